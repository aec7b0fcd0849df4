"""Plumbing shared by every stage: accelerator, schedule, data order, checkpoints, metrics, the loop.

A stage's trainer keeps its algorithm in view; everything here is the same for all stages:

- ``RunDirectory``: the run directory of docs/stages.md#run-directory (config.yaml, metrics.jsonl, checkpoints/, final/),
  atomic writes, finding the newest complete checkpoint.
- ``build_accelerator`` / ``create_optimizer`` / ``create_scheduler`` / ``optimizer_step``.
- ``MicroBatchOrder``: a deterministic, resumable order of micro-batches over epochs.
- ``SupervisedLoop``: the gradient-accumulating loop SFT and the reward model share; each
  stage passes the loss it minimises (``SupervisedObjective``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from transformers import PreTrainedModel

from rlhf.allocator import freed_memory_kept
from rlhf.config import LoggingConfig, TrainingConfig, flatten, save_config, to_dict
from rlhf.errors import NonFiniteValue, Preempted, RunStopped, UserError
from rlhf.logs import attach_run_log
from rlhf.models.lora import save_hf_model

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- run directory

class RunDirectory:
    """``<output_dir>/{config.yaml, metrics.jsonl, checkpoints/step-N/, final/}`` with atomic writes."""

    def __init__(self, output_dir: str):
        self.root = output_dir
        self.config_path = os.path.join(output_dir, "config.yaml")
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.checkpoints_dir = os.path.join(output_dir, "checkpoints")
        self.final_dir = os.path.join(output_dir, "final")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def has_run(self) -> bool:
        return os.path.isdir(self.final_dir) or self.latest_checkpoint() is not None

    def prepare(self, config: Any, resume: bool, overwrite: bool, is_main: bool) -> str | None:
        """Create the directory and write config.yaml; return the checkpoint to resume from, if any.

        A directory that already holds a run is never clobbered silently: the user resumes it or
        says overwrite.
        """
        if is_main:
            self.lock()  # first: what the directory holds is only meaningful once no one else is writing it
        checkpoint = self.latest_checkpoint() if resume else None
        if not resume and self.has_run() and not overwrite:
            raise UserError(f"output_dir: '{self.root}' already holds a run; pass --resume to continue it, "
                            "or choose another output_dir (or set overwrite=true)")
        if resume and checkpoint is None and os.path.isdir(self.final_dir) and not overwrite:
            raise UserError(f"output_dir: '{self.root}' holds a finished run (final/) and no checkpoint to resume; "
                            "choose another output_dir (or set overwrite=true)")
        if resume and checkpoint is None and is_main:  # e.g. preempted before its first checkpoint
            logger.info("--resume: no checkpoint in %s yet; starting from step 0", self.root)
        if is_main:
            # A fresh start replaces the logs of an earlier attempt that never reached a checkpoint
            # (appending would repeat its steps); overwrite also removes its checkpoints and final/.
            stale = ("checkpoints", "final") if overwrite and not resume else ()
            if checkpoint is None and os.path.isdir(self.root):
                for name in (*stale, "metrics.jsonl", "samples.jsonl"):
                    target = self.path(name)
                    shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else (
                        os.path.exists(target) and os.remove(target))
            os.makedirs(self.root, exist_ok=True)
            remove_leftovers(self.root)  # what a kill in the middle of writing final/ or a checkpoint left
            remove_leftovers(self.checkpoints_dir)
            attach_run_log(self.root)
            save_config(config, self.config_path)
        return checkpoint

    def lock(self) -> None:
        """Hold ``<output_dir>/.lock``, so two runs never write one directory at the same time.

        An advisory lock (flock) the kernel drops when its process ends, however it ends: a lock left by a
        dead run is simply taken. A second run gets one line naming the holder's pid. A process that holds
        it already may take it again; the trainers release it when they end (``releasing_locks``).
        """
        import fcntl

        path = os.path.join(self.root, LOCK_FILE)
        if path in _HELD_LOCKS:
            return
        os.makedirs(self.root, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"output_dir: '{self.root}' is in use by a run that is still going ({holder}); wait "
                            "for it to finish, stop it, or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _HELD_LOCKS[path] = handle  # kept open: closing the file would release the lock

    def checkpoint_dir(self, step: int, updates_into_next: int = 0) -> str:
        name = f"step-{step}" + (f"-{updates_into_next}" if updates_into_next else "")
        return os.path.join(self.checkpoints_dir, name)

    def complete_checkpoints(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first (incomplete ones are never renamed into place).

        ``step-N`` is the state after N steps; ``step-N-K`` (PPO stopped inside a step) the state K optimizer
        updates into step N + 1, which comes after ``step-N``.
        """
        if not os.path.isdir(self.checkpoints_dir):
            return []
        found = []
        for name in os.listdir(self.checkpoints_dir):
            path = os.path.join(self.checkpoints_dir, name)
            parts = name.split("-")
            if (parts[0] == "step" and 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts[1:])
                    and os.path.isfile(os.path.join(path, STATE_FILE))):
                found.append(((int(parts[1]), int(parts[2]) if len(parts) == 3 else 0), path))
        return [(step, path) for (step, _), path in sorted(found)]

    def latest_checkpoint(self) -> str | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None


LOCK_FILE = ".lock"
_HELD_LOCKS: dict[str, Any] = {}  # lock file path -> the open file holding its flock, for this process


def atomic_directory(final_path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_dir)`` then rename tmp_dir to ``final_path``: readers never see half a directory.

    A kill at any moment leaves either the previous ``final_path`` or the new one (or, killed between
    the two renames of a replacement, none: the resumable checkpoints remain); never a torn one.
    """
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".tmp-{os.path.basename(final_path)}-{uuid.uuid4().hex[:8]}")
    try:
        with STOP_SIGNALS.writing():
            write(tmp_dir)
            fault_point(os.path.basename(final_path))
            move_into_place(tmp_dir, final_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def move_into_place(source: str, target: str) -> None:
    """Rename the finished directory ``source`` to ``target``; an existing ``target`` is moved aside first and
    deleted after, so there is no moment at which a reader finds a mixture of the two."""
    if os.path.exists(target):
        old = os.path.join(os.path.dirname(target), f".old-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(source, target)


def remove_leftovers(directory: str) -> None:
    """Delete the temporary and set-aside directories a kill mid-write left in ``directory``."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def save_pretrained_atomic(accelerator: Accelerator, model: torch.nn.Module, tokenizer, final_dir: str,
                           save_merged: bool = True, submodule: str | None = None) -> None:
    """Write ``model`` (unwrapped from DDP/FSDP) and ``tokenizer`` in Hugging Face format, atomically.

    A model with LoRA adapters is written merged plus ``adapter/``, or (``save_merged=False``) as the
    adapter alone (``rlhf.models.lora.save_hf_model``). ``submodule``: write only this attribute of the
    prepared model (PPO's ``policy`` or ``critic``).
    """
    # Sharded weights are gathered (every process calls it); whole ones are saved from the model itself.
    state_dict = accelerator.get_state_dict(model) if shards_weights(accelerator) else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if submodule is not None:
            unwrapped = getattr(unwrapped, submodule)
            if state_dict is not None:
                state_dict = {key.removeprefix(f"{submodule}."): value for key, value in state_dict.items()
                              if key.startswith(f"{submodule}.")}

        def write(directory: str) -> None:
            if isinstance(unwrapped, PreTrainedModel):
                save_hf_model(unwrapped, directory, state_dict, save_merged)
            else:  # our wrappers (ScalarHeadModel) map their state dict onto the model inside
                unwrapped.save_pretrained(directory, state_dict=state_dict, save_merged=save_merged)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)

        atomic_directory(final_dir, write)
    accelerator.wait_for_everyone()


def end_training(accelerator: Accelerator, *prepared: Any) -> None:
    """Stop the trackers and close the process group, with every process still present.

    ``prepared``: the objects holding what ``accelerator.prepare`` wrapped (the trainer, its loop); their
    ``model`` is set back to the unwrapped model first. DDP's reducer holds the process group, so
    otherwise the group is destroyed by whichever wrapper is freed last, after the other processes
    may have exited: a gloo group torn down that way hung rank 0 at exit once in the 2-process tests
    (torch 2.13, in ``~ProcessGroupGloo`` joining its threads; pytorch/pytorch#75097 reports the like).
    Released first, the group is destroyed inside ``destroy_process_group``, every process at the same point.
    """
    accelerator.wait_for_everyone()
    for holder in prepared:
        holder.model = accelerator.unwrap_model(holder.model)
    accelerator.free_memory()  # accelerate's own references to the wrappers
    gc.collect()  # wrappers in reference cycles
    accelerator.end_training()


# ----------------------------------------------------------------------------- accelerator, optimizer, schedule

def resolve_mixed_precision(setting: str) -> str:
    """'auto' means bf16 where the device supports it (a recent GPU), fp32 otherwise."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and not torch.cuda.is_available():
        raise UserError("training.mixed_precision: fp16 needs a GPU; use 'no' or 'bf16' on CPU")
    return setting


def avoid_cudnn_attention(device: torch.device) -> None:
    """On a CUDA ``device``, leave cuDNN out of scaled-dot-product attention; torch then runs flash or
    its memory-efficient kernel, which take any length without set-up. Elsewhere nothing changes.

    Measured on an H200 (torch 2.11, the gpt2 SFT config, bf16): the cuDNN attention kernels took
    ~60 us on the GPU but 2.7 ms of CPU per call, because each new padded batch length (and, when
    sampling, each new token) builds a new cuDNN graph; the GPU waited on the CPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def build_accelerator(training: TrainingConfig, logging_config: LoggingConfig, run: RunDirectory,
                      config: Any) -> Accelerator:
    """An ``Accelerator`` (device, DDP/FSDP/DeepSpeed from ``accelerate launch``), seeded, trackers started."""
    trackers = list(logging_config.report_to)
    for tracker in trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(tracker)
        if module is None:
            raise UserError(f"logging.report_to: unknown tracker '{tracker}'; expected tensorboard or wandb")
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"logging.report_to: {tracker} is not installed; pip install 'rlhf[tracking]'") from None
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(training.mixed_precision),
                              log_with=trackers or None, project_dir=run.root)
    set_seed(training.seed + accelerator.process_index)  # a different stream per process (docs/ppo.md#16)
    avoid_cudnn_attention(accelerator.device)
    if trackers:
        run_name = logging_config.run_name or os.path.basename(os.path.normpath(run.root))
        accelerator.init_trackers(logging_config.project, config=flatten(to_dict(config)),
                                  init_kwargs={"wandb": {"name": run_name}})
    return accelerator


def start_run(config: Any, resume: bool) -> tuple[RunDirectory, Accelerator, str | None]:
    """Every stage's first lines: its run directory, its accelerator, and the checkpoint to resume from.

    ``config`` is a stage config with ``output_dir``, ``overwrite``, ``training`` and ``logging``.
    """
    run = RunDirectory(config.output_dir)
    accelerator = build_accelerator(config.training, config.logging, run, config)
    resume_from = run.prepare(config, resume=resume, overwrite=config.overwrite, is_main=accelerator.is_main_process)
    return run, accelerator, resume_from


def fused_adamw_available(device_type: str) -> bool:
    """Whether this torch has its fused AdamW kernel for ``device_type`` (CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older or newer torch without the helper: the default implementation is safe
        return False
    return device_type in _get_fused_kernels_supported_devices()


def uses_fused_adamw(training: TrainingConfig, device_type: str) -> bool:
    """Whether ``create_optimizer`` builds the fused AdamW for parameters on ``device_type``."""
    return training.fused_optimizer and fused_adamw_available(device_type)


def weight_decay_groups(named_parameters, weight_decay: float, **options) -> list[dict]:
    """AdamW parameter groups of the trainable ``(name, parameter)`` pairs: matrices with ``weight_decay``,
    biases and norms without (their scale is not a capacity knob); ``options`` (e.g. ``lr``) go to both.
    Frozen parameters (LoRA's base) are left out."""
    named = [(name, p) for name, p in named_parameters if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay, **options},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, **options}]
    return [group for group in groups if group["params"]]


def create_optimizer(parameters, training: TrainingConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``parameters``: ``(name, parameter)`` pairs (grouped by ``weight_decay_groups``) or groups.

    ``device_type`` is where the parameters will live after ``accelerator.prepare``. Where torch
    has the fused kernel for it (and ``training.fused_optimizer`` is on), the step is fused: the
    same update up to float rounding, ~4x faster than torch's default on CPU, where that default
    is a python loop over the tensors (a GPT-2 of 14 M parameters: 190 -> 49 ms per step on 2
    cores). transformers' Trainer defaults to the fused kernel too (``adamw_torch_fused``).
    """
    parameters = list(parameters)
    groups = (parameters if parameters and isinstance(parameters[0], dict)
              else weight_decay_groups(parameters, training.weight_decay))
    fused = {"fused": True} if uses_fused_adamw(training, device_type) else {}
    return torch.optim.AdamW(groups, lr=training.lr, betas=(training.adam_beta1, training.adam_beta2),
                             eps=training.adam_eps, **fused)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """The lr at optimizer step ``step`` as a share of the peak: linear warmup, then the decay ``kind``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def create_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int):
    warmup_steps = int(round(training.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, total_steps, warmup_steps, training.lr_scheduler, training.min_lr_ratio))


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler, max_grad_norm: float | None, clip_scopes: Sequence[torch.nn.Module] | None = None,
                   step: int | None = None, run: "RunDirectory | None" = None,
                   finite_check: "DeviceFiniteCheck | None" = None, loss: torch.Tensor | float = 0.0) -> float | None:
    """Clip, step, schedule, zero; returns the gradient norm (of the first clip scope) before clipping.

    ``clip_scopes``: modules whose gradients are clipped each on its own norm (PPO's policy and critic);
    default: ``model`` as a whole. Under DeepSpeed the engine has already clipped (globally, to the
    ``gradient_clipping`` we gave it) and stepped in the last ``accelerator.backward``; the norm is its.
    ``step`` (the step being taken) and ``run``: a non-finite gradient norm stops the run before the
    optimizer step (``NonFiniteValue``), unless fp16's loss scaler is in charge of skipping such steps.
    ``finite_check`` (one clip scope): that check, and ``loss``'s, on the device instead, read later
    (``DeviceFiniteCheck``); then the norm is not read here and None is returned (``finite_check.settle`` reads it).
    """
    limit = max_grad_norm if max_grad_norm else float("inf")
    norms = [accelerator.clip_grad_norm_(scope.parameters(), limit) for scope in (clip_scopes or [model])]
    if finite_check is not None:
        finite_check.optimizer_step(optimizer, step, loss, norms[0], run)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return None
    # Under DeepSpeed the engine has stepped already (the loss was checked before that backward).
    if step is not None and accelerator.scaler is None and not is_deepspeed(accelerator) and None not in norms:
        # The norm is reduced over every process already (DDP/FSDP), so all of them stop together.
        bad = [float(norm) for norm in norms if not math.isfinite(float(norm))]
        if bad:
            raise NonFiniteValue(step, "the gradient norm", str(bad[0]), run)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norms[0]) if norms[0] is not None else float("nan")


class DeviceFiniteCheck:
    """A step's loss and gradient norm checked for NaN and infinity without the host waiting for them.

    The check in ``optimizer_step`` reads those values before the optimizer step, which on a GPU stops the host
    at the end of every step until the device has run it, so nothing of the next step is queued meanwhile (on an
    H200, checking on the device made the gpt2 SFT preset 10 % faster in the steady state, the RM's 13 %). Here
    the fused AdamW kernel itself skips the update on the device when a value is not finite (its ``found_inf``
    argument, the mechanism of torch's GradScaler), the values are copied to pinned host memory without waiting,
    and the host reads them later: before the next optimizer step, or at once where it needs them (a log line,
    evaluation, a checkpoint, the end of training).
    A non-finite step then raises ``NonFiniteValue`` for that step, the weights being those of the step before it,
    as with the check in ``optimizer_step``. Used by ``SupervisedLoop`` where ``defers_finite_checks`` says so.
    Under several processes the count of non-finite values is summed over them on the device (DDP's gradients
    are, too), so every process skips and stops at the same step.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.cuda = accelerator.device.type == "cuda"
        # (this process's loss, the gradient norm, non-finite values on every process): one step's, as each step
        # reads the one before it before it writes its own
        self.values = torch.zeros(3, dtype=torch.float64, pin_memory=self.cuda)
        self.written = torch.cuda.Event() if self.cuda else None
        self.pending_step: int | None = None  # the step whose values are not read yet
        self.last_norm = float("nan")

    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: int, loss: torch.Tensor | float,
                       grad_norm: torch.Tensor, run: "RunDirectory | None") -> None:
        """Read the step before (raising if it was not finite), then take this step's update unless its values
        are not finite; the values travel to the host without waiting."""
        self.settle(run)
        values = torch.stack([torch.as_tensor(loss, dtype=torch.float64).to(grad_norm.device).reshape(()),
                              grad_norm.detach().to(torch.float64).reshape(())])
        bad = (~torch.isfinite(values)).sum().to(torch.float64)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        values = torch.cat([values, bad.reshape(1)])
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the torch optimizer
        inner.found_inf = (bad > 0).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        self.values.copy_(values, non_blocking=self.cuda)
        if self.cuda:
            self.written.record()
        self.pending_step = step

    def settle(self, run: "RunDirectory | None") -> float:
        """Wait for the last step's values; raise ``NonFiniteValue`` if one was not finite; its gradient norm."""
        if self.pending_step is not None:
            step, self.pending_step = self.pending_step, None
            if self.cuda:
                self.written.synchronize()
            loss, norm, bad = self.values.tolist()
            for name, value in (("the loss", loss), ("the gradient norm", norm)):
                if not math.isfinite(value):
                    raise NonFiniteValue(step, name, str(value), run)
            if bad:
                raise NonFiniteValue(step, "a value on another process", "not finite", run)
            self.last_norm = norm
        return self.last_norm


def defers_finite_checks(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``SupervisedLoop`` checks for non-finite values on the device (``DeviceFiniteCheck``): on a GPU, with
    the fused AdamW kernel (the one that takes ``found_inf``), and where our code takes the optimizer step itself
    with whole weights: not under DeepSpeed (its engine steps), FSDP (sharded weights) or fp16's loss scaler."""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = bool(inner.defaults.get("fused")) and isinstance(inner, torch.optim.AdamW)
    return (fused and accelerator.device.type == "cuda" and accelerator.scaler is None
            and not is_deepspeed(accelerator) and not shards_weights(accelerator))


# ----------------------------------------------------------------------------- stopping early: signals, non-finite values

class StopSignals:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) as a request to stop at the next step boundary.

    The first signal sets ``received``; the loops finish the step they are in, write a checkpoint and
    raise ``Preempted``. A second signal while a checkpoint or ``final/`` is being written waits for the
    write to finish (a torn checkpoint would be worse than a late stop); a second signal at any other
    moment stops at once (``KeyboardInterrupt``), which atomic checkpoints make safe too.
    """

    def __init__(self):
        self.received: int | None = None
        self._writing = 0
        self._depth = 0
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle the signals for the duration of a run (re-entrant: a pipeline's stages share its handlers)."""
        import threading

        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            yield self
            return
        if self._depth == 0:
            self.received = None
            self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                for signum, handler in self._previous.items():
                    signal.signal(signum, handler)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a checkpoint or final/ write: a second signal waits for it."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            logger.warning("%s: finishing the current step, then writing a checkpoint (send it again to stop at once)",
                           name)
        elif self._writing:
            logger.warning("%s: a checkpoint is being written; stopping as soon as it is complete", name)
        else:
            raise KeyboardInterrupt


STOP_SIGNALS = StopSignals()


@contextlib.contextmanager
def releasing_locks() -> Iterator[None]:
    """Release, when the block ends however it ends, the run-directory locks taken inside it."""
    before = set(_HELD_LOCKS)
    try:
        yield
    finally:
        for path in set(_HELD_LOCKS) - before:
            _HELD_LOCKS.pop(path).close()  # closing the file drops its flock


def stops_gracefully(train: Callable) -> Callable:
    """Decorate a trainer's ``train``: SIGTERM/SIGINT then stop it at a step boundary with a checkpoint, and
    a stopped run says how to continue it (``rlhf <trainer.command> --config <output_dir>/config.yaml --resume``).
    The output directory's lock is released when ``train`` returns or raises. While it runs, freed memory stays
    in the process for the next step (``training.keep_freed_memory``, ``rlhf.allocator``)."""
    import functools

    @functools.wraps(train)
    def wrapper(trainer, *args, **kwargs):
        try:
            with STOP_SIGNALS.installed(), releasing_locks(), \
                    freed_memory_kept(trainer.config.training.keep_freed_memory):
                return train(trainer, *args, **kwargs)
        except RunStopped as stopped:
            if not stopped.resume_hint:
                config_path = os.path.join(trainer.config.output_dir, "config.yaml")
                stopped.resume_hint = f"continue with: rlhf {trainer.command} --config {config_path} --resume"
            raise

    return wrapper


def stop_requested(accelerator: Accelerator) -> int | None:
    """The stop signal received, agreed over every process (any one's request stops all of them together);
    None when there is none. Collective: every process must call it at the same point."""
    received = STOP_SIGNALS.received
    if accelerator.num_processes > 1:
        anyone = accelerator.reduce(torch.tensor(received or 0, device=accelerator.device), "sum")
        return (received or int(signal.SIGTERM)) if int(anyone) else None
    return received


def check_finite(accelerator: Accelerator, step: int, quantities: dict[str, Any], run: "RunDirectory | None") -> None:
    """Raise ``NonFiniteValue`` for the first of ``quantities`` (floats or tensors) holding a NaN or infinity.

    Collective when several processes run (one small reduction): a NaN on one process stops all of them.
    """
    problems = []
    for name, value in quantities.items():
        tensor = torch.as_tensor(value, dtype=torch.float64).detach().flatten().cpu()
        bad = ~torch.isfinite(tensor)
        if bad.any():
            first = tensor[bad][0].item()
            detail = str(first) if tensor.numel() == 1 else f"{first} in {int(bad.sum())} of {tensor.numel()} values"
            problems.append((name, detail))
    if accelerator.num_processes > 1:
        anyone = int(accelerator.reduce(torch.tensor(len(problems), device=accelerator.device), "sum"))
        if anyone and not problems:
            problems.append(("a value on another process", "not finite"))
    if problems:
        raise NonFiniteValue(step, *problems[0], run)


def fault_point(name: str, step: int | None = None) -> None:
    """A test hook: with ``RLHF_TEST_KILL_AT=<name>`` (or ``<name>@<step>``) in the environment, the process
    kills itself (SIGKILL, nothing runs after it) here, so tests can place a hard kill inside a save."""
    target = os.environ.get("RLHF_TEST_KILL_AT")
    if target and target in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- sharded engines (FSDP, DeepSpeed)
# accelerate does the sharding; what a trainer must do differently is here, so the loops stay one loop.

def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether a process holds only a shard of each weight (FSDP, or DeepSpeed ZeRO stage 3): then every
    process must take part in each forward, and generation needs the weights gathered first."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def may_trim_last_block(training: TrainingConfig, accelerator: Accelerator, frozen: bool = False) -> bool:
    """Whether ``training.trim_last_block`` applies to a model: not with compiled blocks (hooks added after
    compilation are not traced), gradient checkpointing (the backward's recomputation of the block would run
    untrimmed and differ from its forward; it never reaches a ``frozen`` model, such as PPO's reward model) or
    weights sharded outside the forward (FSDP, ZeRO-3)."""
    recomputes = training.gradient_checkpointing and not frozen
    return training.trim_last_block and not (training.compile or recomputes or shards_weights(accelerator))


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config's batch and clipping fields from ours, before ``prepare``.

    We pass no dataloader to ``prepare`` (our loops index the data), so DeepSpeed cannot infer the
    micro-batch size; gradient accumulation is ours too (each micro-batch's loss is already divided
    by the step's units), so the engine accumulates 1 step's worth and is told where steps end
    (``micro_batch_sync``); clipping is ``training.max_grad_norm``.
    """
    if not is_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    ds_config["gradient_clipping"] = max_grad_norm or 0.0


@contextlib.contextmanager
def micro_batch_sync(accelerator: Accelerator, model: torch.nn.Module, is_last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are reduced across processes (and, under
    DeepSpeed, the engine steps) only on the last micro-batch of an optimizer step."""
    accelerator.gradient_state._set_sync_gradients(is_last)
    try:
        with accelerator.no_sync(model) if not is_last else contextlib.nullcontext():
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


@contextlib.contextmanager
def full_weights(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The unwrapped ``model`` with its full weights on every process, for no-grad work that does not run
    in lockstep across processes: sampling (each process stops at its own EOS), evaluation over uneven
    shards, samples written by one process.

    DeepSpeed ZeRO-3 gathers the partitioned weights for the block (TRL does the same for generation);
    FSDP unshards every sharded module and keeps it unsharded until the block ends. Without sharding
    (one process, DDP, ZeRO-1/2) this is ``unwrap_model``.
    """
    unwrapped = accelerator.unwrap_model(model)
    if not shards_weights(accelerator):
        yield unwrapped
    elif is_deepspeed(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield unwrapped
    else:
        with fsdp_unsharded(unwrapped):
            yield unwrapped


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP-sharded module of ``model`` with its full parameters until the block ends (FSDP2's
    ``unshard``, with resharding after each forward switched off meanwhile; FSDP1's ``summon_full_params``)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:  # FSDP1 wraps modules in FullyShardedDataParallel instead
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield
        return
    # What each module does after a forward, to restore it (a user may run FSDP2 without resharding).
    settings = [reshards_after_forward(module) for module in sharded]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module, setting in zip(sharded, settings):
            module.reshard()
            module.set_reshard_after_forward(setting, recurse=False)


def reshards_after_forward(module) -> bool:
    """Whether an FSDP2 module frees its gathered parameters after each forward (torch keeps this in a private
    field: a post-forward mesh exists exactly then); True when it cannot be read, FSDP2's default."""
    group = getattr(getattr(module, "_get_fsdp_state", lambda: None)(), "_fsdp_param_group", None)
    return True if group is None else getattr(group, "post_forward_mesh_info", True) is not None


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is never trained (PPO's reference and reward model), placed as the engine expects.

    Under ZeRO-3 and FSDP it is sharded for inference like the trained models (TRL does this for
    ZeRO-3), so it does not cost a full copy per process; elsewhere it is moved to the device.
    """
    if not shards_weights(accelerator):
        return model.to(accelerator.device)
    if is_deepspeed(accelerator):
        import deepspeed

        ds_config = {key: value for key, value in accelerator.state.deepspeed_plugin.deepspeed_config.items()
                     if key in ("train_micro_batch_size_per_gpu", "train_batch_size", "bf16", "fp16", "zero_optimization")}
        ds_config["zero_optimization"] = {"stage": 3, **{k: v for k, v in ds_config.get("zero_optimization", {}).items()
                                                          if k.startswith(("stage3_", "offload_param"))}}
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine.module
    return accelerator.prepare_model(model, evaluation_mode=True)


# ----------------------------------------------------------------------------- data order

class MicroBatchOrder:
    """A deterministic stream of micro-batches over repeated epochs, addressable by position.

    Epoch ``e`` visits the examples in ``randperm(seed + e)`` order, cut into global micro-batches
    of ``batch_size × num_processes`` examples; each process takes its own slice. Micro-batch ``m``
    of the stream is a pure function of ``m``, so resuming at a step needs no replay of data.
    """

    # With lengths, each epoch's order is cut into windows of this many global batches, each sorted by
    # length: batches hold similar lengths while the epoch stays shuffled (as transformers' length grouping).
    LENGTH_WINDOW_BATCHES = 50

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 num_processes: int = 1, process_index: int = 0, drop_last: bool = False,
                 lengths: Sequence[int] | None = None):
        self.num_examples = num_examples
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_processes = num_processes
        self.process_index = process_index
        global_batch = batch_size * num_processes
        # With several processes an uneven last batch would leave a rank without data; drop it.
        # ``drop_last`` drops it always (PPO: every rollout batch has exactly rollout_batch_size episodes).
        self.micro_batches_per_epoch = (num_examples // global_batch if num_processes > 1 or drop_last
                                        else math.ceil(num_examples / global_batch))
        if self.micro_batches_per_epoch == 0:
            raise UserError(f"training.batch_size: {num_examples} examples cannot fill one batch of "
                            f"{batch_size} × {num_processes} processes; lower the batch size")
        self._epoch_cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_examples, generator=generator).tolist()
            else:
                order = list(range(self.num_examples))
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.batch_size * self.num_processes * self.LENGTH_WINDOW_BATCHES)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def indices(self, micro_batch: int) -> list[int]:
        """Example indices of stream position ``micro_batch`` for this process."""
        epoch, position = divmod(micro_batch, self.micro_batches_per_epoch)
        global_batch = self.batch_size * self.num_processes
        start = position * global_batch + self.process_index * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def epoch_at(self, micro_batch: int) -> float:
        return micro_batch / self.micro_batches_per_epoch


def group_by_length(order: list[int], lengths: Sequence[int], window: int) -> list[int]:
    """``order`` cut into windows of ``window`` examples, each sorted longest first (stable, so ties keep
    their shuffled order); the longest window opens, so a memory peak shows at the first step."""
    windows = [sorted(order[start:start + window], key=lambda index: -lengths[index])
               for start in range(0, len(order), window)]
    windows.sort(key=lambda members: -lengths[members[0]])
    return [index for members in windows for index in members]


def evaluation_batches(num_examples: int, batch_size: int, num_processes: int = 1,
                       process_index: int = 0) -> Iterator[list[int]]:
    """Index batches over an evaluation set in order, split across processes (every example once)."""
    for start in range(process_index * batch_size, num_examples, batch_size * num_processes):
        yield list(range(start, min(start + batch_size, num_examples)))


# ----------------------------------------------------------------------------- checkpoints

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where a run is: enough, with the accelerator's state, to continue it exactly."""

    step: int = 0  # optimizer steps done; also the data position (step × accumulation micro-batches)
    examples_seen: int = 0
    tokens_seen: int = 0
    extra: dict | None = None  # stage-specific resumable values (PPO's KL coefficient, ...)


def save_checkpoint(accelerator: Accelerator, run: RunDirectory, state: TrainState, keep: int,
                    updates_into_next: int = 0, write_extra: Callable[[str], None] | None = None) -> str:
    """Save model, optimizer, scheduler, RNG states (accelerate) and ``state``; keep the newest ``keep``.

    Written into a temporary directory and renamed, so a kill mid-save leaves the previous
    checkpoint as the newest complete one; a stop signal during the save waits for it.

    Args:
        updates_into_next: PPO stopped inside a step, this many optimizer updates into step ``state.step + 1``.
        write_extra: ``f(directory)`` run on every process before the checkpoint is complete (PPO's rollout).
    """
    target = run.checkpoint_dir(state.step, updates_into_next)
    tmp_dir = os.path.join(run.checkpoints_dir, f".tmp-{os.path.basename(target)}")
    with STOP_SIGNALS.writing():
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp_dir)
        if write_extra is not None:
            write_extra(tmp_dir)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fault_point("checkpoint", state.step)
            with open(os.path.join(tmp_dir, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(asdict(state), handle)  # last: a checkpoint without it is incomplete
            move_into_place(tmp_dir, target)
            for _, old in run.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: Accelerator, checkpoint_dir: str) -> TrainState:
    accelerator.load_state(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as handle:
        return TrainState(**json.load(handle))


# ----------------------------------------------------------------------------- metrics

class MetricsLogger:
    """Appends one JSON line per logged step to metrics.jsonl and forwards to the trackers."""

    def __init__(self, accelerator: Accelerator, path: str, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process and resume_step is not None:
            truncate_jsonl(path, resume_step)

    def log(self, step: int, metrics: dict[str, float], epoch: float | None = None) -> None:
        record = {"step": step}
        if epoch is not None:
            record["epoch"] = round(epoch, 4)
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the lines of ``path`` with step ≤ last_step: a resumed run logs the later steps again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line.rstrip("\n") + "\n" for line in handle if (step := step_of(line)) is not None and step <= last_step]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)


def step_of(line: str) -> int | None:
    """The step of one JSON line; None for a blank line or one cut short by a kill mid-write."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else None
    except ValueError:
        return None


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)


# ----------------------------------------------------------------------------- the supervised loop

class SupervisedObjective(Protocol):
    """What a stage minimises. SFT: next-token loss over response tokens; RM: pairwise ranking loss."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Turn examples into one padded batch (tensors on CPU)."""

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (tokens, prompts) the batch's loss averages over, known before the forward."""

    def length(self, example: dict) -> int:
        """The padded length an example brings to a batch (for ``training.group_by_length``)."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss summed over the batch's units, and statistics (sums) to report: floats, or detached
        0-dim tensors that the loop adds up on the device and reads back only when it logs."""

    def summarize(self, sums: dict[str, float], units: float) -> dict[str, float]:
        """Turn summed statistics into reported metrics (e.g. loss = sum / units)."""


class SupervisedLoop:
    """Minimise an objective over examples with gradient accumulation, checkpoints and logging.

    Accumulation is exact: each micro-batch's loss sum is divided by the units of the whole
    optimizer step (all micro-batches, all processes), so batch 8 equals batch 2 × 4
    accumulation steps, and a token-level mean stays a token-level mean.
    """

    def __init__(self, *, accelerator: Accelerator, model: torch.nn.Module, objective: SupervisedObjective,
                 train_examples: list[dict], eval_examples: list[dict], training: TrainingConfig,
                 run: RunDirectory, progress_desc: str):
        self.accelerator = accelerator
        self.objective = objective
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.training = training
        self.run = run
        self.progress_desc = progress_desc
        lengths = [objective.length(example) for example in train_examples] if training.group_by_length else None
        self.order = MicroBatchOrder(len(train_examples), training.batch_size, training.seed,
                                     num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                                     lengths=lengths)
        accumulation = training.gradient_accumulation_steps
        steps_per_epoch = math.ceil(self.order.micro_batches_per_epoch / accumulation)
        self.total_steps = training.max_steps or max(1, math.ceil(training.num_epochs * steps_per_epoch))
        optimizer = create_optimizer(model.named_parameters(), training, accelerator.device.type)
        self.scheduler = create_scheduler(optimizer, training, self.total_steps)
        configure_deepspeed(accelerator, training.batch_size, training.max_grad_norm)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        # On a GPU the loss and gradient norm are checked on the device and read a step later (DeviceFiniteCheck).
        self.finite_check = (DeviceFiniteCheck(accelerator) if defers_finite_checks(accelerator, self.optimizer)
                             else None)

    def micro_batch(self, position: int) -> tuple[dict[str, torch.Tensor], int, int, int]:
        """The micro-batch at ``position`` on the device, with its units, real tokens and examples.

        The counts are read from the CPU tensors before they move: counting on a GPU would stop the
        host until the device caught up (a synchronisation per count), where it should queue work ahead.
        """
        examples = [self.train_examples[i] for i in self.order.indices(position)]
        batch = self.objective.collate(examples)
        units = self.objective.count_units(batch)
        tokens = sum(int(batch[key].sum()) for key in ("attention_mask", "prefix_mask") if key in batch)
        # A packed batch's rows hold several examples each: it counts them itself.
        num_examples = int(batch["num_examples"]) if "num_examples" in batch else len(next(iter(batch.values())))
        return to_device(batch, self.accelerator.device), units, tokens, num_examples

    def train(self, resume_from: str | None = None, on_log: Callable[[int, dict], None] | None = None) -> TrainState:
        """Run to ``total_steps`` (continuing from ``resume_from``); returns the final state."""
        accelerator, training = self.accelerator, self.training
        state = load_checkpoint(accelerator, resume_from) if resume_from else TrainState()
        if resume_from:
            logger.info("resumed from %s at step %d", resume_from, state.step)
        metrics_logger = MetricsLogger(accelerator, self.run.metrics_path, resume_step=state.step if resume_from else None)
        if state.step == 0 and self.eval_examples:
            metrics_logger.log(0, prefix("eval/", self.evaluate()), epoch=0.0)
        progress = tqdm(total=self.total_steps, initial=state.step, desc=self.progress_desc,
                        disable=not accelerator.is_main_process, dynamic_ncols=True)
        try:
            window_sums: dict[str, Any] = {}
            window_units, window_tokens, window_start = 0.0, 0, time.perf_counter()
            # This session's training time, real tokens and loss units (SFT: trained tokens; RM: prompts), logged
            # with the last step (train_runtime_s, train_tokens, train_units): evaluation and checkpoint saving
            # are paused out, as for tokens_per_s.
            train_start, paused_s, session_tokens, session_units = window_start, 0.0, 0, 0.0
            self.model.train()
            while state.step < self.total_steps:
                # ---- one optimizer step over `accumulation` micro-batches
                first = state.step * training.gradient_accumulation_steps
                micro_batches = [self.micro_batch(first + i) for i in range(training.gradient_accumulation_steps)]
                local_units = sum(units for _, units, _, _ in micro_batches)
                step_units = (float(local_units) if accelerator.num_processes == 1 else float(accelerator.reduce(
                    torch.tensor(local_units, device=accelerator.device, dtype=torch.float64), "sum")))
                # The statistics stay on the device until a log step reads them: a value read per micro-batch
                # would make the host wait for each forward before it could queue the backward.
                step_loss: torch.Tensor | float = 0.0
                for i, (batch, _, tokens, num_examples) in enumerate(micro_batches):
                    is_last = i == len(micro_batches) - 1
                    with micro_batch_sync(accelerator, self.model, is_last):
                        with accelerator.autocast():
                            loss_sum, stats = self.objective.loss_sum(self.model, batch)
                        step_loss = step_loss + stats.get("loss", 0.0)
                        if is_last and is_deepspeed(accelerator):  # its backward also takes the optimizer step
                            check_finite(accelerator, state.step + 1, {"the loss": step_loss}, self.run)
                        # DDP averages gradients over processes, hence × num_processes.
                        accelerator.backward(loss_sum * accelerator.num_processes / max(step_units, 1.0))
                    for key, value in stats.items():
                        window_sums[key] = window_sums.get(key, 0.0) + value
                    window_tokens += tokens
                    state.examples_seen += num_examples
                # Before the optimizer step, which a non-finite loss must not take (DeviceFiniteCheck: on the device).
                if not is_deepspeed(accelerator) and self.finite_check is None:
                    check_finite(accelerator, state.step + 1, {"the loss": step_loss}, self.run)
                window_units += local_units
                lr = self.scheduler.get_last_lr()[0]
                grad_norm = optimizer_step(accelerator, self.model, self.optimizer, self.scheduler, training.max_grad_norm,
                                           step=state.step + 1, run=self.run, finite_check=self.finite_check,
                                           loss=step_loss)
                state.step += 1
                progress.update(1)

                # ---- log, evaluate, checkpoint
                is_last_step = state.step == self.total_steps
                evaluates = ((training.eval_every and state.step % training.eval_every == 0) or is_last_step) \
                    and self.eval_examples
                saved = training.save_every and state.step % training.save_every == 0 and not is_last_step
                logs = state.step % training.log_every == 0 or is_last_step
                if self.finite_check is not None and (logs or evaluates or saved):
                    grad_norm = self.finite_check.settle(self.run)  # this step's values, before anything uses it
                if logs:
                    elapsed = time.perf_counter() - window_start
                    sums, units = summed_over_processes(accelerator, window_sums, window_units)
                    metrics = self.objective.summarize(sums, units)
                    session_units += units
                    metrics.update(lr=lr, grad_norm=grad_norm, tokens_per_s=window_tokens * accelerator.num_processes / max(elapsed, 1e-9))
                    state.tokens_seen += window_tokens
                    session_tokens += window_tokens
                    if state.step == self.total_steps:
                        metrics.update(train_runtime_s=time.perf_counter() - train_start - paused_s,
                                       train_tokens=session_tokens * accelerator.num_processes,
                                       train_units=session_units)
                    metrics_logger.log(state.step, metrics, epoch=self.order.epoch_at(first + training.gradient_accumulation_steps))
                    progress.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr", "tokens_per_s") if k in metrics})
                    if on_log is not None:
                        on_log(state.step, metrics)
                    window_sums, window_units, window_tokens, window_start = {}, 0.0, 0, time.perf_counter()
                paused_at = time.perf_counter()  # evaluation and saving are not training: keep them out of tokens_per_s
                if evaluates:
                    metrics_logger.log(state.step, prefix("eval/", self.evaluate()))
                if saved:
                    save_checkpoint(accelerator, self.run, state, training.keep_checkpoints)
                signum = stop_requested(accelerator)
                if signum and not is_last_step:  # preempted: this step is done; keep it, then stop
                    if self.finite_check is not None:
                        self.finite_check.settle(self.run)
                    checkpoint = (self.run.checkpoint_dir(state.step) if saved
                                  else save_checkpoint(accelerator, self.run, state, training.keep_checkpoints))
                    raise Preempted(signum, state.step, checkpoint)
                pause = time.perf_counter() - paused_at
                paused_s += pause
                window_start += pause
        finally:
            progress.close()  # on an error too: its one line must not share the bar's line
        return state

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's metrics on the evaluation examples (empty when there are none)."""
        if not self.eval_examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, Any] = {}
        units = 0.0
        batch_size = self.training.eval_batch_size or self.training.batch_size
        # Processes get uneven shares of the evaluation set: with sharded weights, gathered for the whole pass.
        with full_weights(self.accelerator, self.model) as model:
            for indices in evaluation_batches(len(self.eval_examples), batch_size, self.accelerator.num_processes,
                                              self.accelerator.process_index):
                batch = self.objective.collate([self.eval_examples[i] for i in indices])
                units += self.objective.count_units(batch)
                with self.accelerator.autocast():
                    loss_sum, stats = self.objective.loss_sum(model, to_device(batch, self.accelerator.device))
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
        self.model.train(was_training)
        return self.objective.summarize(*summed_over_processes(self.accelerator, sums, units))


def summed_over_processes(accelerator: Accelerator, sums: dict[str, float], units: float) -> tuple[dict[str, float], float]:
    """Statistics summed by each process (loss sums, counts), summed over all of them in float64, so a
    logged metric is the whole batch's and not the main process's share. Every process must call it."""
    if accelerator.num_processes == 1:
        return as_floats(sums), units
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[key], dtype=torch.float64).to(accelerator.device) for key in keys]
                         + [torch.tensor(units, dtype=torch.float64, device=accelerator.device)])
    totals = accelerator.reduce(totals, "sum").tolist()
    return dict(zip(keys, totals[:-1])), totals[-1]


def as_floats(values: dict[str, Any]) -> dict[str, float]:
    """Statistics that may be device tensors (0-dim) as floats, read back in one transfer."""
    tensors = {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        return dict(values)
    read = torch.stack([value.detach().to(torch.float64).reshape(()) for value in tensors.values()]).tolist()
    return {**values, **dict(zip(tensors, read))}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device``; to a GPU through pinned memory, so the copy queues without stopping the host."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def prefix(name: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{name}{k}": v for k, v in metrics.items()}
