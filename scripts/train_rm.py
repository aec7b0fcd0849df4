#!/usr/bin/env python
"""Stage 2, reward model: python scripts/train_rm.py --config configs/rm.yaml [--resume] [key=value ...]"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", *sys.argv[1:]]))
