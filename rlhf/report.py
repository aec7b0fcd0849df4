"""report.md for a pipeline run directory: curves of every stage, the over-optimisation picture,
the held-out evaluation and before/after samples. ``rlhf report RUN_DIR`` rebuilds it.

Plots need matplotlib (``pip install 'rlhf[report]'``); without it the report has the tables only.
"""

from __future__ import annotations

import glob
import json
import logging
import os

from rlhf.errors import UserError

logger = logging.getLogger(__name__)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def write_report(run_dir: str) -> str:
    """Write ``run_dir/report.md`` (and PNGs beside it); returns its path."""
    if not os.path.isdir(os.path.join(run_dir, "sft")):
        raise UserError(f"report: '{run_dir}' is not a pipeline run directory (no sft/ inside)")
    sft = read_metrics(os.path.join(run_dir, "sft", "metrics.jsonl"))
    rounds = sorted(glob.glob(os.path.join(run_dir, "round-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    rm_runs = [read_metrics(os.path.join(r, "rm", "metrics.jsonl")) for r in rounds]
    ppo_runs = [read_metrics(os.path.join(r, "ppo", "metrics.jsonl")) for r in rounds]
    evaluation = None
    if os.path.exists(os.path.join(run_dir, "evaluation.json")):
        with open(os.path.join(run_dir, "evaluation.json"), encoding="utf-8") as handle:
            evaluation = json.load(handle)
    images = plot_all(run_dir, sft, rm_runs, ppo_runs)

    lines = ["# RLHF pipeline report", "", f"Run directory: `{run_dir}`", ""]
    eval_loss = series(sft, "eval/loss")[1]
    if eval_loss:
        lines += ["## SFT", "", f"Eval loss {eval_loss[0]:.3f} before training, {eval_loss[-1]:.3f} after "
                  f"(perplexity {series(sft, 'eval/perplexity')[1][-1]:.2f}).", ""]
    for index, rm in enumerate(rm_runs):
        accuracy = series(rm, "eval/accuracy")[1]
        if accuracy:
            lines += [f"## Reward model (round {index})", "",
                      f"Held-out pair accuracy {accuracy[0]:.3f} before training, **{accuracy[-1]:.3f}** after "
                      "(on held-out pairs labelled by the noiseless gold labeler: agreement with it).", ""]
    for index, ppo in enumerate(ppo_runs):
        if ppo:
            first, last = ppo[0], ppo[-1]
            lines += [f"## PPO (round {index})", "", "| metric | first step | last step |", "|---|---|---|"]
            for key in ("reward/mean", "gold/mean", "kl", "entropy", "response_length", "kl_coef"):
                if key in first:
                    lines.append(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
            lines.append("")
    if evaluation:
        lines += evaluation_section(evaluation)
    timings_path = os.path.join(run_dir, "timings.json")
    if os.path.exists(timings_path):
        with open(timings_path, encoding="utf-8") as handle:
            timings = json.load(handle)
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
        lines += [f"| total | {sum(timings.values()):.1f} |", ""]
    if images:
        lines += ["## Curves", ""] + [f"![{name}]({name})" for name in images] + [""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


def evaluation_section(evaluation: dict) -> list[str]:
    lines = ["## Held-out evaluation", "",
             f"{evaluation['num_prompts']} held-out prompts, {evaluation.get('samples_per_prompt', 1)} sample(s) each per "
             "policy (standard errors over the prompts' means).", "",
             "| policy | gold mean ± s.e. (std) | proxy RM mean ± s.e. |", "|---|---|---|"]
    for name in ("sft", "ppo"):
        gold, proxy = evaluation[name]["gold"], evaluation[name]["proxy"]
        lines.append(f"| {name.upper()} | {gold['mean']:.3f} ± {gold['stderr']:.3f} ({gold['std']:.3f}) | "
                     f"{proxy['mean']:.3f} ± {proxy['stderr']:.3f} |")
    if "win_rate_ppo_over_sft" in evaluation:
        lines += ["", f"Win rate of PPO over SFT by the gold labeler: **{evaluation['win_rate_ppo_over_sft']:.3f}** "
                      f"(ties count half); gold gain = {evaluation['gold_gain_in_sft_std']:.2f} SFT standard deviations."]
    if "kl_ppo_to_sft" in evaluation:  # absent from runs written before it was measured
        kl = evaluation["kl_ppo_to_sft"]
        lines += ["", f"KL(PPO ‖ SFT) on the PPO samples: {kl['mean']:.2f} ± {kl['stderr']:.2f} nats per response "
                      "(summed over its tokens, at the evaluation temperature)."]
    lines += ["", "### Samples (same held-out prompts)", "", "| prompt | SFT (gold / proxy) | PPO (gold / proxy) |",
              "|---|---|---|"]
    for sample in evaluation.get("samples", []):
        def cell(name):
            text = sample[f"{name}_response"].replace("|", "\\|").replace("\n", " ")
            return f"{text} ({sample[f'{name}_gold']:.2f} / {sample[f'{name}_proxy']:.2f})"
        lines.append(f"| {sample['prompt'].strip()} | {cell('sft')} | {cell('ppo')} |")
    return lines + [""]


def plot_all(run_dir: str, sft: list[dict], rm_runs: list[list[dict]], ppo_runs: list[list[dict]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed; report without plots (pip install 'rlhf[report]')")
        return []
    images = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(os.path.join(run_dir, name), dpi=110)
        plt.close(figure)
        images.append(name)

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(*series(sft, "loss"), label="train")
    axes[0].plot(*series(sft, "eval/loss"), "o-", label="eval")
    axes[0].set(title="SFT loss", xlabel="step")
    axes[0].legend()
    for index, rm in enumerate(rm_runs):
        axes[1].plot(*series(rm, "accuracy"), alpha=0.6, label=f"train (round {index})")
        axes[1].plot(*series(rm, "eval/accuracy"), "o-", label=f"held-out (round {index})")
    axes[1].set(title="Reward model accuracy", xlabel="step")
    axes[1].legend()
    save(figure, "sft_rm.png")

    if any(ppo_runs):
        keys = [("reward/mean", "proxy reward (RM)"), ("kl", "KL to reference"), ("entropy", "entropy / token"),
                ("response_length", "response length")]
        figure, axes = plt.subplots(1, 4, figsize=(14, 3.2))
        for axis, (key, title) in zip(axes, keys):
            for index, ppo in enumerate(ppo_runs):
                axis.plot(*series(ppo, key), label=f"round {index}")
            if key == "reward/mean" and any("gold/mean" in r for ppo in ppo_runs for r in ppo):
                for index, ppo in enumerate(ppo_runs):
                    axis.plot(*series(ppo, "gold/mean"), "--", label=f"gold (round {index})")
                axis.legend(fontsize=7)
            axis.set(title=title, xlabel="PPO step")
        save(figure, "ppo.png")

        # Gao et al. 2022: scores against sqrt(KL) from the initial policy (each round's reference: SFT in
        # round 0, the previous round's policy after it).
        figure, axis = plt.subplots(figsize=(5, 3.6))
        for index, ppo in enumerate(ppo_runs):
            points = [r for r in ppo if "kl" in r]
            root_kl = [max(r["kl"], 0.0) ** 0.5 for r in points]
            axis.plot(root_kl, [r["reward/mean"] for r in points], "o-", ms=3, label=f"proxy RM (round {index})")
            if points and "gold/mean" in points[0]:
                axis.plot(root_kl, [r["gold/mean"] for r in points], "s--", ms=3, label=f"gold (round {index})")
        reference = "π_ref) (nats^½), π_ref = the round's start" if len(ppo_runs) > 1 else "π_SFT) (nats^½)"
        axis.set(title="Over-optimisation: score vs √KL", xlabel=f"√KL(π ‖ {reference}", ylabel="score")
        axis.legend(fontsize=7)
        save(figure, "overoptimization.png")
    return images
