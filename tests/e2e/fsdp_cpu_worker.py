"""Run by tests/e2e/test_fsdp_cpu.py under torchrun (2 processes, gloo): a GPT-2 sharded with torch's FSDP2
on CPU samples with ``rlhf.training.fsdp_unsharded``, each process for a different number of tokens."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.generation import sample_with_logprobs
from rlhf.training import fsdp_unsharded, reshards_after_forward

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=1)).eval()
prompts = torch.randint(2, 64, (2, 5))
mask = torch.ones_like(prompts)
new_tokens = 6 if rank == 0 else 3  # uneven work: a forward that needed the other process would hang
with torch.no_grad():
    expected = sample_with_logprobs(model, prompts, mask, new_tokens, 1.0, 0, 1.0, 0, 1,
                                    torch.Generator().manual_seed(rank))
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)
sharded_shape = tuple(model.transformer.h[0].attn.c_attn.weight.to_local().shape)
assert sharded_shape == (16, 96), sharded_shape  # each process holds half of every weight
assert reshards_after_forward(model)
with torch.no_grad(), fsdp_unsharded(model):
    got = sample_with_logprobs(model, prompts, mask, new_tokens, 1.0, 0, 1.0, 0, 1,
                               torch.Generator().manual_seed(rank))
assert torch.equal(got[0], expected[0]), (got[0], expected[0])
torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)
# Sharded again afterwards, with FSDP's own setting back.
assert tuple(model.transformer.h[0].attn.c_attn.weight.to_local().shape) == sharded_shape
assert reshards_after_forward(model) and reshards_after_forward(model.transformer.h[0])
dist.barrier()
print(f"rank {rank}: ok")
sys.exit(0)
