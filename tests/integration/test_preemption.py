"""A run stopped by SIGTERM or SIGINT finishes its optimizer step, writes a complete checkpoint, raises
``Preempted`` (the CLI: one line with the resume command, exit 128 + the signal), and ``--resume``
then ends bitwise equal to an unbroken run. A second signal while the checkpoint is written waits for
it. Every stage, in this process: the signal is raised from inside the training loop at a chosen point.
(The 2-process case: tests/e2e/test_faults.py.)"""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import make_rows, tiny_sft_config, write_jsonl
from rlhf import PPOTrainer, RewardTrainer, SFTTrainer
from rlhf.config import ModelConfig, NormalizationConfig, PreferenceDataConfig, RewardConfig, TrainingConfig
from rlhf.config import LoggingConfig
from rlhf.errors import Preempted
from tests.integration.test_ppo import ppo_config, read_jsonl

TIMING = {"rollout_s", "update_s", "episodes_per_s", "generated_tokens_per_s", "tokens_per_s", "train_runtime_s",
          "train_tokens", "train_units", "train_episodes", "train_generated_tokens"}  # this session's clock and counts


def signal_at(monkeypatch, module, step: int, signum=signal.SIGTERM, calls: int = 1):
    """Raise ``signum`` in this process inside ``module.optimizer_step`` of optimizer step ``step`` (its
    ``calls``-th call there), as a scheduler's signal arriving mid-step would."""
    original = module.optimizer_step
    seen = {}

    def step_with_signal(*args, **kwargs):
        taken = kwargs.get("step")
        seen[taken] = seen.get(taken, 0) + 1
        if taken == step and seen[taken] == calls:
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", step_with_signal)


def same_files(expected_dir, actual_dir, loader) -> None:
    expected = loader.from_pretrained(expected_dir).state_dict()
    actual = loader.from_pretrained(actual_dir).state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def same_metrics(expected_dir, actual_dir) -> None:
    expected, actual = read_jsonl(expected_dir / "metrics.jsonl"), read_jsonl(actual_dir / "metrics.jsonl")
    assert [m["step"] for m in actual] == [m["step"] for m in expected]
    for a, b in zip(expected, actual):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def stop_then_resume(make_trainer, monkeypatch, module, step: int, signum=signal.SIGTERM, calls: int = 1) -> Preempted:
    """Run until the signal stops it; the handlers are restored afterwards; resume to the end."""
    with monkeypatch.context() as patch:
        signal_at(patch, module, step, signum, calls)
        with pytest.raises(Preempted) as stopped:
            make_trainer().train()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # ours are gone once the run is over
    make_trainer().train(resume=True)
    return stopped.value


def test_sft_stopped_by_sigterm_resumes_to_the_unbroken_weights(tokenizer_dir, sft_files, tmp_path, monkeypatch):
    import rlhf.training as training

    train, evaluation = sft_files

    def config(name):
        return tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / name), max_steps=8, save_every=4,
                               eval_every=4, lr_scheduler="cosine", warmup_ratio=0.2)

    SFTTrainer(config("unbroken")).train()
    stopped = stop_then_resume(lambda: SFTTrainer(config("broken")), monkeypatch, training, step=3)
    # Step 3 was finished and checkpointed, though no periodic checkpoint was due.
    assert stopped.exit_code == 128 + signal.SIGTERM
    assert str(stopped).startswith(f"stopped by SIGTERM after step 3; checkpoint {tmp_path / 'broken' / 'checkpoints' / 'step-3'}")
    assert stopped.resume_hint == f"continue with: rlhf sft --config {tmp_path / 'broken' / 'config.yaml'} --resume"
    same_files(tmp_path / "unbroken" / "final", tmp_path / "broken" / "final", AutoModelForCausalLM)
    same_metrics(tmp_path / "unbroken", tmp_path / "broken")


def test_sigint_on_a_checkpoint_step_keeps_that_checkpoint(tokenizer_dir, sft_files, tmp_path, monkeypatch):
    """Ctrl-C at a step with a periodic checkpoint: that one is the stop's (not written twice)."""
    import rlhf.training as training

    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=8, save_every=4)
    saves = []
    original = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda *args, **kwargs: saves.append(1) or original(*args, **kwargs))
    signal_at(monkeypatch, training, step=4, signum=signal.SIGINT)
    with pytest.raises(Preempted, match="stopped by SIGINT after step 4") as stopped:
        SFTTrainer(config).train()
    assert stopped.value.exit_code == 130 and len(saves) == 1
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-4"]


def test_a_second_signal_during_the_checkpoint_waits_for_it(tokenizer_dir, sft_files, tmp_path, monkeypatch):
    """The second SIGTERM arrives while accelerate writes the checkpoint: the write completes (loadable,
    resumable), then the run stops; it does not tear the checkpoint."""
    import accelerate

    import rlhf.training as training

    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=8)
    signal_at(monkeypatch, training, step=2)
    original = accelerate.Accelerator.save_state

    def save_state_interrupted(self, directory, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # again, in the middle of the write
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state_interrupted)
    with pytest.raises(Preempted, match="after step 2"):
        SFTTrainer(config).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    monkeypatch.undo()
    SFTTrainer(config).train(resume=True)  # it resumes from that checkpoint to the end
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def rm_config(tokenizer_dir, root, name) -> RewardConfig:
    rows = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"].replace("very", "not")}
            for r in make_rows(48, seed=4)]
    train = write_jsonl(root / "pref.jsonl", rows)
    return RewardConfig(
        output_dir=str(root / name),
        model=ModelConfig(from_config=tiny_sft_config(tokenizer_dir, "x", None, "y").model.from_config,
                          tokenizer=tokenizer_dir),
        data=PreferenceDataConfig(path=train, eval_fraction=0.2, max_length=64),
        training=TrainingConfig(batch_size=8, lr=3e-3, max_steps=6, save_every=2, log_every=1, lr_scheduler="linear"),
        logging=LoggingConfig(num_samples=1), normalization=NormalizationConfig(set="eval"))


def test_reward_model_stopped_by_sigterm_resumes_to_the_unbroken_weights(tokenizer_dir, tmp_path, monkeypatch):
    import rlhf.training as training

    RewardTrainer(rm_config(tokenizer_dir, tmp_path, "unbroken")).train()
    stopped = stop_then_resume(lambda: RewardTrainer(rm_config(tokenizer_dir, tmp_path, "broken")), monkeypatch,
                               training, step=3)
    assert "after step 3" in str(stopped) and "rlhf rm --config" in stopped.resume_hint
    same_files(tmp_path / "unbroken" / "final", tmp_path / "broken" / "final", AutoModelForSequenceClassification)
    same_metrics(tmp_path / "unbroken", tmp_path / "broken")


REWARD_MODULE = "def letter_a_reward(prompts, responses):\n    return [r.count('a') / 4.0 for r in responses]\n"


@pytest.fixture()
def ppo_run_config(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "preemption_rewards.py").write_text(REWARD_MODULE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in make_rows(24)])

    def make(name):
        return ppo_config(tmp_path / name, tokenizer_dir, data={"path": prompts},
                          reward={"function": "preemption_rewards:letter_a_reward"},
                          ppo={"adaptive_kl": True, "target_kl": 0.1, "kl_horizon": 100},
                          training={"max_steps": 3, "save_every": None, "lr_scheduler": "linear"})
    return make


@pytest.mark.parametrize("where", ["inside the update", "at the end of a step"])
def test_ppo_stopped_by_sigterm_resumes_to_the_unbroken_weights(ppo_run_config, tmp_path, monkeypatch, where):
    """A PPO step is a rollout and 2 epochs x 2 minibatches of updates. Stopped after the first update of
    step 2, the checkpoint keeps the step's rollout and how far it got (step-1-1), and resume takes the
    remaining updates; stopped after the last update, it is an ordinary step-2 checkpoint."""
    import rlhf.trainers.ppo as ppo

    PPOTrainer(ppo_run_config("unbroken")).train()
    calls = 1 if where == "inside the update" else 4
    stopped = stop_then_resume(lambda: PPOTrainer(ppo_run_config("broken")), monkeypatch, ppo, step=2, calls=calls)
    expected = "step-1-1" if where == "inside the update" else "step-2"
    assert f"checkpoints/{expected} written" in str(stopped), str(stopped)
    assert "rlhf ppo --config" in stopped.resume_hint
    if where == "inside the update":
        assert os.path.isfile(tmp_path / "broken" / "checkpoints" / "step-1-1" / "rollout-0.pt")
    for name, loader in (("final", AutoModelForCausalLM), ("value_model", AutoModelForSequenceClassification)):
        same_files(tmp_path / "unbroken" / name, tmp_path / "broken" / name, loader)
    same_metrics(tmp_path / "unbroken", tmp_path / "broken")
    assert read_jsonl(tmp_path / "unbroken" / "samples.jsonl") == read_jsonl(tmp_path / "broken" / "samples.jsonl")


def test_ppo_stopped_while_sampling_keeps_nothing_of_the_step(ppo_run_config, tmp_path, monkeypatch):
    """A signal during the rollout: the step's episodes are dropped (resume samples them again, seeded by
    the step) and the state of the step before is checkpointed."""
    PPOTrainer(ppo_run_config("unbroken")).train()
    original = PPOTrainer.rollout

    def rollout_with_signal(self, prompt_ids, prompt_texts, step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return original(self, prompt_ids, prompt_texts, step)

    with monkeypatch.context() as patch:
        patch.setattr(PPOTrainer, "rollout", rollout_with_signal)
        with pytest.raises(Preempted, match="after step 1; checkpoint .*step-1 written"):
            PPOTrainer(ppo_run_config("broken")).train()
    assert sorted(os.listdir(tmp_path / "broken" / "checkpoints")) == ["step-1"]  # no rollout file: nothing in-step
    PPOTrainer(ppo_run_config("broken")).train(resume=True)
    same_files(tmp_path / "unbroken" / "final", tmp_path / "broken" / "final", AutoModelForCausalLM)
    same_metrics(tmp_path / "unbroken", tmp_path / "broken")


def test_resume_with_no_checkpoint_yet_starts_from_step_0_and_says_so(tokenizer_dir, sft_files, tmp_path, caplog):
    """A scheduler relaunches the same command with --resume after a preemption that came before the first
    checkpoint: the run starts over instead of failing, and says why."""
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=2)
    config.logging.num_samples = 0
    with caplog.at_level(logging.INFO, logger="rlhf"):
        SFTTrainer(config).train(resume=True)
    assert f"--resume: no checkpoint in {tmp_path / 'run'} yet; starting from step 0" in caplog.text
    assert os.path.isdir(tmp_path / "run" / "final")
