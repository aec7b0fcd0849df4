"""The benchmark harness (benchmarks/): the workload check, compare.py's arithmetic on canned result
lines, and the train_runtime_s the trainers log for it. No TRL, no workload, no timing asserted."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from pathlib import Path

import datasets
import pytest

# The benchmark scripts import their helpers as siblings (`import common`), as run from benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common as bench_common  # noqa: E402
import compare  # noqa: E402

from tests.conftest import make_rows, tiny_sft_config  # noqa: E402


# ----------------------------------------------------------------------------- the workload check

def write_workload(root: Path, files: dict[str, bytes], version: int = 1) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    manifest = {"workload_version": version,
                "files": {name: {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
                          for name, content in files.items()}}
    (root / "MANIFEST.json").write_text(json.dumps(manifest))


FILES = {"sft.jsonl": b'{"prompt": "a", "completion": "b"}\n', "model/config.json": b"{}"}


def test_manifest_check_accepts_the_files_it_lists(tmp_path):
    write_workload(tmp_path, FILES)
    assert set(bench_common.verify_workload(tmp_path)["files"]) == set(FILES)


def test_manifest_check_names_a_changed_file_and_the_fix(tmp_path):
    write_workload(tmp_path, FILES)
    (tmp_path / "model" / "config.json").write_bytes(b'{"n_layer": 7}')
    with pytest.raises(bench_common.WorkloadError, match=r"model/config\.json differs .*bash \.\./shared/bench/setup\.sh"):
        bench_common.verify_workload(tmp_path)


def test_manifest_check_names_a_missing_file(tmp_path):
    write_workload(tmp_path, FILES)
    (tmp_path / "sft.jsonl").unlink()
    with pytest.raises(bench_common.WorkloadError, match=r"sft\.jsonl listed in MANIFEST\.json is missing"):
        bench_common.verify_workload(tmp_path)


def test_manifest_check_without_a_workload_or_of_another_version(tmp_path):
    with pytest.raises(bench_common.WorkloadError, match=r"MANIFEST\.json not found; run bash"):
        bench_common.verify_workload(tmp_path / "nowhere")
    write_workload(tmp_path, FILES, version=2)
    with pytest.raises(bench_common.WorkloadError, match="version 2, expected 1"):
        bench_common.verify_workload(tmp_path)


def test_a_script_reports_a_bad_workload_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_BENCH_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        bench_common.verified_workload_or_exit()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "MANIFEST.json" in error and "setup.sh" in error


def test_doubled_rows_repeat_only_the_text_fields():
    row = {"prompt": "Hi there", "chosen": "yes", "id": 3}
    assert bench_common.doubled(row, ("prompt", "chosen")) == {"prompt": "Hi there Hi there", "chosen": "yes yes", "id": 3}


# ----------------------------------------------------------------------------- compare.py's table (pure)

def line(round_index, stage, impl, result, variant="1x"):
    return {"round": round_index, "stage": stage, "impl": impl, "variant": variant, "command": [], "result": result}


def run(throughput_key, value, wall=10.0, rss=1000.0, other=0.01, **extra):
    result = {throughput_key: value, "wall_s": wall, "peak_rss_mb": rss, **extra}
    if other is not None:
        result["cpu"] = {"other_cpu_frac": other}
    return result


def canned_lines() -> list[dict]:
    """Three rounds of SFT (ours, TRL, ceiling, ours 2x), one of RM and PPO, and one peak measurement."""
    lines = [line(0, "peak", "peak", {"results": [{"n": 1024, "gflops_median": 200.0}, {"n": 2048, "gflops_median": 180.0}]})]
    for r, (ours, trl, ceiling) in enumerate([(1200, 1000, 1600), (1000, 900, 1500), (1100, 950, 1550)], 1):
        lines += [line(r, "sft", "rlhf", run("tokens_per_s", ours, wall=r, other=0.2 if r == 2 else 0.01)),
                  line(r, "sft", "trl", run("tokens_per_s", trl, rss=2000.0)),
                  line(r, "sft", "ceiling", run("tokens_per_s", ceiling, other=None)),
                  line(r, "sft", "rlhf", run("tokens_per_s", 900), variant="2x-length")]
    lines += [line(1, "rm", "rlhf", run("pairs_per_s", 6.0, tokens_per_s=2000.0)),
              line(1, "rm", "trl", run("pairs_per_s", 4.0, tokens_per_s=1500.0)),
              line(1, "ppo", "rlhf", run("episodes_per_s", 5.0, prompt_tokens_per_episode=32, new_tokens_per_episode=32)),
              line(1, "ppo", "trl", run("episodes_per_s", 4.0))]
    return lines


def test_medians_ratios_and_the_ratios_line():
    summary = compare.summarize(canned_lines(), n_params=10_000_000)
    sft = summary.group("sft", "rlhf")
    assert sft.throughput == 1100 and compare.median_or_none(sft.walls) == 2.0  # medians over the three rounds
    assert compare.median_or_none(summary.group("sft", "trl").rss) == 2000.0
    assert summary.peak_gflops == 200.0  # the best per-size median
    # ours ÷ TRL: 1100/950, 6/4, 5/4
    last = compare.report_text(summary).splitlines()[-1]
    assert last == "ratios: sft=1.16 rm=1.50 ppo=1.25"
    assert re.fullmatch(r"ratios: sft=\d+\.\d\d rm=\d+\.\d\d ppo=\d+\.\d\d", last)
    assert compare.ratio_line(summary, "ours ÷ ceiling", over="ceiling") == "ours ÷ ceiling: sft=0.71 rm=n/a ppo=n/a"
    assert summary.ratio("sft", "rlhf", "2x-length", over="rlhf") == pytest.approx(900 / 1100)


def test_contaminated_runs_are_flagged_and_footnoted():
    summary = compare.summarize(canned_lines(), n_params=10_000_000)
    assert summary.flagged == [{"round": 2, "stage": "sft", "impl": "rlhf", "variant": "1x", "other_cpu_frac": 0.2}]
    assert summary.group("sft", "rlhf").flags == [False, True, False]
    assert not any(summary.group("sft", "ceiling").flags)  # the ceiling does not measure it: never flagged
    text = compare.report_text(summary)
    assert "1,000!" in text and "1,200," in text
    assert "round 2 sft rlhf 1x (0.200)" in text


def test_useful_flops_and_share_of_peak():
    n = 10_000_000
    assert compare.achieved_gflops("sft", {"tokens_per_s": 1000.0}, n) == pytest.approx(6 * n * 1000 / 1e9)
    # PPO: 22·N per token over prompt + response, per episode
    assert compare.ppo_flops_per_episode(n, 32, 32) == 22 * n * 64
    assert compare.achieved_gflops("ppo", {"episodes_per_s": 2.0}, n) == pytest.approx(2 * 22 * n * 64 / 1e9)
    table = compare.format_table(compare.summarize(canned_lines(), n_params=n))
    sft_row = next(row for row in table.splitlines() if row.startswith("| sft | ours |"))
    assert "| 66.0 | 33 % |" in sft_row  # 6·10M·1100 = 66 GFLOP/s of a 200 GFLOP/s peak


def test_a_stage_not_run_reads_n_a():
    lines = [entry for entry in canned_lines() if entry["stage"] in ("peak", "rm")]
    assert compare.report_text(compare.summarize(lines, 1)).splitlines()[-1] == "ratios: sft=n/a rm=1.50 ppo=n/a"


def test_each_stage_runs_the_optimizer_its_anchor_runs():
    # SFT and RM: torch's default AdamW, as WORKLOAD.md and the TRL anchors (optim=adamw_torch);
    # PPO: the fused kernel, which TRL's PPO anchor gets from transformers' default.
    from rlhf.config import PPOConfig, RewardConfig, SFTConfig, from_dict, read_yaml
    from rlhf.training import fused_adamw_available

    configs = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig}
    manifest = {"files": {"model/model.safetensors": {"sha256": "0" * 64}}}
    fused_name = "adamw_torch_fused" if fused_adamw_available("cpu") else "adamw_torch"
    for stage, expected in (("sft", "adamw_torch"), ("rm", "adamw_torch"), ("ppo", fused_name)):
        path = str(bench_common.CONFIG_DIR / f"{stage}.yaml")  # paths are filled in by the scripts: no validate()
        config = from_dict(configs[stage], read_yaml(path), source=path)
        assert bench_common.run_fields(manifest, {}, 2, config.training)["optim"] == expected, stage


def test_gpu_section_shows_the_last_gpu_run_and_nothing_without_one(tmp_path):
    path = tmp_path / "gpu.jsonl"
    assert compare.gpu_section(path) == ""
    base = {"impl": "rlhf", "variant": "gpt2-shaped", "peak_tflops": 989.4, "versions": {"torch": "2.11"},
            "steps": 20, "peak_gpu_mem_gb": 9.5, "tflops": 100.0, "mfu": 0.101}
    old = {**base, "stage": "sft", "device": "NVIDIA H100", "date": "2026-11-01", "real_tokens_per_s": 1}
    rows = [old,
            {**base, "stage": "sft", "device": "NVIDIA H200", "date": "2026-11-26", "real_tokens_per_s": 123456},
            {**base, "stage": "ppo", "device": "NVIDIA H200", "date": "2026-11-26", "episodes_per_s": 210.5,
             "generated_tokens_per_s": 26944, "mfu": None}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = compare.gpu_section(path)
    assert "2026-11-26 on NVIDIA H200" in section and "H100" not in section
    assert "| sft | 123,456 real tokens/s | 100.0 | 10.1% | 20 | 9.5 GB |" in section
    assert "| ppo | 210.5 episodes/s (26,944 generated tokens/s) | 100.0 | n/a |" in section
    assert "| rm |" not in section  # not measured in that run


def test_non_embedding_params_from_the_safetensors_header(tmp_path):
    d, layers = 8, 2
    shapes = {"transformer.wte.weight": [100, d], "transformer.wpe.weight": [16, d],
              "transformer.ln_f.weight": [d], "transformer.ln_f.bias": [d]}
    for i in range(layers):
        shapes |= {f"transformer.h.{i}.attn.c_attn.weight": [d, 3 * d], f"transformer.h.{i}.attn.c_attn.bias": [3 * d],
                   f"transformer.h.{i}.mlp.c_fc.weight": [d, 4 * d]}
    header = json.dumps({"__metadata__": {"format": "pt"},
                         **{name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert compare.non_embedding_params(tmp_path) == 2 * d + layers * (3 * d * d + 3 * d + 4 * d * d)


def test_a_crashed_run_names_its_command_and_stderr(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import sys\nprint('starting')\nsys.exit('out of memory in step 3')\n")
    with pytest.raises(compare.BenchError, match=r"crash\.py` failed \(exit 1\); stderr tail:\nout of memory in step 3"):
        compare.run_one([sys.executable, str(script)])
    script.write_text('print("log"); print(\'{"tokens_per_s": 5}\')\n')
    assert compare.run_one([sys.executable, str(script)]) == {"tokens_per_s": 5}


# ----------------------------------------------------------------------------- train_runtime_s

def test_supervised_loop_logs_train_runtime_and_tokens_with_its_last_step(tokenizer_dir, sft_files, tmp_path):
    from rlhf.data import load_sft_examples
    from rlhf.models import load_tokenizer
    from rlhf.trainers.sft import SFTTrainer

    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), num_epochs=1, log_every=3,
                             eval_every=4, save_every=4)
    config.logging.num_samples = 0
    SFTTrainer(config).train()
    records = bench_common.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    timed = [r for r in records if "train_runtime_s" in r]
    assert len(timed) == 1 and timed[0]["step"] == 8 and "loss" in timed[0]  # the last training line, eval after it
    assert timed[0]["train_runtime_s"] > 0
    examples, _ = load_sft_examples(config.data, load_tokenizer(config.model), 64, 0)
    assert timed[0]["train_tokens"] == sum(len(e["input_ids"]) for e in examples)  # every real token, once
    assert bench_common.training_record(tmp_path / "run") == timed[0]


def test_ppo_logs_train_runtime_episodes_and_generated_tokens_with_its_last_step(tokenizer_dir, tmp_path):
    from rlhf.config import (ArchitectureConfig, CriticConfig, LoggingConfig, ModelConfig, PPOConfig,
                             PPOHyperparameters, PromptDataConfig, RewardSourceConfig, SamplingConfig, TrainingConfig)
    from rlhf.trainers.ppo import PPOTrainer

    config = PPOConfig(
        output_dir=str(tmp_path / "run"),
        policy=ModelConfig(from_config=ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64),
                           tokenizer=tokenizer_dir),
        reward=RewardSourceConfig(function="unused:passed_in"), critic=CriticConfig(init="policy"),
        data=PromptDataConfig(path="unused: prompts are passed in"),
        sampling=SamplingConfig(max_new_tokens=5), ppo=PPOHyperparameters(rollout_batch_size=4, num_minibatches=2),
        training=TrainingConfig(max_steps=2, batch_size=2, log_every=1, save_every=1), logging=LoggingConfig(num_samples=0))
    prompts = datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in make_rows(8)])
    PPOTrainer(config, reward_fn=lambda p, r: [1.0] * len(r), prompts=prompts).train()
    records = bench_common.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [("train_runtime_s" in r) for r in records] == [False, True]
    last = records[-1]
    assert last["train_runtime_s"] > 0 and last["train_episodes"] == 8
    assert 8 <= last["train_generated_tokens"] <= 8 * 5  # each response has 1 to max_new_tokens real tokens

