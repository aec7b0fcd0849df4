#!/usr/bin/env python
"""Our trainers against the TRL anchors and the plain-torch ceiling on the benchmark workload, interleaved.

    python benchmarks/compare.py [--rounds 3] [--stages sft,rm,ppo] [--skip-double]

Each round runs, stage by stage: ours (benchmarks/<stage>.py in this project's .venv), ours with each
documented speed key that is off by default (LEVERS: training.packing, training.compile, SFT's
training.fused_cross_entropy) and with training.trim_last_block, on by default, off (every stage), the
TRL anchor (benchmarks/anchors/trl_sft.py / trl_rm.py in the trl116 venv, trl_ppo.py in trl029), the
plain-torch ceiling for that stage alone (anchors/torch_ceiling.py --stage <stage>, trl116, so its
peak RSS is the stage's own) and ours on the 2x-length variant; anchors/peak_flops.py runs once
first. Interleaving spreads a machine's slow phases over every implementation; medians over rounds
are compared.

Prints a table of medians (with ours' steady-state rate: compilation and warm-up excluded),
``ours ÷ ceiling``, each stage's best row (the fastest of ours' rows) against the targets, and as its last line
``ratios: sft=X.XX rm=X.XX ppo=X.XX`` (ours ÷ TRL, medians of tokens/s, pairs/s, episodes/s).
Writes BENCHMARKS.md at the repository root and the raw JSON lines to benchmarks/results/latest.jsonl.

Where things are: the anchor scripts in benchmarks/anchors/ (this repository), their venvs in
BENCH_VENVS (default ~/.cache/rlhf-bench/venvs), the workload in RLHF_BENCH_DIR (default
~/.cache/rlhf-bench/workload); ``make bench-setup`` builds the venvs and the workload.
BENCH_THREADS (default 2) reaches every run. docs/benchmark.md describes the benchmark.

No torch here: this script only starts processes and reads their last stdout line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

STAGES = ("sft", "rm", "ppo")
# The throughput each stage is judged by (docs/benchmark.md), with its unit for the table.
THROUGHPUT = {"sft": ("tokens_per_s", "real tokens/s"), "rm": ("pairs_per_s", "pairs/s"),
              "ppo": ("episodes_per_s", "episodes/s")}
IMPLEMENTATIONS = (("rlhf", "1x", "ours"), ("trl", "1x", "TRL"), ("ceiling", "1x", "plain-torch ceiling"),
                   ("rlhf", "2x-length", "ours, 2x-length"))
# The documented speed keys that are off by default, each measured as a row of its own ("ours, <keys>"):
# a stage's best row is the fastest of ours with its defaults and these, compilation time counted.
LEVERS = {
    "sft": {"packing": ["training.packing=true"], "compile": ["training.compile=true"],
            "fused_ce": ["training.fused_cross_entropy=true"],
            "untrimmed": ["training.trim_last_block=false"]},  # on by default: the row shows what it buys
    "rm": {"packing": ["training.packing=true"], "compile": ["training.compile=true"],
           "untrimmed": ["training.trim_last_block=false"]},
    "ppo": {"compile": ["training.compile=true"], "untrimmed": ["training.trim_last_block=false"]},
}
# The targets for the best row, same run, same machine: ours ÷ TRL and share of the matmul peak.
TARGETS = {"sft": (2.0, 0.70), "rm": (1.5, 0.70), "ppo": (1.5, 0.70)}
STEADY = {"sft": "steady_tokens_per_s", "rm": "steady_pairs_per_s", "ppo": "steady_episodes_per_s"}
CONTAMINATION_LIMIT = 0.05  # other processes' share of the CPU above which a run is flagged
ANCHOR_VENV = {"sft": "trl116", "rm": "trl116", "ppo": "trl029"}  # TRL 0.29.1 is the last with a PPOTrainer
ANCHOR_DIR = common.BENCH_DIR / "anchors"  # the anchor scripts, part of this repository
# The anchors' PPO episode (docs/benchmark.md) when a result line does not state its own lengths.
PPO_PROMPT_TOKENS, PPO_NEW_TOKENS = 32, 32
EMBEDDING_NAMES = {"wte", "wpe", "embed_tokens", "embed_positions", "word_embeddings", "position_embeddings",
                   "lm_head"}  # lm_head is tied to wte in the workload model


class BenchError(Exception):
    """A run failed or something the runs need is missing (one message, then exit non-zero)."""


# ----------------------------------------------------------------------------- FLOPs

def non_embedding_params(model_dir: Path) -> int:
    """Parameters of the workload model outside token/position embeddings (and the tied lm_head).

    Read from the safetensors header (tensor names and shapes), so no torch is needed; this is
    the N of the 6·N·tokens rule, as benchmarks/anchors/harness.py's non_embedding_params counts it.
    """
    with open(model_dir / "model.safetensors", "rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__" or EMBEDDING_NAMES & set(name.split(".")):
            continue
        count = 1
        for size in entry["shape"]:
            count *= size
        total += count
    return total


def ppo_flops_per_episode(n_params: int, prompt_tokens: float, new_tokens: float) -> float:
    """Analytic arithmetic of one PPO episode (one PPO epoch), the same count for every implementation.

    Over the L = prompt + response tokens of an episode:
      generation (KV-cached)                       2N per token
      policy logprob, reference, reward and value forwards   4 × 2N per token
      policy training and value training (forward + backward)   2 × 6N per token
    = 22·N·L. An implementation that skips a forward (TRL, and ours with
    ``ppo.logprobs_from_generation``, take the rollout logprobs from sampling) does less than
    this count and shows a higher share of the peak for the same work.
    """
    return 22.0 * n_params * (prompt_tokens + new_tokens)


def achieved_gflops(stage: str, result: dict, n_params: int) -> float | None:
    """Useful GFLOP/s of one run: 6·N·real tokens/s for SFT and RM, 22·N·L·episodes/s for PPO; for our runs less
    the arithmetic their ``trim_last_block`` left out (``skipped_gflop``), so the count stays the work done."""
    skipped = float(result.get("skipped_gflop") or 0.0)
    skipped_per_s = skipped / float(result["wall_s"]) if skipped else 0.0
    if stage in ("sft", "rm"):
        tokens_per_s = result.get("tokens_per_s")
        if tokens_per_s is None:
            return None
        return 6.0 * n_params * tokens_per_s / 1e9 - skipped_per_s
    episodes_per_s = result.get("episodes_per_s")
    if episodes_per_s is None:
        return None
    flops = ppo_flops_per_episode(n_params, result.get("prompt_tokens_per_episode", PPO_PROMPT_TOKENS),
                                  result.get("new_tokens_per_episode", PPO_NEW_TOKENS))
    return flops * episodes_per_s / 1e9 - skipped_per_s


def peak_gflops_of(result: dict) -> float:
    """The matmul peak: the best per-size median of peak_flops.py's trials (a median resists one lucky trial)."""
    return max(size["gflops_median"] for size in result["results"])


# ----------------------------------------------------------------------------- summarising (pure)

def other_cpu_frac(result: dict) -> float | None:
    """Other processes' CPU share during the timed part; None where a result line does not carry it."""
    cpu = result.get("cpu")
    return cpu.get("other_cpu_frac") if isinstance(cpu, dict) else None


def is_flagged(result: dict) -> bool:
    frac = other_cpu_frac(result)
    return frac is not None and frac > CONTAMINATION_LIMIT


@dataclass
class Group:
    """The runs of one stage × implementation × variant, and their medians."""

    stage: str
    impl: str
    variant: str
    label: str
    throughputs: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)  # ours: the rate after compilation and warm-up
    walls: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    gflops: list[float] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def throughput(self) -> float | None:
        return median_or_none(self.throughputs)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Summary:
    groups: list[Group]
    peak_gflops: float | None
    n_params: int | None
    flagged: list[dict]  # {round, stage, impl, variant, other_cpu_frac}

    def group(self, stage: str, impl: str, variant: str = "1x") -> Group | None:
        return next((g for g in self.groups if (g.stage, g.impl, g.variant) == (stage, impl, variant)), None)

    def ratio(self, stage: str, impl: str, variant: str = "1x", over: str = "trl") -> float | None:
        """Median throughput of ``impl`` ÷ that of ``over`` on ``stage`` (None if either is missing)."""
        mine, theirs = self.group(stage, impl, variant), self.group(stage, over)
        if mine is None or theirs is None or not mine.throughput or not theirs.throughput:
            return None
        return mine.throughput / theirs.throughput


def summarize(lines: list[dict], n_params: int | None = None) -> Summary:
    """Medians per stage and implementation from compare.py's result lines.

    Each line is ``{round, stage, impl, variant, result}`` with ``result`` the run's own JSON;
    ``stage == "peak"`` is peak_flops.py.
    """
    peaks = [peak_gflops_of(line["result"]) for line in lines if line["stage"] == "peak"]
    peak = median_or_none(peaks)
    groups: list[Group] = []
    flagged = []
    for stage in STAGES:
        key, _ = THROUGHPUT[stage]
        levers = [("rlhf", lever, f"ours, {' '.join(keys)}") for lever, keys in LEVERS[stage].items()]
        for impl, variant, label in (*IMPLEMENTATIONS[:1], *levers, *IMPLEMENTATIONS[1:]):
            runs = [line for line in lines if (line["stage"], line["impl"], line["variant"]) == (stage, impl, variant)]
            if not runs:
                continue
            group = Group(stage, impl, variant, label)
            for line in runs:
                result = line["result"]
                group.throughputs.append(float(result[key]))
                if result.get(STEADY[stage]) is not None:
                    group.steady.append(float(result[STEADY[stage]]))
                group.walls.append(float(result["wall_s"]))
                if result.get("peak_rss_mb") is not None:
                    group.rss.append(float(result["peak_rss_mb"]))
                gflops = achieved_gflops(stage, result, n_params) if n_params else None
                if gflops is not None:
                    group.gflops.append(gflops)
                group.flags.append(is_flagged(result))
                group.rounds.append(line["round"])
                if is_flagged(result):
                    flagged.append({"round": line["round"], "stage": stage, "impl": impl, "variant": variant,
                                    "other_cpu_frac": other_cpu_frac(result)})
            groups.append(group)
    return Summary(groups, peak, n_params, flagged)


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def format_table(summary: Summary) -> str:
    """A markdown table of medians; each run's throughput listed, a ``!`` on contaminated ones."""
    rows = ["| stage | implementation | throughput (median) | steady state | wall s | peak RSS MB | GFLOP/s | share of peak "
            "| runs |", "|---|---|---|---|---|---|---|---|---|"]
    for group in summary.groups:
        _, unit = THROUGHPUT[group.stage]
        gflops = median_or_none(group.gflops)
        share = (f"{100 * gflops / summary.peak_gflops:.0f} %"
                 if gflops is not None and summary.peak_gflops else "n/a")
        runs = ", ".join(f"{t:,.4g}{'!' if flag else ''}" for t, flag in zip(group.throughputs, group.flags))
        label = group.label
        steady = fmt(median_or_none(group.steady)) if group.steady else "-"
        rows.append(f"| {group.stage} | {label} | {fmt(group.throughput)} {unit} | {steady} "
                    f"| {fmt(median_or_none(group.walls), 1)} | {fmt(median_or_none(group.rss), 0)} | {fmt(gflops, 1)} "
                    f"| {share} | {runs} |")
    return "\n".join(rows)


def ratio_line(summary: Summary, name: str = "ratios", over: str = "trl", impl: str = "rlhf",
               variant: str = "1x") -> str:
    """``ratios: sft=X.XX rm=X.XX ppo=X.XX``: ``impl`` ÷ ``over`` medians (n/a for a stage not run)."""
    parts = [f"{stage}={fmt(summary.ratio(stage, impl, variant, over))}" for stage in STAGES]
    return f"{name}: " + " ".join(parts)


def footnotes(summary: Summary) -> list[str]:
    notes = [f"! other processes used more than {CONTAMINATION_LIMIT:.0%} of the CPU during the timed part: "
             + ", ".join(f"round {f['round']} {f['stage']} {f['impl']} {f['variant']} ({f['other_cpu_frac']:.3f})"
                         for f in summary.flagged)] if summary.flagged else []
    if summary.peak_gflops:
        notes.append(f"share of peak: useful GFLOP/s ÷ the measured fp32 matmul peak of {summary.peak_gflops:.0f} "
                     f"GFLOP/s; N = {summary.n_params:,} non-embedding parameters")
    return notes


def best_group(summary: Summary, stage: str) -> Group | None:
    """The fastest of ours with the defaults and ours with each lever (medians, compilation counted)."""
    candidates = [summary.group(stage, "rlhf", variant) for variant in ("1x", *LEVERS[stage])]
    candidates = [group for group in candidates if group is not None and group.throughput]
    return max(candidates, key=lambda group: group.throughput, default=None)


def share_of_peak(summary: Summary, group: Group | None) -> float | None:
    gflops = median_or_none(group.gflops) if group is not None else None
    return gflops / summary.peak_gflops if gflops is not None and summary.peak_gflops else None


def targets_line(summary: Summary) -> str:
    """``targets (best row): sft 1.73x of 2.0x, 62 % of 70 % peak (defaults); ...``: where each stage's best
    row stands, and which row it is."""
    parts = []
    for stage in STAGES:
        group = best_group(summary, stage)
        ratio = summary.ratio(stage, "rlhf", group.variant) if group is not None else None
        share = share_of_peak(summary, group)
        speed, peak = TARGETS[stage]
        which = "" if group is None else " (defaults)" if group.variant == "1x" else f" ({group.variant})"
        parts.append(f"{stage} {fmt(ratio)}x of {speed}x, " + ("n/a" if share is None else f"{100 * share:.0f} %")
                     + f" of {100 * peak:.0f} % peak{which}")
    return "targets (best row): " + "; ".join(parts)


def ratio_lines(summary: Summary) -> list[str]:
    """ours ÷ ceiling, ours 2x-length ÷ ours 1x, the best rows ÷ TRL against the targets, and last the
    ratios line (ours with the defaults ÷ TRL)."""
    best = "ratios (best row): " + " ".join(
        f"{stage}={fmt(summary.ratio(stage, 'rlhf', group.variant) if group else None)}"
        for stage, group in ((stage, best_group(summary, stage)) for stage in STAGES))
    return [ratio_line(summary, "ours ÷ ceiling", over="ceiling"),
            ratio_line(summary, "2x-length ÷ 1x (ours)", over="rlhf", variant="2x-length"),
            best, targets_line(summary), ratio_line(summary)]


def report_text(summary: Summary) -> str:
    """What compare.py prints: the table, its footnotes, then the ratio lines, the ratios line last."""
    return "\n".join([format_table(summary), "", *footnotes(summary), "", *ratio_lines(summary)])


# ----------------------------------------------------------------------------- locating and running

class SetupMissing(BenchError):
    """What the runs need is not there (a venv, the workload): ``make bench-setup`` is the fix (exit 2)."""


@dataclass
class Places:
    venvs: Path
    workload: Path
    python: str  # ours


def locate() -> Places:
    venvs = Path(os.environ.get("BENCH_VENVS", str(Path.home() / ".cache" / "rlhf-bench" / "venvs")))
    ours = common.REPO_ROOT / ".venv" / "bin" / "python"
    # Absolute, because the runs start in the repository root whatever directory we were started from.
    return Places(venvs.expanduser().resolve(), common.workload_root().resolve(),
                  str(ours) if ours.exists() else sys.executable)


def check_places(places: Places, stages: list[str]) -> None:
    """Everything the runs need, or one line saying what is missing and how to get it."""
    needed = [places.venvs / venv / "bin" / "python" for venv in sorted({"trl116", *(ANCHOR_VENV[s] for s in stages)})]
    for path in needed:
        if not path.exists():
            raise SetupMissing(f"compare: {path} not found (BENCH_VENVS); {common.SETUP_HINT}")
    try:
        common.verify_workload(places.workload)
    except common.WorkloadError as error:
        raise SetupMissing(str(error)) from None


def commands(places: Places, stage: str, skip_double: bool,
             skip_levers: bool = False) -> list[tuple[str, str, list[str]]]:
    """(impl, variant, argv) of one stage's runs in one round, in the order they run."""
    trl116 = str(places.venvs / "trl116" / "bin" / "python")
    ours = [places.python, str(common.REPO_ROOT / "benchmarks" / f"{stage}.py")]
    levers = [] if skip_levers else [("rlhf", lever, [*ours, *keys]) for lever, keys in LEVERS[stage].items()]
    runs = [("rlhf", "1x", ours), *levers,
            ("trl", "1x", [str(places.venvs / ANCHOR_VENV[stage] / "bin" / "python"), str(ANCHOR_DIR / f"trl_{stage}.py")]),
            ("ceiling", "1x", [trl116, str(ANCHOR_DIR / "torch_ceiling.py"), "--stage", stage])]
    if not skip_double:
        runs.append(("rlhf", "2x-length", [*ours, "--double"]))
    return runs


def run_one(argv: list[str]) -> dict:
    """Run a benchmark process; its last stdout line is its JSON result."""
    env = {**os.environ, "BENCH_THREADS": os.environ.get("BENCH_THREADS", "2")}
    process = subprocess.run(argv, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True)
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = "\n".join(process.stderr.strip().splitlines()[-15:])
        raise BenchError(f"compare: `{' '.join(argv)}` failed (exit {process.returncode}); stderr tail:\n{tail}")
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise BenchError(f"compare: `{' '.join(argv)}` did not end its stdout with a JSON line: {lines[-1][:200]}") from None


def headline(stage: str, result: dict) -> str:
    if stage == "peak":
        return f"peak {peak_gflops_of(result):.0f} GFLOP/s"
    key, unit = THROUGHPUT[stage]
    frac = other_cpu_frac(result)
    return (f"{result[key]:,.2f} {unit}, {result['wall_s']:.1f} s"
            + (f", other CPU {frac:.3f}" if frac is not None else ""))


def run_plan(places: Places, stages: list[str], rounds: int, skip_double: bool,
             double_rounds: int | None = None, skip_levers: bool = False) -> list[tuple[int, str, str, str, list[str]]]:
    """(round, stage, impl, variant, argv) of every run, in order: peak_flops.py once (round 0),
    then ``rounds`` rounds of every stage's runs.

    The 2x-length runs (a scaling row, the slowest runs) take part in the first ``double_rounds``
    rounds only (None: all). ``skip_levers`` leaves out ours with each lever (LEVERS).
    """
    plan = [(0, "peak", "peak", "1x", [str(places.venvs / "trl116" / "bin" / "python"),
                                         str(ANCHOR_DIR / "peak_flops.py")])]
    for round_index in range(1, rounds + 1):
        for stage in stages:
            no_double = skip_double or (double_rounds is not None and round_index > double_rounds)
            plan += [(round_index, stage, impl, variant, argv)
                     for impl, variant, argv in commands(places, stage, no_double, skip_levers)]
    return plan


def run_all(places: Places, stages: list[str], rounds: int, skip_double: bool, results_path: Path,
            double_rounds: int | None = None, skip_levers: bool = False) -> list[dict]:
    """Every run of ``run_plan``, one after another; each result line saved as it comes."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("")
    plan = run_plan(places, stages, rounds, skip_double, double_rounds, skip_levers)
    lines = []
    for index, (round_index, stage, impl, variant, argv) in enumerate(plan, 1):
        started = time.perf_counter()
        print(f"[{index}/{len(plan)}] round {round_index} {stage} {impl} {variant} ...", end=" ", file=sys.stderr, flush=True)
        result = run_one(argv)
        print(f"{headline(stage, result)} ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr, flush=True)
        line = {"round": round_index, "stage": stage, "impl": impl, "variant": variant, "command": argv, "result": result}
        lines.append(line)
        with open(results_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
    return lines


# ----------------------------------------------------------------------------- BENCHMARKS.md

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions_text(lines: list[dict]) -> list[str]:
    """One line per implementation and distinct set of versions, from the runs' own reports."""
    seen: dict[str, str] = {}
    for line in lines:
        versions = line["result"].get("versions") or ({"torch": line["result"]["torch"]} if "torch" in line["result"] else None)
        if not versions:
            continue
        who = {"rlhf": "ours", "trl": f"TRL anchor ({line['stage']})", "ceiling": "ceiling", "peak": "peak_flops"}[line["impl"]]
        text = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        seen.setdefault(f"{who}: {text}", who)
    return [f"- {entry}" for entry in seen]


def benchmarks_md(summary: Summary, lines: list[dict], rounds: int, stages: list[str], started: datetime.datetime) -> str:
    threads = os.environ.get("BENCH_THREADS", "2")
    flagged = (", ".join(f"round {f['round']} {f['stage']} {f['impl']} {f['variant']} ({f['other_cpu_frac']:.3f})"
                         for f in summary.flagged) or "none")
    return f"""# Benchmarks: ours against TRL and a plain-torch ceiling

Written by `benchmarks/compare.py` (`make bench`); overwritten by each run. Raw JSON lines:
`benchmarks/results/latest.jsonl`.

- date: {started:%Y-%m-%d %H:%M} (local time)
- machine: {cpu_model()}, {os.cpu_count()} cores; {threads} torch threads per run (BENCH_THREADS), fp32
- rounds: {rounds}, interleaved (ours, ours with each speed key, TRL, ceiling, ours 2x-length per stage and round); stages: {", ".join(stages)}
- runs with other processes above {CONTAMINATION_LIMIT:.0%} of the CPU (flagged `!`): {flagged}

{format_table(summary)}

{chr(10).join(note + chr(10) for note in footnotes(summary))}
```
{chr(10).join(ratio_lines(summary))}
```

## What is measured
The benchmark workload ([docs/benchmark.md](docs/benchmark.md); `make bench-setup` generates it
with `benchmarks/workload.py`, and every run checks its bytes against its MANIFEST.json and the
published hashes in `benchmarks/workload.sha256`): GPT-2 6 layers × 384, random init; SFT 512
rows, batch 8, max length 256; RM 256 pairs, batch 8 pairs; PPO 128 episodes of 32 prompt + 32
sampled tokens (temperature 0.7), rollout 16, 2 minibatches of 8, 1 PPO epoch, policy, reference,
reward and value model. AdamW lr 5e-5 constant, clip 1.0, seed 0, 1 epoch, no evaluation or
saving. The anchors are `benchmarks/anchors/`: `trl_sft.py` and `trl_rm.py` (TRL 1.16.0),
`trl_ppo.py` (TRL 0.29.1, the last release with a PPOTrainer), `torch_ceiling.py` (plain torch)
and `peak_flops.py`, each in a venv of its own pinned by `benchmarks/anchors/requirements-*.txt`
(the versions that really ran are listed below). The optimizer implementation is the anchor's:
torch's default AdamW for SFT and RM (the TRL anchors pass `optim=adamw_torch`), the fused kernel
for PPO, which TRL's PPO anchor runs (it sets no `optim`, so transformers' default
`adamw_torch_fused`); the ceiling uses torch's multi-tensor (`foreach`) AdamW; every JSON line
records its `optim`. The 2x-length variant doubles every text (`text + " " + text`; PPO prompts
doubled and 64 new tokens) at max length 512.

Throughput is real (non-pad) tokens/s for SFT, pairs/s for RM, episodes/s for PPO (the
ratios compare these), over the training only: ours from the library's own `train_runtime_s` (first step to the end of the
last, metrics.jsonl), the anchors from their trainer's `train()` call. Peak RSS is the whole
process's maximum resident set. Medians over rounds; ratios are of medians.

Useful arithmetic, the same count for every implementation (N = non-embedding parameters):
- SFT and RM: 6·N per real token (forward + backward), counting the tokens each implementation
  really processed: our reward model with `prefix_sharing` (default) runs each prompt once, TRL
  and the ceiling once per response, so for RM its tokens/s and GFLOP/s count less work than
  theirs and only pairs/s compares the same task. With `training.trim_last_block` (default) our
  SFT and RM run the last block's feed-forward only where an output is read (SFT: the positions
  that predict a trained token; RM: each response's EOS): their GFLOP/s leave out that skipped
  work (`skipped_gflop` in their JSON lines, 6 × the feed-forward's weights × the other tokens).
- PPO, per episode of L = prompt + response tokens: generation 2N·L, the policy-logprob,
  reference, reward and value forwards 4 × 2N·L, policy and value training 2 × 6N·L:
  **22·N·L** (with one PPO epoch). TRL takes its rollout logprobs from generation, and so do we
  with `ppo.logprobs_from_generation` (our JSON line gives the value used): 20·N·L of real work.
  Trimmed, our policy, reference and critic run the last block's feed-forward only at the positions
  before each response token and our reward model only at the EOS: the GFLOP/s leave that out too
  (`skipped_gflop`: 2 FLOPs per weight and skipped position for a forward, 6 with the backward).
Share of peak = useful GFLOP/s ÷ the fp32 matmul peak that `benchmarks/anchors/peak_flops.py` measures
(best per-size median, {threads} threads).

## Where our runs differ from the anchors' work
- Our tokenizer handling adds a dedicated pad token (the workload's pad is its EOS), so our
  models have 8,193 embedding rows instead of 8,192 (one row more: negligible arithmetic).
- PPO: our sampler ends a response at its first EOS and stops sampling once every response of
  the batch has ended; the workload asks for no early stop. With the random model EOS is rare
  (our JSON line gives `generated_tokens` against `generated_tokens_max`).
- PPO: one AdamW over policy and value, one learning rate and one clipped norm, as TRL
  (`ppo.separate_optimizers: false` in benchmarks/configs/ppo.yaml; the library's default gives
  the critic its own parameter groups at `critic_lr` and its own clipping); the value model starts from
  the reward model (`critic.init: reward`), TRL's from the GPT-2 with a fresh head (the same
  arithmetic).
- SFT and RM batch rows of similar length (`training.group_by_length: true` in
  benchmarks/configs/, as the ceiling's length-sorted batches; the same rows, in another order);
  everything else the workload leaves open takes the library's defaults (`prefix_sharing`,
  `ppo.logprobs_from_generation`); each JSON line records them.
- Our trainers keep the memory freed during training in the process for the next step
  (`training.keep_freed_memory`, default: glibc's `mallopt`, set for the length of `train()`);
  the anchors run on glibc's malloc defaults, which TRL leaves alone. Each JSON line of ours records
  `keep_freed_memory`.

## Versions
{chr(10).join(versions_text(lines))}
{gpu_section(GPU_RESULTS)}{memory_section(MEMORY_RESULTS)}"""


GPU_RESULTS = common.REPO_ROOT / "benchmarks" / "gpu_results.jsonl"  # kept in git: CI machines have no GPU
MEMORY_RESULTS = common.REPO_ROOT / "benchmarks" / "memory_results.jsonl"  # kept in git: minutes per row
MEMORY_START, MEMORY_END = "<!-- memory.py -->", "<!-- /memory.py -->"
# What LoRA (and checkpointing) must save, as a share of full fine-tuning's peak RSS (issue targets).
MEMORY_TARGETS = {("ppo", "lora"): 0.35, ("sft", "lora_gc"): 0.40, ("rm", "lora_gc"): 0.40}


def last_run_rows(path: Path, run_keys: tuple[str, ...]) -> list[dict]:
    """The rows of a kept results file (JSON lines) that belong to its last run: those agreeing with the
    last row on ``run_keys``, in file order; empty when the file is missing or empty."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if all(row.get(key) == rows[-1].get(key) for key in run_keys)]


def memory_table(rows: list[dict]) -> list[str]:
    """Markdown rows: peak RSS and throughput per stage and mode, with the share of full fine-tuning's RSS
    under the same malloc setting."""
    full = {(row["stage"], row.get("malloc")): row["peak_rss_mb"] for row in rows if row["mode"] == "full"}
    lines = ["| malloc | stage | mode | peak RSS MB | share of full | target | throughput | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = full.get((row["stage"], row.get("malloc")))
        share = row["peak_rss_mb"] / base if base else None
        target = MEMORY_TARGETS.get((row["stage"], row["mode"]))
        verdict = "" if target is None or share is None else f"≤ {target:.0%}: {'met' if share <= target else 'missed'}"
        rate = (f"{row['episodes_per_s']} episodes/s" if row["stage"] == "ppo"
                else f"{row['real_tokens_per_s']:,} real tokens/s")
        malloc = {"mmap_threshold_64k": "64 KiB mmap threshold", "glibc_default": "glibc default"}.get(
            row.get("malloc"), "glibc default")
        lines.append(f"| {malloc} | {row['stage']} | {row['mode']} | {row['peak_rss_mb']:,.0f} | "
                     f"{'-' if share is None else f'{share:.0%}'} | {verdict} | {rate} | {row['train_runtime_s']} |")
    return lines


def memory_section(path: Path) -> str:
    """The last run of benchmarks/memory.py (kept across `make bench` runs, between markers); empty without one."""
    rows = last_run_rows(path, ("date",))
    if not rows:
        return ""
    latest = list({(row.get("malloc"), row["stage"], row["mode"]): row for row in rows}.values())  # measured twice: the last
    shape = rows[-1]["shape"]
    lines = ["", MEMORY_START, "## Memory at a real size: full fine-tuning, LoRA, LoRA + checkpointing (`benchmarks/memory.py`)",
             f"Measured {rows[-1]['date']} on this CPU ({rows[-1]['env'].get('cpu_capability')}, {rows[-1]['threads']} "
             f"threads, fp32), torch {rows[-1]['versions']['torch']}: a random GPT-2 of gpt2-medium's shape "
             f"({shape['n_layer']} layers, d={shape['n_embd']}, vocabulary {shape['vocab_size']:,}: 355 M parameters), "
             "a few steps of each stage on rows of realistic length (SFT ~250 tokens, batch 4; RM ~300 tokens per "
             "response, 2 prompts × 2 responses, prefix sharing off in every mode; PPO 8 episodes of ~100 + 64 "
             "tokens). Each row is its own process; peak RSS is that process's maximum resident set. LoRA: rank 16 "
             "on every linear layer of the blocks (PPO: policy and critic; the reference and the reward model are "
             "their adapter-free bases). glibc's malloc keeps freed activation buffers in its heap, so with its "
             "default settings peak RSS measures the allocator's high-water mark; with MALLOC_MMAP_THRESHOLD_=65536 "
             "large blocks go back to the system when freed (the same speed, measured), and RSS follows what "
             "training holds.", "", *memory_table(latest), MEMORY_END]
    return "\n".join(lines) + "\n"


def update_memory_section(benchmarks_md: Path, results: Path) -> None:
    """Rewrite only the memory section of an existing BENCHMARKS.md (memory.py runs apart from make bench)."""
    section = memory_section(results).strip("\n")
    text = benchmarks_md.read_text(encoding="utf-8") if benchmarks_md.exists() else ""
    if MEMORY_START in text and MEMORY_END in text:
        before, rest = text.split(MEMORY_START, 1)
        text = before.rstrip("\n") + "\n\n" + section + rest.split(MEMORY_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    benchmarks_md.write_text(text, encoding="utf-8")


def gpu_section(path: Path) -> str:
    """The last GPU run of benchmarks/gpu.py (the gpt2 configs), kept across CPU runs; empty without one.
    One table row per measured row (``--label``: the presets as shipped, or with the keys ``--set`` changed)
    and stage, in the order measured. Rows of one ``--series`` make one table (several device calls); older rows
    without a series, those of one date and device."""
    rows = last_run_rows(path, ("date", "device"))
    if rows and rows[-1].get("series"):
        rows = last_run_rows(path, ("series",))
    if not rows:
        return ""
    lines = ["", "## GPU: the gpt2 configs (`benchmarks/gpu.py`, not part of `make bench`)",
             f"Measured {rows[-1]['date']} on {rows[-1]['device']}, bf16 (`mixed_precision: auto`), torch "
             f"{rows[-1]['versions']['torch']}: configs/{{sft,rm,ppo}}_gpt2.yaml (batch, accumulation, rollout) as "
             "shipped or with the keys a row names, a random GPT-2 of gpt2's shape (124 M parameters; the machine has "
             "no network for the hub weights and datasets) on synthetic rows of the datasets' lengths, for the "
             "optimizer steps (PPO: PPO steps) the table gives. Throughput and MFU are whole runs, start-up and compilation included; steady state is the "
             "median rate of the run's second half. MFU = useful FLOP/s ÷ the dense bf16 peak "
             f"({rows[-1]['peak_tflops']} TFLOP/s), counted two ways: every matmul the stage needs (6·N per token, "
             "the vocabulary projection where logits are read, PPO's epochs: benchmarks/gpu.py), and the CPU "
             "table's count (6·N per token, 22·N·L per PPO episode: one epoch, no vocabulary projection).", "",
             "| row | stage | throughput | steady state | useful TFLOP/s | MFU | MFU (CPU table's count) | steps "
             "| peak GPU memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    units = {"sft": ("real_tokens_per_s", "real tokens/s"), "rm": ("pairs_per_s", "pairs/s"),
             "ppo": ("episodes_per_s", "episodes/s")}
    for row in rows:
        stage = row["stage"]
        key, unit = units[stage]
        extra = (f" ({row['real_tokens_per_s']:,} tokens/s)" if stage == "rm" and row.get("real_tokens_per_s")
                 else f" ({row['generated_tokens_per_s']:,} generated tokens/s)" if stage == "ppo" else "")
        if stage == "ppo" and row.get("steady_episodes_per_s") is not None:
            steady = f"{row['steady_episodes_per_s']} episodes/s"
            if row.get("steady_rollout_s") is not None:
                steady += f" (a step: rollout {row['steady_rollout_s']} s, update {row['steady_update_s']} s)"
        elif row.get("steady_tokens_per_s") is not None:
            steady = f"{row['steady_tokens_per_s']:,.0f} tokens/s"
        else:
            steady = "n/a"
        # Rows measured before the count took in the vocabulary projection and PPO's epochs have one MFU: 6·N's.
        counted_all = "flops" in row
        mfu = f"{row['mfu']:.1%}" if counted_all and row.get("mfu") is not None else "n/a"
        mfu_6n = row.get("mfu_6n") if counted_all else row.get("mfu")
        mfu_6n = f"{mfu_6n:.1%}" if mfu_6n is not None else "n/a"
        tflops = row["tflops"] if counted_all else f"{row['tflops']} (6·N)"
        lines.append(f"| {row.get('label', 'as shipped')} | {stage} | {row[key]:,} {unit}{extra} | {steady} | "
                     f"{tflops} | {mfu} | {mfu_6n} | {row['steps']} | {row['peak_gpu_mem_gb']} GB |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are over them)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,rm,ppo")
    parser.add_argument("--skip-double", action="store_true", help="leave out the 2x-length runs of ours")
    parser.add_argument("--skip-levers", action="store_true",
                        help="leave out ours with each speed key (training.packing, training.compile)")
    parser.add_argument("--double-rounds", type=int, default=1,
                        help="run the 2x-length rows in the first N rounds only (default 1: a scaling row, the slowest runs)")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; expected some of sft,rm,ppo")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now()
    try:
        places = locate()
        check_places(places, args.stages)
        lines = run_all(places, args.stages, args.rounds, args.skip_double,
                        common.REPO_ROOT / "benchmarks" / "results" / "latest.jsonl", args.double_rounds,
                        args.skip_levers)
    except BenchError as error:
        print(error, file=sys.stderr)
        return 2 if isinstance(error, SetupMissing) else 1
    summary = summarize(lines, non_embedding_params(places.workload / "model"))
    (common.REPO_ROOT / "BENCHMARKS.md").write_text(benchmarks_md(summary, lines, args.rounds, args.stages, started),
                                                    encoding="utf-8")
    print(report_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
