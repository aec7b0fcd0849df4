#!/usr/bin/env python
"""Our SFTTrainer on the benchmark workload, with the anchors' settings (docs/benchmark.md).

    python benchmarks/sft.py [--double] [--config benchmarks/configs/sft.yaml] [key=value ...]

512 prompt/completion rows, batch 8 sequences, max length 256, AdamW lr 5e-5 constant, clip 1.0,
1 epoch, seed 0, fp32, BENCH_THREADS torch threads (default 2); no evaluation, checkpoints or
samples. The run goes through the library entry point (``load_config`` + ``SFTTrainer.train``)
into a temporary output_dir. The training time is the library's own ``train_runtime_s``
(first step to the end of the last, metrics.jsonl), so model loading and tokenisation stay out.

``--double``: the scaling row, every prompt and completion written twice (``text + " " + text``)
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

from rlhf.config import SFTConfig, load_config  # noqa: E402
from rlhf.models.backbone import last_feed_forward  # noqa: E402
from rlhf.trainers.sft import SFTTrainer  # noqa: E402


def main() -> None:
    args = common.parse_stage_args(__doc__.splitlines()[0], "sft", "2x-length variant: texts doubled, max length 512")
    root, manifest = common.verified_workload_or_exit()
    common.setup_logging()
    torch.set_num_threads(THREADS)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-sft-"))
    common.cold_compile_cache(scratch)
    try:
        data_path = common.workload_data(root, scratch, "sft.jsonl", ("prompt", "completion"), args.double)
        output_dir = scratch / "run"
        overrides = [f"output_dir={output_dir}", f"model.name_or_path={root / 'model'}",
                     f"model.tokenizer={root / 'tokenizer'}", f"data.path={data_path}",
                     *(["data.max_length=512"] if args.double else []), *args.overrides]

        started = time.perf_counter()
        config = load_config(SFTConfig, args.config, overrides)
        # "SFT: %d train / %d eval examples, ...": logged after loading and tokenisation, before the first step
        watch = common.TrainingStartWatch("SFT:").attach("rlhf.trainers.sft")
        trainer = SFTTrainer(config)
        trainer.train()
        cpu = watch.require().monitor.stop()  # from the first step to train()'s return (final/ written)
        record = common.training_record(output_dir)
        runtime, tokens = record["train_runtime_s"], int(record["train_tokens"])
        # Trimmed, the last block's feed-forward ran only at the real tokens that predict a trained one (train_units).
        trimmed = trainer.trims_last_block
        feed_forward = last_feed_forward(trainer.model) if trimmed else None
        skipped_gflop = common.skipped_gflop(feed_forward, tokens - int(record["train_units"]))
        common.emit({
            "stage": "sft",
            "impl": "rlhf",
            "variant": "2x-length" if args.double else "1x",
            "wall_s": round(runtime, 3),
            "load_and_prepare_s": round(watch.at - started, 3),
            "examples": watch.args[0],
            "steps": record["step"],
            "nonpad_tokens": tokens,
            "tokens_per_s": round(tokens / runtime, 2),
            # compilation and warm-up excluded: the later logged windows (common.steady_rate)
            "steady_tokens_per_s": common.rounded(common.steady_rate(output_dir, "tokens_per_s"), 2),
            "final_loss": round(record["loss"], 4),
            "max_length": config.data.max_length,
            "group_by_length": config.training.group_by_length,
            "trim_last_block": trimmed,
            "skipped_gflop": round(skipped_gflop, 3),
            **common.run_fields(manifest, cpu, THREADS, config.training),
        })
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    common.run_main(main)
