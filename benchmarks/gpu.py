#!/usr/bin/env python
"""The gpt2 configs (configs/{sft,rm,ppo}_gpt2.yaml) on one GPU: tokens/s and MFU per stage.

    python benchmarks/gpu.py [--steps N] [--out benchmarks/gpu_results.jsonl] [--peak-tflops X]
                             [--label NAME --set [STAGE:]KEY=VALUE ...] [--profile STAGE] [--until STAGE]

Offline by design (the lent GPU machines reach no network): the model is a GPT-2 of gpt2's shape
(12 layers, d=768, 12 heads, context 1024, vocabulary 50,257: 124 M parameters) with random
weights, built locally, and the data are synthetic rows of the demo language with the lengths of
the datasets those configs name (alpaca prompt/response ~250 tokens, HH conversations ~300, PPO
prompts ~100 tokens + 128 new). Everything else is the gpt2 configs as shipped: batch sizes,
gradient accumulation, bf16 (``mixed_precision: auto``), PPO rollout and minibatches; only the
number of steps is cut and checkpoints, evaluation and trackers are off. Arithmetic speed does
not depend on the weights' values, so tokens/s are those of the real checkpoint on such lengths.
``--set`` measures a documented key against the shipped row (``--set training.compile=true`` for every
stage, ``--set sft:training.batch_size=64`` for one), ``--label`` names that row.

The chain is the pipeline's: SFT writes final/, the RM starts from it, PPO uses both. Each stage
prints one JSON line; all are appended to ``--out``, which compare.py copies into BENCHMARKS.md.
MFU counts the matmul FLOPs a stage needs, over the GPU's dense bf16 peak (the convention of PaLM's
MFU and Megatron's FLOP count, without the attention scores): 6·N per trained token (N = non-embedding
parameters), plus the vocabulary projection (6·V·d) where its logits are needed (SFT's response tokens;
none in the RM, whose head is a scalar); per PPO episode of L tokens, 2·N·L to sample, 4 × 2·N·L for the
policy, reference, reward and value forwards and 2 × 6·N·L per PPO epoch to train policy and critic, with
the vocabulary projection of the response tokens when sampling, in the policy and reference forwards and
in each epoch's policy training. ``mfu_6n`` keeps the CPU table's count (6·N per token, 22·N·L per
episode: one PPO epoch, no vocabulary projection), which rows before 2026-12-04 evening report as ``mfu``.
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from compare import ppo_flops_per_episode as ppo_flops_per_episode_6n

from rlhf.config import PPOConfig, RewardConfig, SFTConfig, load_config
from rlhf.demo.demonstrator import demonstrate
from rlhf.demo.grammar import all_combos, render_prompt
from rlhf.trainers.ppo import PPOTrainer
from rlhf.trainers.reward import RewardTrainer
from rlhf.trainers.sft import SFTTrainer

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by device-name fragment.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}
GPT2_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
TOKENIZER = common.REPO_ROOT / "data" / "demo" / "tokenizer"
CONFIGS = common.REPO_ROOT / "configs"
# --smoke: the same code path at a size a CPU runs in seconds (not a measurement).
SMOKE_OVERRIDES = {
    "sft": ["training.batch_size=2", "training.gradient_accumulation_steps=1"],
    "rm": ["training.batch_size=2", "training.gradient_accumulation_steps=1", "training.eval_batch_size=4",
           "training.mixed_precision=auto"],  # bf16 in the config; one process holds one precision
    "ppo": ["ppo.rollout_batch_size=8", "ppo.forward_batch_size=8", "ppo.num_minibatches=2", "training.batch_size=4",
            "ppo.num_ppo_epochs=1", "sampling.max_new_tokens=8"],
}


def build_gpt2_shaped(directory: Path) -> int:
    """A random GPT-2 of gpt2's shape with the demo tokenizer; returns its non-embedding parameters.

    Its vocabulary projection has gpt2's 50,257 rows (the demo tokenizer uses the first 766), so the
    logits and the loss's softmax cost what they cost with gpt2's own tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SHAPE, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(str(directory))
    tokenizer.model_max_length = GPT2_SHAPE["n_positions"]  # the demo tokenizer says 128, its own model's context
    tokenizer.save_pretrained(str(directory))
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


def demo_text(rng: random.Random, min_words: int) -> tuple[str, str]:
    """A demo prompt and a response of at least ``min_words`` words (demonstrations strung together)."""
    subject, tone, phrasing = rng.choice(all_combos())
    prompt = render_prompt(subject, tone, phrasing)
    parts: list[str] = []
    while sum(len(p.split()) for p in parts) < min_words:
        parts.append(demonstrate(prompt, rng))
    return prompt, " ".join(parts)


def prompt_with_context(rng: random.Random, min_words: int) -> str:
    """A demo request after ``min_words`` or more words of context: long, and (almost surely) unique, so an RM
    prompt carries one pair as an HH conversation does (rows sharing a prompt are grouped into one example)."""
    prompt, context = demo_text(rng, min_words)
    return context + " " + prompt


def write_data(scratch: Path, rows: int) -> dict[str, Path]:
    """SFT rows (~250 tokens), RM pairs (~300 per response, one per prompt), PPO prompts (~100 tokens)."""
    rng = random.Random(0)
    paths = {name: scratch / f"{name}.jsonl" for name in ("sft", "rm", "ppo")}
    with open(paths["sft"], "w", encoding="utf-8") as handle:
        for _ in range(rows):
            prompt, response = demo_text(rng, rng.randint(80, 200))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    with open(paths["rm"], "w", encoding="utf-8") as handle:
        for _ in range(rows):
            prompt = prompt_with_context(rng, rng.randint(20, 40))
            chosen, rejected = (demo_text(rng, rng.randint(100, 220))[1] for _ in range(2))
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    with open(paths["ppo"], "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"prompt": prompt_with_context(rng, rng.randint(40, 80))}) + "\n")
    return paths


def peak_tflops(requested: float | None) -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return requested, "cpu"
    name = torch.cuda.get_device_name(0)
    if requested:
        return requested, name
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS.items() if fragment in name), None), name


def vocabulary_flops_per_token() -> int:
    """Multiply-adds ×2 of one token's vocabulary projection (d × V), forward only."""
    return 2 * GPT2_SHAPE["n_embd"] * GPT2_SHAPE["vocab_size"]


def sft_flops(n_params: int, tokens: float, trained_tokens: float) -> float:
    """Forward and backward of every token through the blocks, and of the trained tokens through the vocabulary
    projection (the loss reads logits only there)."""
    return 6 * n_params * tokens + 3 * vocabulary_flops_per_token() * trained_tokens


def ppo_flops_per_episode(n_params: int, prompt_tokens: float, new_tokens: float, ppo_epochs: int) -> float:
    """Sampling (2·N·L), four scoring forwards (policy, reference, reward, value: 8·N·L), and per PPO epoch
    the policy's and critic's forward and backward (12·N·L); the vocabulary projection of the new tokens
    when sampling, in the policy and reference forwards and in each epoch's policy training."""
    length = prompt_tokens + new_tokens
    vocabulary = vocabulary_flops_per_token() * new_tokens * (1 + 2 + 3 * ppo_epochs)
    return (10 + 12 * ppo_epochs) * n_params * length + vocabulary


def steady(output_dir: Path, key: str) -> float | None:
    """The rate once start-up (CUDA context, kernel selection, compilation) is behind it: common.steady_rate."""
    return common.rounded(common.steady_rate(output_dir, key), 1)


def stage_overrides(settings: list[str]) -> dict[str, list[str]]:
    """``--set`` values by stage: ``KEY=VALUE`` applies to every stage, ``sft:KEY=VALUE`` to one."""
    by_stage: dict[str, list[str]] = {"sft": [], "rm": [], "ppo": []}
    for setting in settings:
        key = setting.split("=", 1)[0]
        stage, _, override = setting.partition(":") if ":" in key else ("", "", setting)
        if stage and stage not in by_stage:
            raise SystemExit(f"error: --set {setting}: the stage before ':' must be one of sft, rm, ppo")
        if "=" not in override:
            raise SystemExit(f"error: --set {setting}: expected [STAGE:]KEY=VALUE")
        for name in ([stage] if stage else by_stage):
            by_stage[name].append(override)
    return by_stage


def train_profiled(trainer, activities: list, skip: int, record: int) -> None:
    """``trainer.train()`` with torch.profiler recording ``record`` optimizer steps after the first ``skip`` (start-up,
    kernel selection and compilation left out: the steady loop). Prints the 20 most expensive operations by CPU
    and by GPU time, and how much of the recorded wall time the GPU spent in kernels (what is left to win by
    keeping it busy). The run must take more than ``skip + record + 1`` optimizer steps."""
    step_times: list[float] = []
    cuda = torch.profiler.ProfilerActivity.CUDA in activities

    def report(profiler) -> None:
        wall_s = step_times[-1] - step_times[-1 - record]
        averages = profiler.key_averages()
        for sort_by in ["self_cpu_time_total"] + (["self_device_time_total"] if cuda else []):
            print(averages.table(sort_by=sort_by, row_limit=20, max_name_column_width=60), file=sys.stderr)
        if cuda:
            # Kernels are the events on the device; the CPU operators that launched them carry the same time again,
            # and annotations (ProfilerStep#, Optimizer.step) span kernels already counted.
            kernel_s = sum(event.self_device_time_total for event in averages
                           if event.device_type == torch.autograd.DeviceType.CUDA
                           and not getattr(event, "is_user_annotation", False)) / 1e6
            print(f"profile: GPU busy {kernel_s * 1e3 / record:.1f} ms per optimizer step of "
                  f"{wall_s * 1e3 / record:.1f} ms wall ({kernel_s / wall_s:.0%}; {record} steps after {skip}, "
                  "profiler overhead included in the wall time)", file=sys.stderr)

    schedule = torch.profiler.schedule(wait=skip, warmup=1, active=record, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=report) as profiler:
        def after_step(*_) -> None:
            if cuda:
                torch.cuda.synchronize()  # the step's kernels inside its window
            step_times.append(time.perf_counter())
            profiler.step()

        hook = register_optimizer_step_post_hook(after_step)
        try:
            trainer.train()
        finally:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of SFT and RM (PPO: steps // 5)")
    parser.add_argument("--until", default="ppo", choices=["sft", "rm", "ppo"], help=(
        "the last stage to measure (each stage needs the ones before it: they train the checkpoints it starts from)"))
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "gpu_results.jsonl"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the name)")
    parser.add_argument("--smoke", action="store_true", help=(
        "check the script itself on CPU: a 2-layer d=128 model with gpt2's vocabulary, 2 steps, results not kept"))
    parser.add_argument("--profile", nargs="?", const="sft", choices=["sft", "rm", "ppo"], help=(
        "record ten optimizer steps of this stage (default sft; PPO: two PPO steps) near the end of its run, start-up "
        "behind it, under torch.profiler: its 20 most expensive operations by CPU and by GPU time, and the share "
        "of the wall time the GPU was busy"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="a config override for every stage, or for one (sft:, rm:, ppo:); repeatable")
    parser.add_argument("--label", default=None, help="the row's name in the results (default: the overrides)")
    parser.add_argument("--series", default=None, help=(
        "the name of the measurement the rows belong to: compare.py puts the last series' rows in one table "
        "(default: the date)"))
    args = parser.parse_args()
    overrides = stage_overrides(args.settings)
    label = args.label or (" ".join(args.settings) if args.settings else "as shipped")
    if args.smoke:
        GPT2_SHAPE.update(n_layer=2, n_head=2, n_embd=128)
        args.steps, args.out = 2, None
    elif not torch.cuda.is_available():
        sys.exit("error: benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs on CPU")
    common.setup_logging()
    peak, device_name = peak_tflops(args.peak_tflops)
    cuda = torch.cuda.is_available()
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-gpu-"))
    common.cold_compile_cache(scratch)  # with training.compile, its whole compilation is counted, as a user's first run
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    try:
        model_dir = scratch / "gpt2-shaped"
        n_params = build_gpt2_shaped(model_dir)
        data = write_data(scratch, rows=256 if args.smoke else 64 * args.steps)
        quiet = ["logging.report_to=[]", "training.eval_every=null", "training.save_every=null"]
        shrink = SMOKE_OVERRIDES if args.smoke else {"sft": [], "rm": [], "ppo": []}

        def train(stage: str, trainer) -> None:
            if args.profile != stage:
                trainer.train()
                return
            # PPO takes num_minibatches × num_ppo_epochs optimizer steps per PPO step: its window is one PPO step.
            per_step = (config.ppo.num_minibatches * config.ppo.num_ppo_epochs) if stage == "ppo" else 1
            total = config.training.max_steps * per_step
            record = min(per_step * 2 if stage == "ppo" else 10, max(1, total // 4))
            train_profiled(trainer, activities, skip=max(0, total - record - 2 - per_step), record=record)

        def finish(stage: str, record: dict, extra: dict, flops_per_s: float, flops_per_s_6n: float) -> None:
            result = {"stage": stage, "impl": "rlhf", "variant": "gpt2-shaped", "label": label,
                      "overrides": overrides[stage], "device": device_name,
                      "steps": record["step"], "wall_s": round(record["train_runtime_s"], 2), **extra,
                      "tflops": round(flops_per_s / 1e12, 1),
                      "mfu": round(flops_per_s / (peak * 1e12), 4) if peak else None,
                      "mfu_6n": round(flops_per_s_6n / (peak * 1e12), 4) if peak else None,
                      "flops": "matmuls+vocabulary+epochs",
                      "peak_tflops": peak, "non_embedding_params": n_params,
                      "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                      "versions": common.versions(), "date": time.strftime("%Y-%m-%d"),
                      "series": args.series or time.strftime("%Y-%m-%d")}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            common.emit(result)
            if args.out:  # each stage as it ends: a later stage that fails or runs out of time keeps the earlier rows
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result, sort_keys=True) + "\n")

        sft_dir = scratch / "sft"
        config = load_config(SFTConfig, str(CONFIGS / "sft_gpt2.yaml"), [
            f"output_dir={sft_dir}", f"model.name_or_path={model_dir}", f"data.path={data['sft']}",
            "data.columns={}", "data.eval_fraction=0", f"training.max_steps={args.steps}", "logging.num_samples=0",
            *quiet, *shrink["sft"], *overrides["sft"]])
        train("sft", SFTTrainer(config))
        record = common.training_record(sft_dir)
        tokens_per_s = record["train_tokens"] / record["train_runtime_s"]
        trained_tokens_per_s = record["train_units"] / record["train_runtime_s"]
        finish("sft", record, {"real_tokens_per_s": round(tokens_per_s),
                                "steady_tokens_per_s": steady(sft_dir, "tokens_per_s")},
               sft_flops(n_params, tokens_per_s, trained_tokens_per_s), 6 * n_params * tokens_per_s)
        if args.until == "sft":
            return

        rm_dir = scratch / "rm"
        config = load_config(RewardConfig, str(CONFIGS / "rm_gpt2.yaml"), [
            f"output_dir={rm_dir}", f"model.name_or_path={sft_dir / 'final'}", f"data.path={data['rm']}",
            "data.eval_path=null", "data.format=pairwise", "data.eval_fraction=0.02",
            f"training.max_steps={args.steps}", "normalization.set=train", "normalization.max_samples=256",
            "logging.num_samples=0", *quiet, *shrink["rm"], *overrides["rm"]])
        started = time.perf_counter()
        train("rm", RewardTrainer(config))
        record = common.training_record(rm_dir)
        # Units of the RM loop are prompts; with one pair per prompt (prompt_with_context) they are pairs.
        pairs = record["step"] * config.training.batch_size * config.training.gradient_accumulation_steps
        tokens_per_s = record.get("train_tokens", 0) / record["train_runtime_s"]
        finish("rm", record, {"pairs_per_s": round(pairs / record["train_runtime_s"], 1),
                              "real_tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
                              "steady_tokens_per_s": steady(rm_dir, "tokens_per_s"),
                              "stage_wall_s": round(time.perf_counter() - started, 1)},
               6 * n_params * tokens_per_s, 6 * n_params * tokens_per_s)  # a scalar head: no vocabulary projection
        if args.until == "rm":
            return

        ppo_dir = scratch / "ppo"
        config = load_config(PPOConfig, str(CONFIGS / "ppo_gpt2.yaml"), [
            f"output_dir={ppo_dir}", f"policy.name_or_path={sft_dir / 'final'}",
            f"reward.model_path={rm_dir / 'final'}", f"data.path={data['ppo']}", "data.format=prompt",
            "data.columns={}",
            f"training.max_steps={max(2, args.steps // 5)}", "logging.num_samples=0", *quiet, *shrink["ppo"],
            *overrides["ppo"]])
        trainer = PPOTrainer(config)
        train("ppo", trainer)
        record = common.training_record(ppo_dir)
        episodes = record["train_episodes"]
        prompt_tokens = sum(map(len, trainer.prompt_ids)) / len(trainer.prompt_ids)
        new_tokens = record["train_generated_tokens"] / episodes
        episodes_per_s = episodes / record["train_runtime_s"]
        finish("ppo", record, {"episodes_per_s": round(episodes_per_s, 2),
                                "steady_episodes_per_s": steady(ppo_dir, "episodes_per_s"),
                                # where a step's time goes: sampling and scoring, then the PPO epochs
                                "steady_rollout_s": steady(ppo_dir, "rollout_s"),
                                "steady_update_s": steady(ppo_dir, "update_s"),
                                "generated_tokens_per_s": round(record["train_generated_tokens"] / record["train_runtime_s"]),
                                "prompt_tokens_per_episode": round(prompt_tokens, 1),
                                "new_tokens_per_episode": round(new_tokens, 1)},
               ppo_flops_per_episode(n_params, prompt_tokens, new_tokens, config.ppo.num_ppo_epochs) * episodes_per_s,
               ppo_flops_per_episode_6n(n_params, prompt_tokens, new_tokens) * episodes_per_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    common.run_main(main)
