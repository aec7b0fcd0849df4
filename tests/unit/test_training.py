"""Shared training plumbing: the lr schedule, the resumable data order, atomic directories, metrics lines."""

from __future__ import annotations

import json
import math
import os

import pytest

from rlhf.errors import UserError
from rlhf.training import (
    MicroBatchOrder,
    RunDirectory,
    atomic_directory,
    create_optimizer,
    evaluation_batches,
    fused_adamw_available,
    group_by_length,
    lr_multiplier,
    truncate_jsonl,
)


# ----------------------------------------------------------------------------- lr schedule

@pytest.mark.parametrize("step, expected", [
    # 10 steps, 2 of warmup: (step + 1) / 2, then decay over the remaining 8.
    (0, 0.5), (1, 1.0),
    (2, 1.0),                                  # progress 0
    (4, 0.5 * (1 + math.cos(math.pi / 4))),    # progress 2/8 = 0.25 -> 0.853553
    (6, 0.5),                                  # progress 1/2: cos(pi/2) = 0
    (10, 0.0),                                 # progress 1
    (12, 0.0),                                 # past the end stays at the floor
])
def test_cosine_with_warmup(step, expected):
    assert lr_multiplier(step, total_steps=10, warmup_steps=2, kind="cosine", min_ratio=0.0) == pytest.approx(expected)


def test_cosine_floor_is_min_ratio():
    # progress 1/2 with a floor of 0.1: 0.1 + 0.9 * 0.5 = 0.55
    assert lr_multiplier(6, 10, 2, "cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(10, 10, 2, "cosine", min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (2, 0.8), (5, 0.5), (9, 0.1), (10, 0.0)])
def test_linear_without_warmup(step, expected):
    assert lr_multiplier(step, total_steps=10, warmup_steps=0, kind="linear", min_ratio=0.0) == pytest.approx(expected)


def test_linear_with_floor_and_constant():
    assert lr_multiplier(6, 10, 2, "linear", min_ratio=0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert [lr_multiplier(s, 10, 4, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- data order

def test_micro_batch_order_covers_every_example_once_per_epoch():
    order = MicroBatchOrder(num_examples=10, batch_size=3, seed=7)
    assert order.micro_batches_per_epoch == 4  # the last batch of an epoch is short (10 = 3 + 3 + 3 + 1)
    for epoch in range(3):
        seen = [i for m in range(4 * epoch, 4 * epoch + 4) for i in order.indices(m)]
        assert sorted(seen) == list(range(10))
    assert order.indices(3) == order.epoch_order(0)[9:]
    assert order.epoch_order(0) != order.epoch_order(1)  # a fresh shuffle each epoch
    assert order.epoch_at(6) == 1.5


def test_micro_batch_order_is_deterministic_and_addressable_by_position():
    walked = MicroBatchOrder(20, 4, seed=3)
    stream = [walked.indices(m) for m in range(15)]
    # A fresh order (a resumed run) jumps straight to any position and finds the same batches.
    for m in (14, 0, 7, 5):
        assert MicroBatchOrder(20, 4, seed=3).indices(m) == stream[m]
    assert MicroBatchOrder(20, 4, seed=4).indices(0) != stream[0]
    assert MicroBatchOrder(20, 4, seed=3, shuffle=False).indices(1) == [4, 5, 6, 7]


def test_length_grouping_sorts_windows_of_the_shuffled_epoch_and_keeps_every_example():
    assert group_by_length([0, 1, 2, 3, 4, 5], [5, 1, 9, 2, 8, 3], window=3) == [2, 0, 1, 4, 5, 3]
    lengths = [(i * 37) % 101 for i in range(100)]
    grouped = MicroBatchOrder(100, 4, seed=1, lengths=lengths)
    plain = MicroBatchOrder(100, 4, seed=1)
    assert grouped.micro_batches_per_epoch == 25
    for epoch in range(2):
        batches = [grouped.indices(m) for m in range(25 * epoch, 25 * epoch + 25)]
        assert sorted(i for b in batches for i in b) == list(range(100))
        # One window of 50 batches covers the epoch here: batches are sorted runs, longest first.
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)
    assert grouped.epoch_order(0) != grouped.epoch_order(1) or plain.epoch_order(0) != plain.epoch_order(1)
    # Padding per batch (max - mean) falls; resuming at a position finds the same batch.
    def padding(order):
        return sum(max(lengths[i] for i in order.indices(m)) * 4 - sum(lengths[i] for i in order.indices(m))
                   for m in range(25))
    assert padding(grouped) < padding(plain) / 5
    assert MicroBatchOrder(100, 4, seed=1, lengths=lengths).indices(17) == grouped.indices(17)


def test_micro_batch_order_splits_processes_without_overlap():
    ranks = [MicroBatchOrder(10, 2, seed=0, num_processes=2, process_index=r) for r in range(2)]
    assert ranks[0].micro_batches_per_epoch == 2  # 10 // 4: the uneven remainder is dropped
    for m in range(2):
        first, second = ranks[0].indices(m), ranks[1].indices(m)
        assert len(first) == len(second) == 2 and not set(first) & set(second)


def test_too_few_examples_for_one_batch_is_a_user_error():
    with pytest.raises(UserError, match="training.batch_size"):
        MicroBatchOrder(3, 2, seed=0, num_processes=2)


def test_evaluation_batches_visit_every_example_once():
    assert list(evaluation_batches(7, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    split = [list(evaluation_batches(7, 2, num_processes=2, process_index=r)) for r in range(2)]
    assert sorted(i for batches in split for batch in batches for i in batch) == list(range(7))


# ----------------------------------------------------------------------------- atomic directories

def test_atomic_directory_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "final"

    def failing(directory):
        os.makedirs(directory)
        (open(os.path.join(directory, "half.bin"), "w")).close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_directory(str(target), failing)
    assert os.listdir(tmp_path) == []


def test_atomic_directory_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def writer(directory):
        os.makedirs(directory)
        with open(os.path.join(directory, "new.txt"), "w") as handle:
            handle.write("new")

    atomic_directory(str(target), writer)
    assert os.listdir(target) == ["new.txt"]
    assert os.listdir(tmp_path) == ["final"]  # no temporary or old copies left behind

    def failing(directory):
        os.makedirs(directory)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_directory(str(target), failing)
    assert os.listdir(target) == ["new.txt"]  # a failed rewrite keeps the previous complete directory


def test_run_directory_only_counts_complete_checkpoints(tmp_path):
    run = RunDirectory(str(tmp_path))
    assert not run.has_run() and run.latest_checkpoint() is None
    for step, complete in ((2, True), (4, True), (6, False)):
        directory = tmp_path / "checkpoints" / f"step-{step}"
        directory.mkdir(parents=True)
        if complete:
            (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoints" / ".tmp-step-8").mkdir()
    assert [step for step, _ in run.complete_checkpoints()] == [2, 4]
    assert run.latest_checkpoint() == str(tmp_path / "checkpoints" / "step-4")
    assert run.has_run()


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval/loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
             {"step": 2, "eval/loss": 3.5}, {"step": 3, "loss": 2.0}]
    # A kill mid-write leaves the last line cut short.
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo', encoding="utf-8")
    truncate_jsonl(str(path), 2)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == lines[:4]


def test_prepare_refuses_to_clobber_and_clears_stale_logs(tmp_path):
    from rlhf.config import SFTConfig

    run = RunDirectory(str(tmp_path / "run"))
    config = SFTConfig(output_dir=run.root)
    assert run.prepare(config, resume=False, overwrite=False, is_main=True) is None
    assert os.path.isfile(run.config_path)
    # An attempt killed before its first checkpoint: a relaunch starts over with fresh logs.
    with open(run.metrics_path, "w") as handle:
        handle.write(json.dumps({"step": 0}) + "\n")
    assert run.prepare(config, resume=True, overwrite=False, is_main=True) is None
    assert not os.path.exists(run.metrics_path)

    os.makedirs(run.final_dir)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run.prepare(config, resume=False, overwrite=False, is_main=True)
    with pytest.raises(UserError, match="finished run .* no checkpoint to resume"):
        run.prepare(config, resume=True, overwrite=False, is_main=True)
    run.prepare(config, resume=False, overwrite=True, is_main=True)
    assert not os.path.exists(run.final_dir) and os.path.isfile(run.config_path)


def test_optimizer_uses_the_fused_kernel_where_torch_has_it_unless_switched_off_and_the_update_is_adamw():
    import torch

    from rlhf.config import TrainingConfig

    training = TrainingConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    weights = {"proj.weight": torch.randn(8, 4), "proj.bias": torch.randn(8)}
    grads = [{name: torch.randn_like(value) for name, value in weights.items()} for _ in range(3)]
    unfused = TrainingConfig(lr=1e-2, weight_decay=0.1, fused_optimizer=False)
    results = {}
    for label, device_type, config in (("cpu", "cpu", training), ("unknown", "no-such-device", training),
                                       ("switched off", "cpu", unfused)):
        params = {name: torch.nn.Parameter(value.clone()) for name, value in weights.items()}
        optimizer = create_optimizer(params.items(), config, device_type)
        assert optimizer.defaults.get("fused") is (True if label == "cpu" and fused_adamw_available("cpu")
                                                   else None)
        for step_grads in grads:
            for name, param in params.items():
                param.grad = step_grads[name].clone()
            optimizer.step()
        results[label] = params
    # The fused step is the same AdamW update (decay on the matrix only) up to float rounding.
    reference = {name: torch.nn.Parameter(value.clone()) for name, value in weights.items()}
    plain = torch.optim.AdamW([{"params": [reference["proj.weight"]], "weight_decay": 0.1},
                               {"params": [reference["proj.bias"]], "weight_decay": 0.0}], lr=1e-2)
    for step_grads in grads:
        for name, param in reference.items():
            param.grad = step_grads[name].clone()
        plain.step()
    for params in results.values():
        for name in weights:
            torch.testing.assert_close(params[name].detach(), reference[name].detach(), rtol=1e-6, atol=1e-7)
            assert not torch.equal(params[name].detach(), weights[name])


def test_cudnn_attention_is_switched_off_only_for_cuda(tmp_path):
    import torch

    from rlhf.config import LoggingConfig, TrainingConfig
    from rlhf.training import avoid_cudnn_attention, build_accelerator

    was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        accelerator = build_accelerator(TrainingConfig(), LoggingConfig(), RunDirectory(str(tmp_path)), None)
        assert accelerator.device.type == "cpu" and torch.backends.cuda.cudnn_sdp_enabled()  # CPU: left alone
        avoid_cudnn_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(torch.device("cuda"))  # only reads the type: no GPU needed
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was_enabled)
