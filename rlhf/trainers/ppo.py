"""Stage 3: PPO against a reward model, with a KL penalty to the frozen SFT reference.

One PPO step, in paper order (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022;
the details follow docs/ppo.md, whose checklist items are cited by number):

1. rollout: sample responses to a batch of prompts from the policy; score them with the reward
   model (or a reward function); take the policy's, the reference's and the critic's view of
   every response token;
2. rewards: r_t = −β·KL_t on every response token, plus the score on the last one (items 17, 40);
3. advantages: GAE(γ, λ), returns = advantages + values, then advantage whitening (22–24);
4. update: ``num_ppo_epochs`` passes of shuffled minibatches minimising the clipped policy loss
   plus c_v × the clipped value loss (29–31), optionally with the PPO-ptx term (43);
5. log, adapt β (20), checkpoint.

Extension points (override in a subclass, or pass in): ``reward_fn`` (constructor),
``sample`` (how responses are drawn), ``score`` (how a response is scored), ``compute_loss``
(the loss terms of one micro-batch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import math
import os
import time
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from rlhf.config import DataConfig, ModelConfig, PPOConfig
from rlhf.data import load_table, load_sft_examples, pad_left, rename_columns, tokenize_prompts
from rlhf.errors import UserError
from rlhf.functional import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    exclusive_cumsum_positions,
    gae_advantages,
    adaptive_kl_coef,
    kl_k1,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_whiten,
    whiten_from_moments,
    per_token_rewards,
    truncate_after_eos,
)
from rlhf.generation import sample_with_logprobs
from rlhf.models import (ScalarHeadModel, adopt_model, compile_blocks, feed_forward_at, kept_logits, load_causal_lm,
                         load_reward_model, load_scalar_model, load_tokenizer, make_trainable, resolve_max_length,
                         save_merged, trimmable_feed_forward)
from rlhf.models.lora import adapters_disabled
from rlhf.trainers.sft import LanguageModelingObjective
from rlhf.training import (
    STATE_FILE,
    MetricsLogger,
    MicroBatchOrder,
    Preempted,
    TrainState,
    check_finite,
    configure_deepspeed,
    create_optimizer,
    create_scheduler,
    end_training,
    full_weights,
    load_checkpoint,
    may_trim_last_block,
    micro_batch_sync,
    optimizer_step,
    prepare_frozen,
    save_checkpoint,
    save_pretrained_atomic,
    start_run,
    stop_requested,
    stops_gracefully,
    to_device,
    truncate_jsonl,
    weight_decay_groups,
)

logger = logging.getLogger(__name__)

RewardFunction = Callable[[list[str], list[str]], list[float]]


@dataclasses.dataclass
class Rollout:
    """A batch of episodes. Response tensors are (batch, response_len), right-padded after the first EOS.

    ``logprobs``/``ref_logprobs``/``values`` are at the response positions: the state before
    each response token (logits slice ``[prompt_len − 1 : −1]``, docs/ppo.md#formulas).
    """

    prompt_ids: torch.Tensor        # (B, P) left-padded
    prompt_mask: torch.Tensor       # (B, P)
    response_ids: torch.Tensor      # (B, T)
    response_mask: torch.Tensor     # (B, T) 1 up to and including the first EOS
    logprobs: torch.Tensor          # (B, T) rollout policy, temperature-scaled
    ref_logprobs: torch.Tensor      # (B, T) frozen reference, same temperature
    values: torch.Tensor            # (B, T) critic before the update
    scores: torch.Tensor            # (B,) reward model score (after the missing-EOS penalty)
    ended: torch.Tensor             # (B,) bool: emitted EOS
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                          for f in dataclasses.fields(self)})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of prompt ⊕ response, (B, P + T)."""
        return (torch.cat([self.prompt_ids, self.response_ids], dim=1),
                torch.cat([self.prompt_mask, self.response_mask], dim=1))


def load_reward_function(spec: str, key: str = "reward.function") -> RewardFunction:
    """Import ``module:function``; a mistake names the config ``key`` that gave it."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{key}: cannot import module '{module_name}': {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"{key}: module '{module_name}' has no function '{function_name}'")
    return function


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    trimmed_feed_forward: torch.nn.Module | None = None) -> torch.Tensor:
    """(B, T, V) logits predicting each response token, with position ids = exclusive cumsum of the mask.

    Only the positions that predict response tokens go through the vocabulary projection: the last
    prompt position and every response position but the last, selected by a mask, so the projection is
    one (B·T, d) matmul (the last-k slice of the hidden states is not contiguous, and a linear layer on
    it runs as a batched matmul over a broadcast weight, ~2x slower on CPU). ``trimmed_feed_forward``
    (``trimmable_feed_forward``, ``training.trim_last_block``): the last block's feed-forward, run at
    those positions only; the rest of the prompt is read only through its keys and values.
    """
    position_ids = exclusive_cumsum_positions(attention_mask)
    batch_size, response_len = input_ids.shape[0], input_ids.shape[1] - prompt_len
    predicts_response = torch.zeros_like(input_ids, dtype=torch.bool)
    predicts_response[:, prompt_len - 1:-1] = True
    with feed_forward_at(trimmed_feed_forward, predicts_response):
        logits = kept_logits(model, input_ids, attention_mask, predicts_response, position_ids=position_ids)
    return logits.view(batch_size, response_len, logits.shape[-1])


class PolicyAndValue(torch.nn.Module):
    """The two trained models, policy and critic, as one module with one optimizer.

    accelerate prepares one model per DeepSpeed engine (it refuses a second), and DDP reduces the
    gradients of what one forward of the module it wraps used; so every training forward runs
    through this module's ``forward``, which runs whatever it is given on the two models (TRL wraps
    its policy and value model the same way).
    """

    def __init__(self, policy: torch.nn.Module, critic: ScalarHeadModel):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, compute: Callable[[torch.nn.Module, ScalarHeadModel], object]):
        """``compute(policy, critic)``, inside the engine's forward."""
        return compute(self.policy, self.critic)


class PPOTrainer:
    """PPO fine-tuning of a causal LM against a reward.

    Args:
        config: the stage config.
        policy, tokenizer: the SFT policy and its tokenizer (default: ``config.policy``); the
            frozen reference is a copy loaded the same way.
        reward_fn: ``f(prompts, responses) -> list[float]`` used instead of ``config.reward``; with
            no reward model to start the critic from, ``critic.init: reward`` then becomes ``policy``
            (unless ``critic.name_or_path`` names a checkpoint).
        prompts: a ``datasets.Dataset`` of ``{prompt}`` or ``{messages}`` rows (default: ``config.data``).
    """

    command = "ppo"  # the CLI command that runs this trainer (in messages on how to resume)

    def __init__(self, config: PPOConfig, policy=None, tokenizer=None, reward_fn: RewardFunction | None = None,
                 prompts=None):
        if reward_fn is not None:  # a function passed in replaces whatever the config names
            config.reward.model_path, config.reward.function = None, "<passed in>:reward_fn"
            if config.critic.init == "reward" and config.critic.name_or_path is None:
                config.critic.init = "policy"
        config.validate()
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.prompt_dataset = prompts
        # The last feed-forwards that train() trims (``trim_last_blocks``); None: the model runs untrimmed.
        self.policy_feed_forward = self.reference_feed_forward = None

    # ------------------------------------------------------------------ setup

    def setup_models(self) -> None:
        config = self.config
        seed = config.training.seed
        if self.policy is None:
            self.policy, self.tokenizer = load_causal_lm(config.policy, self.tokenizer, seed=seed, block="policy")
        elif self.tokenizer is None:
            raise ValueError("pass the tokenizer together with the policy")
        else:
            # A policy passed in gets what the loader gives ours: a dedicated pad and no dropout.
            # Dropout in the update's train() forward makes the first ratio ≠ 1 (|Δlogp| ≈ 0.2,
            # docs/ppo.md#35); the reference and a critic copied from the policy inherit the setting.
            adopt_model(self.policy, self.tokenizer, config.policy, "policy")
        # The reference is the SFT policy, frozen: never trained, no gradients (docs/ppo.md#36). With LoRA
        # it is the policy itself with its adapters off (``reference_model``): no second copy of the weights.
        self.reference = None
        if config.policy.lora is None:
            self.reference = copy.deepcopy(self.policy)
            freeze(self.reference)

        self.reward_model, self.reward_tokenizer = None, None
        if config.reward.model_path is not None:
            # The attention kernel is the run's choice, not the checkpoint's: the policy's serves every model.
            rm_config = ModelConfig(name_or_path=config.reward.model_path,
                                    attn_implementation=config.policy.attn_implementation)
            self.reward_tokenizer = load_tokenizer(rm_config, path_key="reward.model_path")
        elif self.reward_fn is None:
            self.reward_fn = load_reward_function(config.reward.function)
        self.same_vocabulary = (self.reward_tokenizer is None
                                or self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab())
        # A LoRA critic started from the reward model shares its weights: the reward is that model with the
        # critic's adapters off (peft keeps the trained head beside the critic's copy), so one copy serves both.
        self.reward_in_critic = (config.reward.model_path is not None and config.critic.lora is not None
                                 and config.critic.init == "reward" and config.critic.name_or_path is None
                                 and self.same_vocabulary)
        if config.reward.model_path is not None and not self.reward_in_critic:
            self.reward_model = load_reward_model(rm_config, self.reward_tokenizer, key="reward.model_path",
                                                  block="policy")
            freeze(self.reward_model)

        if config.critic.init == "reward" or config.critic.name_or_path:
            path = config.critic.name_or_path or config.reward.model_path
            if not self.same_vocabulary and not config.critic.name_or_path:
                raise UserError("critic.init: 'reward' needs a reward model with the policy's tokenizer; "
                                "use critic.init=policy")
            # Same head and normalisation as the RM: V_t starts as the RM's score of the text before token t
            # (docs/ppo.md#oracle-16).
            critic_config = ModelConfig(name_or_path=path, attn_implementation=config.policy.attn_implementation)
            self.critic = (load_reward_model(critic_config, self.tokenizer, key="reward.model_path", block="policy")
                           if self.reward_in_critic else
                           load_scalar_model(critic_config, self.tokenizer, head_init=None,
                                             key="critic.name_or_path" if config.critic.name_or_path
                                             else "reward.model_path", block="policy"))
        else:
            # A copy of the policy trunk with a zero head: V ≡ 0 at the start (LHP).
            self.critic = ScalarHeadModel.from_causal_lm(self.policy)
        # Adapters and checkpointing last: the reference and a critic copied from the policy are plain models.
        make_trainable(self.policy, config.policy.lora, config.training, "policy.lora")
        make_trainable(self.critic, config.critic.lora, config.training, "critic.lora")
        if config.training.compile:  # the frozen models run every rollout too
            for frozen in (self.reference, self.reward_model):
                if frozen is not None:
                    compile_blocks(frozen, config.training.compile_mode)

    @contextlib.contextmanager
    def reference_model(self, policy) -> Iterator[torch.nn.Module]:
        """The frozen reference for a block of no-grad forwards: its own copy, or ``policy`` (unwrapped)
        with its adapters off, which is the SFT policy exactly."""
        if self.reference is not None:
            yield self.reference
        else:
            with adapters_disabled(policy):
                yield policy

    @contextlib.contextmanager
    def reward_scorer(self, critic) -> Iterator[ScalarHeadModel | None]:
        """The reward model for a block of no-grad forwards: its own copy, ``critic`` (unwrapped) with its
        adapters off when the two share weights, or None with a reward function."""
        if not self.reward_in_critic:
            yield self.reward_model
        else:
            with adapters_disabled(critic):
                yield critic

    def load_prompts(self) -> tuple[list[str], list[list[int]]]:
        data = self.config.data
        table = self.prompt_dataset
        source = "prompts"
        if table is None:
            table = rename_columns(load_table(data.path, data.split), data.columns, data.path)
            source = data.path
        if data.max_samples is not None:
            table = table.select(range(min(data.max_samples, len(table))))
        return tokenize_prompts(table, self.tokenizer, data.max_prompt_length, source, data.format,
                                data.assistant_marker)

    # ------------------------------------------------------------------ the loop

    @stops_gracefully
    def train(self, resume: bool = False) -> str:
        """Run PPO; returns the path of ``final/`` (the tuned causal LM + tokenizer)."""
        config, ppo = self.config, self.config.ppo
        run, accelerator, resume_from = start_run(config, resume)
        self.accelerator, self.run = accelerator, run
        self.logprobs_from_generation = ppo.logprobs_from_generation
        if self.logprobs_from_generation is None:
            # Sampling runs outside autocast: under bf16/fp16 its logprobs would differ from the training
            # forward's by more than rounding, and the first minibatch's ratio would not be 1.
            self.logprobs_from_generation = (config.sampling.top_k == 0 and config.sampling.top_p == 1.0
                                             and accelerator.mixed_precision == "no")
        self.setup_models()
        self.prompt_texts, self.prompt_ids = self.load_prompts()
        self.ptx_examples = []
        if ppo.ptx_coef > 0:
            ptx_data = DataConfig(path=ppo.ptx_data, eval_fraction=0.0)
            # Cut at the model's context (as SFT does): a longer document would overrun the position table.
            self.ptx_examples, _ = load_sft_examples(ptx_data, self.tokenizer,
                                                     resolve_max_length(ptx_data.max_length, self.policy),
                                                     config.training.seed)

        if len(self.prompt_ids) < ppo.rollout_batch_size * accelerator.num_processes:
            raise UserError(f"ppo.rollout_batch_size: {len(self.prompt_ids)} prompts cannot fill one rollout batch of "
                            f"{ppo.rollout_batch_size} × {accelerator.num_processes} processes; lower it or add prompts")
        # An incomplete last batch of an epoch is dropped (TRL's drop_last): a smaller rollout would change
        # the number of optimizer steps per PPO step (with fewer episodes than minibatches it crashed) and
        # so the schedule, which assumes num_ppo_epochs × num_minibatches per step.
        prompt_order = MicroBatchOrder(len(self.prompt_ids), ppo.rollout_batch_size, config.training.seed,
                                       num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                                       drop_last=True)
        total_steps = config.training.max_steps or max(1, math.ceil(config.training.num_epochs * prompt_order.micro_batches_per_epoch))
        updates_per_step = ppo.num_ppo_epochs * ppo.num_minibatches
        self.build_optimizers(total_steps * updates_per_step)
        device = accelerator.device
        if self.reference is not None:
            self.reference = prepare_frozen(accelerator, self.reference)
        if self.reward_model is not None:
            self.reward_model = prepare_frozen(accelerator, self.reward_model)
        self.trim_last_blocks()

        state = load_checkpoint(accelerator, resume_from) if resume_from else TrainState(extra={"kl_coef": ppo.kl_coef})
        if resume_from:
            logger.info("resumed from %s at step %d", resume_from, state.step)
        self.kl_coef = state.extra["kl_coef"]
        metrics_logger = MetricsLogger(accelerator, run.metrics_path, resume_step=state.step if resume_from else None)
        samples_path = run.path("samples.jsonl")
        if accelerator.is_main_process:
            truncate_jsonl(samples_path, state.step if resume_from else 0)
        progress = tqdm(total=total_steps, initial=state.step, desc="ppo", disable=not accelerator.is_main_process,
                        dynamic_ncols=True)
        try:
            logger.info("PPO: %d prompts, %d steps of %d episodes", len(self.prompt_ids), total_steps, ppo.rollout_batch_size)

            # This session's training time and work, logged with the last step (train_runtime_s, train_episodes,
            # train_generated_tokens); writing samples and checkpoints is paused out.
            train_start, paused_s, session_episodes, session_generated_tokens = time.perf_counter(), 0.0, 0, 0
            while state.step < total_steps:
                # A run stopped inside this step resumes with the step's rollout and its updates done so far.
                self.update_resume = (state.extra or {}).pop("in_step", None)
                start = time.perf_counter()
                if self.update_resume is not None:
                    rollout = load_rollout(resume_from, accelerator.process_index)
                    rollout_s = self.update_resume["rollout_s"]
                else:
                    # 1-3: rollout, rewards, advantages (no gradients anywhere in here)
                    prompt_indices = prompt_order.indices(state.step)
                    rollout = self.rollout([self.prompt_ids[i] for i in prompt_indices],
                                           [self.prompt_texts[i] for i in prompt_indices], step=state.step)
                    rollout_s = time.perf_counter() - start
                    signum = stop_requested(accelerator)
                    if signum:  # stopped while sampling: nothing of this step is kept (its sampling is seeded by the step)
                        raise Preempted(signum, state.step, self.boundary_checkpoint(state))
                # 4: PPO epochs
                start = time.perf_counter()
                try:
                    update_stats = self.update(rollout, step=state.step)
                except StoppedInUpdate as stop:  # preempted between two optimizer steps of this PPO step
                    state.extra = {"kl_coef": self.kl_coef, "in_step": {"updates_done": stop.updates_done,
                                                                         "totals": stop.totals, "rollout_s": rollout_s}}
                    checkpoint = save_checkpoint(accelerator, run, state, config.training.keep_checkpoints,
                                                 updates_into_next=stop.updates_done,
                                                 write_extra=lambda directory: save_rollout(rollout, directory,
                                                                                            accelerator.process_index))
                    raise Preempted(stop.signum, state.step, checkpoint) from None
                update_s = time.perf_counter() - start
                # 5: log, adapt β, checkpoint
                metrics = mean_over_processes(accelerator, {**self.rollout_metrics(rollout), **update_stats})
                episodes = rollout.scores.numel() * accelerator.num_processes
                metrics.update(rollout_s=rollout_s, update_s=update_s, kl_coef=self.kl_coef,
                               episodes_per_s=episodes / (rollout_s + update_s),
                               generated_tokens_per_s=float(rollout.response_mask.sum()) * accelerator.num_processes / rollout_s,
                               lr=self.scheduler.get_last_lr()[0])
                if ppo.adaptive_kl:
                    # Once per PPO step, after the update, with the batch's mean summed KL (docs/ppo.md#20); the
                    # mean over all processes, so every rank keeps the same β (and the checkpoint's is everyone's).
                    batch_kl = float(accelerator.reduce(torch.tensor(metrics["kl"], device=device), "mean"))
                    self.kl_coef = adaptive_kl_coef(self.kl_coef, batch_kl, ppo.target_kl, ppo.kl_horizon, episodes)
                state.step += 1
                state.examples_seen += episodes
                state.extra = {"kl_coef": self.kl_coef}
                session_episodes += episodes
                session_generated_tokens += int(rollout.response_mask.sum()) * accelerator.num_processes
                if state.step == total_steps:
                    metrics.update(train_runtime_s=time.perf_counter() - train_start - paused_s,
                                   train_episodes=session_episodes, train_generated_tokens=session_generated_tokens)
                progress.update(1)
                paused_at = time.perf_counter()
                if state.step % config.training.log_every == 0 or state.step == total_steps or state.step == 1:
                    metrics_logger.log(state.step, metrics, epoch=prompt_order.epoch_at(state.step))
                    self.write_samples(samples_path, rollout, state.step)
                    progress.set_postfix({"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics['kl']:.3f}"})
                if config.training.save_every and state.step % config.training.save_every == 0 and state.step < total_steps:
                    save_checkpoint(accelerator, run, state, config.training.keep_checkpoints)
                signum = stop_requested(accelerator)
                if signum and state.step < total_steps:
                    raise Preempted(signum, state.step, self.boundary_checkpoint(state))
                paused_s += time.perf_counter() - paused_at
        finally:
            progress.close()  # on an error too: its one line must not share the bar's line

        save_pretrained_atomic(accelerator, self.model, self.tokenizer, run.final_dir, save_merged(config.policy),
                               submodule="policy")
        save_pretrained_atomic(accelerator, self.model, self.tokenizer, run.path("value_model"),
                               save_merged(config.critic), submodule="critic")
        end_training(accelerator, self)
        logger.info("PPO done: %s", run.final_dir)
        return run.final_dir

    def boundary_checkpoint(self, state: TrainState) -> str:
        """The checkpoint of the state after ``state.step`` whole steps: the periodic one if it was just
        written, else a new one."""
        existing = self.run.checkpoint_dir(state.step)
        if os.path.isfile(os.path.join(existing, STATE_FILE)):
            return existing
        return save_checkpoint(self.accelerator, self.run, state, self.config.training.keep_checkpoints)

    def trim_last_blocks(self) -> None:
        """``training.trim_last_block``: each model runs its last block's feed-forward only where an output is
        read. The policy and the reference at the positions that predict a response token, the critic at the
        states before them (``critic_values``), the reward model at each episode's EOS: the prompt's other
        positions reach the outputs only through their keys and values. Each model is checked (and logs why it
        stays untrimmed) before its first forward."""
        training, accelerator = self.config.training, self.accelerator
        self.policy_feed_forward = self.reference_feed_forward = None
        if may_trim_last_block(training, accelerator):
            self.policy_feed_forward = trimmable_feed_forward(self.policy_model)
            self.critic_model.trim_last_block()
        if may_trim_last_block(training, accelerator, frozen=True):  # never trained: never recomputed
            # With LoRA the reference is the policy itself with its adapters off (``reference_model``).
            self.reference_feed_forward = trimmable_feed_forward(
                self.reference if self.reference is not None else self.policy_model)
            if self.reward_model is not None:
                self.reward_model.trim_last_block()

    def build_optimizers(self, total_updates: int) -> None:
        """One AdamW over policy and critic; with ``ppo.separate_optimizers`` the critic's parameters form
        their own groups at ``critic_lr`` and each model's gradient is clipped on its own norm, which is
        what two optimizers would do (AdamW updates every parameter on its own)."""
        training, ppo = self.config.training, self.config.ppo
        accelerator = self.accelerator
        critic_lr = (ppo.critic_lr or training.lr) if ppo.separate_optimizers else training.lr
        groups = (weight_decay_groups(self.policy.named_parameters(), training.weight_decay, lr=training.lr)
                  + weight_decay_groups(self.critic.named_parameters(), training.weight_decay, lr=critic_lr))
        optimizer = create_optimizer(groups, training, accelerator.device.type)
        self.scheduler = create_scheduler(optimizer, training, total_updates)
        configure_deepspeed(accelerator, min(training.batch_size, ppo.rollout_batch_size // ppo.num_minibatches),
                            training.max_grad_norm)
        self.model, self.optimizer = accelerator.prepare(PolicyAndValue(self.policy, self.critic), optimizer)
        accelerator.register_for_checkpointing(self.scheduler)

    @property
    def policy_model(self) -> torch.nn.Module:
        """The policy being trained (unwrapped from DDP/FSDP/DeepSpeed)."""
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def critic_model(self) -> ScalarHeadModel:
        """The critic being trained (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).critic

    # ------------------------------------------------------------------ 1-3: rollout

    @torch.no_grad()
    def rollout(self, prompt_ids: list[list[int]], prompt_texts: list[str], step: int) -> Rollout:
        """Sample, score and evaluate a batch of episodes, then compute rewards and advantages."""
        config, ppo = self.config, self.config.ppo
        device = self.accelerator.device
        pad = self.tokenizer.pad_token_id
        # Left-pad every prompt of the batch to one length so micro-batches concatenate.
        all_prompts = pad_left(prompt_ids, pad).to(device)
        all_prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)
        generator = torch.Generator(device=device).manual_seed(
            config.training.seed * 1_000_003 + step * 1009 + self.accelerator.process_index)
        # 1: every process samples until its own episodes end, so sharded weights are gathered for the rollout.
        with full_weights(self.accelerator, self.model) as models:
            models.eval()
            # Decoded in batches of generation_batch_size, then scored in batches of forward_batch_size.
            generation_batch = ppo.generation_batch_size or ppo.forward_batch_size
            samples = [self.sample(models.policy, all_prompts[start:start + generation_batch],
                                   all_prompt_mask[start:start + generation_batch], generator)
                       for start in range(0, len(prompt_ids), generation_batch)]
            response_ids, sample_logprobs, response_lengths = concatenate_samples(samples, pad)
            parts = []
            for start in range(0, len(prompt_ids), ppo.forward_batch_size):
                rows = slice(start, start + ppo.forward_batch_size)
                length = int(response_lengths[rows].max())  # no forward over another batch's longer responses
                parts.append(self.episodes(models.policy, models.critic, all_prompts[rows], all_prompt_mask[rows],
                                           prompt_texts[rows], response_ids[rows, :length],
                                           sample_logprobs[rows, :length]))
        rollout = Rollout(**concatenate_right_padded(parts, pad))
        mask = rollout.response_mask
        # 2: per-token KL penalty in the reward, score on the last valid token (docs/ppo.md#17, docs/ppo.md#40)
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, ppo.kl_estimator)
        rollout.rewards = per_token_rewards(rollout.scores, kl, mask, self.kl_coef)
        # 3: GAE; the value target is taken before whitening (docs/ppo.md#24)
        rollout.advantages, rollout.returns = gae_advantages(rollout.rewards, rollout.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            rollout.advantages = self.whiten(rollout.advantages, mask)
        valid = mask.bool()
        check_finite(self.accelerator, step + 1, {
            "the reward": rollout.scores, "a value": rollout.values[valid],
            "a log-probability": torch.cat([rollout.logprobs[valid], rollout.ref_logprobs[valid]]),
            "an advantage": rollout.advantages[valid]}, getattr(self, "run", None))
        return rollout

    def whiten(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Advantages whitened over the whole rollout batch: with several processes, over all of them
        (their moments summed), so N processes whiten as one process with the same global batch."""
        if self.accelerator.num_processes == 1:
            return masked_whiten(advantages, mask)
        moments = self.accelerator.reduce(masked_moments(advantages, mask), "sum")
        return whiten_from_moments(advantages, mask, moments)

    def episodes(self, policy, critic: ScalarHeadModel, prompts: torch.Tensor, prompt_mask: torch.Tensor,
                 prompt_texts: list[str], response_ids: torch.Tensor,
                 sample_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward batch of sampled episodes: the policy's, the reference's and the critic's view of them,
        and their scores (the fields of ``Rollout`` before rewards)."""
        sampling = self.config.sampling
        # Tokens after the first EOS become padding; the EOS stays (docs/ppo.md#13).
        response_ids, response_mask, ended = truncate_after_eos(response_ids, self.tokenizer.eos_token_id,
                                                                self.tokenizer.pad_token_id)
        input_ids = torch.cat([prompts, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        prompt_len = prompts.shape[1]
        with self.accelerator.autocast():
            if self.logprobs_from_generation:
                logprobs = sample_logprobs
            else:
                logprobs = logprobs_from_logits(response_logits(policy, input_ids, attention_mask, prompt_len,
                                                                self.policy_feed_forward),
                                                response_ids, sampling.temperature)
            with self.reference_model(policy) as reference:
                ref_logprobs = logprobs_from_logits(response_logits(reference, input_ids, attention_mask, prompt_len,
                                                                    self.reference_feed_forward),
                                                    response_ids, sampling.temperature)
            values = critic_values(critic, input_ids, attention_mask, prompt_len)
            scores = self.score(prompt_texts, prompts, prompt_mask, response_ids, response_mask)
        scores = scores.to(prompts.device).float()
        if sampling.missing_eos_penalty is not None:
            # The RM never saw unfinished responses; without this the policy learns not to stop (docs/ppo.md#14).
            scores = torch.where(ended, scores, scores - sampling.missing_eos_penalty)
        return dict(prompt_ids=prompts, prompt_mask=prompt_mask, response_ids=response_ids,
                    response_mask=response_mask, logprobs=logprobs.float(), ref_logprobs=ref_logprobs.float(),
                    values=values.float(), scores=scores, ended=ended)

    def sample(self, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Extension point: draw responses (B, T) and their temperature-scaled logprobs (B, T)."""
        sampling = self.config.sampling
        training = self.config.training
        return sample_with_logprobs(policy, prompt_ids, prompt_mask, sampling.max_new_tokens, sampling.temperature,
                                    sampling.top_k, sampling.top_p, self.tokenizer.eos_token_id,
                                    self.tokenizer.pad_token_id, generator,
                                    compile_mode=training.compile_mode if training.compile else None,
                                    cpu_packed_weights=sampling.cpu_packed_weights)

    def score(self, prompt_texts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
              response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Extension point: (B,) scores of the episodes (reward model, or the reward function on text)."""
        with self.reward_scorer(self.critic_model) as reward_model:
            if reward_model is not None and self.same_vocabulary:
                input_ids = torch.cat([prompt_ids, response_ids], dim=1)
                attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
                return reward_model.score(input_ids, attention_mask)
            responses = self.decode_responses(response_ids, response_mask)
            if reward_model is not None:  # different tokenizer: re-encode the text as the RM was trained
                encoded = [self.reward_tokenizer(p, add_special_tokens=True)["input_ids"]
                           + self.reward_tokenizer(r, add_special_tokens=False)["input_ids"]
                           + [self.reward_tokenizer.eos_token_id] for p, r in zip(prompt_texts, responses)]
                device = prompt_ids.device
                input_ids = pad_left(encoded, self.reward_tokenizer.pad_token_id).to(device)
                attention_mask = pad_left([[1] * len(e) for e in encoded], 0).to(device)
                return reward_model.score(input_ids, attention_mask)
        scores = self.reward_fn(list(prompt_texts), responses)
        if len(scores) != len(responses):
            raise UserError(f"reward.function: returned {len(scores)} scores for {len(responses)} responses")
        return torch.tensor([float(s) for s in scores])

    def decode_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Response text without EOS and padding."""
        texts = []
        for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
            tokens = [t for t, m in zip(ids, mask) if m and t != self.tokenizer.eos_token_id]
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

    # ------------------------------------------------------------------ 4: update

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """``num_ppo_epochs`` passes over shuffled minibatches; each minibatch is one optimizer step,
        accumulated over micro-batches of ``training.batch_size`` episodes as a token-level mean."""
        config, ppo = self.config, self.config.ppo
        accelerator = self.accelerator
        self.model.train()
        batch_size = rollout.scores.shape[0]
        minibatch_size = batch_size // ppo.num_minibatches
        micro_size = min(config.training.batch_size, minibatch_size)
        # A fixed stream per step, so a resumed run shuffles exactly as an unbroken one.
        generator = torch.Generator().manual_seed(config.training.seed * 7919 + step)
        # Clipping covers what the optimizer steps: each model on its own norm when they have their own
        # learning rates (as two optimizers would), else the joint norm of both.
        models = accelerator.unwrap_model(self.model)
        clip_scopes = [models.policy, models.critic] if ppo.separate_optimizers else [models]
        # Resumed inside this step (the train loop sets it): skip the updates already taken, keep their totals.
        resume, self.update_resume = getattr(self, "update_resume", None), None
        totals: dict[str, float] = dict(resume["totals"]) if resume else {}
        skip = resume["updates_done"] if resume else 0
        total_updates = ppo.num_ppo_epochs * ppo.num_minibatches
        count = 0
        for _ in range(ppo.num_ppo_epochs):
            order = torch.randperm(batch_size, generator=generator).to(rollout.scores.device)
            for start in range(0, batch_size, minibatch_size):
                if count < skip:
                    count += 1
                    continue
                minibatch = order[start:start + minibatch_size]
                # The loss is a token mean over the minibatch of every process: DDP averages gradients over
                # processes, hence × num_processes over the tokens of all of them.
                minibatch_tokens = accelerator.reduce(rollout.response_mask[minibatch].sum(), "sum").clamp(min=1)
                minibatch_tokens = minibatch_tokens / accelerator.num_processes
                if ppo.ptx_coef > 0:  # first, so the minibatch's last backward reduces everything at once
                    with micro_batch_sync(accelerator, self.model, is_last=False):
                        ptx_loss = self.ptx_loss(step * ppo.num_ppo_epochs * ppo.num_minibatches + count)
                        accelerator.backward(ppo.ptx_coef * ptx_loss)
                    totals["ptx_loss"] = totals.get("ptx_loss", 0.0) + float(ptx_loss.detach())
                minibatch_loss = 0.0
                for micro_start in range(0, minibatch_size, micro_size):
                    micro = rollout.select(minibatch[micro_start:micro_start + micro_size])
                    weight = micro.response_mask.sum() / minibatch_tokens
                    is_last = micro_start + micro_size >= minibatch_size
                    with micro_batch_sync(accelerator, self.model, is_last):
                        with accelerator.autocast():
                            loss, stats = self.compute_loss(micro)
                        minibatch_loss += float(loss.detach()) * float(weight)
                        if is_last:  # before the backward that, under DeepSpeed, also takes the optimizer step
                            check_finite(accelerator, step + 1, {"the PPO loss": minibatch_loss}, self.run)
                        accelerator.backward(loss * weight)
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * float(weight)
                count += 1
                grad_norm = optimizer_step(accelerator, self.model, self.optimizer, self.scheduler,
                                           config.training.max_grad_norm, clip_scopes, step=step + 1, run=self.run)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
                if count < total_updates:
                    signum = stop_requested(accelerator)
                    if signum:
                        raise StoppedInUpdate(signum, count, totals)
        return {key: value / count for key, value in totals.items()}

    def compute_loss(self, batch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Extension point: the loss of one micro-batch (token-level means over its response tokens).

        L = L_clip + c_v·L_value − c_H·H (docs/ppo.md#formulas, "Total").
        """
        ppo, sampling = self.config.ppo, self.config.sampling
        input_ids, attention_mask = batch.sequences()
        prompt_len = batch.prompt_ids.shape[1]
        mask = batch.response_mask
        logits, values = self.model(lambda policy, critic: (
            response_logits(policy, input_ids, attention_mask, prompt_len, self.policy_feed_forward),
            critic_values(critic, input_ids, attention_mask, prompt_len)))
        logprobs = logprobs_from_logits(logits, batch.response_ids, sampling.temperature)
        policy_loss, policy_stats = clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, ppo.clip_eps)
        value_loss, value_stats = clipped_value_loss(values, batch.values, batch.returns, mask, ppo.value_clip_eps)
        entropy = masked_mean(entropy_from_logits(logits if ppo.entropy_coef > 0 else logits.detach(),
                                                  sampling.temperature), mask)
        loss = policy_loss + ppo.vf_coef * value_loss - ppo.entropy_coef * entropy
        stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach(),
                 **policy_stats, **value_stats}
        return loss, stats

    def ptx_batch(self, update_index: int) -> list[int]:
        """Indices of the ptx examples for optimizer step ``update_index`` (counted over the whole run).

        Consecutive optimizer steps take consecutive, non-overlapping slices of the ptx data, cycling
        through it, so every epoch and minibatch sees fresh pretraining examples (IGPT C.4 samples
        8× as many pretraining examples as RL episodes) and a resumed run sees the same ones.
        """
        batch_size, count = self.config.ppo.ptx_batch_size, len(self.ptx_examples)
        return [(update_index * batch_size + i) % count for i in range(batch_size)]

    def ptx_loss(self, update_index: int) -> torch.Tensor:
        """Mean NLL of a pretraining/SFT batch (the γ_ptx term of InstructGPT's PPO-ptx)."""
        examples = [self.ptx_examples[i] for i in self.ptx_batch(update_index)]
        objective = LanguageModelingObjective(self.tokenizer.pad_token_id)
        batch = objective.collate(examples)
        units = objective.count_units(batch)  # on the CPU tensors: no wait for the device
        batch = to_device(batch, self.accelerator.device)
        with self.accelerator.autocast():
            loss_sum, _ = self.model(lambda policy, critic: objective.loss_sum(policy, batch))
        return loss_sum / max(units, 1)

    # ------------------------------------------------------------------ 5: metrics and samples

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        mask = rollout.response_mask
        sequence_kl = (kl_k1(rollout.logprobs, rollout.ref_logprobs) * mask).sum(1)  # objective/kl (docs/ppo.md#formulas)
        scores = rollout.scores
        return {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "kl": float(sequence_kl.mean()),
            "rlhf_reward": float((scores - self.kl_coef * sequence_kl).mean()),
            "response_length": float(mask.sum(1).float().mean()),
            "eos_fraction": float(rollout.ended.float().mean()),
            "explained_variance": float(explained_variance(rollout.values, rollout.returns, mask)),
        }

    def write_samples(self, path: str, rollout: Rollout, step: int) -> None:
        if not self.accelerator.is_main_process or not self.config.logging.num_samples:
            return
        count = min(self.config.logging.num_samples, rollout.scores.shape[0])
        responses = self.decode_responses(rollout.response_ids[:count], rollout.response_mask[:count])
        sequence_kl = (kl_k1(rollout.logprobs, rollout.ref_logprobs) * rollout.response_mask).sum(1)
        with open(path, "a", encoding="utf-8") as handle:
            for i in range(count):
                prompt = self.tokenizer.decode([t for t, m in zip(rollout.prompt_ids[i].tolist(),
                                                                   rollout.prompt_mask[i].tolist()) if m],
                                               skip_special_tokens=True)
                handle.write(json.dumps({"step": step, "prompt": prompt, "response": responses[i],
                                         "score": float(rollout.scores[i]), "kl": float(sequence_kl[i])},
                                        ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- helpers

def critic_values(critic: ScalarHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int) -> torch.Tensor:
    """(B, R) values V_t of the states before each of the R response tokens t (the last prompt position and every
    response position but the last), in reward units: the critic's head output with the RM's normalisation.
    Only those positions are ``read``, so a critic that ``trims_last_block`` skips the rest of the prompt."""
    batch_size, seq_len = input_ids.shape
    columns = torch.arange(prompt_len - 1, seq_len - 1, device=input_ids.device)
    read = (torch.arange(batch_size, device=input_ids.device).repeat_interleave(len(columns)),
            columns.repeat(batch_size))
    return critic.normalize(critic(input_ids, attention_mask, read=read)).view(batch_size, len(columns))


class StoppedInUpdate(Exception):
    """A stop signal between two optimizer updates of a PPO step: how far the step got."""

    def __init__(self, signum: int, updates_done: int, totals: dict[str, float]):
        super().__init__(signum, updates_done)
        self.signum, self.updates_done, self.totals = signum, updates_done, totals


def save_rollout(rollout: Rollout, directory: str, process_index: int) -> None:
    """A process's rollout, into a checkpoint written inside a PPO step (tensors only: loaded weights-only)."""
    tensors = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    torch.save({name: value for name, value in tensors.items() if value is not None},
               os.path.join(directory, f"rollout-{process_index}.pt"))


def load_rollout(checkpoint_dir: str, process_index: int) -> Rollout:
    tensors = torch.load(os.path.join(checkpoint_dir, f"rollout-{process_index}.pt"), weights_only=True)
    return Rollout(**tensors)


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes (each holds the same number of episodes), so the log is the
    whole batch's, not rank 0's; a standard deviation becomes the mean of the per-process ones."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[key] for key in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, "mean").tolist()))


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)


def concatenate_samples(samples: list[tuple[torch.Tensor, torch.Tensor]],
                        pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampler's batches as one right-padded batch: (response_ids, logprobs, each row's batch length)."""
    length = max(ids.shape[1] for ids, _ in samples)
    pad = torch.nn.functional.pad
    response_ids = torch.cat([pad(ids, (0, length - ids.shape[1]), value=pad_token_id) for ids, _ in samples])
    logprobs = torch.cat([pad(lp, (0, length - lp.shape[1]), value=0.0) for _, lp in samples])
    lengths = torch.cat([torch.full((ids.shape[0],), ids.shape[1]) for ids, _ in samples])
    return response_ids, logprobs, lengths


def concatenate_right_padded(parts: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate micro-batch results whose response length differs, right-padding the shorter ones."""
    length = max(p["response_ids"].shape[1] for p in parts)
    fills = {"response_ids": pad_token_id, "response_mask": 0, "logprobs": 0.0, "ref_logprobs": 0.0, "values": 0.0}
    merged = {}
    for key in parts[0]:
        tensors = []
        for part in parts:
            tensor = part[key]
            if key in fills and tensor.shape[1] < length:
                tensor = torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=fills[key])
            tensors.append(tensor)
        merged[key] = torch.cat(tensors, dim=0)
    return merged


