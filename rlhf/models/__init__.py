"""The shared GPT backbone (policy) and the scalar-head model (reward and value)."""

from rlhf.models.backbone import (
    adopt_model,
    PAD_TOKEN,
    build_fresh_gpt2,
    check_fused_cross_entropy_support,
    check_packing_support,
    compile_blocks,
    disable_dropout,
    ensure_pad_token,
    feed_forward_at,
    fused_cross_entropy_sum,
    kept_logits,
    last_feed_forward,
    load_causal_lm,
    load_tokenizer,
    resolve_max_length,
    transformer_blocks,
    trimmable_feed_forward,
    use_fused_gelu,
)
from rlhf.models.heads import (ScalarHeadModel, check_segment_mask_support, checkpoint_architectures, has_trained_head,
                               last_token_positions, load_reward_model, load_scalar_model, make_trainable, save_merged)
from rlhf.models.onednn import packed_cpu_linears

__all__ = [
    "PAD_TOKEN", "ScalarHeadModel", "adopt_model", "build_fresh_gpt2",
    "check_fused_cross_entropy_support", "check_packing_support", "check_segment_mask_support",
    "checkpoint_architectures", "compile_blocks", "disable_dropout", "ensure_pad_token", "feed_forward_at",
    "fused_cross_entropy_sum", "has_trained_head", "kept_logits", "last_feed_forward", "last_token_positions",
    "load_causal_lm", "load_reward_model", "load_scalar_model", "load_tokenizer", "make_trainable",
    "packed_cpu_linears",
    "resolve_max_length", "save_merged", "transformer_blocks", "trimmable_feed_forward", "use_fused_gelu",
]
