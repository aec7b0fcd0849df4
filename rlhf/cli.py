"""``rlhf sft|rm|ppo|pipeline``: parse ``--config`` and ``key.sub=value`` overrides, call the library.

A ``UserError`` becomes one line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlhf.errors import UserError

STAGES = {
    "sft": ("rlhf.config", "SFTConfig", "rlhf.trainers.sft", "SFTTrainer", "supervised fine-tuning on demonstrations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF: SFT, reward model, PPO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (*_, description) in STAGES.items():
        stage = commands.add_parser(name, help=description, description=description)
        stage.add_argument("--config", required=True, help="YAML config file (a run's config.yaml re-launches it)")
        stage.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields")
    return parser


def run_stage(name: str, config_path: str, overrides: list[str], resume: bool) -> str:
    import importlib

    config_module, config_class, trainer_module, trainer_class, _ = STAGES[name]
    from rlhf.config import load_config

    config = load_config(getattr(importlib.import_module(config_module), config_class), config_path, overrides)
    trainer = getattr(importlib.import_module(trainer_module), trainer_class)(config)
    return trainer.train(resume=resume)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "accelerate", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        result = run_stage(args.command, args.config, args.overrides, args.resume)
    except UserError as error:
        print(f"rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(f"rlhf {args.command}: done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def main_entry() -> None:
    """Console-script entry point (``rlhf``)."""
    sys.exit(main())
