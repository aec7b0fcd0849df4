#!/usr/bin/env python
"""TRL's PPOTrainer on the benchmark workload: the PPO anchor (the trl029 venv, trl 0.29.1).

    $BENCH_VENVS/trl029/bin/python benchmarks/anchors/trl_ppo.py

trl 0.29.1 is the last TRL release with a PPOTrainer (``trl.experimental.ppo``); later ones
dropped it, hence a venv of its own. 128 prompts of exactly 32 tokens, 32 new tokens each
(sampled at temperature 0.7, no early stop), rollouts of 16 episodes, 2 minibatches of 8, 1 PPO
epoch, fp32, AdamW lr 5e-5 constant, seed 0, BENCH_THREADS torch threads (default 2); TRL's
defaults for the rest (kl_coef 0.05, gamma 1, lam 0.95, clip 0.2, value clip 0.2, vf_coef 0.1).
No ``optim`` is set, so transformers' default, the fused AdamW, runs (our PPO config does the
same). Four models, as TRL builds them: the policy and its frozen reference (causal LM), the
reward and the value model (sequence classification with a scalar head), all from the workload
GPT-2. The time is ``trainer.train()`` alone.

Prints one JSON line as the last line of stdout (compare.py reads ``episodes_per_s``, ``wall_s``,
``peak_rss_mb``, ``cpu`` and ``versions``); docs/benchmark.md describes the benchmark.
"""

import harness  # must come first: pins the threads before torch loads

import time  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from harness import common  # noqa: E402

EPISODES, PROMPT_TOKENS, RESPONSE_TOKENS = 128, 32, 32


def main():
    root, manifest = common.verified_workload_or_exit()
    caught = harness.capture_warnings()

    load_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=1, dtype=torch.float32)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    dataset = load_dataset("json", data_files=str(root / "ppo.jsonl"), split="train")
    dataset = dataset.map(lambda row: {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]},
                          remove_columns=dataset.column_names)
    assert all(len(ids) == PROMPT_TOKENS for ids in dataset["input_ids"])
    config = PPOConfig(
        **harness.trainer_settings("trl-ppo-"),
        total_episodes=EPISODES,
        per_device_train_batch_size=16,  # the rollout: local_batch_size = 16 x 1 process
        num_mini_batches=2,  # minibatches of 8, one optimizer step each
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=16,
        response_length=RESPONSE_TOKENS,
        num_sample_generations=0,
        logging_steps=1,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value)
    load_s = time.perf_counter() - load_started

    wall, cpu = harness.timed_train(trainer)

    episodes = trainer.state.episode
    common.emit({
        "anchor": "trl_ppo",
        "wall_s": round(wall, 3),
        "load_and_prepare_s": round(load_s, 3),
        "episodes": episodes,
        "episodes_per_s": round(episodes / wall, 3),
        "generated_tokens_per_s": round(episodes * RESPONSE_TOKENS / wall, 2),
        **harness.result_tail(config, manifest, cpu, caught),
    })


if __name__ == "__main__":
    main()
