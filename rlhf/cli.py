"""``rlhf sft|rm|ppo|pipeline`` (and ``rlhf score``, ``rlhf report``): parse ``--config`` and ``key.sub=value``
overrides, call the library. ``--help`` lists every config key with its type, default and meaning;
``--print-config`` writes the resolved config as commented YAML.

A ``UserError`` becomes one line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.errors import RunStopped, UserError

STAGES = {
    "sft": ("SFTConfig", "rlhf.trainers.sft", "SFTTrainer", "supervised fine-tuning on demonstrations"),
    "rm": ("RewardConfig", "rlhf.trainers.reward", "RewardTrainer", "reward model on human comparisons"),
    "ppo": ("PPOConfig", "rlhf.trainers.ppo", "PPOTrainer", "PPO against a reward model with a KL penalty"),
}
# The pipeline's stage blocks take every key of that stage; its --help points there instead of repeating them.
PIPELINE_STAGE_BLOCKS = {name: f"every key of `rlhf {name} --help`, written {name}.<key>" for name in STAGES}


def build_parser() -> argparse.ArgumentParser:
    from rlhf import config as configs

    parser = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF: SFT, reward model, PPO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_class, *_, description) in STAGES.items():
        stage = commands.add_parser(name, help=description, description=description,
                                    epilog=configs.key_help(getattr(configs, config_class)),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(stage, "YAML config file (a run's config.yaml re-launches it)")
        stage.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    pipeline = commands.add_parser("pipeline", help="SFT -> reward model -> PPO, evaluation and report",
                                   description="Run the whole pipeline; finished stages are skipped, interrupted "
                                               "ones resume. Overrides address a stage: rm.training.lr=1e-4.",
                                   epilog=configs.key_help(configs.PipelineConfig, PIPELINE_STAGE_BLOCKS),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(pipeline, "pipeline YAML (e.g. configs/pipeline.yaml)")
    report = commands.add_parser("report", help="rebuild report.md of a pipeline run directory",
                                 description="Rebuild report.md of a pipeline run directory from what its stages "
                                             "wrote: the curves of every stage, the reward-model agreement, the "
                                             "held-out evaluation of SFT against PPO (gold and proxy scores, win "
                                             "rate, KL), the over-optimisation picture and before/after samples. "
                                             "Plots need matplotlib (pip install 'rlhf[report]'); without it the "
                                             "report has the tables only.")
    report.add_argument("run_dir", help="a pipeline output_dir")
    score = commands.add_parser("score", help="score prompt/response rows with a trained reward model",
                                description="Score {prompt, response} rows (tokenised as in RM training: prompt + "
                                            "response + EOS) with a reward model's final/, normalisation applied.")
    score.add_argument("--model", required=True, help="reward model directory (an `rlhf rm` final/)")
    score.add_argument("--data", required=True, help="a .json/.jsonl/.csv/.parquet file of {prompt, response} rows")
    score.add_argument("--output", help="write {prompt, response, score} jsonl here (default: print to stdout)")
    score.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    score.add_argument("--device", help="where the reward model runs: cpu, cuda, cuda:1, mps... "
                                        "(default: the accelerator accelerate picks, the GPU when there is one)")
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config``, ``--print-config`` and the ``key.sub=value`` overrides of a command that runs from a config."""
    parser.add_argument("--config", help=config_help + "; required unless --print-config")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as commented YAML and exit: the defaults, or --config with the "
                             "overrides applied (save it, edit it, pass it back with --config)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields")


def run_score(args: argparse.Namespace) -> str:
    """``rlhf score``: the scores go to --output, or one JSON line per row on stdout."""
    import json

    from rlhf.scoring import score_file

    rows = score_file(args.model, args.data, args.output, batch_size=args.batch_size, device=args.device)
    if args.output is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    mean = sum(row["score"] for row in rows) / len(rows)
    return f"scored {len(rows)} rows, mean score {mean:.4f}" + (f"; wrote {args.output}" if args.output else "")


def config_class_of(command: str) -> type:
    from rlhf import config as configs

    return configs.PipelineConfig if command == "pipeline" else getattr(configs, STAGES[command][0])


def print_config(args: argparse.Namespace) -> None:
    """``--print-config``: the resolved config as commented YAML on stdout (keys and types checked, but not
    the cross-field rules: the defaults alone lack a model and data)."""
    from rlhf.config import resolve_config, to_commented_yaml

    config = resolve_config(config_class_of(args.command), args.config, args.overrides)
    source = f"{args.config} with {len(args.overrides)} override(s)" if args.config else "the defaults"
    sys.stdout.write(to_commented_yaml(config, header=(
        f"rlhf {args.command} config: {source}. Every key with its meaning and [type];\n"
        f"run it with: rlhf {args.command} --config THIS_FILE")))


def run_stage(name: str, config_path: str, overrides: list[str], resume: bool) -> str:
    import importlib

    from rlhf.config import load_config

    _, trainer_module, trainer_class, _ = STAGES[name]
    config = load_config(config_class_of(name), config_path, overrides)
    trainer = getattr(importlib.import_module(trainer_module), trainer_class)(config)
    return trainer.train(resume=resume)


def setup_logging() -> None:
    from rlhf.logs import setup_cli_logging

    setup_cli_logging()  # rlhf's lines on the terminal; libraries' and warnings in the run's run.log


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_from_config = args.command in ("pipeline", *STAGES)
    if runs_from_config and not args.config and not args.print_config:
        print(f"rlhf {args.command}: error: --config is required; `rlhf {args.command} --print-config` writes a "
              "commented config to start from", file=sys.stderr)
        return 2
    try:
        if runs_from_config and args.print_config:
            print_config(args)  # before setup_logging: stdout is the YAML and nothing else
            return 0
        setup_logging()
        if args.command == "score":
            result = run_score(args)
        elif args.command == "pipeline":
            from rlhf.config import load_config
            from rlhf.pipeline import run_pipeline

            result = run_pipeline(load_config(config_class_of("pipeline"), args.config, args.overrides))
        elif args.command == "report":
            from rlhf.report import write_report

            result = write_report(args.run_dir)
        else:
            result = run_stage(args.command, args.config, args.overrides, args.resume)
    except UserError as error:
        print(f"rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stopped:  # preempted with a checkpoint, or a NaN/inf before an optimizer step
        hint = f"; {stopped.resume_hint}" if stopped.resume_hint else ""
        print(f"rlhf {args.command}: {stopped}{hint}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; the newest complete checkpoint is intact
        print(f"rlhf {args.command}: interrupted; continue from the newest checkpoint with --resume", file=sys.stderr)
        return 130
    print(f"rlhf {args.command}: done: {result}")
    return 0


def main_entry() -> None:
    """Console-script entry point (``rlhf``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
