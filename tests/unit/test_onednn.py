"""CPU decoding through oneDNN on packed weights (rlhf.models.onednn): the same outputs as the layers' own
forwards, the packed copy really used, and every case where it must not be (gradients, autocast, a weight
changed since packing, a forward someone else replaced) falling back to the layer's own forward."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.generation import generate_responses, sample_with_logprobs
from rlhf.models import onednn
from rlhf.models.onednn import linear_weight, onednn_linear_available, packed_cpu_linears

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def linear_layers(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if linear_weight(module) is not None]


@pytest.mark.parametrize("build, layers", [(tiny_gpt2, 2 * 4 + 1), (tiny_llama, 2 * 7 + 1)])
def test_packed_layers_give_the_layers_own_outputs(build, layers):
    # GPT-2's Conv1D (an (in, out) weight, with bias) and Llama's bias-free nn.Linear, lm_head included.
    model = build()
    expected = logits(model)
    with packed_cpu_linears(model) as packed:
        got = logits(model)
    assert packed == layers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(module) for module in model.modules())  # restored
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_the_packed_copy_is_what_runs():
    # Zeroing the weights behind autograd's back (.data: no version bump) is invisible to the packed copy:
    # the outputs stay those of the weights at entry. Outside the context the same zeroing shows at once.
    # (Not lm_head: its weight is the tied embedding, which is read unpacked too.)
    model = tiny_gpt2()
    expected = logits(model)
    with packed_cpu_linears(model):
        for module in linear_layers(model):
            if module is not model.lm_head:
                module.weight.data.zero_()
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model), expected, atol=1e-3)


def test_a_weight_changed_in_place_is_read_afresh():
    # An optimizer step (in place, version bumped) inside the context: the layer runs its own forward again.
    model = tiny_gpt2()
    with packed_cpu_linears(model):
        with torch.no_grad():
            for module in linear_layers(model):
                module.weight.mul_(0.5)
        inside = logits(model)
    torch.testing.assert_close(inside, logits(model), atol=0, rtol=0)


def test_gradients_flow_as_without_packing():
    model, packed_model = tiny_gpt2(), tiny_gpt2()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with packed_cpu_linears(packed_model) as packed:
        packed_model(input_ids=IDS, labels=IDS).loss.backward()
    assert packed > 0
    for plain, other in zip(model.parameters(), packed_model.parameters()):
        torch.testing.assert_close(other.grad, plain.grad, atol=0, rtol=0)


def test_autocast_runs_the_layers_own_forward():
    model = tiny_gpt2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(model)
        with packed_cpu_linears(model):
            got = logits(model)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_nothing_is_packed_when_off_unavailable_not_fp32_or_already_replaced(monkeypatch):
    model = tiny_gpt2()
    with packed_cpu_linears(model, enabled=False) as packed:
        assert packed == 0
    with packed_cpu_linears(tiny_gpt2().to(torch.bfloat16)) as packed:
        assert packed == 0
    with packed_cpu_linears(tiny_gpt2().double()) as packed:
        assert packed == 0
    # A forward replaced by someone else (accelerate's offload hooks do that) stays theirs, and stays after exit.
    first = linear_layers(model)[0]
    hooked = functools.partial(type(first).forward, first)
    first.forward = hooked
    with packed_cpu_linears(model) as packed:
        assert packed == 2 * 4 + 1 - 1
        assert first.forward is hooked
    assert first.forward is hooked
    monkeypatch.setattr(onednn, "onednn_linear_available", lambda: False)
    with packed_cpu_linears(tiny_gpt2()) as packed:
        assert packed == 0


def test_forwards_are_restored_when_the_block_raises():
    model = tiny_gpt2()
    with pytest.raises(KeyError):
        with packed_cpu_linears(model):
            raise KeyError("boom")
    assert not any("forward" in vars(module) for module in model.modules())


def test_sampling_and_generation_give_the_same_tokens_packed_or_not():
    model = tiny_gpt2()
    prompts, mask = IDS, torch.ones_like(IDS)
    runs = []
    for packed in (False, True):
        generator = torch.Generator().manual_seed(3)
        runs.append(sample_with_logprobs(model, prompts, mask, 10, 0.7, 0, 1.0, 1, 0, generator,
                                         cpu_packed_weights=packed))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-5, rtol=0)

    class Tokenizer:  # what generate_responses reads
        pad_token_id, eos_token_id = 0, 1

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    texts = [generate_responses(model, Tokenizer(), IDS.tolist(), 8, cpu_packed_weights=packed) for packed in (False, True)]
    assert texts[0] == texts[1]
