"""The whole pipeline: SFT -> (collect comparisons -> reward model -> PPO) × rounds -> evaluation -> report.

Each stage reads the previous one's ``final/`` (docs/stages.md#chain). A stage whose ``final/`` exists and
whose config is unchanged is skipped on re-launch; a stage with checkpoints but no ``final/``
resumes; so a killed pipeline continues where it stopped.

Comparisons come from a simulated labeler (the demo's gold scorer with Bradley–Terry label
noise, Christiano et al. 2017 / Gao et al. 2022) or from a preference file written by people.
Round r samples from the current policy (SFT for round 0, then the previous round's PPO
policy), labels, retrains the reward model on all comparisons so far, and runs PPO again
from the current policy.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import random
import time

import torch

from rlhf.config import ModelConfig, PipelineConfig, from_dict, read_yaml, save_config, to_dict
from rlhf.data import load_table, pad_left, tokenize_prompts
from rlhf.errors import Preempted, RunStopped, UserError
from rlhf.generation import sample_with_logprobs
from rlhf.logs import attach_run_log
from rlhf.models import load_causal_lm
from rlhf.models.onednn import packed_cpu_linears
from rlhf.trainers.ppo import PPOTrainer, load_reward_function
from rlhf.trainers.reward import RewardTrainer
from rlhf.trainers.sft import SFTTrainer
from rlhf.training import STOP_SIGNALS, RunDirectory, avoid_cudnn_attention, releasing_locks, write_jsonl

logger = logging.getLogger(__name__)


def run_pipeline(config: PipelineConfig) -> str:
    """Run every stage that is not already done; returns the path of report.md.

    SIGTERM/SIGINT stop the running stage with a checkpoint (or the pipeline between stages); running
    the same command again skips the finished stages and resumes the interrupted one.
    """
    try:
        with STOP_SIGNALS.installed(), releasing_locks():
            return run_stages(config)
    except RunStopped as stopped:
        stopped.resume_hint = (f"continue with: rlhf pipeline --config {os.path.join(config.output_dir, 'config.yaml')}"
                               " (finished stages are skipped, the interrupted one resumes)")
        raise


def stop_before(stage: str) -> None:
    """Between two stages: a stop signal that came while no trainer was running stops the pipeline here."""
    if STOP_SIGNALS.received is not None:
        raise Preempted(STOP_SIGNALS.received, None, None, before=stage)


def run_stages(config: PipelineConfig) -> str:
    """The body of ``run_pipeline``: SFT, then per round feedback, reward model and PPO; evaluation; report."""
    root = config.output_dir
    if config.seed is not None:
        config = copy.deepcopy(config)
        for stage in (config.sft, config.rm, config.ppo):
            stage.training.seed = config.seed
    RunDirectory(root).lock()  # one pipeline per directory (each stage also locks its own)
    attach_run_log(root, replace_previous=False)  # the whole pipeline's log; each stage also gets its own
    save_config(config, os.path.join(root, "config.yaml"))

    timings = StageTimings(os.path.join(root, "timings.json"))
    # Stage 1: SFT. A stage that runs forces every later stage to run again (its input changed).
    sft = copy.deepcopy(config.sft)
    sft.output_dir = os.path.join(root, "sft")
    with timings.measure("sft") as record:
        upstream_ran = record(run_stage(SFTTrainer, sft, force=False))
    sft_final = os.path.join(sft.output_dir, "final")

    policy_path = sft_final
    comparison_files: list[str] = []
    for round_index in range(config.rounds):
        round_dir = os.path.join(root, f"round-{round_index}")
        # Stage 2a: comparisons (from the current policy), plus held-out pairs labelled without noise
        if config.feedback.source == "file":
            comparison_files = [config.feedback.file]
            eval_pairs = None
        else:
            stop_before(f"round-{round_index}/feedback")
            with timings.measure(f"round-{round_index}/feedback") as record:
                new_file, collected = collect_comparisons(config, policy_path, round_dir, round_index, force=upstream_ran)
                eval_pairs, collected_eval = collect_comparisons(config, sft_final, round_dir, round_index,
                                                                 held_out=True, force=upstream_ran)
                upstream_ran = record(collected or collected_eval) or upstream_ran
            comparison_files.append(new_file)
        # Stage 2b: reward model on all comparisons so far: from the SFT model (docs/stages.md#chain), or in later
        # rounds optionally continued from the previous round's reward model, trained head and all.
        rm = copy.deepcopy(config.rm)
        rm.output_dir = os.path.join(round_dir, "rm")
        rm.model = ModelConfig(name_or_path=sft_final)
        if round_index > 0:
            if config.iteration.reward_model == "continue":
                rm.model = ModelConfig(name_or_path=os.path.join(root, f"round-{round_index - 1}", "rm", "final"))
                rm.head_init = "keep"
            if config.iteration.rm_epochs is not None:
                rm.training.num_epochs = config.iteration.rm_epochs
        rm.data.path = merge_files(comparison_files, os.path.join(round_dir, "feedback", "comparisons_all.jsonl"))
        if eval_pairs is not None:
            rm.data.eval_path = eval_pairs
        stop_before(f"round-{round_index}/rm")
        with timings.measure(f"round-{round_index}/rm") as record:
            upstream_ran = record(run_stage(RewardTrainer, rm, force=upstream_ran)) or upstream_ran
        # Stage 3: PPO from the current policy; its frozen reference (the KL anchor) is that same
        # starting policy: the SFT model in round 0, the previous round's PPO policy after that.
        ppo = copy.deepcopy(config.ppo)
        ppo.output_dir = os.path.join(round_dir, "ppo")
        ppo.policy = ModelConfig(name_or_path=policy_path)
        ppo.reward.model_path, ppo.reward.function = os.path.join(rm.output_dir, "final"), None
        trainer_class = gold_monitored_trainer(config.evaluation.gold)
        stop_before(f"round-{round_index}/ppo")
        with timings.measure(f"round-{round_index}/ppo") as record:
            upstream_ran = record(run_stage(trainer_class, ppo, force=upstream_ran)) or upstream_ran
        policy_path = os.path.join(ppo.output_dir, "final")

    stop_before("evaluation")
    with timings.measure("evaluation") as record:
        evaluation = evaluate_policies(config, sft_final, policy_path,
                                       os.path.join(root, f"round-{config.rounds - 1}", "rm", "final"))
        record(True)
    with open(os.path.join(root, "evaluation.json"), "w", encoding="utf-8") as handle:
        json.dump(evaluation, handle, indent=2)
    from rlhf.report import write_report

    return write_report(root)


# ----------------------------------------------------------------------------- stages

class StageTimings:
    """Wall seconds of each stage, kept in timings.json; a skipped stage keeps its earlier time."""

    def __init__(self, path: str):
        self.path = path
        self.seconds: dict[str, float] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                self.seconds = json.load(handle)

    @contextlib.contextmanager
    def measure(self, name: str):
        """``with timings.measure(name) as record: record(ran)``; the time is kept only when ``ran``."""
        start = time.perf_counter()
        outcome = {"ran": False}

        def record(ran: bool) -> bool:
            outcome["ran"] = bool(ran)
            return ran

        yield record
        if outcome["ran"]:
            self.seconds[name] = round(time.perf_counter() - start, 1)
            with open(self.path, "w", encoding="utf-8") as handle:
                json.dump(self.seconds, handle, indent=2)


def run_stage(trainer_class, stage_config, force: bool) -> bool:
    """Skip a finished stage with an unchanged config, resume an interrupted one, else start it.

    ``force``: an earlier stage ran, so this one's inputs changed: start it afresh. Returns whether it ran.
    """
    saved_path = os.path.join(stage_config.output_dir, "config.yaml")
    final_dir = os.path.join(stage_config.output_dir, "final")
    saved = None
    if os.path.exists(saved_path):
        # Read back through the config class, so a key added since (at its default) is no change;
        # a file this version cannot read (or a torn one) counts as changed.
        try:
            saved = to_dict(from_dict(type(stage_config), read_yaml(saved_path), source=saved_path))
        except UserError:
            saved = None
    current = to_dict(stage_config)
    unchanged = not force and saved is not None and strip_overwrite(saved) == strip_overwrite(current)
    if unchanged and os.path.isdir(final_dir):
        logger.info("%s: done with the same config, skipped", stage_config.output_dir)
        return False
    checkpoints = os.path.join(stage_config.output_dir, "checkpoints")
    resume = unchanged and os.path.isdir(checkpoints) and any(n.startswith("step-") for n in os.listdir(checkpoints))
    stage_config.overwrite = not resume  # a changed config re-runs the stage from scratch
    logger.info("%s: %s", stage_config.output_dir, "resuming" if resume else "starting")
    trainer_class(stage_config).train(resume=resume)
    return True


def strip_overwrite(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "overwrite"}


def gold_monitored_trainer(gold_spec: str | None):
    """PPOTrainer that also logs the gold score of each rollout (``gold/mean``): the over-optimisation picture."""
    if gold_spec is None:
        return PPOTrainer
    gold = load_reward_function(gold_spec, key="evaluation.gold")

    class GoldMonitoredPPOTrainer(PPOTrainer):
        def rollout_metrics(self, rollout):
            metrics = super().rollout_metrics(rollout)
            prompts = [self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
                       for ids, mask in zip(rollout.prompt_ids.tolist(), rollout.prompt_mask.tolist())]
            responses = self.decode_responses(rollout.response_ids, rollout.response_mask)
            metrics["gold/mean"] = sum(gold(prompts, responses)) / len(responses)
            return metrics

    return GoldMonitoredPPOTrainer


# ----------------------------------------------------------------------------- simulated feedback

def read_prompts(path: str, tokenizer, limit: int) -> tuple[list[str], list[list[int]]]:
    table = load_table(path, key="feedback.prompts")
    table = table.select(range(min(limit, len(table))))
    return tokenize_prompts(table, tokenizer, max_prompt_length=10**9, path=path)


@torch.no_grad()
def sample_responses(model_path: str, prompt_ids: list[list[int]], num_samples: int, temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int, keep: list | None = None,
                     cpu_packed_weights: bool = True) -> list[list[str]]:
    """``num_samples`` responses per prompt from the causal LM at ``model_path`` (text without EOS).

    ``keep``: if a list, each batch's (prompt indices, (prompts, prompt mask, response ids, logprobs))
    is appended to it. ``cpu_packed_weights``: on a CPU, decode through oneDNN on weights packed once for the
    whole call (``ppo.sampling.cpu_packed_weights``; ``rlhf.models.onednn``).
    """
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=model_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    avoid_cudnn_attention(device)
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    responses: list[list[str]] = [[] for _ in prompt_ids]
    with packed_cpu_linears(model, cpu_packed_weights):  # packed once here; the sampler finds them packed
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            prompts = pad_left(chunk, tokenizer.pad_token_id).to(device)
            mask = pad_left([[1] * len(p) for p in chunk], 0).to(device)
            for _ in range(num_samples):
                tokens, logprobs = sample_with_logprobs(model, prompts, mask, max_new_tokens, temperature, 0, 1.0,
                                                        tokenizer.eos_token_id, tokenizer.pad_token_id, generator,
                                                        cpu_packed_weights=cpu_packed_weights)
                if keep is not None:
                    keep.append((range(start, start + len(chunk)), (prompts, mask, tokens, logprobs)))
                for offset, row in enumerate(tokens.tolist()):
                    kept = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                    responses[start + offset].append(
                        tokenizer.decode([t for t in kept if t != tokenizer.pad_token_id], skip_special_tokens=True))
    return responses


def collect_comparisons(config: PipelineConfig, policy_path: str, round_dir: str, round_index: int,
                        held_out: bool = False, force: bool = False) -> tuple[str, bool]:
    """Sample K responses per prompt from the policy and have the labeler compare them.

    Returns the file and whether it was (re)written: an existing file is reused when the
    feedback settings that made it are unchanged and the policy did not change (``force``).
    """
    feedback = config.feedback
    name = "eval_pairs.jsonl" if held_out else "comparisons.jsonl"
    path = os.path.join(round_dir, "feedback", name)
    # null: PPO's sampling temperature, so the comparisons rank the kind of response PPO will sample.
    temperature = feedback.temperature or config.ppo.sampling.temperature
    settings = {"feedback": to_dict(feedback), "policy": policy_path, "eval_num_prompts": config.evaluation.num_prompts,
                "seed": config.sft.training.seed, "temperature": temperature}
    settings_path = path + ".settings.json"
    if not force and os.path.exists(path) and os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                return path, False
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=policy_path))
    prompts_path = feedback.eval_prompts if held_out else feedback.prompts
    texts, ids = read_prompts(prompts_path, tokenizer, config.evaluation.num_prompts if held_out else feedback.num_prompts)
    # Held-out pairs get the same seed every round, so RM accuracy is comparable across rounds.
    seed = config.sft.training.seed * 1000 + (1 if held_out else 10 * round_index)
    num_samples = feedback.eval_responses_per_prompt if held_out else feedback.responses_per_prompt
    responses = sample_responses(policy_path, ids, num_samples, temperature, feedback.max_new_tokens,
                                 feedback.batch_size, seed, cpu_packed_weights=config.ppo.sampling.cpu_packed_weights)
    labeler = load_reward_function(feedback.labeler, key="feedback.labeler")
    if held_out:
        # Every pair of a prompt's responses, each labelled without noise: RM accuracy on them is
        # agreement with the gold preference. Pairs (not one ranking per prompt) so that a tie, which
        # has no gold preference, is dropped by the labeler instead of being broken at random.
        pair_prompts, pairs = [], []
        for text, candidates in zip(texts, responses):
            for first, second in itertools.combinations(candidates, 2):
                pair_prompts.append(text)
                pairs.append([first, second])
        rows = labeler(pair_prompts, pairs, random.Random(seed), 0.0, 2)
    else:
        rows = labeler(texts, responses, random.Random(seed), feedback.noise_temperature, num_samples)
    if not rows:
        raise UserError(f"feedback: the labeler produced no comparisons from {len(texts)} prompts of {prompts_path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jsonl(path, rows)
    with open(settings_path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)
    logger.info("feedback: %d comparisons from %s -> %s", len(rows), policy_path, path)
    return path, True


def merge_files(paths: list[str], target: str) -> str:
    if len(paths) == 1:
        return paths[0]
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    write_jsonl(target, rows)
    return target


# ----------------------------------------------------------------------------- evaluation

def evaluate_policies(config: PipelineConfig, sft_path: str, ppo_path: str, reward_path: str) -> dict:
    """Gold and proxy scores of SFT and PPO samples on held-out prompts, with standard errors and win rate."""
    from rlhf.models import load_tokenizer
    from rlhf.scoring import load_reward_model, score_texts

    evaluation = config.evaluation
    tokenizer = load_tokenizer(ModelConfig(name_or_path=sft_path))
    texts, ids = read_prompts(config.feedback.eval_prompts, tokenizer, evaluation.num_prompts)
    seed = config.sft.training.seed * 1000 + 999
    result: dict = {"num_prompts": len(texts), "samples": []}
    reward_model, reward_tokenizer = load_reward_model(reward_path)
    gold = load_reward_function(evaluation.gold, key="evaluation.gold") if evaluation.gold else None
    per_prompt = evaluation.samples_per_prompt
    result["samples_per_prompt"] = per_prompt
    # Flat lists, prompt-major: entry i * per_prompt + j is sample j of prompt i.
    prompts = [text for text in texts for _ in range(per_prompt)]
    prompt_of = [i for i in range(len(texts)) for _ in range(per_prompt)]
    scored, ppo_samples = {}, []
    for name, path in (("sft", sft_path), ("ppo", ppo_path)):
        responses = [response for group in sample_responses(
            path, ids, per_prompt, evaluation.temperature, evaluation.max_new_tokens, config.feedback.batch_size,
            seed, keep=ppo_samples if name == "ppo" else None,
            cpu_packed_weights=config.ppo.sampling.cpu_packed_weights) for response in group]
        proxy = score_texts(reward_model, reward_tokenizer, prompts, responses)
        gold_scores = gold(prompts, responses) if gold else [float("nan")] * len(prompts)
        scored[name] = (responses, proxy, gold_scores)
        result[name] = {"gold": summary(gold_scores, prompt_of), "proxy": summary(proxy, prompt_of)}
    # After several rounds each PPO run's own KL is to the policy it started from; this one is to SFT.
    result["kl_ppo_to_sft"] = summary(kl_to_reference([batch for _, batch in ppo_samples], sft_path,
                                                      evaluation.temperature),
                                      [index for indices, _ in ppo_samples for index in indices])
    if gold:
        sft_gold, ppo_gold = scored["sft"][2], scored["ppo"][2]
        # Sample j of a prompt against sample j of the same prompt.
        wins = sum(1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(ppo_gold, sft_gold))
        result["win_rate_ppo_over_sft"] = wins / len(prompts)
        result["gold_gain_in_sft_std"] = ((result["ppo"]["gold"]["mean"] - result["sft"]["gold"]["mean"])
                                          / max(result["sft"]["gold"]["std"], 1e-9))
    for i in range(min(8, len(texts))):
        result["samples"].append({"prompt": texts[i],
                                  **{f"{name}_{field}": scored[name][k][i * per_prompt] for name in scored
                                     for k, field in ((0, "response"), (1, "proxy"), (2, "gold"))}})
    return result


@torch.no_grad()
def kl_to_reference(samples: list, reference_path: str, temperature: float) -> list[float]:
    """Per response, Σ_t log π(y_t) − log π_ref(y_t) over its tokens up to the EOS: the k1 estimate of
    KL(π ‖ π_ref) of each sampled sequence, at the sampling temperature, as PPO logs ``kl``.

    Args:
        samples: (prompts, prompt mask, response ids, logprobs under π) batches, as ``sample_responses`` keeps them.
        reference_path: the causal LM of π_ref.
    """
    from rlhf.functional import logprobs_from_logits, truncate_after_eos
    from rlhf.trainers.ppo import response_logits

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=reference_path))
    device = samples[0][0].device if samples else torch.device("cpu")
    model.to(device).eval()
    per_sequence = []
    for prompts, prompt_mask, tokens, logprobs in samples:
        response_ids, response_mask, _ = truncate_after_eos(tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        input_ids = torch.cat([prompts, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        ref_logprobs = logprobs_from_logits(response_logits(model, input_ids, attention_mask, prompts.shape[1]),
                                            response_ids, temperature)
        per_sequence += ((logprobs.float() - ref_logprobs.float()) * response_mask).sum(-1).tolist()
    return per_sequence


def summary(values: list[float], groups: list[int] | None = None) -> dict:
    """Mean, std over all values, n, and the standard error of the mean.

    ``groups``: the prompt of each value. With several samples per prompt they are not independent,
    so the standard error is that of the mean over prompts of each prompt's mean (equal group sizes).
    """
    count = len(values)
    mean = sum(values) / count
    std = sample_std(values)
    by_group: dict[int, list[float]] = {}
    for value, group in zip(values, groups if groups is not None else range(count)):
        by_group.setdefault(group, []).append(value)
    group_means = [sum(v) / len(v) for v in by_group.values()]
    stderr = sample_std(group_means) / math.sqrt(len(group_means))
    return {"mean": mean, "std": std, "stderr": stderr, "n": count}


def sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
