"""The benchmark harness (benchmarks/): the workload check, compare.py's arithmetic on canned result
lines, and the train_runtime_s the trainers log for it. No TRL, no workload, no timing asserted."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
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

def write_workload(root: Path, files: dict[str, bytes], version: int = 1,
                   generated_with: dict | None = None) -> dict[str, str]:
    """A workload of ``files`` with its MANIFEST.json; returns its hashes (to pass as the published ones)."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    hashes = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
    manifest = {"workload_version": version,
                "files": {name: {"sha256": hashes[name], "bytes": len(content)} for name, content in files.items()},
                "generated_with": generated_with or {"tokenizers": "0.23.3", "torch": "2.13.0+cpu"}}
    (root / "MANIFEST.json").write_text(json.dumps(manifest))
    return hashes


FILES = {"sft.jsonl": b'{"prompt": "a", "completion": "b"}\n', "model/config.json": b"{}"}


def test_manifest_check_accepts_the_files_it_lists(tmp_path):
    published = write_workload(tmp_path, FILES)
    assert set(bench_common.verify_workload(tmp_path, published)["files"]) == set(FILES)


def test_manifest_check_names_a_changed_file_and_the_fix(tmp_path):
    published = write_workload(tmp_path, FILES)
    (tmp_path / "model" / "config.json").write_bytes(b'{"n_layer": 7}')
    with pytest.raises(bench_common.WorkloadError,
                       match=r"model/config\.json differs from MANIFEST\.json .*; run make bench-setup$"):
        bench_common.verify_workload(tmp_path, published)


def test_manifest_check_names_a_missing_file(tmp_path):
    published = write_workload(tmp_path, FILES)
    (tmp_path / "sft.jsonl").unlink()
    with pytest.raises(bench_common.WorkloadError, match=r"sft\.jsonl listed in MANIFEST\.json is missing"):
        bench_common.verify_workload(tmp_path, published)


def test_manifest_check_without_a_workload_or_of_another_version(tmp_path):
    with pytest.raises(bench_common.WorkloadError, match=r"MANIFEST\.json not found; run make bench-setup"):
        bench_common.verify_workload(tmp_path / "nowhere")
    write_workload(tmp_path, FILES, version=2)
    with pytest.raises(bench_common.WorkloadError, match="version 2, expected 1"):
        bench_common.verify_workload(tmp_path)


def test_a_workload_generated_by_other_versions_is_named_in_one_line(tmp_path):
    # Faithful to its own MANIFEST.json, but not the published bytes: e.g. another tokenizers release.
    published = write_workload(tmp_path, FILES, generated_with={"tokenizers": "0.99.0", "torch": "2.13.0+cpu"})
    published["sft.jsonl"] = "0" * 64
    with pytest.raises(bench_common.WorkloadError) as error:
        bench_common.verify_workload(tmp_path, published)
    message = str(error.value)
    assert "\n" not in message
    assert f"{tmp_path / 'sft.jsonl'} differs from the published workload (benchmarks/workload.sha256)" in message
    assert "generated with tokenizers 0.99.0, torch 2.13.0+cpu" in message
    assert "requirements-trl116.txt" in message and message.endswith("run make bench-setup")


def test_a_workload_with_files_other_than_the_published_ones_is_refused(tmp_path):
    published = write_workload(tmp_path, FILES)
    with pytest.raises(bench_common.WorkloadError, match=r"ppo\.jsonl is missing \(the published workload has it\)"):
        bench_common.verify_workload(tmp_path, {**published, "ppo.jsonl": "0" * 64})
    del published["sft.jsonl"]
    with pytest.raises(bench_common.WorkloadError, match=r"sft\.jsonl is not part of the published workload"):
        bench_common.verify_workload(tmp_path, published)


def test_by_default_the_check_is_against_the_published_hashes_in_the_repository(tmp_path):
    write_workload(tmp_path, FILES)  # not the real workload: its first file differs from the published one
    with pytest.raises(bench_common.WorkloadError, match=r"model/config\.json differs from the published workload"):
        bench_common.verify_workload(tmp_path)


def test_the_published_hashes_cover_the_whole_workload():
    published = bench_common.read_published_hashes()
    assert sorted(published) == ["model/config.json", "model/generation_config.json", "model/model.safetensors",
                                 "ppo.jsonl", "pref.jsonl", "sft.jsonl", "tokenizer/tokenizer.json",
                                 "tokenizer/tokenizer_config.json"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in published.values())
    # the file is sha256sum's format, so `sha256sum -c` checks a workload with it too
    files = {name: {"sha256": digest, "bytes": 0} for name, digest in published.items()}
    assert bench_common.PUBLISHED_HASHES.read_text().endswith(bench_common.format_published_hashes(files))


def test_a_script_reports_a_bad_workload_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_BENCH_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        bench_common.verified_workload_or_exit()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "MANIFEST.json" in error and "make bench-setup" in error


def test_the_generator_check_mode_names_the_file_that_differs(tmp_path, monkeypatch, capsys):
    import workload  # no torch, tokenizers or transformers at import: it loads them only to generate

    write_workload(tmp_path, FILES)
    assert workload.main(["--check", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "model/config.json differs from the published workload" in error
    # --print-hashes checks the files against their own manifest only, and prints sha256sum lines
    assert workload.main(["--print-hashes", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "".join(
        f"{hashlib.sha256(FILES[name]).hexdigest()}  {name}\n" for name in sorted(FILES))


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


def test_lever_rows_their_steady_state_the_best_row_and_the_targets_line():
    lines = canned_lines() + [
        line(r, "sft", "rlhf", run("tokens_per_s", value, steady_tokens_per_s=value * 1.5), variant="compile")
        for r, value in ((1, 1400), (2, 1300), (3, 1500))] + [
        line(1, "rm", "rlhf", run("pairs_per_s", 5.0, steady_pairs_per_s=7.0), variant="packing")]
    summary = compare.summarize(lines, n_params=10_000_000)
    text = compare.report_text(summary).splitlines()
    compiled = next(row for row in text if row.startswith("| sft | ours, training.compile=true |"))
    assert "| 1,400.00 real tokens/s | 2,100.00 |" in compiled  # the median, then the median steady state
    assert next(row for row in text if row.startswith("| sft | ours |")).split(" | ")[3] == "-"  # none reported
    # The best row is the fastest by the end-to-end median, compilation counted: SFT compiled (1400/950),
    # RM with its defaults (6.0 > 5.0 packed, though packed is faster in steady state), PPO's defaults (5/4).
    assert "ratios (best row): sft=1.47 rm=1.50 ppo=1.25" in text
    targets = next(row for row in text if row.startswith("targets (best row): "))
    assert targets.startswith("targets (best row): sft 1.47x of 2.0x, 42 % of 70 % peak (compile); "
                              "rm 1.50x of 1.5x")
    assert "(defaults)" in targets.split("; ")[1]
    assert text[-1] == "ratios: sft=1.16 rm=1.50 ppo=1.25"  # the last line stays the defaults' ratios


def test_the_plan_runs_each_lever_of_a_stage_unless_told_not_to(tmp_path):
    places = compare.Places(venvs=tmp_path / "venvs", workload=tmp_path / "workload", python=sys.executable)
    plan = compare.run_plan(places, list(compare.STAGES), rounds=1, skip_double=True)
    levers = [(stage, variant, argv[2:]) for _, stage, impl, variant, argv in plan
              if impl == "rlhf" and variant != "1x"]
    assert levers == [("sft", "packing", ["training.packing=true"]), ("sft", "compile", ["training.compile=true"]),
                      ("sft", "fused_ce", ["training.fused_cross_entropy=true"]),
                      ("sft", "untrimmed", ["training.trim_last_block=false"]),
                      ("rm", "packing", ["training.packing=true"]), ("rm", "compile", ["training.compile=true"]),
                      ("rm", "untrimmed", ["training.trim_last_block=false"]), ("ppo", "compile", ["training.compile=true"]),
                      ("ppo", "untrimmed", ["training.trim_last_block=false"])]
    plan = compare.run_plan(places, list(compare.STAGES), rounds=1, skip_double=True, skip_levers=True)
    assert {variant for *_, variant, _ in plan} == {"1x"}


def test_steady_rate_is_the_median_of_the_later_windows(tmp_path):
    records = [{"step": 0, "eval/loss": 1.0}] + [{"step": s, "tokens_per_s": rate}
                                                 for s, rate in ((1, 10.0), (2, 90.0), (3, 100.0), (4, 120.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench_common.steady_rate(tmp_path, "tokens_per_s") == 110.0  # windows 3 and 4: compile time is in 1
    assert bench_common.steady_rate(tmp_path, "episodes_per_s") is None


def test_contaminated_runs_are_flagged_and_footnoted():
    summary = compare.summarize(canned_lines(), n_params=10_000_000)
    assert summary.flagged == [{"round": 2, "stage": "sft", "impl": "rlhf", "variant": "1x", "other_cpu_frac": 0.2}]
    assert summary.group("sft", "rlhf").flags == [False, True, False]
    assert not any(summary.group("sft", "ceiling").flags)  # a line without a cpu measure: never flagged
    text = compare.report_text(summary)
    assert "1,000!" in text and "1,200," in text
    assert "round 2 sft rlhf 1x (0.200)" in text


def test_useful_flops_and_share_of_peak():
    n = 10_000_000
    assert compare.achieved_gflops("sft", {"tokens_per_s": 1000.0}, n) == pytest.approx(6 * n * 1000 / 1e9)
    # Our RM with trim_last_block: the count less the arithmetic it left out, per second of training
    trimmed = {"tokens_per_s": 1000.0, "skipped_gflop": 12.0, "wall_s": 40.0}
    assert compare.achieved_gflops("rm", trimmed, n) == pytest.approx(6 * n * 1000 / 1e9 - 0.3)
    # PPO: 22·N per token over prompt + response, per episode
    assert compare.ppo_flops_per_episode(n, 32, 32) == 22 * n * 64
    assert compare.achieved_gflops("ppo", {"episodes_per_s": 2.0}, n) == pytest.approx(2 * 22 * n * 64 / 1e9)
    trimmed_ppo = {"episodes_per_s": 2.0, "skipped_gflop": 10.0, "wall_s": 50.0}
    assert compare.achieved_gflops("ppo", trimmed_ppo, n) == pytest.approx(2 * 22 * n * 64 / 1e9 - 0.2)
    table = compare.format_table(compare.summarize(canned_lines(), n_params=n))
    sft_row = next(row for row in table.splitlines() if row.startswith("| sft | ours |"))
    assert "| 66.0 | 33 % |" in sft_row  # 6·10M·1100 = 66 GFLOP/s of a 200 GFLOP/s peak


def test_a_stage_not_run_reads_n_a():
    lines = [entry for entry in canned_lines() if entry["stage"] in ("peak", "rm")]
    assert compare.report_text(compare.summarize(lines, 1)).splitlines()[-1] == "ratios: sft=n/a rm=1.50 ppo=n/a"


def test_each_stage_runs_the_optimizer_its_anchor_runs():
    # SFT and RM: torch's default AdamW, as the TRL anchors (they pass optim=adamw_torch);
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
             "generated_tokens_per_s": 26944, "mfu": None},
            {**base, "stage": "sft", "device": "NVIDIA H200", "date": "2026-11-26", "real_tokens_per_s": 99000,
             "steady_tokens_per_s": 180123.4, "label": "compiled"},
            {**base, "stage": "ppo", "device": "NVIDIA H200", "date": "2026-11-26", "episodes_per_s": 70.3,
             "generated_tokens_per_s": 9000, "steady_episodes_per_s": 72.0, "steady_rollout_s": 1.9,
             "steady_update_s": 1.7, "label": "compiled"},
            {**base, "stage": "sft", "device": "NVIDIA H200", "date": "2026-11-26", "real_tokens_per_s": 98000,
             "label": "both counts", "flops": "matmuls+vocabulary+epochs", "tflops": 140.0, "mfu": 0.142,
             "mfu_6n": 0.094}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = compare.gpu_section(path)
    assert "2026-11-26 on NVIDIA H200" in section and "H100" not in section
    # Rows from before the full count have only the 6·N MFU: in its column, the other one n/a.
    assert "| as shipped | sft | 123,456 real tokens/s | n/a | 100.0 (6·N) | n/a | 10.1% | 20 | 9.5 GB |" in section
    assert "| as shipped | ppo | 210.5 episodes/s (26,944 generated tokens/s) | n/a | 100.0 (6·N) | n/a | n/a |" in section
    assert "| compiled | sft | 99,000 real tokens/s | 180,123 tokens/s | 100.0 (6·N) | n/a | 10.1% |" in section
    assert "| both counts | sft | 98,000 real tokens/s | n/a | 140.0 | 14.2% | 9.4% | 20 | 9.5 GB |" in section
    assert ("| compiled | ppo | 70.3 episodes/s (9,000 generated tokens/s) | 72.0 episodes/s (a step: rollout 1.9 s, "
            "update 1.7 s) |") in section
    assert "| rm |" not in section  # not measured in that run
    lines = section.splitlines()
    assert lines.index(next(l for l in lines if "| as shipped | ppo" in l)) < lines.index(
        next(l for l in lines if "| compiled | sft" in l))  # the order measured


def test_gpu_section_shows_the_last_series_across_calls(tmp_path):
    path = tmp_path / "gpu.jsonl"
    base = {"impl": "rlhf", "variant": "gpt2-shaped", "peak_tflops": 989.4, "versions": {"torch": "2.11"},
            "steps": 50, "peak_gpu_mem_gb": 9.5, "tflops": 100.0, "mfu": 0.101, "stage": "sft", "device": "NVIDIA H200",
            "date": "2026-12-04"}
    rows = [{**base, "real_tokens_per_s": 1, "label": "same day, no series"},
            {**base, "real_tokens_per_s": 2, "label": "first call", "series": "b"},
            {**base, "real_tokens_per_s": 3, "label": "second call", "series": "b", "date": "2026-12-05"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = compare.gpu_section(path)
    assert "first call" in section and "second call" in section and "no series" not in section


def test_gpu_flop_counts_add_the_vocabulary_projection_and_every_ppo_epoch():
    gpu = pytest.importorskip("gpu")
    vocabulary = 2 * 768 * 50257  # one token's forward through gpt2's vocabulary projection
    assert gpu.vocabulary_flops_per_token() == vocabulary
    # SFT: 6·N per token; forward and backward of the vocabulary projection on the trained tokens only.
    assert gpu.sft_flops(1000, tokens=300, trained_tokens=200) == 6 * 1000 * 300 + 3 * vocabulary * 200
    # PPO, one epoch, no vocabulary: the CPU table's 22·N·L.
    n, prompt, new = 1000, 90, 10
    one_epoch = gpu.ppo_flops_per_episode(n, prompt, new, ppo_epochs=1)
    assert one_epoch - vocabulary * new * (1 + 2 + 3) == pytest.approx(22 * n * (prompt + new))
    assert gpu.ppo_flops_per_episode_6n(n, prompt, new) == pytest.approx(22 * n * (prompt + new))
    # Four epochs: sampling 2, four scoring forwards 8, and 4 × 12 to train policy and critic.
    four = gpu.ppo_flops_per_episode(n, prompt, new, ppo_epochs=4)
    assert four == pytest.approx((2 + 8 + 48) * n * (prompt + new) + vocabulary * new * (1 + 2 + 12))


def test_gpu_script_overrides_apply_to_every_stage_or_to_the_one_named():
    gpu = pytest.importorskip("gpu")
    assert gpu.stage_overrides(["training.compile=true", "sft:training.batch_size=64", "ppo:ppo.kl_coef=0.1"]) == {
        "sft": ["training.compile=true", "training.batch_size=64"], "rm": ["training.compile=true"],
        "ppo": ["training.compile=true", "ppo.kl_coef=0.1"]}
    assert gpu.stage_overrides(["data.path=a:b"]) == {stage: ["data.path=a:b"] for stage in ("sft", "rm", "ppo")}
    for bad, message in (("dpo:training.lr=1", "must be one of sft, rm, ppo"), ("training.compile", "expected")):
        with pytest.raises(SystemExit, match=message):
            gpu.stage_overrides([bad])


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


# ----------------------------------------------------------------------------- self-contained

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
ANCHOR_SCRIPTS = ["trl_sft.py", "trl_rm.py", "trl_ppo.py", "torch_ceiling.py", "peak_flops.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", [*ANCHOR_SCRIPTS, "harness.py"])
def test_the_anchors_compile_and_never_import_rlhf(name):
    # They run in TRL's venvs, where rlhf is not installed; TRL is not installed here: parse only.
    path = BENCH / "anchors" / name
    compile(path.read_text(encoding="utf-8"), str(path), "exec")  # a syntax error fails here, as py_compile would
    modules = imported_modules(path)
    assert "rlhf" not in modules
    if name != "harness.py":
        source = path.read_text(encoding="utf-8")
        first_import = next(line for line in source.splitlines() if line.startswith(("import ", "from ")))
        assert first_import.startswith("import harness"), "harness must load first: it pins the threads before torch"


def test_the_modules_the_anchors_share_stay_light():
    # benchmarks/common.py and workload.py load in the anchors' venvs and in compare.py: stdlib only at
    # module level (torch, transformers and rlhf are imported inside the functions that need them).
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in (BENCH / "common.py", BENCH / "workload.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert top_level - stdlib <= {"common"}, path.name


def test_compare_runs_scripts_of_this_repository(tmp_path):
    places = compare.Places(venvs=tmp_path / "venvs", workload=tmp_path / "workload", python=sys.executable)
    plan = compare.run_plan(places, list(compare.STAGES), rounds=2, skip_double=False, double_rounds=1)
    scripts = {Path(argv[1]) for *_, argv in plan}
    assert {path.name for path in scripts} == {*ANCHOR_SCRIPTS, "sft.py", "rm.py", "ppo.py"}
    for path in scripts:
        assert path.is_file() and REPO in path.parents, path
    pythons = {argv[0] for *_, argv in plan}
    assert pythons == {sys.executable, str(tmp_path / "venvs" / "trl116" / "bin" / "python"),
                       str(tmp_path / "venvs" / "trl029" / "bin" / "python")}
    # 2x-length only in round 1; the PPO anchor in TRL 0.29.1's venv
    assert [entry[0] for entry in plan if entry[3] == "2x-length"] == [1, 1, 1]
    assert next(argv for _, stage, impl, _, argv in plan if (stage, impl) == ("ppo", "trl"))[0].endswith("trl029/bin/python")


def test_compare_without_the_anchor_venvs_says_make_bench_setup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_VENVS", str(tmp_path / "venvs"))
    monkeypatch.setenv("RLHF_BENCH_DIR", str(tmp_path / "workload"))
    assert compare.main(["--rounds", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.endswith("not found (BENCH_VENVS); run make bench-setup")
    for venv in ("trl116", "trl029"):
        (tmp_path / "venvs" / venv / "bin").mkdir(parents=True)
        (tmp_path / "venvs" / venv / "bin" / "python").touch()
    assert compare.main(["--rounds", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("MANIFEST.json not found; run make bench-setup")


def make_dry_run(target: str, home: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, "HOME": str(home)}
    for name in ("BENCH_VENVS", "RLHF_BENCH_DIR", "BENCH_ARGS", "PYTHON", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(name, None)  # the defaults, also when the tests themselves run under make
    return subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("target", ["bench-setup", "bench"])
def test_make_bench_targets_name_no_path_outside_the_repository_but_the_cache(target, tmp_path):
    cache = tmp_path / ".cache" / "rlhf-bench"
    commands = make_dry_run(target, tmp_path)
    assert "benchmarks/" in commands
    for token in re.findall(r"[^\s\"'=;]*/[^\s\"'=;]*", commands):
        if token.startswith("/"):
            assert token.startswith((str(cache / "venvs"), str(cache / "workload"))), token
        else:
            assert ".." not in Path(token).parts, token
    if target == "bench-setup":
        assert f'BENCH_VENVS="{cache / "venvs"}"' in commands and f'RLHF_BENCH_DIR="{cache / "workload"}"' in commands
        assert ".venv" not in commands  # TRL never enters the project's environment


# What the benchmark used to need from beside the repository; spelt in pieces so that this file does
# not name them itself (tests/unit/test_docs.py looks for such names in every file).
OUTSIDE_NAMES = [".." + "/shared", "shared" + "/bench", "WORKLOAD" + ".md", "RESULTS" + ".md",
                 "RLHF_BENCH_" + "SHARED", "run_" + "anchors"]


def test_nothing_in_the_benchmark_names_files_outside_the_repository():
    paths = [path for path in BENCH.rglob("*") if path.is_file() and path.suffix in {".py", ".sh", ".txt", ".yaml", ".md"}
             and "results" not in path.parts and "__pycache__" not in path.parts]
    paths += [REPO / "Makefile", REPO / "BENCHMARKS.md", REPO / "docs" / "benchmark.md"]
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for outside in OUTSIDE_NAMES:
            assert outside not in text, f"{path.relative_to(REPO)} names {outside}"


def fake_python(path: Path, log: Path, exit_status: int = 0) -> Path:
    """A stand-in interpreter that records its arguments (no venv is built, nothing is downloaded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> "{log}"\nexit {exit_status}\n')
    path.chmod(0o755)
    return path


def test_bench_setup_leaves_built_venvs_alone(tmp_path):
    # A venv whose stamp equals its requirements file counts as built: a second bench-setup only
    # re-checks the workload (the generator, run here by the stand-in, does nothing when it matches).
    venvs, log = tmp_path / "venvs", tmp_path / "calls.log"
    for name in ("trl116", "trl029"):
        fake_python(venvs / name / "bin" / "python", log)
        shutil.copy(BENCH / "anchors" / f"requirements-{name}.txt", venvs / name / "rlhf-bench-requirements.txt")
    env = {**os.environ, "BENCH_VENVS": str(venvs), "RLHF_BENCH_DIR": str(tmp_path / "workload"),
           "PYTHON": str(fake_python(tmp_path / "system" / "python3", log))}
    done = subprocess.run(["bash", str(BENCH / "setup_anchors.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("is up to date") == 2 and "building" not in done.stdout
    calls = log.read_text().splitlines()
    assert [call.split()[0] for call in calls] == [str(tmp_path / "system" / "python3"), str(venvs / "trl116" / "bin" / "python")]
    assert calls[1].endswith(f"benchmarks/workload.py --out {tmp_path / 'workload'}")


def test_bench_setup_refuses_a_python_older_than_trl_needs(tmp_path):
    log = tmp_path / "calls.log"
    env = {**os.environ, "BENCH_VENVS": str(tmp_path / "venvs"), "RLHF_BENCH_DIR": str(tmp_path / "workload"),
           "PYTHON": str(fake_python(tmp_path / "python3.10", log, exit_status=1))}
    done = subprocess.run(["bash", str(BENCH / "setup_anchors.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "need Python >= 3.11" in done.stderr
    assert not (tmp_path / "venvs").exists()


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
    # The loss's units: every trained (predicted) response token, once.
    assert timed[0]["train_units"] == sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
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



# ----------------------------------------------------------------------------- memory.py's section of BENCHMARKS.md

def memory_row(stage: str, mode: str, rss: float, date: str = "2026-12-02") -> dict:
    rate = {"episodes_per_s": 0.5} if stage == "ppo" else {"real_tokens_per_s": 40.0}
    return {"stage": stage, "mode": mode, "peak_rss_mb": rss, "train_runtime_s": 60.0, "date": date, "threads": 2,
            "shape": {"n_layer": 24, "n_embd": 1024, "vocab_size": 50257}, "env": {"cpu_capability": "AVX2"},
            "versions": {"torch": "2.13.0"}, **rate}


def test_memory_table_gives_the_share_of_full_and_the_targets():
    lines = compare.memory_table([memory_row("ppo", "full", 10000), memory_row("ppo", "lora", 3000),
                                  memory_row("sft", "full", 8000), memory_row("sft", "lora_gc", 3600)])
    assert "| glibc default | ppo | lora | 3,000 | 30% | ≤ 35%: met | 0.5 episodes/s | 60.0 |" in lines
    assert "| glibc default | sft | lora_gc | 3,600 | 45% | ≤ 40%: missed | 40.0 real tokens/s | 60.0 |" in lines


def test_memory_section_is_rewritten_in_place_and_kept_by_make_bench(tmp_path):
    results = tmp_path / "memory_results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        memory_row("sft", "full", 9999, date="2026-11-30"),  # an older run: not shown
        memory_row("sft", "full", 8000), memory_row("sft", "lora_gc", 3000)]) + "\n")
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    benchmarks_md.write_text("# Benchmarks\n\nthe CPU table\n")
    compare.update_memory_section(benchmarks_md, results)
    compare.update_memory_section(benchmarks_md, results)  # twice: replaced, not appended again
    text = benchmarks_md.read_text()
    assert text.startswith("# Benchmarks\n\nthe CPU table\n") and text.count(compare.MEMORY_START) == 1
    assert "| sft | lora_gc | 3,000 | 38% |" in text and "9,999" not in text
    assert compare.memory_section(results).strip() in text  # what make bench writes when it regenerates the file
