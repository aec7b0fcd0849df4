"""The scalar-head model: the shared backbone plus one linear output, for rewards and values.

Stored as a Hugging Face sequence-classification model with one label (``score`` head), so
``AutoModelForSequenceClassification.from_pretrained`` loads what we write. We call the trunk
ourselves to pass position ids and to read the head at every token:

- reward: the head read at the last non-padding token of prompt+response (the EOS);
- value:  the head read at every token (the critic of PPO).

Packed batches (``training.packing`` for the reward model) come with a 4D attention mask that keeps
the examples of a row apart (``rlhf.preference.collate_preferences_packed``); a model must apply it,
which ``check_segment_mask_support`` checks before training.

Reward normalisation (mean 0 on a reference set, optionally std 1) lives in the saved config as
``rlhf_reward_mean`` / ``rlhf_reward_std`` and is applied by ``score``.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, PreTrainedModel

from rlhf.config import LoraConfig, ModelConfig, TrainingConfig
from rlhf.errors import UserError
from rlhf.functional import exclusive_cumsum_positions, last_valid_index
from rlhf.models.backbone import (adopt_model, build_fresh_gpt2, compile_blocks, eager_blocks,
                                  enable_gradient_checkpointing, ensure_pad_token, feed_forward_at,
                                  from_pretrained_or_error, full_precision_attention, half_precision_attention,
                                  last_feed_forward, packing_changed_outputs, trimming_fits)
from rlhf.models.lora import apply_lora, has_lora, save_hf_model


def last_token_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of each row's last real token, where a reward is read: ``ScalarHeadModel``'s ``read``."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    return rows, last_valid_index(attention_mask)


class ScalarHeadModel(nn.Module):
    """A sequence-classification model with one label, read at every token or at the last valid one."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise UserError(f"{type(model).__name__}: expected a sequence-classification model with a one-label "
                            "'score' head (num_labels=1)")
        self.model = model
        # The last block's feed-forward when ``trim_last_block`` turned trimming on; a tuple, so that
        # nn.Module does not register it as a second path to the same parameters.
        self._trimmed_feed_forward: tuple[nn.Module, ...] = ()

    @property
    def config(self):
        return self.model.config

    @property
    def head(self) -> nn.Linear:
        return self.model.score

    @property
    def trimmed_feed_forward(self) -> nn.Module | None:
        """The last block's feed-forward that ``feed_forward_at`` trims, once ``trim_last_block`` turned it on."""
        return self._trimmed_feed_forward[0] if self._trimmed_feed_forward else None

    @property
    def trims_last_block(self) -> bool:
        return bool(self._trimmed_feed_forward)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None, prefix_index: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                read: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Head output at every position, fp32, unnormalised; or at the positions ``read`` names.

        Args:
            input_ids: (batch, seq_len); pad positions may hold any id.
            attention_mask: (batch, seq_len), 1 on real tokens; left, right or mixed padding. Or, for a
                packed batch, (rows, 1, seq_len, seq_len) bool, True where a query attends to a key,
                with ``position_ids`` (rows, seq_len) (``rlhf.preference.collate_preferences_packed``): the trunk
                takes the mask as it is, so only that mask keeps the examples of a row apart.
            prefix_ids, prefix_mask, prefix_index: shared prefixes (prefix sharing). Row ``i`` of
                ``input_ids`` then continues prefix ``prefix_index[i]`` (a right-padded continuation;
                prefixes may be left-padded). Each prefix runs through the trunk once and its
                continuations attend to its key/value cache; the outputs equal those of the full
                sequences up to float rounding.
            read: (rows, columns), two (n,) index tensors: the positions whose output the caller wants.
                With ``trim_last_block`` on, the last block's feed-forward runs at these positions only.
        Returns:
            (batch, seq_len) scalars (of the continuations when prefixes are given); with ``read``, (n,)
            scalars, the i-th at (rows[i], columns[i]).
        """
        keep = None
        if read is not None and self._trimmed_feed_forward:
            keep = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device).index_put(
                read, torch.ones((), dtype=torch.bool, device=input_ids.device))
        if prefix_ids is not None:
            hidden = self.continuation_hidden_states(input_ids, attention_mask, prefix_ids, prefix_mask, prefix_index,
                                                     keep)
        elif attention_mask.dim() == 4:
            with feed_forward_at(self.trimmed_feed_forward, keep):
                hidden = packed_hidden_states(self.model.base_model, input_ids, attention_mask, position_ids)
        else:
            # Positions are the exclusive cumsum of the mask, so a token's position (and its output)
            # does not depend on how much padding sits to its left (docs/ppo.md#11, docs/ppo.md#41).
            with feed_forward_at(self.trimmed_feed_forward, keep):
                hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=exclusive_cumsum_positions(attention_mask),
                                               use_cache=False).last_hidden_state
        if read is not None:
            hidden = hidden[read]
        return self.head(hidden).squeeze(-1).float()

    def continuation_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                   prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, prefix_index: torch.Tensor,
                                   keep: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's last hidden states over continuations of shared prefixes (see ``forward``); gradients reach
        the prefixes too. ``keep``: the positions of ``input_ids`` the caller reads, for ``feed_forward_at``."""
        with eager_blocks():  # compiled blocks would re-trace per layer on a cache (eager_blocks)
            trunk = self.model.base_model
            # Nothing reads the prefixes' outputs, only their key/value cache: a trimmed last block skips
            # its feed-forward there entirely.
            nothing_read = torch.zeros_like(prefix_mask, dtype=torch.bool)
            with feed_forward_at(self.trimmed_feed_forward, nothing_read):
                prefix_out = trunk(input_ids=prefix_ids, attention_mask=prefix_mask,
                                   position_ids=exclusive_cumsum_positions(prefix_mask), use_cache=True)
            # transformers >= 5.2x names the KV cache `cache`; older releases `past_key_values`.
            cache_argument = ("cache" if "cache" in inspect.signature(trunk.forward).parameters
                              else "past_key_values")
            cache = prefix_out[cache_argument]
            # One cache row per continuation: an index_select, differentiable, on every layer's keys and values
            cache.reorder_cache(prefix_index)
            prefix_lengths = prefix_mask.sum(dim=1)[prefix_index]
            position_ids = prefix_lengths.unsqueeze(1) + exclusive_cumsum_positions(attention_mask)
            full_mask = torch.cat([prefix_mask[prefix_index], attention_mask], dim=1)
            with feed_forward_at(self.trimmed_feed_forward, keep):
                return trunk(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                             use_cache=True, **{cache_argument: cache}).last_hidden_state

    @torch.no_grad()
    def trim_last_block(self) -> bool:
        """From now on, run the last transformer block's feed-forward only at the positions a forward ``read``s
        (the rewards' EOS tokens) and nowhere on shared prefixes, whose outputs nothing reads
        (``training.trim_last_block``): the same rewards up to float rounding for a fraction of the last block's
        matmuls.

        Turned on only when the model passes a check: a short batch, padded and with a shared prefix, gives the
        rewards trimmed that it gives untrimmed. A model whose last block has no feed-forward module under a
        usual name, or one that needs every position (it fails the check), runs untrimmed. Not for a model
        that recomputes its blocks in the backward (gradient checkpointing: the recomputation runs outside
        the trimming) or runs compiled blocks (hooks added after compilation are not traced). Returns
        whether trimming is on.
        """
        vocab = self.model.base_model.get_input_embeddings().num_embeddings
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(vocab, (2, 5), generator=generator).to(device)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=device)
        prefix = {"prefix_ids": torch.randint(vocab, (1, 3), generator=generator).to(device),
                  "prefix_mask": torch.ones(1, 3, dtype=torch.long, device=device),
                  "prefix_index": torch.zeros(2, dtype=torch.long, device=device)}
        read = last_token_positions(mask)

        def rewards(feed_forward: nn.Module | None) -> torch.Tensor:
            self._trimmed_feed_forward = (feed_forward,) if feed_forward is not None else ()
            return torch.cat([self(ids, mask, read=read), self(ids, mask, **prefix, read=read)])

        feed_forward = last_feed_forward(self.model)
        was_training = self.training
        self.eval()
        try:
            with full_precision_attention(self):
                fits = trimming_fits(type(self.model).__name__, feed_forward, rewards)
        finally:
            self.train(was_training)
        self._trimmed_feed_forward = (feed_forward,) if fits else ()
        return fits

    def raw_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) head output at the last non-padding token, before normalisation."""
        return self(input_ids, attention_mask, read=last_token_positions(attention_mask))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) reward: the raw score normalised with the statistics stored in the config."""
        return self.normalize(self.raw_score(input_ids, attention_mask))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        mean = getattr(self.config, "rlhf_reward_mean", 0.0) or 0.0
        std = getattr(self.config, "rlhf_reward_std", 1.0) or 1.0
        return (raw - mean) / std

    def set_normalization(self, mean: float, std: float = 1.0) -> None:
        """Store reward statistics in the config (saved with the model, applied by ``score``)."""
        self.config.rlhf_reward_mean = float(mean)
        self.config.rlhf_reward_std = float(std)

    def init_head(self, how: str) -> None:
        """'normal': N(0, 1/sqrt(d+1)) as in Ziegler et al. (docs/ppo.md#3); 'zero': V = 0 at start."""
        with torch.no_grad():
            if how == "normal":
                width = self.head.in_features
                self.head.weight.normal_(0.0, 1.0 / math.sqrt(width + 1))
            elif how == "zero":
                self.head.weight.zero_()
            else:
                raise ValueError(f"unknown head init {how!r}")
            if self.head.bias is not None:
                self.head.bias.zero_()

    @classmethod
    def from_causal_lm(cls, causal_lm: PreTrainedModel, head_init: str = "zero") -> "ScalarHeadModel":
        """A scalar-head model on a copy of ``causal_lm``'s trunk (the critic initialised from the policy)."""
        config = copy.deepcopy(causal_lm.config)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
        model.base_model.load_state_dict(causal_lm.base_model.state_dict())
        model.to(next(causal_lm.parameters()).device)
        scalar_model = cls(model)
        scalar_model.init_head(head_init)
        return scalar_model

    def save_pretrained(self, directory: str, state_dict: dict | None = None, save_merged: bool = True) -> None:
        """The sequence classifier in Hugging Face format (with adapters: see ``lora.save_hf_model``)."""
        if state_dict is not None:  # this wrapper's state dict (accelerate's get_state_dict): drop our "model." prefix
            state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
        save_hf_model(self.model, directory, state_dict, save_merged)


def packed_hidden_states(trunk: PreTrainedModel, input_ids: torch.Tensor, segment_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
    """The trunk's last hidden states under a 4D boolean attention mask (True: attend).

    transformers passes a 4D mask to the attention as it is (``masking_utils``): SDPA reads a boolean
    one, but eager attention adds the mask to the scores, so it gets 0 / the dtype's minimum instead.
    """
    mask = segment_mask
    if getattr(trunk.config, "_attn_implementation", None) == "eager":
        dtype = trunk.get_input_embeddings().weight.dtype
        mask = torch.zeros(segment_mask.shape, dtype=dtype, device=segment_mask.device).masked_fill(
            ~segment_mask, torch.finfo(dtype).min)
    return trunk(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def check_segment_mask_support(model: ScalarHeadModel) -> None:
    """Raise ``UserError`` unless ``model`` keeps the examples of a packed reward batch apart
    (``training.packing``).

    Two short random examples packed in one row (``collate_preferences_packed``), the first with a
    prompt shared by its two responses, the second without one (two whole sequences), must give the
    hidden states at each response's last token that the full sequences give run one by one. A model
    whose attention drops or rebuilds a 4D mask (flash attention, remote code) would let responses
    attend to each other and to the other example, and train on a silently different objective.
    """
    from rlhf.preference import collate_preferences_packed  # preference builds on rlhf.data, not on models

    kernel = half_precision_attention(model)
    if kernel is not None:  # flash attention takes no 4D mask: it would attend across the segments
        raise UserError(f"training.packing: the reward model's packed rows need an attention that applies a 4D mask "
                        f"(sdpa, eager), not model.attn_implementation={kernel}; set training.packing=false")
    trunk = model.model.base_model
    vocab = trunk.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompt, *responses = (torch.randint(vocab, (length,), generator=generator).tolist() for length in (3, 2, 3, 4))
    examples = [{"sequences": [prompt + responses[0], prompt + responses[1]], "prompt_length": 3},
                {"sequences": [responses[2], responses[0] + responses[2]], "prompt_length": 0}]
    for example in examples:
        example |= {"pairs": [[0, 1]], "margins": [0.0]}
    packed_batch = collate_preferences_packed(examples, pad_token_id=0, capacity=64, share_prompt=True)
    batch = {key: value.to(device) for key, value in packed_batch.items()}
    was_training = model.training
    model.eval()
    try:
        alone = torch.stack([trunk(input_ids=torch.tensor([sequence], device=device), use_cache=False
                                   ).last_hidden_state[0, -1] for example in examples
                             for sequence in example["sequences"]]).float()
        packed = packed_hidden_states(trunk, batch["input_ids"], batch["segment_mask"], batch["position_ids"])
        packed = packed[batch["reward_rows"], batch["reward_columns"]].float()
    finally:
        model.train(was_training)
    if packing_changed_outputs(alone, packed):
        import transformers

        implementation = getattr(trunk.config, "_attn_implementation", None)
        raise UserError(f"training.packing: {type(trunk).__name__} (transformers {transformers.__version__}, "
                        f"attention {implementation}) does not keep packed examples apart: it does not apply a 4D "
                        "attention mask; set training.packing=false")


def checkpoint_architectures(model: ScalarHeadModel) -> list[str]:
    """The architectures the loaded checkpoint's config names (empty for a model built here)."""
    return getattr(model.config, "architectures", None) or []


def has_trained_head(model: ScalarHeadModel) -> bool:
    """Whether the checkpoint was saved as a sequence classifier, i.e. its one-label head was trained;
    loaded from a causal LM, the head is a random draw."""
    return any(name.endswith("ForSequenceClassification") for name in checkpoint_architectures(model))


def load_reward_model(model_config: ModelConfig, tokenizer, key: str = "model",
                      block: str = "model") -> ScalarHeadModel:
    """A trained reward model (one-label sequence classifier) from ``model_config.name_or_path``, or one line
    naming ``key`` when the checkpoint is not one: loaded from a causal LM, its head would be a random draw
    and everything scored with it noise."""
    model = load_scalar_model(model_config, tokenizer, head_init=None, key=key, block=block)
    if not has_trained_head(model):
        architectures = checkpoint_architectures(model)
        raise UserError(f"{key}: '{model_config.name_or_path}' is not a reward model (its config lists "
                        f"{architectures or 'no'} architectures, so its score head would be random); "
                        "train one with `rlhf rm`")
    return model


def load_scalar_model(model_config: ModelConfig, tokenizer, head_init: str | None = "normal",
                      seed: int = 0, key: str = "model.name_or_path", block: str = "model") -> ScalarHeadModel:
    """A scalar-head model from any causal-LM or sequence-classification checkpoint, or a fresh GPT-2.

    Args:
        model_config: the ``model:`` block (``name_or_path`` may be an SFT ``final/`` or an RM ``final/``).
        tokenizer: the tokenizer (its pad id is written into the config, embeddings resized).
        head_init: 'normal' or 'zero' re-initialises the head; None keeps a trained head
            (loading a reward model).
        seed: seeds the head initialisation.
        key: the config key that gave the checkpoint path; block: the one holding the rest of
            ``model_config`` (``attn_implementation``), both for error messages.
    """
    ensure_pad_token(tokenizer)  # before building: a fresh model's vocabulary includes the pad
    torch.manual_seed(seed)
    if model_config.from_config is not None:
        lm = build_fresh_gpt2(model_config.from_config, tokenizer)
        lm_config = {k: v for k, v in lm.config.to_dict().items() if k not in ("id2label", "label2id")}
        config = GPT2Config.from_dict({**lm_config, "num_labels": 1})
        model = GPT2ForSequenceClassification(config)
        model.transformer.load_state_dict(lm.transformer.state_dict())
    else:
        model = from_pretrained_or_error(AutoModelForSequenceClassification, model_config, key, num_labels=1)
    adopt_model(model, tokenizer, model_config, block)
    scalar_model = ScalarHeadModel(model)
    if head_init is not None:
        scalar_model.init_head(head_init)
    return scalar_model


def make_trainable(model: torch.nn.Module, lora: LoraConfig | None, training: TrainingConfig,
                   key: str = "model.lora") -> None:
    """What a stage's config asks of a model it trains: LoRA adapters (a scalar-head model also trains its
    head, as a copy beside the original), then gradient checkpointing, then compilation.

    Args:
        model: a causal LM or a ``ScalarHeadModel``, before ``accelerator.prepare``.
        training: the stage's ``training`` block (``gradient_checkpointing``, ``compile``, ``compile_mode``).
        key: the config key of ``lora``, for error messages.
    """
    hf_model, head = (model.model, "score") if isinstance(model, ScalarHeadModel) else (model, None)
    if lora is not None and not has_lora(hf_model):  # a model trained twice keeps its first adapters
        apply_lora(hf_model, lora, key, scalar_head=head)
    if training.gradient_checkpointing:
        enable_gradient_checkpointing(hf_model)
    if training.compile:  # last: the compiled blocks are the adapted, checkpointed ones
        compile_blocks(hf_model, training.compile_mode)


def save_merged(model_config: ModelConfig) -> bool:
    """Whether ``final/`` holds a full checkpoint (always without LoRA; with it, unless ``lora.save_merged: false``)."""
    return model_config.lora is None or model_config.lora.save_merged
