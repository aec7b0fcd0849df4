"""The shared backbone: pad tokens, loading any causal LM, context size, dropout, and the scalar head."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from rlhf.config import ArchitectureConfig, ModelConfig
from rlhf.errors import UserError
from rlhf.models import (
    PAD_TOKEN,
    ScalarHeadModel,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    resolve_max_length,
    use_fused_gelu,
)

TINY = ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


def tiny_model_config(tokenizer_dir, **architecture) -> ModelConfig:
    arch = ArchitectureConfig(**{**TINY.__dict__, **architecture})
    return ModelConfig(from_config=arch, tokenizer=tokenizer_dir)


# ----------------------------------------------------------------------------- pad token

def test_tokenizer_without_pad_gets_a_dedicated_pad_and_the_embeddings_grow(tokenizer_dir):
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert plain.pad_token is None
    model, tokenizer = load_causal_lm(tiny_model_config(tokenizer_dir))
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == len(plain) + 1
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_with_pad_equal_to_eos_also_gets_a_dedicated_pad(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token  # the common (and harmful) GPT-2 recipe
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token == PAD_TOKEN and loaded.pad_token_id != loaded.eos_token_id


def test_ensure_pad_token_keeps_a_dedicated_pad(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert ensure_pad_token(tokenizer) is True
    pad_id, size = tokenizer.pad_token_id, len(tokenizer)
    assert ensure_pad_token(tokenizer) is False
    assert (tokenizer.pad_token_id, len(tokenizer)) == (pad_id, size)


def test_passed_tokenizer_without_pad_gets_one_too(tokenizer_dir):
    model, tokenizer = load_causal_lm(tiny_model_config(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


# ----------------------------------------------------------------------------- loading checkpoints

def test_our_backbone_gives_the_logits_of_plain_transformers(tokenizer_dir, tmp_path):
    """As minGPT's test_huggingface_import: a local checkpoint loads to the same function (bit-exact with fused_gelu off)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    exact, _ = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), fused_gelu=False))
    ours, _ = load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))  # GPT-2's GELU as the fused kernel
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for model in (exact, ours, plain):
        model.eval()
    input_ids = torch.tensor([tokenizer("The cat sat on the mat.")["input_ids"][:6],
                              tokenizer("The dog ran on the log.")["input_ids"][:6]])
    with torch.no_grad():
        assert torch.equal(exact(input_ids).logits, plain(input_ids).logits)
        torch.testing.assert_close(ours(input_ids).logits, plain(input_ids).logits, rtol=0, atol=1e-5)
    assert next(ours.parameters()).dtype == torch.float32


def test_missing_local_checkpoint_is_a_user_error(tmp_path, tokenizer_dir):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match="model.name_or_path: directory .*no-such-model.* not found"):
        load_causal_lm(ModelConfig(name_or_path=missing, tokenizer=tokenizer_dir))
    with pytest.raises(UserError, match="model.name_or_path: directory .*no-such-model.* not found"):
        load_causal_lm(ModelConfig(name_or_path=missing))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=tokenizer_dir))
    with pytest.raises(UserError, match="model.name_or_path: directory .*no-such-model.* not found"):
        load_scalar_model(ModelConfig(name_or_path=missing), tokenizer)


def test_directory_without_a_model_is_a_user_error(tmp_path, tokenizer_dir):
    with pytest.raises(UserError, match="model.name_or_path: cannot load .* as a local directory"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path), tokenizer=tokenizer_dir))


def test_resolve_max_length_caps_at_the_context_size(tokenizer_dir):
    model, _ = load_causal_lm(tiny_model_config(tokenizer_dir, n_positions=48))
    assert resolve_max_length(512, model) == 48
    assert resolve_max_length(32, model) == 32


def test_disable_dropout_makes_train_mode_deterministic(tokenizer_dir):
    config = tiny_model_config(tokenizer_dir, dropout=0.5)
    input_ids = torch.arange(3, 19).reshape(2, 8)

    config.disable_dropout = False
    noisy, _ = load_causal_lm(config)
    noisy.train()
    assert not torch.equal(noisy(input_ids).logits, noisy(input_ids).logits)  # the control: dropout is live

    disable_dropout(noisy)
    noisy.train()
    assert torch.equal(noisy(input_ids).logits, noisy(input_ids).logits)
    assert noisy.config.resid_pdrop == noisy.config.attn_pdrop == noisy.config.embd_pdrop == 0.0

    config.disable_dropout = True
    quiet, _ = load_causal_lm(config)
    quiet.train()
    assert torch.equal(quiet(input_ids).logits, quiet(input_ids).logits)


def test_fused_gelu_replaces_gpt2s_python_gelu_with_equal_outputs(tokenizer_dir, tmp_path):
    from transformers.activations import GELUTanh, NewGELUActivation

    config = tiny_model_config(tokenizer_dir, activation="gelu_new")  # what gpt2 checkpoints use
    config.fused_gelu = False
    model, tokenizer = load_causal_lm(config, seed=0)
    kinds = {type(m) for m in model.modules()}
    assert NewGELUActivation in kinds and GELUTanh not in kinds  # the control
    input_ids = torch.arange(3, 19).reshape(2, 8)
    before = model(input_ids).logits

    assert use_fused_gelu(model) == config.from_config.n_layer
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    torch.testing.assert_close(model(input_ids).logits, before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)  # the checkpoint keeps its activation name
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.activation_function == "gelu_new"

    config.fused_gelu = True  # the default: the loader does it
    fused, _ = load_causal_lm(config, seed=0)
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    torch.testing.assert_close(fused(input_ids).logits, before, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- vocabulary projection on CUDA

def test_aligned_vocab_projection_gives_the_same_logits_and_gradients(tokenizer_dir, tmp_path, monkeypatch):
    """The padded projection runs on CUDA only; here its padding is forced on CPU to check the arithmetic."""
    import copy

    from rlhf.models import backbone
    from rlhf.models.onednn import linear_weight

    model, _ = load_causal_lm(tiny_model_config(tokenizer_dir), seed=0)
    head = model.get_output_embeddings()
    assert type(head) is backbone.VocabAlignedLinear and head.out_features % backbone.VOCAB_ALIGNMENT != 0
    assert head.weight is model.get_input_embeddings().weight  # still tied
    assert linear_weight(head) is head.weight  # CPU sampling still packs it for oneDNN
    hidden = torch.randn(2, 5, head.in_features, requires_grad=True)
    expected = torch.nn.functional.linear(hidden, head.weight)
    expected_grads = torch.autograd.grad(expected.square().sum(), [hidden, head.weight])

    monkeypatch.setattr(backbone, "pads_projection", lambda weight: True)
    logits = head(hidden)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected)
    for got, want in zip(torch.autograd.grad(logits.square().sum(), [hidden, head.weight]), expected_grads):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(copy.deepcopy(model)(torch.arange(3, 11)[None]).logits,
                               model(torch.arange(3, 11)[None]).logits)

    model.save_pretrained(tmp_path)  # the checkpoint is a plain transformers one
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.get_output_embeddings()) is torch.nn.Linear
    assert set(reloaded.state_dict()) == set(model.state_dict())


def test_an_aligned_or_unusual_output_projection_is_left_alone():
    from rlhf.models.backbone import align_vocab_projection

    aligned = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_layer=1, n_head=2, n_embd=16, n_positions=16))
    assert align_vocab_projection(aligned) is False and type(aligned.lm_head) is torch.nn.Linear
    odd = GPT2LMHeadModel(GPT2Config(vocab_size=131, n_layer=1, n_head=2, n_embd=16, n_positions=16))
    odd.lm_head = torch.nn.Sequential(torch.nn.Linear(16, 131, bias=False))  # someone else's head
    assert align_vocab_projection(odd) is False
    assert align_vocab_projection(torch.nn.Linear(2, 3)) is False  # not a model


# ----------------------------------------------------------------------------- hub kernels

def test_hub_kernels_are_off_unless_asked_for(tokenizer_dir, tmp_path, monkeypatch):
    """Recent transformers turn hub kernels on at load where the kernels package is installed, and fetch them
    when a GPU model switches between train and eval (an offline machine then fails); the loader turns them off."""
    import importlib.util

    from transformers import PreTrainedModel

    from rlhf.models.backbone import hub_kernel_arguments

    model, _ = load_causal_lm(tiny_model_config(tokenizer_dir), seed=0)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), tokenizer=tokenizer_dir))
    scalar = load_scalar_model(ModelConfig(name_or_path=str(tmp_path)), tokenizer)
    if hasattr(PreTrainedModel, "set_use_kernels"):
        assert hub_kernel_arguments(False) == {"use_kernels": False}
        assert loaded.use_kernels is False and scalar.model.use_kernels is False
    else:
        assert hub_kernel_arguments(False) == {}
        with pytest.raises(UserError, match="model.hub_kernels: needs a transformers release"):
            hub_kernel_arguments(True)
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda *args, **kwargs: None, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(UserError, match="model.hub_kernels: needs the kernels package; pip install kernels"):
        hub_kernel_arguments(True)


# ----------------------------------------------------------------------------- attention implementation

def test_attn_implementation_switches_the_kernel_and_keeps_the_function(tokenizer_dir, tmp_path):
    default, _ = load_causal_lm(tiny_model_config(tokenizer_dir), seed=0)
    assert default.config._attn_implementation == "sdpa"  # transformers' default for its own architectures
    config = tiny_model_config(tokenizer_dir)
    config.attn_implementation = "eager"
    eager, tokenizer = load_causal_lm(config, seed=0)
    assert eager.config._attn_implementation == "eager"
    # Same weights, same function: a left-padded batch gives the same logits at every real position.
    input_ids = torch.arange(3, 19).reshape(2, 8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
              for m in (default, eager)]
    real = attention_mask.bool()
    torch.testing.assert_close(logits[1][real], logits[0][real], rtol=0, atol=1e-5)
    # The scalar-head models get it too, and a checkpoint does not keep it (it is the run's choice).
    scalar = load_scalar_model(config, tokenizer)
    assert scalar.model.config._attn_implementation == "eager"
    assert scalar.model.base_model.config._attn_implementation == "eager"
    eager.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_an_attention_the_model_cannot_run_is_one_line_naming_the_key(tokenizer_dir):
    import importlib.util

    config = tiny_model_config(tokenizer_dir)
    config.attn_implementation = "no_such_kernel"
    with pytest.raises(UserError, match=r"^policy.attn_implementation: .*no_such_kernel") as caught:
        load_causal_lm(config, block="policy")
    assert "\n" not in str(caught.value)
    if importlib.util.find_spec("flash_attn") is None:  # always so on a CPU machine: the package needs CUDA
        config.attn_implementation = "flash_attention_2"
        with pytest.raises(UserError, match=r"^model.attn_implementation: .*FlashAttention2.*installed; pip install "
                                            r"'rlhf\[flash-attn\]'") as caught:
            load_scalar_model(config, load_tokenizer(config))
        assert "\n" not in str(caught.value)


def test_a_model_that_cannot_switch_its_attention_is_refused(tokenizer_dir):
    from rlhf.models.backbone import set_attention_implementation

    model, _ = load_causal_lm(tiny_model_config(tokenizer_dir), seed=0)
    set_attention_implementation(model, "sdpa", "model.attn_implementation")  # already so: nothing to do
    model._can_set_attn_implementation = lambda: False  # what remote code without the attention interface reports
    with pytest.raises(UserError, match=r"^model.attn_implementation: GPT2LMHeadModel cannot switch its attention"):
        set_attention_implementation(model, "eager", "model.attn_implementation")
    assert model.config._attn_implementation == "sdpa"


def test_fp32_forwards_of_a_flash_attention_model_run_through_sdpa(tokenizer_dir):
    from rlhf.models import check_packing_support, check_segment_mask_support
    from rlhf.models.backbone import full_precision_attention
    from rlhf.scoring import raw_scores

    model, tokenizer = load_causal_lm(tiny_model_config(tokenizer_dir), seed=0)
    scalar = ScalarHeadModel.from_causal_lm(model, head_init="normal")
    input_ids = torch.arange(3, 19).reshape(2, 8)
    expected_logits = model(input_ids).logits
    sequences = [list(range(3, 12)), list(range(5, 9))]
    expected_scores = raw_scores(scalar, sequences, tokenizer.pad_token_id)
    for flagged in (model, scalar):  # set_attn_implementation("flash_attention_2") records this (CUDA only)
        flagged.config._attn_implementation = "flash_attention_2"
    with pytest.raises(Exception):  # the negative control: an fp32 forward through the kernel fails
        model(input_ids)
    with full_precision_attention(model):
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(input_ids).logits, expected_logits, rtol=0, atol=0)
    assert model.config._attn_implementation == "flash_attention_2"
    assert raw_scores(scalar, sequences, tokenizer.pad_token_id) == expected_scores
    check_packing_support(model)  # the packing probe runs in fp32 too: through SDPA, and passes
    # The reward model's packed rows need a 4D mask, which a flash kernel does not take: refused, not probed.
    with pytest.raises(UserError, match=r"^training.packing: the reward model's packed rows need an attention that "
                                        r"applies a 4D mask .*model.attn_implementation=flash_attention_2"):
        check_segment_mask_support(scalar)
    assert scalar.config._attn_implementation == "flash_attention_2"


# ----------------------------------------------------------------------------- scalar head

@pytest.fixture(scope="module")
def scalar_model(tokenizer_dir) -> tuple[ScalarHeadModel, object]:
    tokenizer = load_tokenizer(tiny_model_config(tokenizer_dir))
    model = load_scalar_model(tiny_model_config(tokenizer_dir), tokenizer, head_init="normal", seed=0)
    return model.eval(), tokenizer


def pad_row(ids: list[int], left: int, right: int, pad_id: int) -> tuple[list[int], list[int]]:
    return [pad_id] * left + ids + [pad_id] * right, [0] * left + [1] * len(ids) + [0] * right


@torch.no_grad()
def test_score_is_read_at_the_last_token_whatever_the_padding(scalar_model):
    """docs/ppo.md#oracle-9: left, right and mixed padding leave the score unchanged (≤1e-5)."""
    model, tokenizer = scalar_model
    sequences = [tokenizer("The cat is very happy.")["input_ids"] + [tokenizer.eos_token_id],
                 tokenizer("The dog ran.")["input_ids"] + [tokenizer.eos_token_id]]
    alone = torch.stack([model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
                         for ids in sequences])
    pad = tokenizer.pad_token_id
    total = max(len(s) for s in sequences) + 5
    first, second = (total - len(s) for s in sequences)
    for padding in ([(0, first), (0, second)],                    # right
                    [(first, 0), (second, 0)],                    # left
                    [(2, first - 2), (second - 1, 1)]):           # mixed: both sides, different amounts
        rows = [pad_row(ids, left, right, pad) for ids, (left, right) in zip(sequences, padding)]
        input_ids = torch.tensor([r[0] for r in rows])
        attention_mask = torch.tensor([r[1] for r in rows])
        scores = model.score(input_ids, attention_mask)
        assert torch.allclose(scores, alone, atol=1e-5, rtol=0), padding
        # Whatever sits after the last valid token (pad ids or real words) cannot change the score.
        garbage = input_ids.masked_fill(attention_mask == 0, tokenizer.eos_token_id)
        garbage[:, 0] = torch.where(attention_mask[:, 0] == 0, 7, garbage[:, 0])
        assert torch.allclose(model.score(garbage, attention_mask), alone, atol=1e-5, rtol=0), padding


@torch.no_grad()
def test_tokens_after_the_last_valid_token_do_not_change_the_score(scalar_model):
    model, tokenizer = scalar_model
    ids = tokenizer("The cat sat on the mat.")["input_ids"]
    tails = [[tokenizer.pad_token_id] * 4, tokenizer(" the big red dog")["input_ids"][:4], [5, 6, 7, 8]]
    mask = torch.tensor([[1] * len(ids) + [0] * 4] * len(tails))
    scores = model.score(torch.tensor([ids + tail for tail in tails]), mask)
    assert torch.allclose(scores, scores[0].expand(3), atol=1e-5, rtol=0)


@torch.no_grad()
def test_set_normalization_centres_the_scores(scalar_model):
    model, tokenizer = scalar_model
    texts = ["The cat is happy.", "The dog is sad.", "A bird sings in the tree.", "The sun and the moon."]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    longest = max(len(e) for e in encoded)
    input_ids = torch.tensor([e + [tokenizer.pad_token_id] * (longest - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (longest - len(e)) for e in encoded])
    raw = model.raw_score(input_ids, mask)
    try:
        model.set_normalization(raw.mean().item(), raw.std().item())
        normalized = model.score(input_ids, mask)
        assert abs(normalized.mean().item()) < 1e-5
        assert normalized.std().item() == pytest.approx(1.0, abs=1e-5)
        assert model.config.rlhf_reward_mean == pytest.approx(raw.mean().item())  # saved with the model
    finally:
        model.set_normalization(0.0, 1.0)


@torch.no_grad()
def test_a_trimmed_last_block_scores_like_the_full_model_running_its_feed_forward_at_the_eos_only(tokenizer_dir):
    tokenizer = load_tokenizer(tiny_model_config(tokenizer_dir))
    model = load_scalar_model(tiny_model_config(tokenizer_dir), tokenizer, head_init="normal", seed=0).eval()
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
                 for text in ("The cat is very happy.", "The dog ran.", "A bird")]
    total = max(len(s) for s in sequences) + 2
    rows = [pad_row(ids, left, total - len(ids) - left, tokenizer.pad_token_id)
            for ids, left in zip(sequences, (0, 2, total - len(sequences[2])))]  # right, mixed, left padding
    input_ids, attention_mask = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    full_scores, per_token = model.score(input_ids, attention_mask), model(input_ids, attention_mask)

    assert model.trim_last_block() and model.trims_last_block
    feed_forward = model.model.transformer.h[-1].mlp
    seen = []
    handle = feed_forward.register_forward_hook(lambda _module, args, _output: seen.append(tuple(args[0].shape)))
    try:
        scores = model.score(input_ids, attention_mask)
        values = model(input_ids, attention_mask)  # nothing read: every position, as a critic needs
    finally:
        handle.remove()
    torch.testing.assert_close(scores, full_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, per_token, atol=1e-5, rtol=0)
    assert seen == [(1, 3, 32), (3, total, 32)]  # the score: one position per sequence; the values: all


def test_trimming_stays_off_for_a_feed_forward_that_mixes_positions_or_none_found(tokenizer_dir, monkeypatch,
                                                                                  caplog):
    from rlhf.models import backbone

    class MixesPositions(torch.nn.Module):  # not a per-token feed-forward: each output sees the sequence's mean
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden):
            return self.inner(hidden) + hidden.mean(dim=1, keepdim=True)

    tokenizer = load_tokenizer(tiny_model_config(tokenizer_dir))
    model = load_scalar_model(tiny_model_config(tokenizer_dir), tokenizer, head_init="normal", seed=0).eval()
    block = model.model.transformer.h[-1]
    block.mlp = MixesPositions(block.mlp)
    ids, mask = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        expected = model(ids, mask)[[0, 1], [3, 2]]
    with caplog.at_level("INFO", logger="rlhf.models.backbone"):
        assert not model.trim_last_block()
    assert not model.trims_last_block and "trimming the last block changes its outputs" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model.score(ids, mask), expected, atol=1e-6, rtol=0)

    monkeypatch.setattr(backbone, "FEED_FORWARD_NAMES", ("feed_forward",))  # a block without a known name
    caplog.clear()
    with caplog.at_level("INFO", logger="rlhf.models.backbone"):
        assert not model.trim_last_block()
    assert "no feed-forward module found in the last block" in caplog.text


def test_head_init_normal_has_std_one_over_sqrt_width_plus_one(scalar_model):
    model, _ = scalar_model
    saved = model.head.weight.detach().clone()
    width = model.head.in_features
    draws = []
    for seed in range(60):  # 60 × 32 weights: the sample std is within a few percent
        torch.manual_seed(seed)
        model.init_head("normal")
        draws.append(model.head.weight.detach().flatten().clone())
    with torch.no_grad():
        model.head.weight.copy_(saved)
    draws = torch.cat(draws)
    assert draws.std().item() == pytest.approx(1 / math.sqrt(width + 1), rel=0.08)
    assert abs(draws.mean().item()) < 0.02


def test_zero_head_gives_zero_values_everywhere(tokenizer_dir):
    tokenizer = load_tokenizer(tiny_model_config(tokenizer_dir))
    model = load_scalar_model(tiny_model_config(tokenizer_dir), tokenizer, head_init="zero")
    input_ids = torch.tensor([tokenizer("The cat is happy.")["input_ids"]])
    values = model(input_ids, torch.ones_like(input_ids))
    assert values.shape == input_ids.shape
    assert torch.equal(values, torch.zeros_like(values))


def test_scalar_model_saves_as_a_sequence_classifier(scalar_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = scalar_model
    model.save_pretrained(str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    input_ids = torch.tensor([tokenizer("The cat is happy.")["input_ids"]])
    with torch.no_grad():
        ours = model.raw_score(input_ids, torch.ones_like(input_ids))
        theirs = loaded(input_ids).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_missing_local_directory_names_the_config_key_that_gave_it(tmp_path, monkeypatch):
    from rlhf.models import load_causal_lm, load_tokenizer

    missing = str(tmp_path / "runs" / "rm" / "final")
    with pytest.raises(UserError, match=r"^reward\.model_path: directory '.*' not found$"):
        load_tokenizer(ModelConfig(name_or_path=missing), path_key="reward.model_path")
    with pytest.raises(UserError, match=r"^policy\.name_or_path: directory '.*' not found$"):
        load_causal_lm(ModelConfig(name_or_path=missing), block="policy")
    # under an existing local folder, "runs/nope" is a path, not a hub name to try
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^model\.tokenizer: directory 'runs/nope' not found$"):
        load_tokenizer(ModelConfig(tokenizer="runs/nope"))


# ----------------------------------------------------------------------------- logits where a loss reads them

class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (older transformers, custom code): the fallback path."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_kept_logits_equal_the_full_logits_at_the_kept_positions():
    from rlhf.models import kept_logits

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=32)).eval()
    input_ids = torch.randint(0, 40, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    keep[0, 2:5], keep[1, 7], keep[2, 1:6] = True, True, True
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for lm in (model, NoLogitsToKeep(model)):
            torch.testing.assert_close(kept_logits(lm, input_ids, attention_mask, keep), full[keep], atol=1e-5, rtol=0)
            torch.testing.assert_close(kept_logits(lm, input_ids, attention_mask, 4), full[:, -4:], atol=1e-5, rtol=0)


def test_sft_loss_from_kept_logits_equals_the_full_cross_entropy():
    from rlhf.trainers.sft import LanguageModelingObjective

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=32)).eval()
    examples = [{"input_ids": [5, 6, 7, 8, 9, 1], "labels": [-100, -100, -100, 8, 9, 1]},
                {"input_ids": [5, 6, 1], "labels": [-100, 6, 1]}]
    objective = LanguageModelingObjective(pad_token_id=0)
    batch = objective.collate(examples)
    loss_sum, _ = objective.loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_sum, expected, atol=1e-5, rtol=1e-6)
    loss_sum.backward()  # the kept positions carry gradients to the whole model
    assert model.transformer.wte.weight.grad.abs().sum() > 0
