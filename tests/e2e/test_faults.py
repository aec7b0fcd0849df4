"""Hard faults on the real command line: ``kill -9`` inside a checkpoint write and inside the final save,
for every stage, and SIGTERM to a 2-process run. After each, the newest complete checkpoint is the one
resumed from, no half-written final/ exists, and the resumed run ends bitwise equal to an unbroken one.

The kill is placed by the test hook ``RLHF_TEST_KILL_AT`` (``rlhf.training.fault_point``): the process
SIGKILLs itself after a checkpoint's files are written but before it is marked complete, or after
final/'s files are written but before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.from_config.n_layer=2", "model.from_config.n_head=2", "model.from_config.n_embd=32"]
STAGES = {  # overrides that make each demo config a few seconds' run with checkpoints at steps 2 and 4
    "sft": TINY + ["data.max_samples=96", "training.max_steps=6", "training.batch_size=8", "training.eval_every=null"],
    "rm": ["data.max_samples=96", "training.max_steps=6", "training.batch_size=8", "training.eval_every=null"],
    "ppo": ["data.max_samples=64", "training.max_steps=6", "ppo.rollout_batch_size=8", "ppo.forward_batch_size=8",
            "ppo.num_ppo_epochs=1", "training.batch_size=4", "sampling.max_new_tokens=8"],
}
COMMON = ["training.save_every=2", "training.keep_checkpoints=5", "logging.num_samples=1", "training.log_every=1"]
FINALS = {"sft": ["final"], "rm": ["final"], "ppo": ["final", "value_model"]}


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def rlhf(stage: str, output_dir, inputs: list[str], *extra: str, kill_at: str | None = None,
         processes: int = 1) -> subprocess.Popen:
    command = ["-m", "rlhf", stage, "--config", f"configs/{stage}.yaml", f"output_dir={output_dir}",
               *STAGES[stage], *COMMON, *inputs, *extra]
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    extra_env = {"RLHF_TEST_KILL_AT": kill_at} if kill_at else {}
    if processes > 1:
        extra_env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.Popen(launcher + command, cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def complete(run_dir) -> list[str]:
    checkpoints = run_dir / "checkpoints"
    return sorted(name for name in os.listdir(checkpoints) if (checkpoints / name / "trainer_state.json").is_file()) \
        if checkpoints.is_dir() else []


def weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def assert_same(expected_dir, actual_dir, names: list[str]) -> None:
    for name in names:
        expected, actual = weights(expected_dir / name), weights(actual_dir / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name


def kill_in_saves_then_resume(stage: str, root, inputs: list[str]):
    """Unbroken run beside a run killed while writing its step-4 checkpoint, whose resume is killed while
    writing final/, whose resume then finishes."""
    unbroken = rlhf(stage, root / "unbroken", inputs)
    code, stderr = finish(rlhf(stage, root / "broken", inputs, kill_at="checkpoint@4"))
    assert code == -signal.SIGKILL, stderr[-2000:]
    broken = root / "broken"
    assert complete(broken) == ["step-2"]  # step 4's files are there but it was never marked complete
    assert any(name.startswith(".tmp-step-4") for name in os.listdir(broken / "checkpoints"))
    assert not (broken / "final").exists()

    code, stderr = finish(rlhf(stage, broken, inputs, "--resume", kill_at="final"))
    assert code == -signal.SIGKILL, stderr[-2000:]
    assert f"resumed from {broken / 'checkpoints' / 'step-2'}" in (broken / "run.log").read_text()
    assert not (broken / "final").exists()  # killed before the rename: no half-written final/
    assert any(name.startswith(".tmp-final") for name in os.listdir(broken))
    assert complete(broken) == ["step-2", "step-4"]

    code, stderr = finish(rlhf(stage, broken, inputs, "--resume"))
    assert code == 0, stderr[-2000:]
    assert f"resumed from {broken / 'checkpoints' / 'step-4'}" in (broken / "run.log").read_text()
    assert not [name for name in os.listdir(broken) if name.startswith((".tmp-", ".old-"))]  # leftovers removed
    code, stderr = finish(unbroken)
    assert code == 0, stderr[-2000:]
    assert_same(root / "unbroken", broken, FINALS[stage])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The SFT and reward model runs the later stages start from (the unbroken runs of the tests below)."""
    return tmp_path_factory.mktemp("faults")


@pytest.mark.e2e
def test_sft_killed_inside_its_saves_resumes_bitwise(chain):
    kill_in_saves_then_resume("sft", chain / "sft", [])


@pytest.mark.e2e
def test_reward_model_killed_inside_its_saves_resumes_bitwise(chain):
    sft_final = chain / "sft" / "unbroken" / "final"
    if not sft_final.is_dir():
        pytest.skip("needs the SFT test's run")
    kill_in_saves_then_resume("rm", chain / "rm", [f"model.name_or_path={sft_final}"])


@pytest.mark.e2e
def test_ppo_killed_inside_its_saves_resumes_bitwise(chain):
    sft_final, rm_final = chain / "sft" / "unbroken" / "final", chain / "rm" / "unbroken" / "final"
    if not rm_final.is_dir():
        pytest.skip("needs the SFT and reward model tests' runs")
    kill_in_saves_then_resume("ppo", chain / "ppo", [f"policy.name_or_path={sft_final}", f"reward.model_path={rm_final}"])


@pytest.mark.e2e
def test_sigterm_to_a_two_process_run_checkpoints_and_resumes_bitwise(tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption): it passes the signal to both workers, which agree
    on the step to stop after, checkpoint it together and exit 143; a 2-process resume ends as the
    unbroken 2-process run."""
    extra = ["training.max_steps=12", "training.save_every=4"]
    unbroken = rlhf("sft", tmp_path / "unbroken", extra, processes=2)
    broken = rlhf("sft", tmp_path / "broken", extra, processes=2)
    deadline = time.monotonic() + 300
    log = tmp_path / "broken" / "metrics.jsonl"
    while not (log.is_file() and any(json.loads(line)["step"] >= 2 for line in log.read_text().splitlines() if line)):
        assert broken.poll() is None and time.monotonic() < deadline, broken.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(broken.pid, signal.SIGTERM)  # torchrun and its workers, as a scheduler signals a job
    code, stderr = finish(broken)
    assert code != 0, stderr[-2000:]
    assert "rlhf sft: stopped by SIGTERM after step" in stderr and "--resume" in stderr, stderr[-2000:]
    assert not (tmp_path / "broken" / "final").exists()
    stopped_at = complete(tmp_path / "broken")[-1]
    code, stderr = finish(rlhf("sft", tmp_path / "broken", extra, "--resume", processes=2))
    assert code == 0, stderr[-2000:]
    assert f"resumed from {tmp_path / 'broken' / 'checkpoints' / stopped_at}" in (tmp_path / "broken" / "run.log").read_text()
    code, stderr = finish(unbroken)
    assert code == 0, stderr[-2000:]
    assert_same(tmp_path / "unbroken", tmp_path / "broken", ["final"])
