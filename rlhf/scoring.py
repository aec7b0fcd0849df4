"""Scoring with a trained reward model: load ``final/``, score prompt/response pairs.

Texts are tokenised exactly as in reward-model training (``rlhf.preference``): prompt ids +
response ids + EOS, and the score is read at that EOS. ``load_reward_model`` returns a
``ScalarHeadModel`` whose ``score`` applies the normalisation stored in the checkpoint's config
(``rlhf_reward_mean`` / ``rlhf_reward_std``); ``raw_score`` is the plain head output, the
number ``AutoModelForSequenceClassification`` gives for the same tokens.
"""

from __future__ import annotations

import logging

import torch

from rlhf.config import ModelConfig
from rlhf.data import check_text, load_table, pad_right, require_columns
from rlhf.errors import UserError
from rlhf.models import ScalarHeadModel, load_tokenizer
from rlhf.models import load_reward_model as load_trained_reward_model
from rlhf.models.backbone import context_size, full_precision_attention
from rlhf.preference import encode_prompt, encode_response

logger = logging.getLogger(__name__)


def load_reward_model(path: str, device: str | torch.device | None = None) -> tuple[ScalarHeadModel, object]:
    """A trained reward model (``rlhf rm``'s ``final/``, or any one-label sequence classifier) and its tokenizer.

    The model is in eval mode, fp32, on ``device`` (default: CPU); its ``score`` applies the
    stored normalisation.
    """
    model_config = ModelConfig(name_or_path=path)
    tokenizer = load_tokenizer(model_config)
    model = load_trained_reward_model(model_config, tokenizer, key="model")
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def encode_pair(tokenizer, prompt: str, response: str) -> list[int]:
    """prompt + response + EOS token ids, as in reward-model training."""
    return encode_prompt(tokenizer, prompt) + encode_response(tokenizer, response)


@torch.no_grad()
def raw_scores(model: ScalarHeadModel, sequences: list[list[int]], pad_token_id: int,
               batch_size: int = 32) -> list[float]:
    """Unnormalised rewards of token sequences (each ending with EOS), in the input order.

    Sequences are batched by length to save padding; the score does not depend on padding.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    with full_precision_attention(model):  # fp32 forwards: not through a half-precision-only kernel
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            input_ids = pad_right([sequences[i] for i in chunk], pad_token_id).to(device)
            attention_mask = pad_right([[1] * len(sequences[i]) for i in chunk], 0).to(device)
            for index, value in zip(chunk, model.raw_score(input_ids, attention_mask).tolist()):
                scores[index] = value
    model.train(was_training)
    return scores


def score_texts(model: ScalarHeadModel, tokenizer, prompts: list[str], responses: list[str],
                batch_size: int = 32) -> list[float]:
    """Normalised rewards of (prompt, response) texts."""
    sequences = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    limit = context_size(model.model)
    for index, sequence in enumerate(sequences):
        if limit is not None and len(sequence) > limit:
            raise UserError(f"row {index}: prompt + response is {len(sequence)} tokens, more than the reward "
                            f"model's context of {limit}")
    raw = torch.tensor(raw_scores(model, sequences, tokenizer.pad_token_id, batch_size), dtype=torch.float64)
    return model.normalize(raw).tolist()


def resolve_device(spec: str | None, key: str = "--device") -> torch.device:
    """``spec`` as a torch device that exists here; None: the device accelerate picks (a GPU when there is one)."""
    if spec is None:
        from accelerate import PartialState

        return PartialState().device
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"{key}: '{spec}' is not a device; expected cpu, cuda, cuda:N, mps...") from None
    available = {"cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if device.type in available and not available[device.type]():
        raise UserError(f"{key}: '{spec}' requested, but this machine has no {device.type} device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{key}: '{spec}' requested, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def score_file(model_path: str, data_path: str, output: str | None = None, batch_size: int = 32,
               device: str | None = None) -> list[dict]:
    """Score every ``{prompt, response}`` row of ``data_path``; write ``{prompt, response, score}`` to ``output``.

    ``device``: where the model runs ('cpu', 'cuda:1'...); None: the accelerator's (a GPU when there is one).
    """
    from rlhf.training import write_jsonl

    target = resolve_device(device)
    table = load_table(data_path, "train", "--data")
    require_columns(table, ["prompt", "response"], data_path, "scoring")
    prompts = [check_text(row, "prompt", i, data_path) for i, row in enumerate(table)]
    responses = [check_text(row, "response", i, data_path) for i, row in enumerate(table)]
    model, tokenizer = load_reward_model(model_path, target)
    scores = score_texts(model, tokenizer, prompts, responses, batch_size)
    rows = [{"prompt": p, "response": r, "score": s} for p, r, s in zip(prompts, responses, scores)]
    if output is not None:
        write_jsonl(output, rows)
    logger.info("scored %d rows of %s with %s", len(rows), data_path, model_path)
    return rows
