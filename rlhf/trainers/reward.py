"""Stage 2: the reward model, trained on human comparisons with the pairwise ranking loss.

r(x, y) is the scalar head read at the EOS closing prompt x + response y. For each prompt with
responses ranked by people, the loss is the mean over its ordered pairs (y_w ≻ y_l) of
−log σ(r(x, y_w) − r(x, y_l) − margin), and the batch loss is the mean over prompts: a prompt
counts once however many responses it has (InstructGPT §3.5; docs/ppo.md#1 to #8). All responses
of a batch go through the model in one forward.

After training the reward is centred (optionally scaled) on a reference set, so the mean reward
there is 0 (docs/ppo.md#6: the loss is blind to a constant shift, but the KL coefficient and
the value clip of PPO are in reward units). The statistics go into ``final/``'s config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from rlhf.config import RewardConfig
from rlhf.errors import UserError
from rlhf.functional import pairwise_accuracy, pairwise_ranking_loss, reward_centering_penalty
from rlhf.models import (
    ScalarHeadModel,
    adopt_model,
    check_segment_mask_support,
    checkpoint_architectures,
    has_trained_head,
    last_token_positions,
    load_scalar_model,
    load_tokenizer,
    make_trainable,
    resolve_max_length,
    save_merged,
)
from rlhf.preference import (
    chosen_sequences,
    collate_preferences,
    collate_preferences_packed,
    detect_preference_format,
    load_preference_examples,
    load_response_sequences,
    tokenize_preferences,
)
from rlhf.scoring import raw_scores
from rlhf.training import (
    MetricsLogger,
    SupervisedLoop,
    as_floats,
    end_training,
    full_weights,
    stops_gracefully,
    may_trim_last_block,
    save_pretrained_atomic,
    start_run,
    write_jsonl,
)

logger = logging.getLogger(__name__)


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(responses,) raw rewards: the head at each response's last non-padding token (its EOS).

    Goes through ``model(...)`` rather than ``raw_score`` so a DDP-wrapped model synchronises
    its gradients. A batch collated with ``share_prompt`` runs each prompt once and its responses
    on the prompt's key/value cache (``ScalarHeadModel.forward``); a packed one
    (``collate_preferences_packed``) runs its rows under their segment mask, and each reward is read
    where the batch says its response ends.
    """
    if "segment_mask" in batch:
        return model(batch["input_ids"], batch["segment_mask"], position_ids=batch["position_ids"],
                     read=(batch["reward_rows"], batch["reward_columns"]))
    prefix = {key: batch[key] for key in ("prefix_ids", "prefix_mask", "prefix_index") if key in batch}
    return model(batch["input_ids"], batch["attention_mask"], **prefix,
                 read=last_token_positions(batch["attention_mask"]))


def log_held_out(metrics_path: str) -> None:
    """Log the last evaluation of metrics.jsonl in one line: what `rlhf rm` reports at the end."""
    last = None
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:  # blank, or cut short by an earlier kill
                continue
            if "eval/accuracy" in record:
                last = record
    if last is not None:
        logger.info("RM held-out at step %d: accuracy %.4f, loss %.4f, margin %.4f", last["step"],
                    last["eval/accuracy"], last["eval/loss"], last["eval/margin"])


class RewardObjective:
    """Pairwise ranking loss summed over prompts; units = prompts, so a step's loss is a mean over prompts.

    With ``center_rewards_coef`` > 0 the optimised loss adds that times the centering penalty
    (``reward_centering_penalty``), reported as ``centering``.

    Reported: ``loss`` (the ranking loss alone); ``accuracy``, the share of pairs with r_c > r_r
    strictly; ``margin``, the mean r_c − r_r; ``reward/chosen_mean|std`` and
    ``reward/rejected_mean|std`` over the pairs. All raw (unnormalised) rewards.

    ``pack_length``: pack each batch's examples into rows of at most this many tokens (more for an
    example that is longer) instead of padding every response (``training.packing``; the model must
    pass ``check_segment_mask_support``). The same rewards, so the same loss and metrics.
    """

    def __init__(self, pad_token_id: int, share_prompt: bool = False, center_rewards_coef: float = 0.0,
                 pack_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.share_prompt = share_prompt
        self.center_rewards_coef = center_rewards_coef
        self.pack_length = pack_length

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack_length:
            return collate_preferences_packed(examples, self.pad_token_id, self.pack_length, self.share_prompt)
        return collate_preferences(examples, self.pad_token_id, self.share_prompt)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pairs_per_prompt"].numel())

    def length(self, example: dict) -> int:
        return max(len(sequence) for sequence in example["sequences"])

    def loss_sum(self, model, batch):
        rewards = sequence_rewards(model, batch)
        chosen_rewards = rewards[batch["chosen_index"]]
        rejected_rewards = rewards[batch["rejected_index"]]
        num_prompts = batch["pairs_per_prompt"].numel()
        # pairwise_ranking_loss with group_ids is the mean over prompts of each prompt's mean
        # pair loss; × num_prompts makes it a sum, which the loop divides by the step's prompts.
        ranking_loss = pairwise_ranking_loss(chosen_rewards, rejected_rewards, margin=batch["margins"],
                                             group_ids=batch["group_ids"])
        loss_sum = num_prompts * ranking_loss
        stats = {}
        if self.center_rewards_coef:
            # Reported apart from "loss", which stays the ranking loss whatever the coefficient.
            centering = reward_centering_penalty(chosen_rewards, rejected_rewards, group_ids=batch["group_ids"])
            loss_sum = loss_sum + num_prompts * self.center_rewards_coef * centering
            stats["centering"] = num_prompts * centering.detach().double()
        chosen, rejected = chosen_rewards.detach().double(), rejected_rewards.detach().double()
        num_pairs = chosen.numel()
        # Device tensors: the loop reads them back when it logs, not after every forward.
        stats |= {
            "loss": num_prompts * ranking_loss.detach().double(),
            "pairs": float(num_pairs),
            "correct": pairwise_accuracy(chosen, rejected).double() * num_pairs,
            "margin": (chosen - rejected).sum(),
            "chosen_sum": chosen.sum(), "chosen_sq": chosen.square().sum(),
            "rejected_sum": rejected.sum(), "rejected_sq": rejected.square().sum(),
        }
        return loss_sum, stats

    def summarize(self, sums: dict[str, float], units: float) -> dict[str, float]:
        sums = as_floats(sums)
        pairs = sums.get("pairs", 0.0)
        if units == 0 or pairs == 0:
            return {}
        metrics = {"loss": sums["loss"] / units, "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs}
        if "centering" in sums:
            metrics["centering"] = sums["centering"] / units
        for side in ("chosen", "rejected"):
            mean = sums[f"{side}_sum"] / pairs
            metrics[f"reward/{side}_mean"] = mean
            metrics[f"reward/{side}_std"] = math.sqrt(max(sums[f"{side}_sq"] / pairs - mean * mean, 0.0))
        return metrics


class RewardTrainer:
    """Train a reward model on comparisons, centre it, write ``final/`` as a one-label sequence classifier.

    Use from Python with your own objects, or let the config load them::

        config = load_config(RewardConfig, "configs/rm.yaml", ["training.lr=1e-4"])
        RewardTrainer(config).train()
        RewardTrainer(config, model=my_scalar_model, tokenizer=my_tokenizer,
                      train_dataset=my_rows, eval_dataset=my_eval_rows).train()

    Args:
        config: the stage config.
        model, tokenizer: a ``ScalarHeadModel`` (or a one-label Hugging Face sequence-classification
            model) and its tokenizer (default: built from ``config.model``: the backbone plus a fresh
            N(0, 1/√(d+1)) head). A tokenizer without a pad token distinct from EOS gets one, and the
            model's embeddings grow to match; ``model.disable_dropout`` applies to a passed model too.
        train_dataset, eval_dataset: ``datasets.Dataset`` of rows in a preference format
            (default: ``config.data``).
    """

    command = "rm"  # the CLI command that runs this trainer (in messages on how to resume)

    def __init__(self, config: RewardConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None):
        config.validate(model_given=model is not None, data_given=train_dataset is not None)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset

    @stops_gracefully
    def train(self, resume: bool = False) -> str:
        """Train, centre the reward, write ``final/``; returns the path of ``final/``."""
        config = self.config
        run, accelerator, resume_from = start_run(config, resume)

        self.model, self.tokenizer = self.build_model()
        make_trainable(self.model, config.model.lora, config.training)
        if may_trim_last_block(config.training, accelerator):
            self.model.trim_last_block()
        max_length = resolve_max_length(config.data.max_length, self.model)
        train_examples, eval_examples = self.load_examples(max_length)
        reference = self.normalization_sequences(train_examples, eval_examples, max_length)  # fail before training

        loop = SupervisedLoop(accelerator=accelerator, model=self.model,
                              objective=RewardObjective(self.tokenizer.pad_token_id, config.prefix_sharing,
                                                        config.center_rewards_coef,
                                                        max_length if config.training.packing else None),
                              train_examples=train_examples, eval_examples=eval_examples,
                              training=config.training, run=run, progress_desc="rm")
        if config.training.packing:  # every process: sharded weights are gathered for the check
            with full_weights(accelerator, loop.model) as model:
                check_segment_mask_support(model)
        train_pairs = sum(len(e["pairs"]) for e in train_examples)
        logger.info("RM: %d train prompts (%d pairs) / %d eval prompts (%d pairs), %d optimizer steps",
                    len(train_examples), train_pairs, len(eval_examples),
                    sum(len(e["pairs"]) for e in eval_examples), loop.total_steps)
        started = time.perf_counter()
        state = loop.train(resume_from=resume_from)
        elapsed = time.perf_counter() - started
        self.log_throughput(loop, train_pairs, resume_from, elapsed)
        if accelerator.is_main_process:
            log_held_out(run.metrics_path)

        # Each process scores its (uneven) share of the normalisation set: with sharded weights, gathered for it.
        with full_weights(accelerator, loop.model) as model:
            mean, std = self.fit_normalization(accelerator, model, reference)
        model.set_normalization(mean, std)
        logger.info("reward normalisation on %s (%d responses): mean %.6g, std %.6g", config.normalization.set,
                    len(reference), mean, std)
        MetricsLogger(accelerator, run.metrics_path).log(state.step, {"normalization/mean": mean,
                                                                      "normalization/std": std})

        save_pretrained_atomic(accelerator, loop.model, self.tokenizer, run.final_dir, save_merged(config.model))
        if config.logging.num_samples:
            with full_weights(accelerator, loop.model) as model:  # every process enters; the main one writes
                if accelerator.is_main_process:
                    self.write_samples(model, eval_examples or train_examples, run.path("samples.jsonl"))
        end_training(accelerator, self, loop)
        logger.info("RM done: %s", run.final_dir)
        return run.final_dir

    # ------------------------------------------------------------------ setup

    def build_model(self) -> tuple[ScalarHeadModel, object]:
        config = self.config
        if self.model is None:
            tokenizer = self.tokenizer if self.tokenizer is not None else load_tokenizer(config.model)
            keep_head = config.head_init == "keep"
            model = load_scalar_model(config.model, tokenizer, head_init=None if keep_head else "normal",
                                      seed=config.training.seed)
            if keep_head and not has_trained_head(model):
                architectures = ", ".join(checkpoint_architectures(model)) or "model"
                raise UserError(f"model.name_or_path: head_init=keep continues a reward model, but "
                                f"'{config.model.name_or_path}' is a {architectures} checkpoint "
                                "without a trained scalar head; give a reward model's final/ or use head_init=normal")
            return model, tokenizer
        if self.tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        model = self.model if isinstance(self.model, ScalarHeadModel) else ScalarHeadModel(self.model)
        # As for a model we build: a pad distinct from EOS (the reward is read at the EOS, which
        # pad == eos would mask), embeddings grown to match, dropout off if configured.
        adopt_model(model.model, self.tokenizer, config.model)
        return model, self.tokenizer

    def load_examples(self, max_length: int) -> tuple[list[dict], list[dict]]:
        data = self.config.data
        if self.train_dataset is None:
            return load_preference_examples(data, self.tokenizer, max_length, self.config.training.seed)
        examples = []
        for dataset, name in ((self.train_dataset, "train_dataset"), (self.eval_dataset, "eval_dataset")):
            if dataset is None:
                examples.append([])
                continue
            data_format = detect_preference_format(dataset, data.format, name)
            tokenized, report = tokenize_preferences(dataset, self.tokenizer, data_format, max_length, name,
                                                     group_by_prompt=data.group_by_prompt,
                                                     assistant_marker=data.assistant_marker)
            logger.info("%s: %s (format %s)", name, report.summary(), data_format)
            examples.append(tokenized)
        return examples[0], examples[1]

    def normalization_sequences(self, train_examples: list[dict], eval_examples: list[dict],
                                max_length: int) -> list[list[int]]:
        """Token sequences of the normalisation set (docs/ppo.md#6); empty for 'none'."""
        norm = self.config.normalization
        if norm.set == "none":
            return []
        if norm.set == "eval":
            if not eval_examples:
                raise UserError("normalization.set: 'eval' but there are no evaluation comparisons; give "
                                "data.eval_path (or eval_dataset) or data.eval_fraction > 0, or use "
                                "normalization.set=train")
            sequences = chosen_sequences(eval_examples)
        elif norm.set == "train":
            sequences = chosen_sequences(train_examples)
        else:
            sequences = load_response_sequences(norm.set, self.tokenizer, max_length)
        return sequences[:norm.max_samples] if norm.max_samples else sequences

    # ------------------------------------------------------------------ after training

    @torch.no_grad()
    def fit_normalization(self, accelerator, model: ScalarHeadModel, sequences: list[list[int]]) -> tuple[float, float]:
        """(mean, std) of the raw reward on ``sequences``; std is 1 unless normalization.scale.

        Each process scores its share; the sums are reduced in float64.
        """
        if not sequences:  # normalization.set: none — store the identity, replacing any inherited statistics
            return 0.0, 1.0
        shard = sequences[accelerator.process_index::accelerator.num_processes]
        batch_size = self.config.training.eval_batch_size or self.config.training.batch_size * 2
        scores = torch.tensor(raw_scores(model, shard, self.tokenizer.pad_token_id, batch_size), dtype=torch.float64)
        sums = torch.stack([scores.sum(), scores.square().sum(), torch.tensor(float(len(scores)), dtype=torch.float64)])
        total, total_sq, count = accelerator.reduce(sums.to(accelerator.device), "sum").tolist()
        mean = total / count
        if not self.config.normalization.scale:
            return mean, 1.0
        std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
        if std < 1e-6:
            logger.warning("reward std on the normalisation set is %.3g; not scaling", std)
            return mean, 1.0
        return mean, std

    def log_throughput(self, loop: SupervisedLoop, train_pairs: int, resume_from: str | None, elapsed: float) -> None:
        """Comparison pairs trained per second in this session (the loop's evaluations included)."""
        first_step = int(os.path.basename(resume_from).removeprefix("step-")) if resume_from else 0
        micro_batches = (loop.total_steps - first_step) * self.config.training.gradient_accumulation_steps
        epochs = micro_batches / loop.order.micro_batches_per_epoch
        logger.info("RM loop: %.1fs for %.2f epochs of %d pairs: %.1f pairs/s", elapsed, epochs, train_pairs,
                    epochs * train_pairs / max(elapsed, 1e-9))

    def write_samples(self, model: ScalarHeadModel, examples: list[dict], path: str) -> None:
        """The first prompts' pairs with their normalised rewards, for a look at what the model learned."""
        rows = []
        for example in examples[: self.config.logging.num_samples]:
            rewards = model.normalize(torch.tensor(raw_scores(model, example["sequences"], self.tokenizer.pad_token_id),
                                                   dtype=torch.float64)).tolist()
            prompt_ids = example["sequences"][0][: example["prompt_length"]]
            prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            for better, worse in example["pairs"]:
                rows.append({"prompt": prompt, "chosen": self.decode_response(example, better),
                             "rejected": self.decode_response(example, worse),
                             "chosen_reward": rewards[better], "rejected_reward": rewards[worse]})
        write_jsonl(path, rows)

    def decode_response(self, example: dict, index: int) -> str:
        return self.tokenizer.decode(example["sequences"][index][example["prompt_length"]:], skip_special_tokens=True)
