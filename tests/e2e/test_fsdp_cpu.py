"""FSDP2 on CPU: torch 2.13 shards a model over 2 gloo processes on CPU (accelerate itself enables FSDP only
on GPUs), which is enough to run the piece of our FSDP path that matters most for PPO: sampling from a
sharded policy, where each process stops at its own EOS, through ``rlhf.training.fsdp_unsharded``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.e2e
def test_sampling_from_an_fsdp2_sharded_model_on_cpu():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", os.path.join(ROOT, "tests", "e2e", "fsdp_cpu_worker.py")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout
