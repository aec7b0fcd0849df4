"""Stage 1: supervised fine-tuning (SFT) of a causal LM on demonstrations.

The objective is the next-token cross-entropy on the response tokens (and EOS) only, as a
token-level mean over the whole optimizer step (Ouyang et al. 2022, §3.5 "SFT").
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from rlhf.config import SFTConfig
from rlhf.data import IGNORE_INDEX, collate_sft, collate_sft_packed, load_sft_examples, prompt_of, tokenize_sft, detect_sft_format
from rlhf.generation import generate_responses
from rlhf.errors import UserError
from rlhf.models import (adopt_model, check_fused_cross_entropy_support, check_packing_support, feed_forward_at,
                         fused_cross_entropy_sum, kept_logits, load_causal_lm, make_trainable, resolve_max_length,
                         save_merged, trimmable_feed_forward)
from rlhf.training import (SupervisedLoop, as_floats, end_training, full_weights, may_trim_last_block,
                           save_pretrained_atomic, shards_weights, start_run, stops_gracefully, write_jsonl)

logger = logging.getLogger(__name__)


class LanguageModelingObjective:
    """Next-token loss summed over trained tokens; units = trained tokens, so the step loss is a token mean.

    ``pack_length``: pack each batch's examples into rows of at most this many tokens instead of padding
    (``training.packing``; the model must pass ``check_packing_support``). ``fused``: training forwards compute
    the loss from the hidden states and the output layer without the logits (``training.fused_cross_entropy``;
    the model must pass ``check_fused_cross_entropy_support``). ``trimmed_feed_forward``: the last block's
    feed-forward, run only at the positions that predict a trained token (``training.trim_last_block``; from
    ``trimmable_feed_forward``). The loss is the same sum either way.
    """

    def __init__(self, pad_token_id: int, pack_length: int | None = None, fused: bool = False,
                 trimmed_feed_forward: torch.nn.Module | None = None):
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length
        self.fused = fused
        self.trimmed_feed_forward = trimmed_feed_forward

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack_length:
            return collate_sft_packed(examples, self.pad_token_id, self.pack_length)
        return collate_sft(examples, self.pad_token_id)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def loss_sum(self, model, batch):
        # Position t predicts token t+1. Logits only where a trained token is predicted: prompt and
        # padding positions skip the vocabulary projection. Log-softmax in fp32 whatever the autocast dtype.
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        predicts_trained = F.pad(trained, (0, 1), value=False)  # (B, T): the last position predicts nothing
        # Packed rows carry their boundaries in the position ids (a mask would hide them). Padded rows are
        # right-padded and attention is causal: a real token attends only to the tokens before it, all real, so
        # the padding mask changes no logit the loss reads; without it the model takes its unmasked causal path
        # (flash attention through SDPA on a GPU; the masked memory-efficient kernels took a fifth of the gpt2
        # preset's SFT kernel time on an H200).
        position_ids = batch.get("position_ids")
        with feed_forward_at(self.trimmed_feed_forward, predicts_trained):
            if self.fused and torch.is_grad_enabled():  # evaluation keeps the plain path: no gradient to make
                loss_sum = fused_cross_entropy_sum(model, batch["input_ids"], predicts_trained, targets[trained],
                                                   position_ids=position_ids)
            else:
                logits = kept_logits(model, batch["input_ids"], None, predicts_trained, position_ids=position_ids)
                loss_sum = F.cross_entropy(logits.float(), targets[trained], reduction="sum")
        return loss_sum, {"loss": loss_sum.detach().double()}

    def summarize(self, sums: dict[str, float], units: float) -> dict[str, float]:
        if units == 0:
            return {}
        loss = as_floats(sums)["loss"] / units
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class SFTTrainer:
    """Fine-tune a causal LM on prompt/response, chat or plain-text data.

    Use from Python with your own objects, or let the config load them::

        config = load_config(SFTConfig, "configs/sft.yaml", ["training.lr=3e-4"])
        SFTTrainer(config).train()                      # everything from the config
        SFTTrainer(config, model=my_model, tokenizer=my_tokenizer,
                   train_dataset=my_dataset).train()    # bring your own (a datasets.Dataset of rows)

    Args:
        config: the stage config.
        model, tokenizer: a causal LM and its tokenizer (default: built from ``config.model``).
            A tokenizer without a dedicated pad token gets one, and the model's embeddings grow to
            match; ``model.disable_dropout`` applies to a passed model too.
        train_dataset, eval_dataset: ``datasets.Dataset`` of rows in an SFT format (default: ``config.data``).
    """

    command = "sft"  # the CLI command that runs this trainer (in messages on how to resume)

    def __init__(self, config: SFTConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None):
        config.validate(model_given=model is not None, data_given=train_dataset is not None)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.trims_last_block = False  # whether train() runs the last block's feed-forward at trained positions only

    @stops_gracefully
    def train(self, resume: bool = False) -> str:
        """Train, write ``final/`` and samples; returns the path of ``final/``."""
        config = self.config
        run, accelerator, resume_from = start_run(config, resume)

        if self.model is None:
            self.model, self.tokenizer = load_causal_lm(config.model, self.tokenizer, seed=config.training.seed)
        elif self.tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        else:
            adopt_model(self.model, self.tokenizer, config.model)
        make_trainable(self.model, config.model.lora, config.training)
        max_length = resolve_max_length(config.data.max_length, self.model)
        train_examples, eval_examples = self.load_examples(max_length)

        trimmed = trimmable_feed_forward(self.model) if may_trim_last_block(config.training, accelerator) else None
        self.trims_last_block = trimmed is not None
        loop = SupervisedLoop(accelerator=accelerator, model=self.model,
                              objective=LanguageModelingObjective(self.tokenizer.pad_token_id,
                                                                  max_length if config.training.packing else None,
                                                                  fused=config.training.fused_cross_entropy,
                                                                  trimmed_feed_forward=trimmed),
                              train_examples=train_examples, eval_examples=eval_examples,
                              training=config.training, run=run, progress_desc="sft")
        if config.training.packing:  # every process: sharded weights are gathered for the check
            with full_weights(accelerator, loop.model) as model:
                check_packing_support(model)
        if config.training.fused_cross_entropy:
            if shards_weights(accelerator):
                raise UserError("training.fused_cross_entropy: the output layer is sharded outside the forward under "
                                "FSDP and DeepSpeed ZeRO-3; set training.fused_cross_entropy=false")
            check_fused_cross_entropy_support(loop.model)
        logger.info("SFT: %d train / %d eval examples, %d optimizer steps", len(train_examples),
                    len(eval_examples), loop.total_steps)
        loop.train(resume_from=resume_from)

        save_pretrained_atomic(accelerator, loop.model, self.tokenizer, run.final_dir, save_merged(config.model))
        if config.logging.num_samples:
            # Every process enters: gathering sharded weights takes them all; then only the main one samples.
            with full_weights(accelerator, loop.model) as model:
                if accelerator.is_main_process:
                    self.write_samples(model, eval_examples or train_examples, run.path("samples.jsonl"))
        end_training(accelerator, self, loop)
        logger.info("SFT done: %s", run.final_dir)
        return run.final_dir

    def load_examples(self, max_length: int) -> tuple[list[dict], list[dict]]:
        data = self.config.data
        if self.train_dataset is None:
            return load_sft_examples(data, self.tokenizer, max_length, self.config.training.seed)
        examples = []
        for dataset, name in ((self.train_dataset, "train_dataset"), (self.eval_dataset, "eval_dataset")):
            if dataset is None:
                examples.append([])
                continue
            data_format = detect_sft_format(dataset, data.format, name)
            tokenized, _ = tokenize_sft(dataset, self.tokenizer, data_format, max_length, data.train_on_prompt, name)
            examples.append(tokenized)
        return examples[0], examples[1]

    def write_samples(self, model, examples: list[dict], path: str) -> None:
        """Greedy continuations of the first eval prompts, with the reference response.

        An example trained on every token ({text} data, or train_on_prompt) has no untrained
        prompt; its first half serves as the prompt and the rest as the reference.
        """
        chosen = examples[: self.config.logging.num_samples]
        prompts = [prompt_of(e) or e["input_ids"][:max(1, len(e["input_ids"]) // 2)] for e in chosen]
        responses = generate_responses(model, self.tokenizer, prompts, self.config.logging.max_new_tokens)
        rows = []
        for example, prompt, response in zip(chosen, prompts, responses):
            reference = [t for t, label in zip(example["input_ids"][len(prompt):], example["labels"][len(prompt):])
                         if label != IGNORE_INDEX]
            rows.append({"prompt": self.tokenizer.decode(prompt, skip_special_tokens=True), "response": response,
                         "reference": self.tokenizer.decode(reference, skip_special_tokens=True)})
        write_jsonl(path, rows)
