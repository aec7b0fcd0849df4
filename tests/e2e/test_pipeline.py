"""The whole pipeline, shrunken, through the CLI in a subprocess: every stage's output exists, loads,
and is used by the next; a re-launch skips finished stages; the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHRINK = [
    "sft.model.from_config.n_layer=2", "sft.model.from_config.n_embd=32", "sft.model.from_config.n_head=2",
    "sft.training.max_steps=6", "sft.training.eval_every=3", "sft.training.save_every=3", "sft.data.max_samples=96",
    "sft.logging.num_samples=2",
    "feedback.num_prompts=24", "feedback.max_new_tokens=16", "feedback.batch_size=24",
    "rm.training.max_steps=3", "rm.training.batch_size=8", "rm.training.eval_every=3", "rm.training.save_every=2",
    "ppo.training.max_steps=2", "ppo.ppo.rollout_batch_size=8", "ppo.ppo.forward_batch_size=8",
    "ppo.ppo.num_ppo_epochs=1", "ppo.training.batch_size=4", "ppo.sampling.max_new_tokens=12",
    "ppo.training.save_every=1",
    "evaluation.num_prompts=8", "evaluation.max_new_tokens=12",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.e2e
def test_shrunken_pipeline_runs_chains_and_reports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "pipe"
    result = run_cli("pipeline", "--config", "configs/pipeline.yaml", f"output_dir={out}", *SHRINK)
    assert result.returncode == 0, result.stderr[-3000:]

    # each stage's deliverable exists and loads in plain transformers
    AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
    AutoModelForSequenceClassification.from_pretrained(out / "round-0" / "rm" / "final")
    AutoModelForCausalLM.from_pretrained(out / "round-0" / "ppo" / "final")

    # ... and is what the next stage read
    import yaml

    rm_config = yaml.safe_load((out / "round-0" / "rm" / "config.yaml").read_text())
    ppo_config = yaml.safe_load((out / "round-0" / "ppo" / "config.yaml").read_text())
    assert rm_config["model"]["name_or_path"] == str(out / "sft" / "final")
    assert rm_config["data"]["path"] == str(out / "round-0" / "feedback" / "comparisons.jsonl")
    assert ppo_config["policy"]["name_or_path"] == str(out / "sft" / "final")
    assert ppo_config["reward"]["model_path"] == str(out / "round-0" / "rm" / "final")

    # simulated comparisons in the RM data format
    first = json.loads((out / "round-0" / "feedback" / "comparisons.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "responses", "ranking"} and sorted(first["ranking"]) == list(range(8))
    held_out = [json.loads(l) for l in (out / "round-0" / "feedback" / "eval_pairs.jsonl").read_text().splitlines()]
    assert set(held_out[0]) == {"prompt", "chosen", "rejected"}
    # every pair of 4 responses per held-out prompt, labelled without noise, ties dropped
    from rlhf.demo.gold import gold_score

    assert all(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in held_out)
    per_prompt = [sum(r["prompt"] == p for r in held_out) for p in {r["prompt"] for r in held_out}]
    assert max(per_prompt) <= 6 and len(held_out) > len(per_prompt)

    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_prompts"] == 8 and evaluation["samples_per_prompt"] == 8  # configs/pipeline.yaml's 8
    assert {"mean", "stderr", "std", "n"} <= set(evaluation["ppo"]["gold"]) and evaluation["ppo"]["gold"]["n"] == 64
    assert evaluation["kl_ppo_to_sft"]["n"] == 64 and evaluation["kl_ppo_to_sft"]["mean"] > -1.0
    assert 0.0 <= evaluation["win_rate_ppo_over_sft"] <= 1.0
    ppo_metrics = [json.loads(l) for l in (out / "round-0" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert "gold/mean" in ppo_metrics[-1]
    report = (out / "report.md").read_text()
    assert "Held-out evaluation" in report and "Win rate" in report

    # a re-launch skips every finished stage (and rebuilds the report)
    before = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    again = run_cli("pipeline", "--config", "configs/pipeline.yaml", f"output_dir={out}", *SHRINK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") >= 3
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == before

    # a PPO stage interrupted after its step-1 checkpoint resumes from it; the earlier stages are skipped
    import shutil

    shutil.rmtree(out / "round-0" / "ppo" / "final")
    assert (out / "round-0" / "ppo" / "checkpoints" / "step-1").is_dir()
    resumed = run_cli("pipeline", "--config", "configs/pipeline.yaml", f"output_dir={out}", *SHRINK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round-0/ppo: resuming" in resumed.stderr and resumed.stderr.count("skipped") >= 2
    AutoModelForCausalLM.from_pretrained(out / "round-0" / "ppo" / "final")


@pytest.mark.e2e
@pytest.mark.parametrize("reward_model", ["retrain", "continue"])
def test_two_rounds_continue_from_the_previous_policy_on_all_comparisons(tmp_path, reward_model):
    import yaml

    out = tmp_path / "pipe"
    result = run_cli("pipeline", "--config", "configs/pipeline.yaml", f"output_dir={out}", "rounds=2",
                     f"iteration.reward_model={reward_model}", "iteration.rm_epochs=2", *SHRINK)
    assert result.returncode == 0, result.stderr[-3000:]
    round_1 = out / "round-1"
    rm_config = yaml.safe_load((round_1 / "rm" / "config.yaml").read_text())
    ppo_config = yaml.safe_load((round_1 / "ppo" / "config.yaml").read_text())
    # round 1 samples from round 0's PPO policy, trains the RM on both rounds' comparisons (a new one
    # from the SFT model, or round 0's continued, head and all), and runs PPO again from round 0's PPO policy
    if reward_model == "retrain":
        assert rm_config["model"]["name_or_path"] == str(out / "sft" / "final") and rm_config["head_init"] == "normal"
    else:
        assert rm_config["model"]["name_or_path"] == str(out / "round-0" / "rm" / "final")
        assert rm_config["head_init"] == "keep"
    assert rm_config["training"]["num_epochs"] == 2.0
    round_0_rm = yaml.safe_load((out / "round-0" / "rm" / "config.yaml").read_text())
    assert round_0_rm["training"]["num_epochs"] == 5.0 and round_0_rm["head_init"] == "normal"
    assert rm_config["data"]["path"] == str(round_1 / "feedback" / "comparisons_all.jsonl")
    lines = lambda path: len(path.read_text().splitlines())  # noqa: E731
    assert lines(round_1 / "feedback" / "comparisons_all.jsonl") == (
        lines(out / "round-0" / "feedback" / "comparisons.jsonl") + lines(round_1 / "feedback" / "comparisons.jsonl"))
    assert ppo_config["policy"]["name_or_path"] == str(out / "round-0" / "ppo" / "final")
    assert ppo_config["reward"]["model_path"] == str(round_1 / "rm" / "final")
    # the held-out pairs are the same in every round, so RM accuracy compares across rounds
    assert (round_1 / "feedback" / "eval_pairs.jsonl").read_text() == (
        out / "round-0" / "feedback" / "eval_pairs.jsonl").read_text()
    assert "round 1" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_bench_pipeline_prints_the_time_of_every_stage_and_the_results(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "scripts/bench_pipeline.py", "--output-dir", str(tmp_path / "bench"),
                             "evaluation.samples_per_prompt=2", *SHRINK], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line["seconds_per_stage"]) == {"sft", "round-0/feedback", "round-0/rm", "round-0/ppo", "evaluation"}
    assert all(seconds > 0 for seconds in line["seconds_per_stage"].values())
    assert line["eval_samples_per_policy"] == 16 and line["total_s"] >= sum(line["seconds_per_stage"].values())
    assert {"gold_sft", "gold_ppo", "win_rate", "gold_gain_in_sft_std", "kl_ppo_to_sft", "peak_rss_mb"} <= set(line)


def test_pipeline_config_error_is_one_line(tmp_path):
    result = run_cli("pipeline", "--config", "configs/pipeline.yaml", "rm.trainng.lr=1")
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines == [l for l in lines if "error" in l][-1:] and "rm.training" in lines[-1]
    assert "Traceback" not in result.stderr


def test_feedback_samples_at_the_ppo_temperature_unless_set_and_a_change_recollects(tmp_path, monkeypatch):
    from rlhf import pipeline
    from rlhf.config import PipelineConfig, load_config

    temperatures = []

    def fake_sample(model_path, prompt_ids, num_samples, temperature, *args, **kwargs):
        temperatures.append(temperature)
        # Different gold scores (each repeated word costs), so the labeler has preferences to give.
        return [["The old harbor is" + " calm" * (i + 1) + "." for i in range(num_samples)] for _ in prompt_ids]

    monkeypatch.setattr(pipeline, "sample_responses", fake_sample)
    tokenizer = os.path.join(ROOT, "data", "demo", "tokenizer")
    base = [f"feedback.prompts={ROOT}/data/demo/prompts_train.jsonl", "feedback.num_prompts=4"]

    def collect(*overrides):
        config = load_config(PipelineConfig, os.path.join(ROOT, "configs", "pipeline.yaml"), base + list(overrides))
        return pipeline.collect_comparisons(config, tokenizer, str(tmp_path), 0)[1]

    assert collect("ppo.sampling.temperature=0.9") and temperatures[-1] == 0.9
    assert not collect("ppo.sampling.temperature=0.9")        # unchanged: the cached comparisons are reused
    assert collect("ppo.sampling.temperature=0.6") and temperatures[-1] == 0.6  # PPO's changed: re-collected
    assert collect("feedback.temperature=1.0") and temperatures[-1] == 1.0


def test_evaluation_summary_takes_the_standard_error_over_prompt_means():
    from rlhf.pipeline import summary

    # one sample per prompt: the usual std / sqrt(n)
    one = summary([1.0, 2.0, 3.0, 6.0])
    assert one["mean"] == 3.0 and one["std"] == pytest.approx(2.160247, abs=1e-6)
    assert one["stderr"] == pytest.approx(2.160247 / 2, abs=1e-6) and one["n"] == 4
    # two prompts, two samples each: prompt means 1.5 and 4.5, std 2.1213, s.e. 2.1213 / sqrt(2) = 1.5
    two = summary([1.0, 2.0, 3.0, 6.0], groups=[0, 0, 1, 1])
    assert two["mean"] == 3.0 and two["std"] == one["std"] and two["stderr"] == pytest.approx(1.5)


def test_kl_to_reference_is_zero_against_itself_and_sums_only_response_tokens(tokenizer_dir, tmp_path):
    import torch

    from rlhf.config import ArchitectureConfig, ModelConfig
    from rlhf.generation import sample_with_logprobs
    from rlhf.models import load_causal_lm
    from rlhf.pipeline import kl_to_reference, sample_responses

    model, tokenizer = load_causal_lm(ModelConfig(
        from_config=ArchitectureConfig(n_layer=1, n_head=2, n_embd=16, n_positions=64), tokenizer=tokenizer_dir))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model.eval()
    prompts = torch.tensor([[5, 6, 7], [tokenizer.pad_token_id, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    tokens, logprobs = sample_with_logprobs(model, prompts, mask, 6, 0.7, 0, 1.0, tokenizer.eos_token_id,
                                            tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    # the same model as reference: every per-token log ratio is 0 up to float rounding
    same = kl_to_reference([(prompts, mask, tokens, logprobs)], str(tmp_path / "m"), 0.7)
    assert len(same) == 2 and all(abs(v) < 1e-4 for v in same)
    # a response ending at its third token, π's logprobs all 0: -Σ of the reference's logprobs of the
    # three tokens up to and including the EOS, nothing after it (oracle: a plain forward)
    tokens[0, 2] = tokenizer.eos_token_id
    kl = kl_to_reference([(prompts, mask, tokens, torch.zeros_like(logprobs))], str(tmp_path / "m"), 0.7)
    with torch.no_grad():
        logits = model(torch.cat([prompts[0], tokens[0, :3]]).unsqueeze(0)).logits[0, 2:5] / 0.7
    expected = -logits.log_softmax(-1).gather(1, tokens[0, :3].unsqueeze(1)).sum()
    assert kl[0] == pytest.approx(float(expected), abs=1e-4)

    # kept samples carry their prompts' indices: drawn batch by batch of prompts, every prompt of a
    # batch once per pass
    kept = []
    sample_responses(str(tmp_path / "m"), [[5, 6], [7], [8, 9], [10], [11]], 2, 0.7, 4, 3, 0, keep=kept)
    assert [index for indices, _ in kept for index in indices] == [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]
    assert [batch[2].shape[0] for _, batch in kept] == [3, 3, 2, 2]
