"""Generate the demo data set (SFT rows, prompt sets, preference pairs, tokenizer).

    python scripts/make_demo_data.py [--out data/demo] [--seed 0]

The shipped data/demo is this script's output for seed 0; the unit tests check that it
matches a fresh build, so rerun this after any change to rlhf/demo.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.build import build_demo_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    manifest = build_demo_data(args.out, seed=args.seed)
    seconds = time.perf_counter() - start
    for name, entry in manifest["files"].items():
        rows = f"{entry['rows']:>6} rows" if "rows" in entry else " " * 11
        logging.info("%-32s %s %9d bytes", name, rows, entry["bytes"])
    for key, value in manifest["stats"].items():
        logging.info("%s: %s", key, value)
    logging.info("wrote %s in %.1f s", args.out, seconds)


if __name__ == "__main__":
    main()
