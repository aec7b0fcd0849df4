#!/usr/bin/env python
"""The whole pipeline: python scripts/run_pipeline.py --config configs/pipeline.yaml [key=value ...]"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
