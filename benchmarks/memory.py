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

The runs set ``MALLOC_MMAP_THRESHOLD_=65536`` (``--glibc-default`` leaves it out): glibc otherwise serves
the large activation buffers of a training step from its heap and keeps them after they are freed,
so peak RSS measures the allocator's high-water mark rather than what training holds (measured:
LoRA with checkpointing, SFT, 3.6 GB with glibc's default, the same step's live tensors ~2.5 GB). With
the threshold, large blocks are mmap'd and returned when freed, at no measured cost in speed (full SFT
31.0 against 30.9 tokens/s). A user on CPU gets the same by setting the variable.

Prints a table, appends one JSON line per run to ``--out`` as each finishes (default benchmarks/memory_results.jsonl) and
rewrites the memory section of BENCHMARKS.md (compare.py keeps it when it regenerates the file).
"""

import common

THREADS = common.pin_threads()  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
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
# glibc: blocks of 64 KiB and more are mmap'd, so a freed activation buffer goes back to the system
MALLOC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}
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
            "malloc": "mmap_threshold_64k" if os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536" else "glibc_default",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--modes", default="full,lora,lora_gc")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of SFT and RM (PPO: one fewer)")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "memory_results.jsonl"))
    parser.add_argument("--smoke", action="store_true", help="the same path on a 2-layer d=64 model, results not kept")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc as it is (its heap keeps freed activations: RSS above the live memory)")
    parser.add_argument("--one", nargs=3, metavar=("STAGE", "MODE", "SCRATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, metavar=("SCRATCH", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.setup_logging()
    if args.one:
        stage, mode, scratch = args.one
        common.emit(run_one(stage, mode, Path(scratch), args.steps))
        return
    if args.prepare:
        prepare(Path(args.prepare[0]), SMOKE_SHAPE if args.prepare[1] == "smoke" else MEDIUM_SHAPE)
        return
    stages, modes = args.stages.split(","), args.modes.split(",")
    for name, known in (("--stages", ("sft", "rm", "ppo")), ("--modes", tuple(MODES))):
        unknown = set(stages if name == "--stages" else modes) - set(known)
        if unknown:
            sys.exit(f"error: {name}: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(known)}")
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-memory-"))
    results = []
    try:
        # In a process of its own: a run's peak RSS (ru_maxrss) keeps the forked parent's from before its exec,
        # so this driver must stay small (it would otherwise hold the models prepare builds).
        subprocess.run([sys.executable, __file__, "--prepare", str(scratch), "smoke" if args.smoke else "medium"],
                       check=True, capture_output=True)
        for stage in stages:
            for mode in modes:  # a process each: peak RSS is per process
                environment = dict(os.environ) if args.glibc_default else {**os.environ, **MALLOC_RETURNS_MEMORY}
                done = subprocess.run([sys.executable, __file__, "--one", stage, mode, str(scratch),
                                       "--steps", str(args.steps)], capture_output=True, text=True, env=environment)
                if done.returncode != 0:
                    sys.exit(f"error: {stage} {mode} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(result, sort_keys=True), file=sys.stderr, flush=True)
                results.append(result)
                if args.out and not args.smoke:  # kept as it comes: a later failure does not lose the finished rows
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(result, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from compare import memory_table, update_memory_section

    print("\n".join(memory_table(results)))
    if args.smoke or not args.out:
        return
    update_memory_section(common.REPO_ROOT / "BENCHMARKS.md", Path(args.out))


if __name__ == "__main__":
    common.run_main(main)
