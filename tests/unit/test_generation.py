"""The rollout sampler: logits filtering, stopping at EOS, and logprobs that a training forward reproduces.

PPO divides by the rollout logprobs, so the sampler and the training forward must compute the
same function (docs/ppo.md#oracle-11): same positions (exclusive cumsum of the mask on
left-padded rows), same temperature, dropout off, fp32. The negative controls show that each
of those three really matters at the tolerance we test, so the positive test cannot pass by
accident.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.functional import exclusive_cumsum_positions, logprobs_from_logits, truncate_after_eos
from rlhf.generation import AllStoppedFlags, draw_tokens, filter_logits, preallocated_cache, sample_with_logprobs

VOCAB, PAD, EOS = 64, 0, 1
TEMPERATURE = 0.7
# Three prompts of different lengths, so two rows are left-padded.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, width 32, random weights (default GPT-2 init), eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=EOS, eos_token_id=EOS,
                        pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def sample(model, max_new_tokens: int = 12, temperature: float = TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
           seed: int = 0, prompts=PROMPTS):
    prompt_ids, prompt_mask = left_padded(prompts)
    generator = torch.Generator().manual_seed(seed)
    response_ids, logprobs = sample_with_logprobs(model, prompt_ids, prompt_mask, max_new_tokens, temperature,
                                                  top_k, top_p, EOS, PAD, generator)
    return prompt_ids, prompt_mask, response_ids, logprobs


def forward_logprobs(model, prompt_ids, prompt_mask, response_ids, temperature=TEMPERATURE, position_ids=True):
    """The training-side computation: one full forward over prompt ⊕ response."""
    response_ids, response_mask, _ = truncate_after_eos(response_ids, EOS, PAD)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    extra = {"position_ids": exclusive_cumsum_positions(attention_mask)} if position_ids else {}
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    logits = logits[:, prompt_ids.shape[1] - 1:-1]  # logits[:, t] predicts response token t
    return logprobs_from_logits(logits, response_ids, temperature), response_mask.bool()


# ----------------------------------------------------------------------------- filter_logits

def test_filter_logits_both_off_is_identity():
    logits = torch.randn(3, 10)
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=10, top_p=1.0), logits)  # k = vocab keeps everything


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    filtered = filter_logits(logits, top_k=2, top_p=1.0)
    kept = torch.isfinite(filtered)
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(filtered[kept], logits[kept])  # survivors are untouched


def test_top_p_keeps_the_nucleus_including_the_first_token():
    # probabilities 0.5, 0.3, 0.15, 0.05, in scrambled order
    probabilities = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probabilities.log()

    def kept(top_p):
        return torch.isfinite(filter_logits(logits, top_k=0, top_p=top_p))[0].tolist()

    # The smallest set, most probable first, whose mass reaches top_p.
    assert kept(0.7) == [False, True, False, True]     # 0.5 + 0.3 = 0.8 ≥ 0.7
    assert kept(0.9) == [True, True, False, True]      # 0.5 + 0.3 + 0.15 = 0.95 ≥ 0.9
    assert kept(0.5) == [False, True, False, False]    # the top token alone reaches 0.5
    assert kept(0.1) == [False, True, False, False]    # the most probable token always stays
    assert kept(0.99) == [True, True, True, True]
    renormalised = filter_logits(logits, top_k=0, top_p=0.7).softmax(-1)
    assert torch.allclose(renormalised, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))


def test_top_k_and_top_p_together_keep_the_intersection():
    probabilities = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    filtered = filter_logits(probabilities.log(), top_k=1, top_p=0.9)
    assert torch.isfinite(filtered)[0].tolist() == [False, True, False, False]


# ----------------------------------------------------------------------------- draw_tokens

def test_draw_tokens_follows_the_probabilities_and_never_draws_a_zero():
    # 200,000 draws of p = (0.1, 0, 0.6, 0.3, 0): each frequency within 5 standard errors
    # (sqrt(p(1-p)/n) <= 0.0011), and the two zero-probability tokens never
    probabilities = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]).expand(200_000, 5)
    tokens = draw_tokens(probabilities, torch.Generator().manual_seed(0))
    assert tokens.shape == (200_000,) and tokens.dtype == torch.long
    frequencies = torch.bincount(tokens, minlength=5).double() / 200_000
    assert frequencies[1] == 0 and frequencies[4] == 0
    assert torch.allclose(frequencies, torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0], dtype=torch.float64), atol=0.0055)
    # unnormalised rows are drawn from their normalised distribution; a one-hot row always gives its token
    assert torch.equal(draw_tokens(torch.tensor([[0.0, 0.0, 2.0], [5.0, 0.0, 0.0]])), torch.tensor([2, 0]))


def test_draw_tokens_is_reproducible_and_matches_multinomial_in_distribution():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    probabilities = logits.softmax(-1)
    first = draw_tokens(probabilities.repeat(50_000, 1), torch.Generator().manual_seed(7))
    again = draw_tokens(probabilities.repeat(50_000, 1), torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    reference = torch.multinomial(probabilities.repeat(50_000, 1), 1, generator=torch.Generator().manual_seed(7))[:, 0]
    for row in range(4):  # 50,000 draws a row: sampling noise alone gives a total variation of ~0.015 (two samples), ~0.011 (one)
        ours = torch.bincount(first.view(50_000, 4)[:, row], minlength=50).double() / 50_000
        theirs = torch.bincount(reference.view(50_000, 4)[:, row], minlength=50).double() / 50_000
        assert 0.5 * (ours - theirs).abs().sum() < 0.035
        assert 0.5 * (ours - probabilities[row].double()).abs().sum() < 0.025


# ----------------------------------------------------------------------------- logprob consistency (docs/ppo.md#oracle-11)

def test_generation_logprobs_equal_a_full_forward():
    model = tiny_gpt2()
    prompt_ids, prompt_mask, response_ids, sampled_logprobs = sample(model)
    logprobs, mask = forward_logprobs(model, prompt_ids, prompt_mask, response_ids)
    assert mask.sum() > 20  # enough tokens for the check to mean something
    assert (logprobs - sampled_logprobs)[mask].abs().max() <= 1e-5


def test_preallocated_cache_samples_what_the_growing_cache_samples(monkeypatch):
    import rlhf.generation

    model = tiny_gpt2()
    assert type(preallocated_cache(model, 20)).__name__ == "StaticCache"  # GPT-2 declares support
    _, _, static_ids, static_logprobs = sample(model)
    monkeypatch.setattr(rlhf.generation, "preallocated_cache", lambda model, max_length: None)
    _, _, growing_ids, growing_logprobs = sample(model)
    assert torch.equal(static_ids, growing_ids)
    assert (static_logprobs - growing_logprobs).abs().max() <= 1e-5


def test_a_model_set_to_flash_attention_samples_through_sdpa_in_fp32():
    from rlhf.generation import generate_responses

    model = tiny_gpt2()
    _, _, expected_ids, expected_logprobs = sample(model)
    # What set_attn_implementation("flash_attention_2") records. The kernel takes fp16/bf16 only (and needs a
    # CUDA GPU): an fp32 forward through it fails, here on CPU as it would on a GPU.
    model.config._attn_implementation = "flash_attention_2"
    try:
        model(torch.tensor([PROMPTS[0]]))
    except Exception:
        pass
    else:
        raise AssertionError("the negative control ran: an fp32 forward reached no flash kernel")
    _, _, ids, logprobs = sample(model)  # the sampler switches to SDPA for its fp32 forwards
    assert torch.equal(ids, expected_ids) and torch.equal(logprobs, expected_logprobs)
    assert model.config._attn_implementation == "flash_attention_2"  # and back
    assert preallocated_cache(model, 20) is None  # a static cache is no path for the kernel itself

    class Tokenizer:  # what generate_responses reads of a tokenizer
        pad_token_id, eos_token_id = PAD, EOS

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    texts = generate_responses(model, Tokenizer(), PROMPTS, max_new_tokens=5)
    assert len(texts) == len(PROMPTS) and model.config._attn_implementation == "flash_attention_2"


def test_compiled_decode_step_samples_what_the_eager_one_samples_and_compiles_once():
    from torch._dynamo.utils import counters

    from rlhf.models import compile_blocks

    model = tiny_gpt2()
    _, _, eager_ids, eager_logprobs = sample(model)
    compile_blocks(model)  # as training.compile leaves the policy: the blocks run eager on the cache
    torch._dynamo.reset()
    counters.clear()
    prompt_ids, prompt_mask = left_padded(PROMPTS)
    compiled_ids, compiled_logprobs = sample_with_logprobs(model, prompt_ids, prompt_mask, 12, TEMPERATURE, 0, 1.0,
                                                           EOS, PAD, torch.Generator().manual_seed(0),
                                                           compile_mode="default")
    assert torch.equal(compiled_ids, eager_ids)
    assert (compiled_logprobs - eager_logprobs).abs().max() <= 1e-5
    # One graph for the whole response: the static cache and the full-length mask keep every step's shapes.
    assert counters["stats"]["unique_graphs"] == 1


def test_negative_control_forward_without_position_ids_on_a_left_padded_row():
    model = tiny_gpt2()
    prompt_ids, prompt_mask, response_ids, sampled_logprobs = sample(model)
    logprobs, mask = forward_logprobs(model, prompt_ids, prompt_mask, response_ids, position_ids=False)
    padded_row = 1  # the shortest prompt: 5 pads on its left
    assert (logprobs - sampled_logprobs)[padded_row][mask[padded_row]].abs().max() > 1e-3
    # The unpadded row is unaffected: the default positions 0..n-1 are right there.
    assert (logprobs - sampled_logprobs)[0][mask[0]].abs().max() <= 1e-5


def test_negative_control_forgetting_the_temperature():
    model = tiny_gpt2()
    prompt_ids, prompt_mask, response_ids, sampled_logprobs = sample(model, temperature=0.7)
    logprobs, mask = forward_logprobs(model, prompt_ids, prompt_mask, response_ids, temperature=1.0)
    assert (logprobs - sampled_logprobs)[mask].abs().max() > 1e-3


def test_negative_control_dropout_on():
    model = tiny_gpt2(dropout=0.1)
    prompt_ids, prompt_mask, response_ids, sampled_logprobs = sample(model)  # sampled in eval mode
    torch.manual_seed(0)
    logprobs, mask = forward_logprobs(model.train(), prompt_ids, prompt_mask, response_ids)
    assert (logprobs - sampled_logprobs)[mask].abs().max() > 1e-3
    logprobs, mask = forward_logprobs(model.eval(), prompt_ids, prompt_mask, response_ids)
    assert (logprobs - sampled_logprobs)[mask].abs().max() <= 1e-5


def test_logprobs_are_of_the_unfiltered_tempered_distribution():
    """With top-k the sampler still returns log softmax(z/τ), what the training forward computes."""
    model = tiny_gpt2()
    prompt_ids, prompt_mask, response_ids, sampled_logprobs = sample(model, top_k=5)
    logprobs, mask = forward_logprobs(model, prompt_ids, prompt_mask, response_ids)
    assert (logprobs - sampled_logprobs)[mask].abs().max() <= 1e-5


# ----------------------------------------------------------------------------- stopping

def eos_prone_gpt2(eos_logit: float) -> GPT2LMHeadModel:
    """A tiny GPT-2 whose next-token distribution puts a fixed, large logit on EOS everywhere.

    The final layer norm outputs (nearly) its bias b, and the untied output row of EOS is
    eos_logit · b/|b|², so every position has logit ≈ eos_logit on EOS and ≈ 0 elsewhere.
    """
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(1e-4)
        bias = torch.randn(32)
        model.transformer.ln_f.bias.copy_(bias)
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[EOS] = eos_logit * bias / bias.square().sum()
    return model


def test_sampling_stops_when_every_row_has_emitted_eos_and_pads_after():
    # P(EOS) ≈ e^2.5 / (e^2.5 + 63) ≈ 0.16 per step: rows stop at different times, all within 60 tokens.
    model = eos_prone_gpt2(eos_logit=2.5)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15], [16, 17]]
    _, _, response_ids, logprobs = sample(model, max_new_tokens=60, temperature=1.0, prompts=prompts)
    is_eos = response_ids == EOS
    assert is_eos.any(1).all()  # every row stopped
    first_eos = is_eos.float().argmax(1)
    assert len(set(first_eos.tolist())) > 1  # ...at different times
    # The loop ends at the step where the last row stops, not at max_new_tokens.
    assert response_ids.shape[1] == int(first_eos.max()) + 1 < 60
    assert logprobs.shape == response_ids.shape
    for row, stop in zip(response_ids.tolist(), first_eos.tolist()):
        assert EOS not in row[:stop] and PAD not in row[:stop]
        assert row[stop + 1:] == [PAD] * (len(row) - stop - 1)


def test_rows_without_eos_run_to_max_new_tokens():
    model = eos_prone_gpt2(eos_logit=-20.0)  # EOS practically never sampled
    _, _, response_ids, _ = sample(model, max_new_tokens=7, temperature=1.0)
    assert response_ids.shape == (len(PROMPTS), 7)
    assert not (response_ids == EOS).any()
    _, mask, ended = truncate_after_eos(response_ids, EOS, PAD)
    assert mask.all() and not ended.any()


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny_gpt2()
    first = sample(model, seed=3)
    second = sample(model, seed=3)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    assert math.isfinite(float(first[3].sum()))


@pytest.mark.parametrize("lag", [1, 3, 100])
def test_reading_the_stop_flag_late_samples_the_same_tokens(lag):
    # On a GPU the flag "every row has stopped" is read a few steps late, so the host need not wait for
    # each step; the steps decoded past the stop are cut off. Forced here on the CPU: the same result.
    model = eos_prone_gpt2(eos_logit=2.5)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15], [16, 17]]
    prompt_ids, prompt_mask = left_padded(prompts)
    runs = []
    for check_lag in (0, lag):
        generator = torch.Generator().manual_seed(0)
        runs.append(sample_with_logprobs(model, prompt_ids, prompt_mask, 60, 1.0, 0, 1.0, EOS, PAD, generator,
                                         stop_check_lag=check_lag))
    (eager_ids, eager_logprobs), (late_ids, late_logprobs) = runs
    assert eager_ids.shape[1] < 60  # every row stopped early: the cut was needed
    assert torch.equal(late_ids, eager_ids) and torch.equal(late_logprobs, eager_logprobs)


def test_all_stopped_flags_report_the_first_step_at_which_every_row_had_stopped():
    flags = AllStoppedFlags(torch.device("cpu"), lag=2)
    states = [[False, False], [True, False], [True, True], [True, True], [True, True]]
    reported = [flags.first_stop(torch.tensor(state), index) for index, state in enumerate(states)]
    assert reported == [None, None, None, None, 2]  # step 2's flag, read two steps later
