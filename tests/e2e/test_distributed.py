"""Two processes on CPU (torchrun + gloo, through accelerate) train the same weights as one process
with the same global batch: the data sharding, the loss normalisation over all processes and the
gradient synchronisation are right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["model.from_config.n_layer=2", "model.from_config.n_head=2", "model.from_config.n_embd=32",
        "data.max_samples=64", "training.max_steps=4", "training.log_every=1", "training.warmup_ratio=0",
        "logging.num_samples=0", "training.eval_every=4"]


def run(command: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_two_cpu_processes_train_the_same_weights_as_one(tmp_path):
    from safetensors.torch import load_file

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = run([torchrun, "--nproc_per_node", "2", "-m", "rlhf", "sft", "--config", "configs/sft.yaml",
               f"output_dir={tmp_path / 'two'}", "training.batch_size=4", *TINY], {"ACCELERATE_USE_CPU": "true"})
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, "-m", "rlhf", "sft", "--config", "configs/sft.yaml",
               f"output_dir={tmp_path / 'one'}", "training.batch_size=8", *TINY], {})
    assert one.returncode == 0, one.stderr[-3000:]

    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5, msg=name)
    # the evaluation is sharded over the processes and reduced: the same numbers as one process
    import json

    def eval_losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["eval/loss"] for line in lines if "eval/loss" in line]

    losses_two, losses_one = eval_losses(tmp_path / "two"), eval_losses(tmp_path / "one")
    assert len(losses_two) == len(losses_one) == 2 and losses_one[1] < losses_one[0]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
