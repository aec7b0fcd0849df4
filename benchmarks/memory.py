#!/usr/bin/env python
"""Memory and speed of full fine-tuning, LoRA, and LoRA with gradient checkpointing, at a real size, on CPU.

    python benchmarks/memory.py [--stages sft,rm,ppo] [--modes full,lora,lora_gc] [--steps 3] [--out FILE]

A GPT-2 of gpt2-medium's shape (24 layers, d=1024, 16 heads, vocabulary 50,257: 355 M parameters),
random weights built locally (nothing downloaded), trained for a few steps of each stage on synthetic
demo-language rows of realistic length (benchmarks/gpu.py's: SFT ~250 tokens, RM ~300 per response,
PPO prompts ~100 tokens + 64 sampled). Each (stage, mode) runs in a process of its own, so its peak
RSS is its own; throughput is the library's ``train_runtime_s`` (the last metrics.jsonl record).

Modes: ``full`` (every weight, AdamW state for all), ``lora`` (rank 16 adapters on every linear layer
of the blocks; PPO: policy and critic, the reference = the policy with adapters off, the reward = the
critic with adapters off: two bases instead of four), ``lora_gc`` (plus ``training.gradient_checkpointing``).
The reward model runs without prefix sharing in every mode (checkpointing drops the cache it needs),
so the three rows differ by LoRA and checkpointing alone.

Prints a table and appends one JSON line per run to ``--out`` (default benchmarks/memory_results.jsonl),
which compare.py copies into BENCHMARKS.md.
"""

import common

THREADS = common.pin_threads()  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

MEDIUM_SHAPE = {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024, "vocab_size": 50257}
SMOKE_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 1024, "vocab_size": 50257}
MODES = {
    "full": {"sft": [], "rm": [], "ppo": []},
    "lora": {"sft": ["model.lora.rank=16", "model.lora.alpha=32"],
             "rm": ["model.lora.rank=16", "model.lora.alpha=32"],
             "ppo": ["policy.lora.rank=16", "policy.lora.alpha=32", "critic.lora.rank=16", "critic.lora.alpha=32"]},
}
MODES["lora_gc"] = {stage: overrides + ["training.gradient_checkpointing=true"] for stage, overrides in MODES["lora"].items()}
QUIET = ["logging.report_to=[]", "training.eval_every=null", "training.save_every=null", "logging.num_samples=0",
         "training.mixed_precision=no", "training.log_every=1"]


def stage_overrides(stage: str, scratch: Path, steps: int) -> list[str]:
    """The stage's shipped demo config pointed at the gpt2-medium-shaped model and the long rows."""
    if stage == "sft":
        return [f"model.name_or_path={scratch / 'model'}", "model.from_config=null", "model.tokenizer=null",
                f"data.path={scratch / 'sft.jsonl'}", "data.eval_path=null", "data.eval_fraction=0",
                "data.max_length=512", "training.batch_size=4", f"training.max_steps={steps}"]
    if stage == "rm":
        return [f"model.name_or_path={scratch / 'model'}", f"data.path={scratch / 'rm.jsonl'}", "data.eval_path=null",
                "data.eval_fraction=0", "data.max_length=512", "training.batch_size=2", f"training.max_steps={steps}",
                "normalization.set=none", "prefix_sharing=false"]
    return [f"policy.name_or_path={scratch / 'model'}", f"reward.model_path={scratch / 'reward_model'}",
            f"data.path={scratch / 'ppo.jsonl'}", "data.max_prompt_length=256", "sampling.max_new_tokens=64",
            "ppo.rollout_batch_size=8", "ppo.forward_batch_size=8", "ppo.num_minibatches=2", "ppo.num_ppo_epochs=1",
            "training.batch_size=2", f"training.max_steps={max(1, steps - 1)}"]


def run_one(stage: str, mode: str, scratch: Path, steps: int) -> dict:
    """One stage in one mode, in this process; returns its result line."""
    import torch

    from rlhf.config import PPOConfig, RewardConfig, SFTConfig, load_config
    from rlhf.trainers.ppo import PPOTrainer
    from rlhf.trainers.reward import RewardTrainer
    from rlhf.trainers.sft import SFTTrainer

    torch.set_num_threads(THREADS)
    config_class, trainer_class = {"sft": (SFTConfig, SFTTrainer), "rm": (RewardConfig, RewardTrainer),
                                   "ppo": (PPOConfig, PPOTrainer)}[stage]
    output_dir = scratch / f"{stage}-{mode}"
    config = load_config(config_class, str(common.REPO_ROOT / "configs" / f"{stage}.yaml"),
                         [f"output_dir={output_dir}", *stage_overrides(stage, scratch, steps), *QUIET,
                          *MODES[mode][stage]])
    trainer_class(config).train()
    record = common.training_record(output_dir)
    runtime = record["train_runtime_s"]
    if stage == "ppo":
        throughput = {"episodes_per_s": round(record["train_episodes"] / runtime, 3),
                      "generated_tokens_per_s": round(record["train_generated_tokens"] / runtime, 1)}
    else:
        throughput = {"real_tokens_per_s": round(record["train_tokens"] / runtime, 1)}
    return {"stage": stage, "mode": mode, "steps": record["step"], "train_runtime_s": round(runtime, 2),
            **throughput, "peak_rss_mb": round(common.peak_rss_mb(), 1), "threads": THREADS,
            "shape": json.loads((scratch / "shape.json").read_text()), "env": common.env_info(),
            "versions": common.versions(), "date": time.strftime("%Y-%m-%d")}


def prepare(scratch: Path, shape: dict) -> None:
    """The gpt2-medium-shaped causal LM, a reward model of the same shape, and the long rows."""
    import torch

    import gpu
    from rlhf.models import ScalarHeadModel

    gpu.GPT2_SHAPE.update(shape)
    gpu.build_gpt2_shaped(scratch / "model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    reward_model = ScalarHeadModel.from_causal_lm(AutoModelForCausalLM.from_pretrained(scratch / "model"),
                                                  head_init="normal")
    reward_model.save_pretrained(str(scratch / "reward_model"))
    AutoTokenizer.from_pretrained(scratch / "model").save_pretrained(scratch / "reward_model")
    gpu.write_data(scratch, rows=64)
    (scratch / "shape.json").write_text(json.dumps(shape))


def table(results: list[dict]) -> str:
    rows = ["| stage | mode | peak RSS MB | share of full | throughput | train s |", "|---|---|---|---|---|---|"]
    full = {r["stage"]: r["peak_rss_mb"] for r in results if r["mode"] == "full"}
    for r in results:
        share = f"{r['peak_rss_mb'] / full[r['stage']]:.0%}" if r["stage"] in full else "-"
        rate = (f"{r['episodes_per_s']} episodes/s" if r["stage"] == "ppo" else f"{r['real_tokens_per_s']} tokens/s")
        rows.append(f"| {r['stage']} | {r['mode']} | {r['peak_rss_mb']:,.0f} | {share} | {rate} | {r['train_runtime_s']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--modes", default="full,lora,lora_gc")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of SFT and RM (PPO: one fewer)")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "memory_results.jsonl"))
    parser.add_argument("--smoke", action="store_true", help="the same path on a 2-layer d=64 model, results not kept")
    parser.add_argument("--one", nargs=3, metavar=("STAGE", "MODE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.setup_logging()
    if args.one:
        stage, mode, scratch = args.one
        common.emit(run_one(stage, mode, Path(scratch), args.steps))
        return
    stages, modes = args.stages.split(","), args.modes.split(",")
    for name, known in (("--stages", ("sft", "rm", "ppo")), ("--modes", tuple(MODES))):
        unknown = set(stages if name == "--stages" else modes) - set(known)
        if unknown:
            sys.exit(f"error: {name}: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(known)}")
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-memory-"))
    results = []
    try:
        prepare(scratch, SMOKE_SHAPE if args.smoke else MEDIUM_SHAPE)
        for stage in stages:
            for mode in modes:  # a process each: peak RSS is per process
                done = subprocess.run([sys.executable, __file__, "--one", stage, mode, str(scratch),
                                       "--steps", str(args.steps)], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"error: {stage} {mode} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(result, sort_keys=True), file=sys.stderr, flush=True)
                results.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(results))
    if args.smoke or not args.out:
        return
    with open(args.out, "a", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result, sort_keys=True) + "\n")


if __name__ == "__main__":
    common.run_main(main)
