#!/usr/bin/env python
"""The fp32 matmul throughput this CPU reaches with torch: the peak that "share of peak" divides by.

    $BENCH_VENVS/trl116/bin/python benchmarks/anchors/peak_flops.py [--sizes 384,1024,2048,4096] [--trials 5]

For each size n: ``torch.matmul(a, b, out=c)`` on n x n fp32 matrices, a warm-up, then ``reps``
back-to-back products timed as one trial (2·n³·reps FLOP), ``trials`` times. Every trial is kept,
so that a report can quote the median (compare.py takes the best per-size median, which one lucky
trial cannot move) as well as the best. BENCH_THREADS torch threads (default 2), like every run.

Prints one JSON line.
"""

import harness  # noqa: F401  (must come first: pins the threads before torch loads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from harness import common  # noqa: E402


def measure(n: int, reps: int, trials: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    c = torch.empty(n, n)
    for _ in range(3):  # warm-up: first calls pay for allocation and kernel selection
        torch.matmul(a, b, out=c)
    rates = []
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        seconds = time.perf_counter() - started
        rates.append(2 * n**3 * reps / seconds / 1e9)
    return {"n": n, "reps": reps, "gflops_trials": [round(r, 2) for r in rates],
            "gflops_median": round(statistics.median(rates), 2), "gflops_max": round(max(rates), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384,1024,2048,4096",
                        help="matrix sizes; 384 is the workload model's width")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    results = []
    for n in [int(size) for size in args.sizes.split(",")]:
        # about 20 products of 2048³ worth of work per trial, whatever the size (at most 4000 products)
        reps = min(max(2, int(round(20 * (2048 / n) ** 3))), 4000)
        results.append(measure(n, reps, args.trials))
    common.emit({"anchor": "peak_fp32_matmul", "results": results, "env": common.env_info(),
                 "torch": torch.__version__, "blas": "mkl" if torch.__config__.show().count("mkl") > 0 else "other",
                 "peak_gflops": max(r["gflops_max"] for r in results)})


if __name__ == "__main__":
    main()
