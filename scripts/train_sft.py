#!/usr/bin/env python
"""Stage 1, supervised fine-tuning: python scripts/train_sft.py --config configs/sft.yaml [--resume] [key=value ...]"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
