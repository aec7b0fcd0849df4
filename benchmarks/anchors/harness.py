"""What the anchor scripts share, on top of benchmarks/common.py. Import it FIRST in an anchor.

The anchors run in TRL's own venvs (``make bench-setup`` builds them outside the project), where
rlhf is not installed: nothing here or in an anchor imports rlhf. They reuse benchmarks/common.py
(stdlib only at import) for the thread pinning, the workload check, the CPU-contamination monitor
and the result line, so that our runs and theirs are measured by the same code.

Importing this module pins the threads before torch loads (OMP and MKL read their variables once,
at load time), then loads torch and sets its thread count.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402

THREADS = common.pin_threads()
# Nothing a trainer does here should reach the network or a tracker, or print TRL's banner about
# experimental modules into every PPO run.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

torch.set_num_threads(THREADS)

# The settings every side uses (docs/benchmark.md); benchmarks/configs/*.yaml say the same for ours.
LR = 5e-5  # AdamW, constant, no warm-up
SEED = 0


def trainer_settings(output_prefix: str) -> dict:
    """The TrainingArguments every TRL anchor sets alike: fp32 on CPU, the workload's lr and seed, no
    accumulation, checkpointing, saving, trackers or progress bars (the timing would include them)."""
    import tempfile

    return dict(output_dir=tempfile.mkdtemp(prefix=output_prefix), gradient_accumulation_steps=1, learning_rate=LR,
                lr_scheduler_type="constant", bf16=False, fp16=False, gradient_checkpointing=False,
                save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True)


def supervised_settings(output_prefix: str, optim: str, logging_steps: int) -> dict:
    """``trainer_settings`` plus what the SFT and RM anchors add: one epoch, 8 rows a step, no warm-up or
    weight decay, clipping at 1.0, max length 256, the given AdamW flavour, no evaluation, no workers."""
    return dict(trainer_settings(output_prefix), num_train_epochs=1, per_device_train_batch_size=8, warmup_steps=0,
                weight_decay=0.0, optim=optim, max_grad_norm=1.0, max_length=256, eval_strategy="no",
                logging_strategy="steps", logging_steps=logging_steps, dataloader_num_workers=0)


def result_tail(config, manifest: dict, cpu: dict, caught: list[str]) -> dict:
    """The fields every anchor's result line ends with (what ran, memory, contamination, versions, data)."""
    return {
        "optim": config.optim if isinstance(config.optim, str) else config.optim.value,
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
        "versions": versions(),
        "env": common.env_info(),
        "cpu": cpu,
        "workload_sha_model": manifest["files"]["model/model.safetensors"]["sha256"][:16],
        "warnings": sorted(set(caught)),
    }


def versions() -> dict:
    """The anchor's library versions: what BENCHMARKS.md's Versions section lists for it."""
    return common.package_versions("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers")


def non_embedding_params(model) -> int:
    """Parameters outside token and position embeddings (the tied lm_head shares wte, so it is out too).

    The N of the 6·N·tokens rule; compare.py counts the same from the safetensors header.
    """
    embeddings = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embeddings.update(id(p) for p in module.parameters(recurse=False))
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen or id(param) in embeddings:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


class CountingCollator:
    """Wraps a trainer's data collator and counts what really enters the model.

    A trainer's own token counts may include padding or not; counting the collated batches is the
    one way to know the real (non-pad) tokens a throughput should be divided by.
    """

    def __init__(self, inner, mask_key: str = "attention_mask", loss_key: str | None = None):
        self.inner = inner
        self.mask_key = mask_key
        self.loss_key = loss_key
        self.batches = 0
        self.sequences = 0
        self.nonpad_tokens = 0
        self.padded_tokens = 0  # numel of input_ids: what the model computes on
        self.loss_tokens = 0
        self.shapes: list[tuple[int, int]] = []
        self.nonpad_per_batch: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        input_ids = batch["input_ids"]
        self.batches += 1
        self.sequences += input_ids.shape[0]
        self.padded_tokens += input_ids.numel()
        self.shapes.append(tuple(input_ids.shape))
        if self.mask_key in batch:
            real = int(batch[self.mask_key].sum())
            self.nonpad_tokens += real
            self.nonpad_per_batch.append(real)
        if self.loss_key is not None and self.loss_key in batch:
            marks = batch[self.loss_key]
            # labels: the positions != -100 that really contribute (shifted: the first column predicts nothing)
            self.loss_tokens += int((marks[:, 1:] != -100).sum()) if self.loss_key == "labels" else int(marks.sum())
        return batch


def make_step_timer():
    """A transformers TrainerCallback timing each optimizer step and keeping the logged losses.

    Built in a function because transformers is imported only where a Trainer runs.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.train_began: float | None = None
            self.step_ends: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def summary(self) -> dict:
            """First step apart (it pays one-off costs), the rest as the steady state."""
            ends = self.step_ends
            durations = [ends[0] - self.train_began] + [b - a for a, b in zip(ends, ends[1:])]
            steady = durations[1:] if len(durations) > 1 else durations
            return {
                "steps": len(durations),
                "first_step_s": round(durations[0], 4),
                "steady_step_mean_s": round(sum(steady) / len(steady), 4),
                "steady_loop_s": round(ends[-1] - ends[0], 4),
            }

    return StepTimer()


def timed_train(trainer) -> tuple[float, dict]:
    """``trainer.train()``: its wall-clock seconds and the process's CPU use over it (common.CpuMonitor)."""
    monitor = common.CpuMonitor().start()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return wall, monitor.stop()


def capture_warnings() -> list[str]:
    """Record each distinct warning (first occurrence per location) in the result line, still printing it.

    A warning from a trainer (a silently changed default, a deprecated path) can explain a number.
    """
    import warnings

    caught: list[str] = []
    warnings.simplefilter("default")
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        caught.append(f"{category.__name__}: {str(message)[:240]}")
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    return caught
