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
    assert evaluation["num_prompts"] == 8
    assert {"mean", "stderr", "std", "n"} <= set(evaluation["ppo"]["gold"])
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
def test_two_rounds_continue_from_the_previous_policy_on_all_comparisons(tmp_path):
    import yaml

    out = tmp_path / "pipe"
    result = run_cli("pipeline", "--config", "configs/pipeline.yaml", f"output_dir={out}", "rounds=2", *SHRINK)
    assert result.returncode == 0, result.stderr[-3000:]
    round_1 = out / "round-1"
    rm_config = yaml.safe_load((round_1 / "rm" / "config.yaml").read_text())
    ppo_config = yaml.safe_load((round_1 / "ppo" / "config.yaml").read_text())
    # round 1 samples from round 0's PPO policy, retrains the RM on both rounds' comparisons
    # (from the SFT model), and runs PPO again from round 0's PPO policy
    assert rm_config["model"]["name_or_path"] == str(out / "sft" / "final")
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

    def fake_sample(model_path, prompt_ids, num_samples, temperature, *args):
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
