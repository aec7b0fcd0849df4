"""Sampling text from a causal LM for reports and evaluation (PPO's rollout sampler lives with PPO)."""

from __future__ import annotations

import torch

from rlhf.data import pad_left


@torch.no_grad()
def generate_responses(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                       do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Continue each prompt (token ids) and decode the continuation up to the first EOS.

    Prompts are left-padded; ``generate`` derives position ids from the attention mask itself
    (passing them breaks generation, PPO-NOTES item 11).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        input_ids = pad_left(chunk, tokenizer.pad_token_id).to(device)
        attention_mask = pad_left([[1] * len(p) for p in chunk], 0).to(device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, temperature=temperature if do_sample else None,
                                top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in output[:, input_ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            responses.append(tokenizer.decode([t for t in row if t != tokenizer.pad_token_id], skip_special_tokens=True))
    model.train(was_training)
    return responses
