#!/usr/bin/env python
"""Our RewardTrainer on the benchmark workload, with the anchors' settings (docs/benchmark.md).

    python benchmarks/rm.py [--double] [--config benchmarks/configs/rm.yaml] [key=value ...]

256 prompt/chosen/rejected rows, batch 8 pairs, max length 256, pairwise loss, AdamW lr 5e-5
constant, clip 1.0, 1 epoch, seed 0, fp32, BENCH_THREADS torch threads (default 2); no
evaluation, checkpoints, samples or reward normalisation pass. The run goes through the library
entry point (``load_config`` + ``RewardTrainer.train``) into a temporary output_dir; the
training time is the library's own ``train_runtime_s`` (metrics.jsonl).

``--double``: the scaling row, prompt, chosen and rejected written twice (``text + " " + text``)
and max length 512 (variant "2x-length").

Prints one JSON line as the last line of stdout.
"""

import common

THREADS = common.pin_threads()  # before torch loads (rlhf imports it)

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from rlhf.config import RewardConfig, load_config  # noqa: E402
from rlhf.trainers.reward import RewardTrainer  # noqa: E402


def main() -> None:
    args = common.parse_stage_args(__doc__.splitlines()[0], "rm", "2x-length variant: texts doubled, max length 512")
    root, manifest = common.verified_workload_or_exit()
    common.setup_logging()
    torch.set_num_threads(THREADS)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-rm-"))
    common.cold_compile_cache(scratch)
    try:
        data_path = common.workload_data(root, scratch, "pref.jsonl", ("prompt", "chosen", "rejected"), args.double)
        output_dir = scratch / "run"
        overrides = [f"output_dir={output_dir}", f"model.name_or_path={root / 'model'}",
                     f"model.tokenizer={root / 'tokenizer'}", f"data.path={data_path}",
                     *(["data.max_length=512"] if args.double else []), *args.overrides]

        started = time.perf_counter()
        config = load_config(RewardConfig, args.config, overrides)
        # "RM: %d train prompts (%d pairs) / ...": logged after loading and tokenisation, before the first step
        watch = common.TrainingStartWatch("RM:").attach("rlhf.trainers.reward")
        trainer = RewardTrainer(config)
        trainer.train()
        cpu = watch.require().monitor.stop()  # from the first step to train()'s return (final/ written)
        record = common.training_record(output_dir)
        runtime, tokens = record["train_runtime_s"], int(record["train_tokens"])
        pairs = watch.args[1]  # one epoch: every training pair once
        # Trimmed, the last block's feed-forward ran at the responses' EOS only: two per prompt in the workload.
        trimmed = trainer.model.trims_last_block
        skipped_gflop = common.skipped_gflop(trainer.model.trimmed_feed_forward, tokens - 2 * pairs)
        common.emit({
            "stage": "rm",
            "impl": "rlhf",
            "variant": "2x-length" if args.double else "1x",
            "wall_s": round(runtime, 3),
            "load_and_prepare_s": round(watch.at - started, 3),
            "prompts": watch.args[0],
            "pairs": pairs,
            "steps": record["step"],
            "nonpad_tokens": tokens,
            "pairs_per_s": round(pairs / runtime, 3),
            # What the model really processed: with prefix sharing each prompt once, not once per response
            "tokens_per_s": round(tokens / runtime, 2),
            # compilation and warm-up excluded (common.steady_rate), pairs at the run's tokens per pair
            "steady_pairs_per_s": common.rounded(common.steady_rate(output_dir, "tokens_per_s"), 3, pairs / tokens),
            "tokens_per_pair": round(tokens / pairs, 1),
            "prefix_sharing": config.prefix_sharing,
            "trim_last_block": trimmed,
            "skipped_gflop": round(skipped_gflop, 3),
            "group_by_length": config.training.group_by_length,
            "final_loss": round(record["loss"], 4),
            "max_length": config.data.max_length,
            **common.run_fields(manifest, cpu, THREADS, config.training),
        })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    common.run_main(main)
