#!/usr/bin/env python
"""Plain-torch loops doing the anchors' exact work: the practical ceiling for this machine.

    $BENCH_VENVS/trl116/bin/python benchmarks/anchors/torch_ceiling.py --stage sft|rm|ppo|all

The same weights, data, batch sizes, optimizer settings (AdamW lr 5e-5 constant, weight decay 0,
clip 1.0), fp32 and BENCH_THREADS threads as trl_sft.py, trl_rm.py and trl_ppo.py, with none of
a framework's overhead and the obvious efficiencies that change no numerics beyond the order of
float additions: batches of similar length, SDPA attention, logits only where a loss needs them,
one forward over chosen and rejected together, KV-cached sampling, inference mode for frozen
forwards, and torch's multi-tensor (``foreach``) AdamW. A framework at 80 % of these numbers or
more is close to what this CPU allows for this model.

Prints one JSON line per stage (compare.py runs one stage per process, so that each stage's peak
RSS is its own; ``--stage all`` reports a high-water mark for the later stages). The timed part
of each stage starts after tokenisation and batching and ends after the last optimizer step.
"""

import harness  # must come first: pins the threads before torch loads

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from harness import common  # noqa: E402

BATCH = 8  # sequences (SFT) or pairs (RM) per optimizer step


class Timed:
    """The timed part of a stage: its wall time and other processes' CPU use meanwhile."""

    def __enter__(self) -> "Timed":
        self.monitor = common.CpuMonitor().start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = self.monitor.stop()


def load_lm(root):
    return AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa")


def pad_batch(sequences, pad_id):
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, : len(sequence)] = 1
    return ids, mask


def length_grouped(items, length, batch):
    """Batches of consecutive items in length order: the least padding for the same rows."""
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    return [[items[i] for i in order[j: j + batch]] for j in range(0, len(order), batch)]


def optimizer_step(optimizer, params):
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adamw(params):
    return torch.optim.AdamW(params, lr=harness.LR, weight_decay=0.0, foreach=True)


def sft(root, tokenizer):
    """Loss on the completion and its EOS, lm_head only at those positions."""
    model = load_lm(root).train()
    eos = tokenizer.eos_token_id
    rows = []
    for row in common.read_jsonl(root / "sft.jsonl"):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt + completion, len(prompt)))
    batches = length_grouped(rows, lambda r: len(r[0]), BATCH)
    optimizer = adamw(model.parameters())
    tokens = 0
    with Timed() as timed:
        for batch in batches:
            ids, mask = pad_batch([sequence for sequence, _ in batch], tokenizer.pad_token_id)
            target = torch.full_like(ids, -100)
            for i, (sequence, n_prompt) in enumerate(batch):
                target[i, n_prompt: len(sequence)] = ids[i, n_prompt: len(sequence)]
            hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
            scored = target[:, 1:] != -100  # position t predicts token t + 1
            logits = model.lm_head(hidden[:, :-1][scored])
            loss = F.cross_entropy(logits, target[:, 1:][scored])
            loss.backward()
            optimizer_step(optimizer, model.parameters())
            tokens += int(mask.sum())
    return {"stage": "sft", "wall_s": round(timed.wall, 3), "nonpad_tokens": tokens,
            "tokens_per_s": round(tokens / timed.wall, 2), "final_loss": round(float(loss), 4), "cpu": timed.cpu}


class Scalar(torch.nn.Module):
    """The GPT-2 backbone and a bias-free scalar head read at the last real token (as HF sequence classification)."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.transformer
        self.head = torch.nn.Linear(lm.config.n_embd, 1, bias=False)
        torch.nn.init.normal_(self.head.weight, std=lm.config.initializer_range)

    def forward(self, ids, mask):
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return self.head(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1)


def rm(root, tokenizer):
    """Pairwise loss -log σ(r_chosen - r_rejected), chosen and rejected in one forward."""
    model = Scalar(load_lm(root)).train()
    eos = tokenizer.eos_token_id
    pairs = []
    for row in common.read_jsonl(root / "pref.jsonl"):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        chosen = prompt + tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        rejected = prompt + tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [eos]
        pairs.append((chosen, rejected))
    batches = length_grouped(pairs, lambda pair: max(len(pair[0]), len(pair[1])), BATCH)
    optimizer = adamw(model.parameters())
    tokens, n_pairs = 0, 0
    with Timed() as timed:
        for batch in batches:
            ids, mask = pad_batch([c for c, _ in batch] + [r for _, r in batch], tokenizer.pad_token_id)
            scores = model(ids, mask)
            loss = -F.logsigmoid(scores[: len(batch)] - scores[len(batch):]).mean()
            loss.backward()
            optimizer_step(optimizer, model.parameters())
            tokens += int(mask.sum())
            n_pairs += len(batch)
    return {"stage": "rm", "wall_s": round(timed.wall, 3), "pairs": n_pairs, "pairs_per_s": round(n_pairs / timed.wall, 3),
            "tokens_per_s": round(tokens / timed.wall, 2), "final_loss": round(float(loss), 4), "cpu": timed.cpu}


def response_logprobs(lm, ids, n_prompt, temperature):
    """Log-probabilities of the response tokens under ``lm`` at the sampling temperature."""
    hidden = lm.transformer(input_ids=ids).last_hidden_state[:, n_prompt - 1: -1]
    logits = lm.lm_head(hidden) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, n_prompt:, None]).squeeze(-1)


def ppo(root, tokenizer, episodes=128, rollout=16, minibatch=8, new_tokens=32, temperature=0.7,
        kl_coef=0.05, clip=0.2, clip_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95):
    """TRL's PPO step (per-token KL penalty, score on the last token, GAE, whitened advantages,
    clipped policy and value losses, one AdamW over policy and value) as a plain loop."""
    policy = load_lm(root)
    reference = load_lm(root).eval().requires_grad_(False)
    reward = Scalar(load_lm(root)).eval().requires_grad_(False)
    value = Scalar(load_lm(root))
    params = list(policy.parameters()) + list(value.parameters())
    optimizer = adamw(params)
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
               for row in common.read_jsonl(root / "ppo.jsonl")]
    assert all(len(p) == 32 for p in prompts)
    generator = torch.Generator().manual_seed(harness.SEED)
    with Timed() as timed:
        for start in range(0, episodes, rollout):
            queries = torch.tensor(prompts[start: start + rollout])
            n_prompt = queries.shape[1]
            with torch.inference_mode():  # the rollout: KV-cached sampling, then the frozen forwards
                out = policy(input_ids=queries, use_cache=True)
                past, sequences = out.past_key_values, queries
                for _ in range(new_tokens):
                    probs = torch.softmax(out.logits[:, -1] / temperature, -1)
                    next_tokens = torch.multinomial(probs, 1, generator=generator)
                    sequences = torch.cat([sequences, next_tokens], 1)
                    out = policy(input_ids=next_tokens, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                full_mask = torch.ones_like(sequences)
                old_logprobs = response_logprobs(policy, sequences, n_prompt, temperature)
                ref_logprobs = response_logprobs(reference, sequences, n_prompt, temperature)
                hidden = value.backbone(input_ids=sequences).last_hidden_state[:, n_prompt - 1: -1]
                old_values = value.head(hidden).squeeze(-1)
                score = reward(sequences, full_mask)
                rewards = -kl_coef * (old_logprobs - ref_logprobs)
                rewards[:, -1] += score
                advantages = torch.zeros_like(rewards)
                last = torch.zeros(rewards.shape[0])
                for t in reversed(range(new_tokens)):
                    next_value = old_values[:, t + 1] if t + 1 < new_tokens else torch.zeros(rewards.shape[0])
                    last = rewards[:, t] + gamma * next_value - old_values[:, t] + gamma * lam * last
                    advantages[:, t] = last
                returns = advantages + old_values
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            # inference tensors cannot enter autograd: ordinary copies for the update
            sequences, old_logprobs, old_values, advantages, returns = (
                x.clone() for x in (sequences, old_logprobs, old_values, advantages, returns))
            order = torch.randperm(sequences.shape[0], generator=generator)
            for m in range(0, sequences.shape[0], minibatch):
                i = order[m: m + minibatch]
                logprobs = response_logprobs(policy, sequences[i], n_prompt, temperature)
                ratio = torch.exp(logprobs - old_logprobs[i])
                policy_loss = torch.max(-advantages[i] * ratio, -advantages[i] * ratio.clamp(1 - clip, 1 + clip)).mean()
                values = value.head(value.backbone(input_ids=sequences[i]).last_hidden_state[:, n_prompt - 1: -1]).squeeze(-1)
                values_clipped = old_values[i] + (values - old_values[i]).clamp(-clip_value, clip_value)
                value_loss = 0.5 * torch.max((values - returns[i]) ** 2, (values_clipped - returns[i]) ** 2).mean()
                (policy_loss + vf_coef * value_loss).backward()
                optimizer_step(optimizer, params)
    return {"stage": "ppo", "wall_s": round(timed.wall, 3), "episodes": episodes,
            "episodes_per_s": round(episodes / timed.wall, 3),
            "generated_tokens_per_s": round(episodes * new_tokens / timed.wall, 2), "cpu": timed.cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["sft", "rm", "ppo", "all"], default="all")
    args = parser.parse_args()
    root, _ = common.verified_workload_or_exit()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(harness.SEED)  # the scalar heads' initialisation
    for name in (["sft", "rm", "ppo"] if args.stage == "all" else [args.stage]):
        result = {"sft": sft, "rm": rm, "ppo": ppo}[name](root, tokenizer)
        result.update(anchor="torch_ceiling", optim="adamw_torch_foreach", peak_rss_mb=round(common.peak_rss_mb(), 1),
                      versions=harness.versions(), cpu_loadavg=common.env_info()["loadavg_at_end"])
        common.emit(result)


if __name__ == "__main__":
    main()
