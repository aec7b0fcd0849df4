#!/usr/bin/env python
"""Our PPOTrainer on the benchmark workload, with the anchors' settings (docs/benchmark.md).

    python benchmarks/ppo.py [--double] [--config benchmarks/configs/ppo.yaml] [key=value ...]

128 prompts of 32 tokens, 32 new tokens sampled at temperature 0.7, rollout 16, 2 minibatches
of 8, 1 PPO epoch, kl_coef 0.05, gamma 1, lam 0.95, clip 0.2, AdamW lr 5e-5 constant, fp32,
BENCH_THREADS torch threads (default 2). Four models: the policy, its frozen reference, a
reward model and a separate value model. The reward model is a scalar-head model on the
workload GPT-2 (as trl_ppo.py's), built and saved before anything is timed; the value model
starts from it (``critic.init: reward``). The run goes through the library entry point
(``load_config`` + ``PPOTrainer.train``); the training time is the library's own
``train_runtime_s`` (metrics.jsonl).

Our sampler stops a response at its first EOS (the rest is padding) and stops a batch early
once every response has ended; the workload asks for no early stop. With the random workload
model EOS is rare: ``generated_tokens`` against ``generated_tokens_max`` shows how often it happened.

``--double``: the scaling row, every prompt written twice (``text + " " + text``) and 64 new
tokens (variant "2x-length").

Prints one JSON line as the last line of stdout.
"""

import common

THREADS = common.pin_threads()  # before torch loads (rlhf imports it)

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from rlhf.config import ModelConfig, PPOConfig, load_config  # noqa: E402
from rlhf.models import ScalarHeadModel, load_causal_lm  # noqa: E402
from rlhf.trainers.ppo import PPOTrainer  # noqa: E402


def build_reward_model(root: Path, directory: Path, seed: int) -> None:
    """A reward model as stage 2 would write it, untrained: the workload GPT-2 plus a scalar head.

    Loaded like our policy (same dedicated pad token), so the PPO trainer sees one vocabulary and
    scores token ids directly, as TRL does.
    """
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(root / "model"),
                                                   tokenizer=str(root / "tokenizer")), seed=seed)
    torch.manual_seed(seed)
    reward_model = ScalarHeadModel.from_causal_lm(policy, head_init="normal")
    reward_model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def main() -> None:
    args = common.parse_stage_args(__doc__.splitlines()[0], "ppo", "2x-length variant: prompts doubled, 64 new tokens")
    root, manifest = common.verified_workload_or_exit()
    common.setup_logging()
    torch.set_num_threads(THREADS)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-ppo-"))
    common.cold_compile_cache(scratch)
    try:
        data_path = common.workload_data(root, scratch, "ppo.jsonl", ("prompt",), args.double)
        started = time.perf_counter()
        reward_dir = scratch / "reward_model"
        build_reward_model(root, reward_dir, seed=0)
        reward_model_build_s = time.perf_counter() - started

        output_dir = scratch / "run"
        overrides = [f"output_dir={output_dir}", f"policy.name_or_path={root / 'model'}",
                     f"policy.tokenizer={root / 'tokenizer'}", f"reward.model_path={reward_dir}",
                     f"data.path={data_path}",
                     *(["data.max_prompt_length=128", "sampling.max_new_tokens=64"] if args.double else []),
                     *args.overrides]
        started = time.perf_counter()
        config = load_config(PPOConfig, args.config, overrides)
        # "PPO: %d prompts, %d steps of %d episodes": logged after loading, before the first rollout
        watch = common.TrainingStartWatch("PPO:").attach("rlhf.trainers.ppo")
        trainer = PPOTrainer(config)
        trainer.train()
        cpu = watch.require().monitor.stop()  # from the first step to train()'s return (final/ written)
        record = common.training_record(output_dir)
        runtime = record["train_runtime_s"]
        episodes, generated = int(record["train_episodes"]), int(record["train_generated_tokens"])
        max_new_tokens = config.sampling.max_new_tokens
        from_generation = getattr(trainer, "logprobs_from_generation", config.ppo.logprobs_from_generation)
        # Trimmed (training.trim_last_block), the last feed-forward of the policy, the reference and the critic ran at
        # the R positions before each response token, skipping as many as the prompt has tokens (its own but the last,
        # and the response's last), the policy and the critic forward and backward (the critic's rollout forward too);
        # the reward model's ran at each episode's EOS alone.
        prompt_tokens = round(episodes * sum(map(len, trainer.prompt_ids)) / len(trainer.prompt_ids))
        sequence_tokens = prompt_tokens + generated
        trimmed = {"policy": trainer.policy_feed_forward, "critic": trainer.critic_model.trimmed_feed_forward,
                   "reference": trainer.reference_feed_forward,
                   "reward": trainer.reward_model.trimmed_feed_forward if trainer.reward_model else None}
        skipped_gflop = (common.skipped_gflop(trimmed["policy"], prompt_tokens, 6 if from_generation else 8)
                         + common.skipped_gflop(trimmed["critic"], prompt_tokens, 8)
                         + common.skipped_gflop(trimmed["reference"], prompt_tokens, 2)
                         + common.skipped_gflop(trimmed["reward"], sequence_tokens - episodes, 2))
        common.emit({
            "stage": "ppo",
            "impl": "rlhf",
            "variant": "2x-length" if args.double else "1x",
            "wall_s": round(runtime, 3),
            "load_and_prepare_s": round(watch.at - started, 3),
            "reward_model_build_s": round(reward_model_build_s, 3),
            "prompts": watch.args[0],
            "steps": record["step"],
            "episodes": episodes,
            "episodes_per_s": round(episodes / runtime, 3),
            # compilation and warm-up excluded: the later steps (common.steady_rate)
            "steady_episodes_per_s": common.rounded(common.steady_rate(output_dir, "episodes_per_s"), 3),
            "prompt_tokens_per_episode": round(sum(map(len, trainer.prompt_ids)) / len(trainer.prompt_ids), 2),
            "new_tokens_per_episode": max_new_tokens,
            "generated_tokens": generated,  # up to and including the first EOS
            "generated_tokens_max": episodes * max_new_tokens,
            "generated_tokens_per_s": round(generated / runtime, 2),
            # null in the config means "from sampling where exact"; the trainer keeps what it resolved
            "logprobs_from_generation": from_generation,
            "trim_last_block": sorted(name for name, feed_forward in trimmed.items() if feed_forward is not None),
            "skipped_gflop": round(skipped_gflop, 3),
            "cpu_packed_weights": config.sampling.cpu_packed_weights,  # the sampler's oneDNN path (rlhf.models.onednn)
            "final_loss": round(record["policy_loss"], 4),
            "final_value_loss": round(record["value_loss"], 4),
            **common.run_fields(manifest, cpu, THREADS, config.training),
        })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    common.run_main(main)
