#!/usr/bin/env python
"""TRL's RewardTrainer on the benchmark workload: the reward-model anchor (the trl116 venv, trl 1.16.0).

    $BENCH_VENVS/trl116/bin/python benchmarks/anchors/trl_rm.py [--optim adamw_torch]

One epoch over pref.jsonl (256 prompt/chosen/rejected rows with an explicit prompt), batch 8
pairs, max length 256, fp32, AdamW lr 5e-5 constant, no warm-up, weight decay 0, clip 1.0, no
accumulation, evaluation or checkpoints, seed 0, BENCH_THREADS torch threads (default 2). The
model is the workload GPT-2 with a scalar head (sequence classification, 1 label). RewardConfig's
own defaults of bf16 and gradient checkpointing are switched off, so that both sides do the same
fp32 work. The time is ``trainer.train()`` alone.

Prints one JSON line as the last line of stdout (compare.py reads ``pairs_per_s``,
``tokens_per_s``, ``wall_s``, ``peak_rss_mb``, ``cpu`` and ``versions``); docs/benchmark.md
describes the benchmark.
"""

import harness  # must come first: pins the threads before torch loads

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from harness import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optim", default="adamw_torch", help="HF optim name")
    args = parser.parse_args()

    root, manifest = common.verified_workload_or_exit()
    caught = harness.capture_warnings()

    load_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    dataset = load_dataset("json", data_files=str(root / "pref.jsonl"), split="train")
    config = RewardConfig(**harness.supervised_settings("trl-rm-", args.optim, logging_steps=8))
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    counter = harness.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = harness.make_step_timer()
    trainer.add_callback(timer)
    load_s = time.perf_counter() - load_started

    wall, cpu = harness.timed_train(trainer)

    pairs = counter.sequences // 2  # the collator stacks the chosen, then the rejected: 2 sequences a pair
    common.emit({
        "anchor": "trl_rm",
        "wall_s": round(wall, 3),
        "load_and_prepare_s": round(load_s, 3),
        "pairs": pairs,
        "batches": counter.batches,
        "nonpad_tokens": counter.nonpad_tokens,
        "padded_tokens": counter.padded_tokens,
        "padding_fraction": round(1 - counter.nonpad_tokens / max(1, counter.padded_tokens), 4),
        "pairs_per_s": round(pairs / wall, 3),
        "tokens_per_s": round(counter.nonpad_tokens / wall, 2),
        "losses_logged": [round(x, 4) for x in timer.losses],
        "step_timing": timer.summary(),
        **harness.result_tail(config, manifest, cpu, caught),
    })


if __name__ == "__main__":
    main()
