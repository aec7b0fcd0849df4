"""``rlhf sft|rm|ppo|pipeline`` (and ``rlhf score``): parse ``--config`` and ``key.sub=value`` overrides, call the library.

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
    "rm": ("rlhf.config", "RewardConfig", "rlhf.trainers.reward", "RewardTrainer", "reward model on human comparisons"),
    "ppo": ("rlhf.config", "PPOConfig", "rlhf.trainers.ppo", "PPOTrainer", "PPO against a reward model with a KL penalty"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF: SFT, reward model, PPO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (*_, description) in STAGES.items():
        stage = commands.add_parser(name, help=description, description=description)
        stage.add_argument("--config", required=True, help="YAML config file (a run's config.yaml re-launches it)")
        stage.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields")
    pipeline = commands.add_parser("pipeline", help="SFT -> reward model -> PPO, evaluation and report",
                                   description="Run the whole pipeline; finished stages are skipped, interrupted "
                                               "ones resume. Overrides address a stage: rm.training.lr=1e-4.")
    pipeline.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/pipeline.yaml)")
    pipeline.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields")
    report = commands.add_parser("report", help="rebuild report.md of a pipeline run directory")
    report.add_argument("run_dir", help="a pipeline output_dir")
    score = commands.add_parser("score", help="score prompt/response rows with a trained reward model",
                                description="Score {prompt, response} rows (tokenised as in RM training: prompt + "
                                            "response + EOS) with a reward model's final/, normalisation applied.")
    score.add_argument("--model", required=True, help="reward model directory (an `rlhf rm` final/)")
    score.add_argument("--data", required=True, help="a .json/.jsonl/.csv/.parquet file of {prompt, response} rows")
    score.add_argument("--output", help="write {prompt, response, score} jsonl here (default: print to stdout)")
    score.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    return parser


def run_score(args: argparse.Namespace) -> str:
    """``rlhf score``: the scores go to --output, or one JSON line per row on stdout."""
    import json

    from rlhf.scoring import score_file

    rows = score_file(args.model, args.data, args.output, batch_size=args.batch_size)
    if args.output is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    mean = sum(row["score"] for row in rows) / len(rows)
    return f"scored {len(rows)} rows, mean score {mean:.4f}" + (f"; wrote {args.output}" if args.output else "")


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
    import transformers

    # Keep the terminal to our progress and errors; a newly initialised score head is expected here.
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "score":
            result = run_score(args)
        elif args.command == "pipeline":
            from rlhf.config import PipelineConfig, load_config
            from rlhf.pipeline import run_pipeline

            result = run_pipeline(load_config(PipelineConfig, args.config, args.overrides))
        elif args.command == "report":
            from rlhf.report import write_report

            result = write_report(args.run_dir)
        else:
            result = run_stage(args.command, args.config, args.overrides, args.resume)
    except UserError as error:
        print(f"rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(f"rlhf {args.command}: done: {result}")
    return 0


def main_entry() -> None:
    """Console-script entry point (``rlhf``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
