#!/usr/bin/env python
"""TRL's SFTTrainer on the benchmark workload: the SFT anchor (the trl116 venv, trl 1.16.0).

    $BENCH_VENVS/trl116/bin/python benchmarks/anchors/trl_sft.py [--optim adamw_torch]

One epoch over sft.jsonl (512 prompt/completion rows, loss on the completion only, TRL's default
for such data; no packing, no padding-free), batch 8, max length 256, fp32, AdamW lr 5e-5
constant, no warm-up, weight decay 0, clip 1.0, no accumulation, evaluation, checkpoints or
gradient checkpointing, seed 0, BENCH_THREADS torch threads (default 2). ``--optim`` defaults to
transformers' plain ``adamw_torch`` (TRL's own default would be the fused kernel), as our SFT
config does. The time is ``trainer.train()`` alone: loading and tokenisation stay outside.

Prints one JSON line as the last line of stdout (compare.py reads ``tokens_per_s``, ``wall_s``,
``peak_rss_mb``, ``cpu`` and ``versions``); docs/benchmark.md describes the benchmark.
"""

import harness  # must come first: pins the threads before torch loads

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from harness import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optim", default="adamw_torch", help="HF optim name (TRL's default would be adamw_torch_fused)")
    args = parser.parse_args()

    root, manifest = common.verified_workload_or_exit()
    caught = harness.capture_warnings()

    load_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(root / "sft.jsonl"), split="train")
    config = SFTConfig(
        **harness.supervised_settings("trl-sft-", args.optim, logging_steps=16),
        packing=False,
        padding_free=False,
        completion_only_loss=None,  # TRL's default: True for prompt/completion datasets
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    counter = harness.CountingCollator(trainer.data_collator, loss_key="completion_mask")
    trainer.data_collator = counter
    timer = harness.make_step_timer()
    trainer.add_callback(timer)
    load_s = time.perf_counter() - load_started
    rss_before = common.current_rss_mb()

    wall, cpu = harness.timed_train(trainer)

    n_non_embedding = harness.non_embedding_params(trainer.model)
    steps = timer.summary()
    common.emit({
        "anchor": "trl_sft",
        "wall_s": round(wall, 3),
        "load_and_prepare_s": round(load_s, 3),
        "sequences": counter.sequences,
        "batches": counter.batches,
        "nonpad_tokens": counter.nonpad_tokens,
        "padded_tokens": counter.padded_tokens,
        "padding_fraction": round(1 - counter.nonpad_tokens / counter.padded_tokens, 4),
        "loss_tokens_completion_mask": counter.loss_tokens,
        "tokens_per_s": round(counter.nonpad_tokens / wall, 2),
        # the first batch pays one-off costs; the steady rate leaves it out
        "steady_tokens_per_s": round(sum(counter.nonpad_per_batch[1:]) / steps["steady_loop_s"], 2),
        "completion_only_loss": trainer.completion_only_loss,
        "losses_logged": [round(x, 4) for x in timer.losses],
        "step_timing": steps,
        "n_params_total": sum(p.numel() for p in trainer.model.parameters()),
        "n_params_non_embedding": n_non_embedding,
        "train_flops_6ND_nonemb": 6 * n_non_embedding * counter.nonpad_tokens,
        "achieved_gflops_6ND_nonemb": round(6 * n_non_embedding * counter.nonpad_tokens / wall / 1e9, 3),
        "lr": harness.LR,
        "rss_mb_before_train": round(rss_before, 1),
        **harness.result_tail(config, manifest, cpu, caught),
    })


if __name__ == "__main__":
    main()
