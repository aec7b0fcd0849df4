#!/usr/bin/env python
"""Stage 3, PPO: python scripts/train_ppo.py --config configs/ppo.yaml [--resume] [key=value ...]"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
