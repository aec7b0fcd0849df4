"""The PPO stage on a tiny GPT-2 (2 layers, width 32): the test oracles of docs/ppo.md#oracles that need a trainer.

The RL math itself is tested by hand in tests/unit/test_functional.py and the sampler in
tests/unit/test_generation.py; here we check what only the assembled trainer can get wrong:
logprob consistency at the first update, no gradient reaching the frozen models, dropout
off, the critic's initialisation, truncation and the missing-EOS penalty in real rollouts,
that PPO learns, exact resume, the ptx term, config errors and the written outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import (
    ArchitectureConfig,
    CriticConfig,
    LoggingConfig,
    ModelConfig,
    PPOConfig,
    PPOHyperparameters,
    PromptDataConfig,
    RewardSourceConfig,
    SamplingConfig,
    TrainingConfig,
    load_config,
)
from rlhf.errors import UserError
from rlhf.functional import kl_penalty, logprobs_from_logits
from rlhf.models import ScalarHeadModel, load_causal_lm, load_tokenizer
from rlhf.trainers.ppo import PPOTrainer, response_logits

from tests.conftest import WORDS, make_rows, write_jsonl

TINY = ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
# The reward model's stored normalisation: a non-trivial mean and std, so a critic that forgot
# to apply it (or applied it twice) is caught.
RM_MEAN, RM_STD = 0.3, 2.0


# ----------------------------------------------------------------------------- helpers

def policy_config(tokenizer_dir: str, dropout: float = 0.0, disable_dropout: bool = True) -> ModelConfig:
    return ModelConfig(from_config=dataclasses.replace(TINY, dropout=dropout), tokenizer=tokenizer_dir,
                       disable_dropout=disable_dropout)


def ppo_config(output_dir, tokenizer_dir: str, **blocks) -> PPOConfig:
    """A one-step PPO config: 8 episodes, 2 epochs × 2 minibatches of 4, micro-batches of 2.

    ``blocks`` replace fields of a block, e.g. ``ppo={"ptx_coef": 0.5}``.
    """
    config = PPOConfig(
        output_dir=str(output_dir),
        policy=policy_config(tokenizer_dir),
        reward=RewardSourceConfig(function="unused:passed_in"),
        critic=CriticConfig(init="policy"),
        data=PromptDataConfig(path="unused: prompts are passed in"),
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.7),
        ppo=PPOHyperparameters(rollout_batch_size=8, forward_batch_size=4, num_ppo_epochs=2, num_minibatches=2,
                               kl_coef=0.05),
        training=TrainingConfig(lr=1e-3, max_steps=1, batch_size=2, log_every=1, lr_scheduler="constant"),
        logging=LoggingConfig(num_samples=2),
    )
    for block, changes in blocks.items():
        setattr(config, block, dataclasses.replace(getattr(config, block), **changes))
    return config


def prompt_rows(count: int = 16) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in make_rows(count)])


def letter_a_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Any reward with some spread across episodes, so advantages are not all zero."""
    return [response.count("a") / 4.0 for response in responses]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class RecordingTrainer(PPOTrainer):
    """PPOTrainer that keeps what the tests inspect, through its own extension points.

    - ``rollouts``: every rollout handed to ``update`` (before any optimizer step of that update);
    - ``first_logprob_gap``: max |log π_θ − ℓ| over the whole first rollout, recomputed with the
      policy in train() mode exactly as ``compute_loss`` does, before the first optimizer step;
    - ``loss_calls``: the stats of every ``compute_loss`` call, in order.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.loss_calls, self.first_logprob_gap = [], [], None

    def update(self, rollout, step):
        self.rollouts.append(rollout)
        if self.first_logprob_gap is None:
            self.policy_model.train()
            with torch.no_grad():
                input_ids, attention_mask = rollout.sequences()
                logits = response_logits(self.policy_model, input_ids, attention_mask, rollout.prompt_ids.shape[1])
                logprobs = logprobs_from_logits(logits, rollout.response_ids, self.config.sampling.temperature)
            self.first_logprob_gap = float((logprobs - rollout.logprobs)[rollout.response_mask.bool()].abs().max())
        return super().update(rollout, step)

    def compute_loss(self, batch):
        loss, stats = super().compute_loss(batch)
        self.loss_calls.append({"loss": float(loss.detach()), **{key: float(value) for key, value in stats.items()}})
        return loss, stats


def run_tiny_ppo(tmp_path, tokenizer_dir, trainer_class=RecordingTrainer, policy=None, reward_fn=letter_a_reward,
                 prompts=None, **blocks) -> PPOTrainer:
    config = ppo_config(tmp_path / "run", tokenizer_dir, **blocks)
    if policy is None:
        policy, tokenizer = load_causal_lm(config.policy, seed=0)
    else:
        tokenizer = load_tokenizer(config.policy)
    kwargs = {"reward_fn": reward_fn} if reward_fn is not None else {}
    trainer = trainer_class(config, policy=policy, tokenizer=tokenizer,
                            prompts=prompts if prompts is not None else prompt_rows(), **kwargs)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def reward_model_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A reward model as stage 2 writes it: a scalar head on the tiny backbone, normalisation in its config."""
    policy, tokenizer = load_causal_lm(policy_config(tokenizer_dir), seed=1)
    torch.manual_seed(1)
    reward_model = ScalarHeadModel.from_causal_lm(policy, head_init="normal")
    reward_model.set_normalization(mean=RM_MEAN, std=RM_STD)
    directory = str(tmp_path_factory.mktemp("reward_model"))
    reward_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- first update (docs/ppo.md#oracle-6, docs/ppo.md#oracle-11)

@pytest.mark.parametrize("from_generation", [False, True])
def test_first_update_has_ratio_one_and_zero_kl_when_policy_is_the_reference(tokenizer_dir, tmp_path,
                                                                              from_generation):
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, ppo={"logprobs_from_generation": from_generation})
    rollout = trainer.rollouts[0]
    mask = rollout.response_mask.bool()
    assert mask.sum() > 20
    if from_generation:  # KV-cache sampling vs a full forward: equal up to float noise
        assert (rollout.logprobs - rollout.ref_logprobs)[mask].abs().max() <= 1e-5
    else:  # same weights, same code path, dropout off: exactly equal, so every KL estimate is exactly 0
        assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
        for estimator in ("k1", "k2", "k3"):
            assert torch.equal(kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator),
                               torch.zeros_like(rollout.logprobs))
        assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["kl"] == 0.0
    # Before the first optimizer step the training forward (train mode) reproduces the rollout.
    assert trainer.first_logprob_gap <= 1e-5
    first = trainer.loss_calls[0]
    assert abs(first["ratio_mean"] - 1.0) <= 1e-5
    assert first["approx_kl"] < 1e-8
    assert first["clipfrac"] == 0.0


@pytest.mark.parametrize("sampling, expected", [({}, True), ({"top_k": 5}, False), ({"top_p": 0.9}, False)])
def test_rollout_logprobs_come_from_sampling_by_default_only_when_the_temperature_alone_shapes_it(
        tokenizer_dir, tmp_path, sampling, expected):
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, sampling=sampling, training={"max_steps": 1})
    assert trainer.logprobs_from_generation is expected  # fp32 on CPU: the precision condition holds


# ----------------------------------------------------------------------------- frozen models (docs/ppo.md#oracle-14)

class GradientCheckingTrainer(RecordingTrainer):
    """Checks the frozen models between two backward passes of the first minibatch (before its optimizer step)."""

    def compute_loss(self, batch):
        if len(self.loss_calls) == 1:  # the first micro-batch's backward has just run
            self.grads_seen = {
                "policy": any(p.grad is not None for p in self.policy_model.parameters()),
                "critic": any(p.grad is not None for p in self.critic_model.parameters()),
                "frozen": [p.grad for m in (self.reference, self.reward_model) for p in m.parameters()],
            }
        return super().compute_loss(batch)


def test_no_gradient_reaches_the_reference_or_the_reward_model(tokenizer_dir, tmp_path, reward_model_dir):
    policy, _ = load_causal_lm(policy_config(tokenizer_dir), seed=0)
    initial = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, GradientCheckingTrainer, policy=policy, reward_fn=None,
                           reward={"function": None, "model_path": reward_model_dir}, critic={"init": "reward"},
                           training={"max_steps": 2})
    assert trainer.grads_seen["policy"] and trainer.grads_seen["critic"]
    assert all(grad is None for grad in trainer.grads_seen["frozen"])
    for frozen in (trainer.reference, trainer.reward_model):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
        assert not frozen.training
    for rollout in trainer.rollouts:
        for name in ("advantages", "returns", "logprobs", "ref_logprobs", "values", "scores", "rewards"):
            assert not getattr(rollout, name).requires_grad, name
    # The reference is the initial policy, still; the policy moved; the reward model is as saved.
    reference = trainer.reference.state_dict()
    assert all(torch.equal(reference[name], initial[name]) for name in initial)
    tuned = trainer.accelerator.unwrap_model(trainer.policy_model).state_dict()
    assert any(not torch.equal(tuned[name], initial[name]) for name in initial)
    saved = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).state_dict()
    current = trainer.reward_model.model.state_dict()
    assert all(torch.equal(current[name], saved[name]) for name in saved)


# ----------------------------------------------------------------------------- dropout (docs/ppo.md#oracle-15, docs/ppo.md#35)

def test_dropout_is_really_off(tokenizer_dir):
    input_ids = torch.randint(0, 200, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    for disable, should_match in ((True, True), (False, False)):
        model, _ = load_causal_lm(policy_config(tokenizer_dir, dropout=0.1, disable_dropout=disable), seed=0)
        model.train()
        first = model(input_ids=input_ids, attention_mask=attention_mask).logits
        second = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert torch.equal(first, second) == should_match  # False: the control shows dropout 0.1 is visible
    assert model.config.resid_pdrop == 0.1
    reloaded, _ = load_causal_lm(policy_config(tokenizer_dir, dropout=0.1), seed=0)
    assert reloaded.config.resid_pdrop == 0.0  # written into the config, so a saved final/ keeps it off


def test_trainer_turns_dropout_off_in_a_policy_passed_in(tokenizer_dir, tmp_path):
    """A user's policy with dropout 0.1: the trainer disables it (config.policy.disable_dropout), so the
    first update still sees ratio = 1."""
    policy, _ = load_causal_lm(policy_config(tokenizer_dir, dropout=0.1, disable_dropout=False), seed=0)
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, policy=policy)
    for model in (trainer.policy_model, trainer.critic_model, trainer.reference):
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert trainer.first_logprob_gap <= 1e-5
    assert trainer.loss_calls[0]["approx_kl"] < 1e-8


def test_a_policy_passed_in_with_a_pad_less_tokenizer_gets_a_dedicated_pad(tokenizer_dir, tmp_path):
    """A user's GPT-2 and its tokenizer without a pad token (as gpt2 ships): the trainer adds `<|pad|>`
    (pad != eos), grows the embeddings, and PPO runs."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id is None
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    config = ppo_config(tmp_path / "run", tokenizer_dir)
    trainer = RecordingTrainer(config, policy=policy, tokenizer=tokenizer, reward_fn=letter_a_reward,
                               prompts=prompt_rows())
    trainer.train()
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert trainer.policy.get_input_embeddings().num_embeddings == len(tokenizer)
    assert trainer.first_logprob_gap <= 1e-5


# ----------------------------------------------------------------------------- critic initialisation (docs/ppo.md#oracle-16)

def test_critic_from_the_reward_model_predicts_its_score_before_any_update(tokenizer_dir, tmp_path,
                                                                           reward_model_dir):
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, reward_fn=None, sampling={"missing_eos_penalty": None},
                           reward={"function": None, "model_path": reward_model_dir}, critic={"init": "reward"})
    rollout = trainer.rollouts[0]  # values were computed before any update
    reward_model = trainer.reward_model
    assert reward_model.trims_last_block  # its scores run the last feed-forward at the EOS only; the critic's do not
    # V_t is the critic read at the state before response token t, x ⊕ a_<t: a copy of the RM gives
    # the (normalised) RM score of exactly that sequence, and at t* the sequence before the EOS.
    with torch.no_grad():
        for t in range(rollout.response_ids.shape[1]):
            valid = rollout.response_mask[:, t].bool()
            prefix_ids = torch.cat([rollout.prompt_ids, rollout.response_ids[:, :t]], dim=1)
            prefix_mask = torch.cat([rollout.prompt_mask, rollout.response_mask[:, :t]], dim=1)
            expected = reward_model.score(prefix_ids, prefix_mask)
            assert (rollout.values[:, t] - expected)[valid].abs().max() <= 1e-5
    # Both sides normalised with the stored statistics: the episode scores are (raw − mean)/std.
    raw = reward_model.raw_score(*rollout.sequences())
    assert torch.allclose(rollout.scores, (raw - RM_MEAN) / RM_STD, atol=1e-6)


def test_the_policys_attention_choice_serves_every_ppo_model(tokenizer_dir, tmp_path, reward_model_dir):
    config = ppo_config(tmp_path / "run", tokenizer_dir, policy={"attn_implementation": "eager"},
                        critic={"init": "reward"}, reward={"function": None, "model_path": reward_model_dir})
    policy, tokenizer = load_causal_lm(policy_config(tokenizer_dir), seed=0)
    assert policy.config._attn_implementation == "sdpa"  # passed in as loaded: the trainer switches it
    trainer = RecordingTrainer(config, policy=policy, tokenizer=tokenizer, prompts=prompt_rows())
    trainer.train()
    models = {"policy": trainer.accelerator.unwrap_model(trainer.policy_model), "reference": trainer.reference,
              "reward": trainer.reward_model.model, "critic": trainer.critic.model}
    assert {name: model.config._attn_implementation for name, model in models.items()} == dict.fromkeys(models, "eager")
    assert all(math.isfinite(call["policy_loss"]) for call in trainer.loss_calls)


def test_critic_from_the_policy_starts_at_zero(tokenizer_dir, tmp_path):
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, critic={"init": "policy"})
    assert torch.equal(trainer.rollouts[0].values, torch.zeros_like(trainer.rollouts[0].values))


# ----------------------------------------------------------------------------- truncation, missing EOS (docs/ppo.md#oracle-12, docs/ppo.md#13, docs/ppo.md#14)

class BatchRecordingTrainer(RecordingTrainer):
    """Records the rows of every sampler call and every scoring batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples, self.scored_rows = [], []

    def sample(self, policy, prompt_ids, prompt_mask, generator):
        response_ids, logprobs = super().sample(policy, prompt_ids, prompt_mask, generator)
        self.samples.append((response_ids, logprobs))
        return response_ids, logprobs

    def episodes(self, policy, critic, prompts, *args):
        self.scored_rows.append(prompts.shape[0])
        return super().episodes(policy, critic, prompts, *args)


@pytest.mark.parametrize("generation_batch_size, sampled_rows", [(None, [4, 4]), (8, [8]), (3, [3, 3, 2])])
def test_generation_batches_are_decoded_apart_from_the_scoring_batches(tokenizer_dir, tmp_path,
                                                                       generation_batch_size, sampled_rows):
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, trainer_class=BatchRecordingTrainer,
                           ppo={"generation_batch_size": generation_batch_size, "logprobs_from_generation": False})
    assert [ids.shape[0] for ids, _ in trainer.samples] == sampled_rows
    assert trainer.scored_rows == [4, 4]  # forward_batch_size, whatever the generation batches
    # Every episode kept its own sample: the policy forward's logprobs (logprobs_from_generation off)
    # equal the sampler's row by row, and the responses are the sampled tokens up to the first EOS.
    rollout = trainer.rollouts[0]
    mask = rollout.response_mask.bool()
    start = 0
    for response_ids, logprobs in trainer.samples:
        rows, length = slice(start, start + response_ids.shape[0]), response_ids.shape[1]
        start += response_ids.shape[0]
        assert torch.equal(rollout.response_ids[rows, :length][mask[rows, :length]], response_ids[mask[rows, :length]])
        assert not mask[rows, length:].any()
        gap = (rollout.logprobs[rows, :length] - logprobs)[mask[rows, :length]].abs().max()
        assert gap <= 1e-5


class EndingTrainer(RecordingTrainer):
    """Forces an EOS at response position 2 in even rows (with ordinary tokens sampled after it)
    and removes every EOS from odd rows, so the batch has finished and unfinished episodes."""

    def sample(self, policy, prompt_ids, prompt_mask, generator):
        response_ids, logprobs = super().sample(policy, prompt_ids, prompt_mask, generator)
        eos, filler = self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("Ġthe")
        response_ids = torch.where(response_ids == eos, torch.full_like(response_ids, filler), response_ids)
        response_ids[0::2, 2] = eos
        response_ids[0::2, 3:] = filler  # must become padding
        self.raw_responses = getattr(self, "raw_responses", []) + [response_ids.clone()]
        return response_ids, logprobs


def test_rollout_truncates_after_eos_and_penalises_unfinished_responses(tokenizer_dir, tmp_path):
    seen = []

    def zero_reward(prompts, responses):
        seen.extend(responses)
        return [0.0] * len(responses)

    penalty = 0.75
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, EndingTrainer, reward_fn=zero_reward,
                           sampling={"max_new_tokens": 6, "missing_eos_penalty": penalty})
    rollout = trainer.rollouts[0]
    tokenizer = trainer.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    finished = torch.arange(8) % 2 == 0  # forward_batch_size 4: rows 0, 2 of each micro-batch
    assert rollout.ended.tolist() == finished.tolist()
    assert rollout.response_ids.shape[1] == 6
    raw = torch.cat(trainer.raw_responses)
    # Finished rows: the EOS and everything before it are kept, then padding, masked out.
    assert torch.equal(rollout.response_ids[finished, :3], raw[finished, :3])
    assert (rollout.response_ids[finished, 2] == eos).all()
    assert (rollout.response_ids[finished, 3:] == pad).all()
    assert rollout.response_mask[finished].tolist() == [[1, 1, 1, 0, 0, 0]] * 4
    # Unfinished rows: all six tokens kept and in the mask.
    assert torch.equal(rollout.response_ids[~finished], raw[~finished])
    assert rollout.response_mask[~finished].all()
    # The penalty is subtracted from unfinished episodes only, exactly.
    assert rollout.scores[~finished].tolist() == [-penalty] * 4
    assert rollout.scores[finished].tolist() == [0.0] * 4
    # Nothing after the EOS reaches the reward function, and the EOS itself is not text.
    for text, ids in zip(seen[:8], rollout.response_ids.tolist()):
        kept = [t for t in ids if t not in (pad, eos)]
        assert text == tokenizer.decode(kept, skip_special_tokens=True)
    # The score lands on the last valid token: the EOS, or the last token of an unfinished row.
    rewards, kl = rollout.rewards, kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1")
    score_part = rewards + trainer.config.ppo.kl_coef * kl * rollout.response_mask
    assert torch.allclose(score_part[finished, 2], torch.zeros(4)) and (rewards[finished, 3:] == 0).all()
    assert torch.allclose(score_part[~finished, 5], torch.full((4,), -penalty))
    assert torch.allclose(score_part[:, :2], torch.zeros(8, 2), atol=1e-6)


# ----------------------------------------------------------------------------- learning

@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer over conftest.WORDS (27 tokens), so a random policy samples any word often."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<|endoftext|>": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    directory = str(tmp_path_factory.mktemp("word_tokenizer"))
    fast.save_pretrained(directory)
    return directory


def cat_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The known reward: the share of response words that are 'cat'."""
    return [sum(word == "cat" for word in response.split()) / max(len(response.split()), 1) for response in responses]


def test_ppo_raises_a_known_reward_with_finite_kl(word_tokenizer_dir, tmp_path):
    """Random-init policy, reward = share of the target word: clearly better within 15 PPO steps.

    Measured with seeds 0–4 (policy init and training seed alike): first step 0.016–0.044, mean of
    steps 13–15 0.74–0.88, summed KL ≤ 24 nats; the bar below (+0.3) leaves a wide margin.
    """
    rng = random.Random(0)
    prompts = datasets.Dataset.from_list(
        [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))} for _ in range(64)])
    config = ppo_config(tmp_path / "run", word_tokenizer_dir,
                        sampling={"max_new_tokens": 8, "temperature": 1.0, "missing_eos_penalty": None},
                        ppo={"rollout_batch_size": 16, "forward_batch_size": 16, "num_ppo_epochs": 4,
                             "num_minibatches": 2, "kl_coef": 0.01},
                        training={"lr": 3e-3, "max_steps": 15, "batch_size": 8, "seed": 0},
                        logging={"num_samples": 0})
    policy, tokenizer = load_causal_lm(config.policy, seed=0)
    PPOTrainer(config, policy=policy, tokenizer=tokenizer, reward_fn=cat_share, prompts=prompts).train()
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 16))
    rewards = [m["reward/mean"] for m in metrics]
    assert sum(rewards[-3:]) / 3 >= rewards[0] + 0.3, rewards
    assert all(math.isfinite(m["kl"]) for m in metrics)
    assert metrics[-1]["kl"] > 0  # it moved away from the reference, and the KL measures it


# ----------------------------------------------------------------------------- resume and outputs (docs/stages.md#run-directory)

REWARD_MODULE = '''
def letter_a_reward(prompts, responses):
    return [response.count("a") / 4.0 for response in responses]
'''


@pytest.fixture(scope="module")
def unbroken_run(tokenizer_dir, tmp_path_factory):
    """A 4-step run from a config alone (reward function named as module:function), checkpoint at step 2.

    Linear LR decay, adaptive β and separate optimizers: everything a resume has to restore.
    """
    root = tmp_path_factory.mktemp("ppo_resume")
    sys.path.insert(0, str(root))
    (root / "ppo_test_rewards.py").write_text(REWARD_MODULE)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": row["prompt"]} for row in make_rows(16)])
    config = ppo_config(root / "unbroken", tokenizer_dir, data={"path": prompts},
                        reward={"function": "ppo_test_rewards:letter_a_reward"},
                        ppo={"adaptive_kl": True, "target_kl": 0.1, "kl_horizon": 100},
                        training={"max_steps": 4, "save_every": 2, "lr_scheduler": "linear"})
    trainer = PPOTrainer(config)
    trainer.train()
    yield root, config, trainer
    sys.path.remove(str(root))


def test_resume_gives_bitwise_the_unbroken_final(unbroken_run):
    root, _, _ = unbroken_run
    assert_resume_gives_the_unbroken_run(root / "unbroken", root / "broken")


def assert_resume_gives_the_unbroken_run(unbroken, broken):
    """Resume a copy of ``unbroken`` "killed" after its last step was logged but before final/ was written
    (its config, its step-2 checkpoint and the logs as they stood): the same final/, metrics and samples."""
    assert sorted(os.listdir(unbroken / "checkpoints")) == ["step-2"]
    broken.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl"):
        shutil.copy(unbroken / name, broken / name)
    shutil.copytree(unbroken / "checkpoints" / "step-2", broken / "checkpoints" / "step-2")
    resumed_config = load_config(PPOConfig, str(broken / "config.yaml"), [f"output_dir={broken}"])
    final_dir = PPOTrainer(resumed_config).train(resume=True)

    for name, loader in (("final", AutoModelForCausalLM), ("value_model", AutoModelForSequenceClassification)):
        expected = loader.from_pretrained(unbroken / name).state_dict()
        actual = loader.from_pretrained(broken / name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
    assert final_dir == str(broken / "final")

    metrics_a, metrics_b = read_jsonl(unbroken / "metrics.jsonl"), read_jsonl(broken / "metrics.jsonl")
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4]  # truncated to step 2, then 3 and 4 once each
    timing = {"rollout_s", "update_s", "episodes_per_s", "generated_tokens_per_s",
              "train_runtime_s", "train_episodes", "train_generated_tokens"}  # the last two: this session's
    for a, b in zip(metrics_a, metrics_b):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    samples_a, samples_b = read_jsonl(unbroken / "samples.jsonl"), read_jsonl(broken / "samples.jsonl")
    assert [s["step"] for s in samples_b] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert samples_a == samples_b


def test_metrics_and_samples_name_what_design_md_requires(unbroken_run):
    root, _, _ = unbroken_run
    metrics = read_jsonl(root / "unbroken" / "metrics.jsonl")
    required = {"reward/mean", "reward/std", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "response_length", "rollout_s", "update_s", "kl_coef", "lr", "grad_norm"}
    for line in metrics:
        assert required <= line.keys(), required - line.keys()
        assert all(isinstance(v, (int, float)) and v == v for v in line.values())  # numbers, no NaN
    # Adaptive β moved (target 0.1 nats is far from the measured KL), and it is logged per step.
    assert len({m["kl_coef"] for m in metrics}) > 1
    sample = read_jsonl(root / "unbroken" / "samples.jsonl")[0]
    assert {"step", "prompt", "response", "score", "kl"} <= sample.keys()
    assert sample["prompt"].startswith("Tell me about the")


def test_final_loads_in_plain_transformers_and_generates(unbroken_run):
    root, _, trainer = unbroken_run
    final_dir = root / "unbroken" / "final"
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(final_dir)))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    tuned = trainer.accelerator.unwrap_model(trainer.policy_model).state_dict()
    assert all(torch.equal(tensor, tuned[name]) for name, tensor in model.state_dict().items())
    encoded = tokenizer(["Tell me about the happy cat.\n"], return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > encoded["input_ids"].shape[1]

    value_model = AutoModelForSequenceClassification.from_pretrained(root / "unbroken" / "value_model").eval()
    assert value_model.config.num_labels == 1
    critic = trainer.accelerator.unwrap_model(trainer.critic_model)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        reloaded = ScalarHeadModel(value_model)(input_ids, attention_mask)
        assert torch.allclose(reloaded, critic(input_ids, attention_mask), atol=1e-6)


# ----------------------------------------------------------------------------- PPO-ptx (docs/ppo.md#oracle-14, docs/ppo.md#43)

class BackwardRecordingTrainer(RecordingTrainer):
    """Records every scalar that reaches ``accelerator.backward`` and every ptx loss."""

    def build_optimizers(self, total_updates):
        super().build_optimizers(total_updates)  # the accelerator exists by now
        self.backward_values, self.ptx_values = [], []
        backward = self.accelerator.backward

        def recording_backward(loss, **kwargs):
            self.backward_values.append(float(loss.detach()))
            return backward(loss, **kwargs)

        self.accelerator.backward = recording_backward

    def ptx_loss(self, *args):
        loss = super().ptx_loss(*args)
        self.ptx_values.append(float(loss.detach()))
        return loss


def independent_nll(model, examples: list[dict]) -> float:
    """Token-mean NLL of SFT examples, one unpadded sequence at a time (no collator, no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            input_ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            logits = model(input_ids=input_ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


@pytest.mark.parametrize("ptx_coef", [0.0, 0.5])
def test_ptx_adds_exactly_its_coefficient_times_the_nll(tokenizer_dir, tmp_path, ptx_coef):
    ptx_data = write_jsonl(tmp_path / "sft.jsonl", make_rows(16, seed=3))
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, BackwardRecordingTrainer,
                           ppo={"ptx_coef": ptx_coef, "ptx_data": ptx_data if ptx_coef else None,
                                "ptx_batch_size": 4})
    per_minibatch = 3 if ptx_coef else 2  # the ptx term if any, then 2 micro-batches of PPO loss
    assert len(trainer.backward_values) == 4 * per_minibatch  # 2 epochs × 2 minibatches
    assert len(trainer.loss_calls) == 8
    ppo_terms = [v for i, v in enumerate(trainer.backward_values) if i % per_minibatch >= per_minibatch - 2]
    # Each micro-batch's token-mean loss enters with its share of the minibatch's tokens, so the
    # two shares sum to 1: the backward'd PPO part is exactly the minibatch's token-mean loss.
    shares = [term / call["loss"] for term, call in zip(ppo_terms, trainer.loss_calls)]
    assert all(0 < share < 1 for share in shares)
    assert [shares[i] + shares[i + 1] for i in range(0, 8, 2)] == pytest.approx([1.0] * 4, abs=1e-6)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    if not ptx_coef:
        assert trainer.ptx_values == [] and "ptx_loss" not in metrics
        return
    ptx_terms = trainer.backward_values[0::3]
    assert len(trainer.ptx_values) == 4
    assert ptx_terms == [ptx_coef * value for value in trainer.ptx_values]
    assert metrics["ptx_loss"] == pytest.approx(sum(trainer.ptx_values) / 4)


def test_ptx_loss_is_the_mean_nll_of_its_batch_and_batches_do_not_repeat(tokenizer_dir, tmp_path):
    ptx_data = write_jsonl(tmp_path / "sft.jsonl", make_rows(16, seed=3))
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, ppo={"ptx_coef": 0.5, "ptx_data": ptx_data, "ptx_batch_size": 4})
    policy = trainer.accelerator.unwrap_model(trainer.policy_model).eval()
    examples = trainer.ptx_examples
    assert len(examples) == 16
    # One PPO step has 2 epochs × 2 minibatches = 4 optimizer steps of 4 ptx examples each:
    # together they cover the 16 examples once, and the loss is the token-mean NLL of its batch.
    seen = []
    for update_index in range(4):
        batch = trainer.ptx_batch(update_index)
        seen += batch
        with torch.no_grad():
            loss = float(trainer.ptx_loss(update_index))
        assert loss == pytest.approx(independent_nll(policy, [examples[i] for i in batch]), abs=1e-5)
    assert sorted(seen) == list(range(16))


# ----------------------------------------------------------------------------- config errors

def error_of(config: PPOConfig) -> str:
    with pytest.raises(UserError) as caught:
        config.validate()
    return str(caught.value)


def test_config_errors_name_the_key(tokenizer_dir, tmp_path):
    both = ppo_config(tmp_path, tokenizer_dir, reward={"model_path": "rm", "function": "m:f"})
    assert "reward: give exactly one of" in error_of(both)
    neither = ppo_config(tmp_path, tokenizer_dir, reward={"function": None})
    assert "reward: give exactly one of" in error_of(neither)
    uneven = ppo_config(tmp_path, tokenizer_dir, ppo={"rollout_batch_size": 10, "num_minibatches": 4})
    assert "ppo.num_minibatches" in error_of(uneven) and "10" in error_of(uneven)
    topk = ppo_config(tmp_path, tokenizer_dir, ppo={"logprobs_from_generation": True}, sampling={"top_k": 5})
    assert "ppo.logprobs_from_generation" in error_of(topk)
    # All problems at once, in one line.
    several = ppo_config(tmp_path, tokenizer_dir, reward={"function": None},
                         ppo={"rollout_batch_size": 10, "num_minibatches": 4})
    message = error_of(several)
    assert "reward:" in message and "ppo.num_minibatches" in message and "\n" not in message


def test_unimportable_reward_function_is_a_user_error_at_setup(tokenizer_dir, tmp_path):
    config = ppo_config(tmp_path / "run", tokenizer_dir, reward={"function": "nomodule:f"})
    trainer = PPOTrainer(config)
    with pytest.raises(UserError, match="reward.function: cannot import module 'nomodule'"):
        trainer.setup_models()
    config = ppo_config(tmp_path / "run", tokenizer_dir, reward={"function": "json:no_such_function"})
    with pytest.raises(UserError, match="reward.function: module 'json' has no function 'no_such_function'"):
        PPOTrainer(config).setup_models()


# ----------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("separate", [True, False])
def test_gradient_clipping_covers_every_parameter_the_optimizer_steps(tokenizer_dir, tmp_path, monkeypatch,
                                                                      separate):
    """One optimizer over policy and critic; separate_optimizers: the critic's groups at critic_lr and each
    model clipped on its own norm (what two optimizers do), else one lr and the joint norm."""
    import rlhf.trainers.ppo as ppo_module

    calls = []
    optimizer_step = ppo_module.optimizer_step

    def recording_step(accelerator, model, optimizer, scheduler, max_grad_norm, clip_scopes, **checks):
        scopes = [{id(p) for p in scope.parameters() if p.requires_grad} for scope in clip_scopes]
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        calls.append((scopes, stepped, sorted({group["lr"] for group in optimizer.param_groups})))
        return optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm, clip_scopes, **checks)

    monkeypatch.setattr(ppo_module, "optimizer_step", recording_step)
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, ppo={"separate_optimizers": separate, "critic_lr": 1e-3},
                           training={"lr": 5e-3, "lr_scheduler": "constant"})
    assert len(calls) == 4  # 2 epochs × 2 minibatches, one optimizer step each
    policy = {id(p) for p in trainer.policy_model.parameters()}
    critic = {id(p) for p in trainer.critic_model.parameters()}
    for scopes, stepped, lrs in calls:
        assert set().union(*scopes) == stepped == policy | critic
        assert scopes == ([policy, critic] if separate else [policy | critic])
        assert lrs == ([1e-3, 5e-3] if separate else [5e-3])


def test_every_rollout_has_rollout_batch_size_episodes(tokenizer_dir, tmp_path):
    """17 prompts, batches of 8: the incomplete ninth-prompt batch of each epoch is dropped (it used to
    crash the minibatch split: one episode cannot make 2 minibatches)."""
    trainer = run_tiny_ppo(tmp_path, tokenizer_dir, prompts=prompt_rows(17),
                           training={"max_steps": None, "num_epochs": 1.0})
    assert [rollout.scores.shape[0] for rollout in trainer.rollouts] == [8, 8]
    with pytest.raises(UserError, match="ppo.rollout_batch_size: 5 prompts cannot fill one rollout batch of 8"):
        run_tiny_ppo(tmp_path / "few", tokenizer_dir, prompts=prompt_rows(5))


# ----------------------------------------------------------------------------- LoRA and gradient checkpointing

def lora_blocks(reward_model_dir: str) -> dict:
    """Policy and critic with adapters, the critic on the reward model's weights: two bases in all."""
    lora = {"rank": 4, "alpha": 8.0}
    from rlhf.config import LoraConfig

    return dict(reward={"function": None, "model_path": reward_model_dir},
                critic={"init": "reward", "lora": LoraConfig(**lora)},
                policy={"lora": LoraConfig(**lora)})


def test_lora_reference_and_reward_are_the_adapter_free_bases(tokenizer_dir, tmp_path, reward_model_dir):
    pytest.importorskip("peft")
    blocks = lora_blocks(reward_model_dir)
    policy_block = blocks.pop("policy")
    config = ppo_config(tmp_path / "run", tokenizer_dir, **blocks, training={"max_steps": 2, "lr": 2e-2})
    config.policy = dataclasses.replace(config.policy, lora=policy_block["lora"])
    policy, tokenizer = load_causal_lm(config.policy, seed=0)
    initial_policy = {name: value.clone() for name, value in policy.state_dict().items()}
    trainer = RecordingTrainer(config, policy=policy, tokenizer=tokenizer, prompts=prompt_rows())
    trainer.train()
    # No second copy of either base: the reference is the policy, the reward model the critic, adapters off.
    assert trainer.reference is None and trainer.reward_model is None and trainer.reward_in_critic

    base, _ = load_causal_lm(config.policy.__class__(from_config=TINY, tokenizer=tokenizer_dir), seed=0)
    base.eval()
    reward_model = ScalarHeadModel(AutoModelForSequenceClassification.from_pretrained(reward_model_dir)).eval()
    rollout = trainer.rollouts[1]  # after one update: the adapters have moved
    input_ids, attention_mask = rollout.sequences()
    prompt_len = rollout.prompt_ids.shape[1]
    mask = rollout.response_mask.bool()
    with torch.no_grad():
        base_logprobs = logprobs_from_logits(response_logits(base, input_ids, attention_mask, prompt_len),
                                             rollout.response_ids, config.sampling.temperature)
        rm_scores = reward_model.score(input_ids, attention_mask)
    torch.testing.assert_close(rollout.ref_logprobs[mask], base_logprobs[mask], atol=1e-6, rtol=0)
    assert (rollout.logprobs - rollout.ref_logprobs)[mask].abs().max() > 1e-4  # the policy itself moved
    ended = rollout.ended  # unfinished episodes carry the missing-EOS penalty on top of the score
    penalty = config.sampling.missing_eos_penalty
    torch.testing.assert_close(rollout.scores, torch.where(ended, rm_scores, rm_scores - penalty), atol=1e-5, rtol=0)

    # Only adapters (and the critic's head copy) trained: the merged final/ differs from the SFT weights
    # in the adapted matrices alone; the value model also in its head.
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    moved = {name for name, value in final.items() if not torch.equal(value, initial_policy[name])}
    assert moved and all(name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for name in moved)
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "value_model").state_dict()
    saved_rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).state_dict()
    moved = {name for name, weights in value.items() if not torch.equal(weights, saved_rm[name])}
    assert "score.weight" in moved
    assert all(name == "score.weight" or name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
               for name in moved), moved
    assert os.path.isfile(tmp_path / "run" / "final" / "adapter" / "adapter_config.json")
    trainable = {name for name, p in trainer.policy_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_resume_gives_bitwise_the_unbroken_final(tokenizer_dir, tmp_path, reward_model_dir):
    pytest.importorskip("peft")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in make_rows(16)])
    blocks = lora_blocks(reward_model_dir)
    policy = dataclasses.replace(policy_config(tokenizer_dir), lora=blocks.pop("policy")["lora"])
    config = ppo_config(tmp_path / "unbroken", tokenizer_dir, data={"path": prompts}, **blocks,
                        training={"max_steps": 4, "save_every": 2, "lr_scheduler": "linear"})
    config.policy = policy
    PPOTrainer(config).train()
    assert_resume_gives_the_unbroken_run(tmp_path / "unbroken", tmp_path / "broken")


def test_gradient_checkpointing_leaves_the_ppo_losses_unchanged(tokenizer_dir, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        trainer = run_tiny_ppo(tmp_path / str(checkpointing), tokenizer_dir,
                               training={"gradient_checkpointing": checkpointing, "max_steps": 2})
        runs[checkpointing] = trainer.loss_calls
        # Checkpointing is on the trained models only (the reference never runs a backward).
        assert trainer.policy_model.transformer.gradient_checkpointing is checkpointing
        assert trainer.critic_model.model.transformer.gradient_checkpointing is checkpointing
        assert not trainer.reference.transformer.gradient_checkpointing
    assert len(runs[True]) == len(runs[False]) == 16
    for with_checkpoints, without in zip(runs[True], runs[False]):
        assert with_checkpoints == pytest.approx(without, abs=1e-6)


class RowCountingTrainer(RecordingTrainer):
    """Counts the rows each model's trimmed last feed-forward sees in the update's forwards (``compute_loss``)."""

    def compute_loss(self, batch):
        rows = {}
        modules = {"policy": self.policy_feed_forward, "critic": self.critic_model.trimmed_feed_forward}
        # A forward hook sees the input the module really ran on (after the trimming's pre-hook took the rows out).
        hooks = [module.register_forward_hook(
            lambda _, args, output, name=name: rows.__setitem__(name, rows.get(name, 0) + args[0].shape[:-1].numel()))
            for name, module in modules.items() if module is not None]
        try:
            loss, stats = super().compute_loss(batch)
        finally:
            for hook in hooks:
                hook.remove()
        states = batch.response_ids.numel()  # one per response position: the logits and the values read
        self.loss_calls[-1].update({f"{name}_rows_seen": count / states for name, count in rows.items()})
        return loss, stats


def test_trimmed_ppo_trains_the_curves_of_the_untrimmed_models(tokenizer_dir, tmp_path, reward_model_dir):
    # training.trim_last_block: the policy and the reference run their last feed-forward only at the positions
    # that predict a response token, the critic at the states before them, the reward model at each EOS; the
    # rollouts and every loss are the untrimmed run's up to float rounding. Gradient checkpointing leaves the
    # trained models untrimmed (the recomputation would run the whole block), the frozen ones trimmed.
    runs = {}
    for trim, checkpointing in ((False, False), (True, False), (True, True)):
        trainer = run_tiny_ppo(tmp_path / f"{trim}-{checkpointing}", tokenizer_dir, trainer_class=RowCountingTrainer,
                               reward_fn=None, sampling={"missing_eos_penalty": None},
                               reward={"function": None, "model_path": reward_model_dir}, critic={"init": "reward"},
                               ppo={"logprobs_from_generation": False},
                               training={"trim_last_block": trim, "gradient_checkpointing": checkpointing,
                                         "max_steps": 2})
        trains_trimmed = trim and not checkpointing
        assert (trainer.policy_feed_forward is not None) == trains_trimmed
        assert trainer.critic_model.trims_last_block == trains_trimmed
        assert (trainer.reference_feed_forward is not None) == trim
        assert trainer.reward_model.trims_last_block == trim
        if trains_trimmed:  # the trained rows only: the prompt's other positions never reach the feed-forward
            assert {call["policy_rows_seen"] for call in trainer.loss_calls} == {1.0}
            assert {call["critic_rows_seen"] for call in trainer.loss_calls} == {1.0}
        runs[trim, checkpointing] = trainer
    untrimmed = runs[False, False]
    assert len(untrimmed.loss_calls) == 16
    for trainer in (runs[True, False], runs[True, True]):
        for rollout, reference in zip(trainer.rollouts, untrimmed.rollouts):
            assert torch.equal(rollout.response_ids, reference.response_ids)
            for field in ("logprobs", "ref_logprobs", "values", "scores", "advantages"):
                assert torch.allclose(getattr(rollout, field), getattr(reference, field), atol=1e-5), field
        for call, reference in zip(trainer.loss_calls, untrimmed.loss_calls):
            shared = {key: call[key] for key in reference}
            assert shared == pytest.approx(reference, rel=1e-4, abs=1e-6)


def test_packed_cpu_weights_sample_the_same_rollouts(tokenizer_dir, tmp_path, monkeypatch):
    # sampling.cpu_packed_weights (rlhf.models.onednn): the sampler decodes through oneDNN on packed weights when
    # on, its own MKL path when off; the rollouts and the losses agree up to float rounding.
    import contextlib

    import rlhf.generation
    from rlhf.models.onednn import onednn_linear_available
    if not onednn_linear_available():
        pytest.skip("this torch has no oneDNN")
    real = rlhf.generation.packed_cpu_linears
    packed_layers = []

    @contextlib.contextmanager
    def counting(model, enabled=True):
        with real(model, enabled) as count:
            packed_layers.append(count)
            yield count

    monkeypatch.setattr(rlhf.generation, "packed_cpu_linears", counting)
    runs = {}
    for packed in (False, True):
        packed_layers.clear()
        trainer = run_tiny_ppo(tmp_path / str(packed), tokenizer_dir, sampling={"cpu_packed_weights": packed},
                               training={"max_steps": 2})
        assert packed_layers and set(packed_layers) == ({2 * 4 + 1} if packed else {0})  # 2 blocks + lm_head
        runs[packed] = trainer
    for with_packing, without in zip(runs[True].rollouts, runs[False].rollouts):
        assert torch.equal(with_packing.response_ids, without.response_ids)
        torch.testing.assert_close(with_packing.logprobs, without.logprobs, atol=1e-5, rtol=0)
    for with_packing, without in zip(runs[True].loss_calls, runs[False].loss_calls):
        assert with_packing == pytest.approx(without, abs=1e-5)


def test_lora_dropout_is_refused_in_ppo(tokenizer_dir, tmp_path):
    from rlhf.config import LoraConfig

    config = ppo_config(tmp_path, tokenizer_dir)
    config.policy = dataclasses.replace(config.policy, lora=LoraConfig(dropout=0.1))
    config.critic = dataclasses.replace(config.critic, lora=LoraConfig(dropout=0.05))
    message = error_of(config)
    assert "policy.lora.dropout: 0.1" in message and "critic.lora.dropout: 0.05" in message
    assert "docs/ppo.md#35" in message
