#!/usr/bin/env python
"""Time the whole pipeline on the embedded demo, stage by stage.

    python scripts/bench_pipeline.py [--output-dir runs/bench] [key=value ...]

Runs `rlhf pipeline --config configs/pipeline.yaml` into a fresh directory and prints one JSON
line: wall seconds per stage, total, peak RSS, and the headline results.
"""

import argparse
import json
import resource
import shutil
import sys
import time

from rlhf.cli import main


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/bench")
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    start = time.perf_counter()
    status = main(["pipeline", "--config", args.config, f"output_dir={args.output_dir}", *args.overrides])
    if status:
        return status
    with open(f"{args.output_dir}/timings.json", encoding="utf-8") as handle:
        timings = json.load(handle)
    with open(f"{args.output_dir}/evaluation.json", encoding="utf-8") as handle:
        evaluation = json.load(handle)
    print(json.dumps({
        "seconds_per_stage": timings,
        "total_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "gold_sft": round(evaluation["sft"]["gold"]["mean"], 4),
        "gold_ppo": round(evaluation["ppo"]["gold"]["mean"], 4),
        "win_rate": round(evaluation.get("win_rate_ppo_over_sft", float("nan")), 4),
        "gold_gain_in_sft_std": round(evaluation.get("gold_gain_in_sft_std", float("nan")), 4),
        "kl_ppo_to_sft": round(evaluation["kl_ppo_to_sft"]["mean"], 4),
        "eval_samples_per_policy": evaluation["ppo"]["gold"]["n"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(run())
