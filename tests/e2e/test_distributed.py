"""Two processes on CPU (torchrun + gloo, through accelerate) train the same weights as one process with
the same global batch, in every stage, with and without LoRA: the data sharding, the loss normalisation
over all processes, the gradient reduction and (PPO) the whitening over all processes are right.

Each stage runs from its shipped demo config, shrunk to a 2-layer, width-32 GPT-2 and a few steps; the
reward model starts from the one-process SFT run, PPO from the SFT and reward model runs. PPO samples
greedily (top_k=1, so its episodes do not depend on the process's random stream) with one minibatch
per epoch (a minibatch is then the whole rollout, however the processes split it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

TINY_MODEL = ["model.from_config.n_layer=2", "model.from_config.n_head=2", "model.from_config.n_embd=32"]
COMMON = ["training.log_every=1", "training.warmup_ratio=0", "logging.num_samples=0"]
LORA = {"sft": ["model.lora.rank=4", "model.lora.alpha=8", "training.lr=1e-2"],
        "rm": ["model.lora.rank=4", "model.lora.alpha=8"],
        "ppo": ["policy.lora.rank=4", "policy.lora.alpha=8", "critic.lora.rank=4", "critic.lora.alpha=8"]}
# Per stage: the overrides of both runs, then the batch key whose value is per process.
STAGES = {
    "sft": (TINY_MODEL + ["data.max_samples=64", "training.max_steps=4", "training.eval_every=4"],
            "training.batch_size", 4),
    "rm": (["data.max_samples=96", "training.max_steps=3", "training.eval_every=3", "training.save_every=null",
            "training.lr=1e-3"], "training.batch_size", 4),
    "ppo": (["data.max_samples=32", "training.max_steps=2", "training.save_every=null", "sampling.top_k=1",
             "sampling.max_new_tokens=8", "ppo.num_minibatches=1", "ppo.num_ppo_epochs=2", "training.lr=1e-3",
             "training.batch_size=2", "ppo.forward_batch_size=4"],
            "ppo.rollout_batch_size", 4),
}


def launch(command: list[str], processes: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        command = [TORCHRUN, "--nproc_per_node", str(processes), *command]
    else:
        command = [sys.executable, *command]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]


def run_one_and_two(stage: str, root, name: str, extra: list[str]) -> tuple:
    """The stage once on 1 process with batch 2b and once on 2 processes with batch b each, side by side."""
    overrides, batch_key, batch = STAGES[stage]
    runs = {}
    for processes in (1, 2):
        output_dir = root / f"{name}-{processes}"
        runs[processes] = (output_dir, launch(
            ["-m", "rlhf", stage, "--config", f"configs/{stage}.yaml", f"output_dir={output_dir}",
             f"{batch_key}={batch * 2 // processes}", *overrides, *COMMON, *extra], processes))
    for _, process in runs.values():
        finish(process)
    return runs[1][0], runs[2][0]


def assert_same_weights(one, two, subdir: str = "final", atol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    weights_one = load_file(one / subdir / "model.safetensors")
    weights_two = load_file(two / subdir / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=atol, msg=name)


def metric(run_dir, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One-process SFT and reward model runs of the tiny demo model, the inputs of the later stages."""
    root = tmp_path_factory.mktemp("upstream")
    sft_overrides, _, _ = STAGES["sft"]
    finish(launch(["-m", "rlhf", "sft", "--config", "configs/sft.yaml", f"output_dir={root / 'sft'}",
                   "training.batch_size=8", *sft_overrides, *COMMON], 1))
    rm_overrides, _, _ = STAGES["rm"]
    finish(launch(["-m", "rlhf", "rm", "--config", "configs/rm.yaml", f"output_dir={root / 'rm'}",
                   f"model.name_or_path={root / 'sft' / 'final'}", "training.batch_size=8", *rm_overrides,
                   *COMMON], 1))
    return root / "sft" / "final", root / "rm" / "final"


@pytest.mark.e2e
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_two_processes_train_the_same_weights_as_one(tmp_path, lora):
    one, two = run_one_and_two("sft", tmp_path, "sft", LORA["sft"] if lora else [])
    assert_same_weights(one, two)
    # the evaluation is sharded over the processes and reduced: the same numbers as one process
    losses_one, losses_two = metric(one, "eval/loss"), metric(two, "eval/loss")
    assert len(losses_one) == 2 and losses_one[1] < losses_one[0]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    assert metric(two, "loss") == pytest.approx(metric(one, "loss"), abs=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward_model_two_processes_train_the_same_weights_as_one(upstream, tmp_path, lora):
    sft_final, _ = upstream
    one, two = run_one_and_two("rm", tmp_path, "rm", [f"model.name_or_path={sft_final}", *(LORA["rm"] if lora else [])])
    # 5e-5: the last block's feed-forward gets its gradient from the EOS rows alone (training.trim_last_block), and
    # Adam (lr 1e-3) scales every element's update to about lr however small its gradient, so the rounding of the two
    # layouts' reductions reaches those weights at up to ~2e-5 (1.6e-5 untrimmed, 1.9e-5 trimmed, measured).
    assert_same_weights(one, two, atol=5e-5)
    assert metric(two, "loss") == pytest.approx(metric(one, "loss"), abs=1e-5)
    assert metric(two, "eval/accuracy") == pytest.approx(metric(one, "eval/accuracy"), abs=1e-6)
    # The normalisation is fitted over every process's share: the same statistics.
    assert metric(two, "normalization/mean") == pytest.approx(metric(one, "normalization/mean"), abs=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_two_processes_train_the_same_weights_as_one(upstream, tmp_path, lora):
    sft_final, rm_final = upstream
    one, two = run_one_and_two("ppo", tmp_path, "ppo", [f"policy.name_or_path={sft_final}",
                                                         f"reward.model_path={rm_final}", *(LORA["ppo"] if lora else [])])
    assert_same_weights(one, two, atol=1e-4)
    assert_same_weights(one, two, "value_model", atol=1e-4)
    from safetensors.torch import load_file

    start, tuned = load_file(sft_final / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    assert max((tuned[name] - start[name]).abs().max().item() for name in start) > 1e-4  # not equal by standing still
    for key in ("reward/mean", "kl", "policy_loss", "value_loss"):
        assert metric(two, key) == pytest.approx(metric(one, key), abs=1e-4), key
