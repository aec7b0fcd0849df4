"""Sampling text from a causal LM for reports and evaluation (PPO's rollout sampler lives with PPO)."""

from __future__ import annotations

import contextlib
import inspect

import torch

from rlhf.data import pad_left
from rlhf.models.backbone import eager_blocks, full_precision_attention, half_precision_attention
from rlhf.models.onednn import packed_cpu_linears


@torch.no_grad()
def generate_responses(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                       do_sample: bool = False, temperature: float = 1.0, cpu_packed_weights: bool = True) -> list[str]:
    """Continue each prompt (token ids) and decode the continuation up to the first EOS.

    Prompts are left-padded; ``generate`` derives position ids from the attention mask itself
    (passing them breaks generation, docs/ppo.md#11). ``cpu_packed_weights``: as in ``sample_with_logprobs``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses = []
    # Entered once for all batches: the weights are packed once, not per batch.
    with eager_blocks(), full_precision_attention(model), packed_cpu_linears(model, cpu_packed_weights):
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
                responses.append(tokenizer.decode([t for t in row if t != tokenizer.pad_token_id],
                                                  skip_special_tokens=True))
    model.train(was_training)
    return responses


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the nucleus of mass top_p.

    Args:
        logits: (batch, vocab), already divided by the temperature.
        top_k: keep the k largest (0 = off).
        top_p: keep the smallest set whose probability reaches top_p (1.0 = off).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_with_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                         temperature: float, top_k: int, top_p: float, eos_token_id: int, pad_token_id: int,
                         generator: torch.Generator | None = None,
                         compile_mode: str | None = None,
                         cpu_packed_weights: bool = True,
                         stop_check_lag: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses with a KV cache, returning the tokens and their logprobs under log softmax(z/τ).

    Rows stop at their first EOS (later tokens are ``pad_token_id``); the loop ends when every
    row has stopped or after ``max_new_tokens``. Position ids are the exclusive cumsum of the
    mask, as in every other forward (docs/ppo.md#11). The logprobs are of the temperature-scaled
    distribution *before* top-k/top-p, i.e. the same function the training forward computes.

    Args:
        prompt_ids: (batch, prompt_len) left-padded prompts.
        prompt_mask: (batch, prompt_len), 1 on real prompt tokens.
        compile_mode: run the one-token decode step through ``torch.compile`` in this mode ("default",
            "max-autotune-no-cudagraphs"; None: eager). With a static cache its shapes stay fixed for the
            whole response, so it compiles once per batch shape. The tokens equal the eager ones up to float
            rounding.
        cpu_packed_weights: on a CPU, run the fp32 linear layers through oneDNN on weights packed once for the
            whole response (``rlhf.models.onednn``; not with ``compile_mode``). Decoding multiplies a few rows
            by every weight per token, and MKL's sgemm re-lays the weight out on each call: the PPO benchmark's
            sampling takes 0.47 s per rollout instead of 0.59 s. Same tokens up to float rounding; the packed
            copy doubles the policy's weight memory while it samples.
        stop_check_lag: whether every row has stopped is read this many tokens late (default: 8 on a GPU, 0
            elsewhere), so the host never waits for the step it has just queued (``AllStoppedFlags``). The
            loop may then decode a few tokens past the point where every row stopped; they are cut off, so
            the result is the same as with 0.
    Returns:
        response_ids (batch, response_len) and logprobs (batch, response_len), response_len ≤ max_new_tokens.
    """
    from rlhf.functional import exclusive_cumsum_positions

    # fp32 forwards: a model set to a half-precision-only (flash) kernel samples through SDPA.
    with full_precision_attention(model), packed_cpu_linears(model, cpu_packed_weights and compile_mode is None):
        # transformers >= 5.2x names the KV cache argument `cache`; older releases `past_key_values`.
        forward_parameters = inspect.signature(model.forward).parameters
        cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        batch_size, prompt_len = prompt_ids.shape
        # A key/value cache allocated once for the whole response: no torch.cat of every layer's cache per token.
        # Only with the cache API this was tested on (the `cache` argument): older releases need cache
        # positions passed by hand for a static cache.
        cache = preallocated_cache(model, prompt_len + max_new_tokens) if cache_argument == "cache" else None
        if cache is not None:
            # With a static cache the mask is allocated at full length too (future columns 0), so every
            # decode step sees the same shapes: nothing to re-trace for a compiled step.
            attention_mask = prompt_mask.new_zeros(batch_size, prompt_len + max_new_tokens)
            attention_mask[:, :prompt_len] = prompt_mask
        else:
            attention_mask = prompt_mask.clone()
        positions = exclusive_cumsum_positions(prompt_mask)
        # Only the last prompt position's logits are read: skip the vocabulary projection of the others.
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        with eager_blocks():  # compiled blocks would re-trace per layer on a cache (see eager_blocks)
            output = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                           **keep_last, **({cache_argument: cache} if cache is not None else {}))
        cache, next_logits = output[cache_argument], output.logits[:, -1]
        compiled = compile_mode is not None
        step = decode_step
        if compiled:
            step = torch.compile(decode_step, **({} if compile_mode == "default" else {"mode": compile_mode}))
        next_position = prompt_mask.sum(-1, keepdim=True)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
        all_stopped = AllStoppedFlags(prompt_ids.device, stop_check_lag)
        tokens, logprobs = [], []
        for index in range(max_new_tokens):
            scaled = next_logits.float() / temperature
            probabilities = filter_logits(scaled, top_k, top_p).softmax(-1)
            token = draw_tokens(probabilities, generator)
            token_logprob = scaled.log_softmax(-1).gather(1, token.unsqueeze(1)).squeeze(1)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            tokens.append(token)
            logprobs.append(token_logprob)
            finished |= token == eos_token_id
            stopped_at = all_stopped.first_stop(finished, index)
            if stopped_at is None and index == max_new_tokens - 1:
                stopped_at = all_stopped.first_pending_stop()
            if stopped_at is not None:
                del tokens[stopped_at + 1:], logprobs[stopped_at + 1:]  # the steps decoded past it: padding
                break
            if index == max_new_tokens - 1:
                break
            if attention_mask.shape[1] > prompt_len + index:  # static: fill the column
                attention_mask[:, prompt_len + index] = 1
            else:
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            with contextlib.nullcontext() if compiled else eager_blocks():
                next_logits, cache = step(model, token.unsqueeze(1), attention_mask, next_position, cache,
                                          cache_argument)
            next_position = next_position + 1
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


class AllStoppedFlags:
    """Whether every row has stopped, read ``lag`` decode steps after the step that computed it.

    Reading ``finished.all()`` at once makes the host wait until the device has run every step queued so
    far, so on a GPU the next step's launches never overlap the current step's kernels. Here each step's
    flag is copied to pinned host memory without waiting, an event marks it, and the flag of the step
    ``lag`` tokens back is read after waiting on its event alone: the device keeps up to ``lag`` steps
    queued. With ``lag`` 0 (the default off a GPU) the flag is read at once.
    """

    def __init__(self, device: torch.device, lag: int | None = None):
        self.lag = (8 if device.type == "cuda" else 0) if lag is None else lag
        self.cuda = device.type == "cuda"
        slots = self.lag + 1
        self.flags = torch.zeros(slots, dtype=torch.bool, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(slots)] if self.cuda else []
        self.pending: list[int] = []  # steps whose flag is not read yet, oldest first

    def first_stop(self, finished: torch.Tensor, index: int) -> int | None:
        """Record step ``index``'s flag; return the first step at which every row had stopped, once known."""
        if self.lag == 0:
            return index if bool(finished.all()) else None
        slot = index % (self.lag + 1)
        self.flags[slot].copy_(finished.all(), non_blocking=self.cuda)
        if self.cuda:
            self.events[slot].record()
        self.pending.append(index)
        if len(self.pending) <= self.lag:
            return None
        return self._read(self.pending.pop(0))

    def first_pending_stop(self) -> int | None:
        """After the last step: the first step not read yet at which every row had stopped, if any."""
        while self.pending:
            stopped_at = self._read(self.pending.pop(0))
            if stopped_at is not None:
                return stopped_at
        return None

    def _read(self, index: int) -> int | None:
        slot = index % (self.lag + 1)
        if self.cuda:
            self.events[slot].synchronize()
        return index if bool(self.flags[slot]) else None


def draw_tokens(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probabilities`` (batch, vocab), drawn by inverting the row's CDF.

    The same distribution as ``torch.multinomial(probabilities, 1)`` with one uniform number per row:
    multinomial's CPU path draws one exponential per vocabulary entry (16 x 8,193 per token on the
    PPO benchmark, 3.2 ms against 0.85 ms here). The CDF is summed in float64 so that rounding cannot
    move mass between neighbouring tokens; a zero-probability token (top-k/top-p) is never drawn,
    because ``right=True`` finds the first entry whose cumulative mass exceeds the draw.

    Returns:
        (batch,) long token ids.
    """
    cdf = probabilities.to(torch.float64).cumsum(-1)
    draw = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def decode_step(model, token: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
                cache_argument: str):
    """One token per row through the model on its KV cache: (next-token logits (batch, vocab), the cache)."""
    output = model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{cache_argument: cache})
    return output.logits[:, -1], output[cache_argument]


def preallocated_cache(model, max_length: int):
    """A transformers ``StaticCache`` for ``max_length`` tokens, or None (the model's own growing cache).

    Only for models that declare static-cache support (``_can_compile_fullgraph``, as ``generate``
    checks) and do not attend through flash attention; the sampled tokens and logprobs equal the
    growing cache's up to float rounding. Measured on the PPO benchmark (6-layer GPT-2, 16 rows, 32
    new tokens, 2 CPU threads): +5 to +14 % episodes/s.
    """
    if not getattr(model, "_can_compile_fullgraph", False):
        return None
    # Flash-attention kernels do not mask a static cache's unfilled slots (transformers#32040); the sampler
    # runs them through SDPA (full_precision_attention), so this guards direct callers.
    if half_precision_attention(model):
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_length)
