"""What real runs meet, each answered by one clear line and nothing lost: a checkpoint whose weights are a
pickle, a causal LM given as the reward model, a data file with a broken row, a NaN or infinity in
training, a second run on the same output directory, and library log noise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import tiny_sft_config
from rlhf import PPOTrainer, SFTTrainer, UserError
from rlhf.config import ModelConfig
import rlhf.training as training_module
from rlhf.errors import NonFiniteValue
from rlhf.models import load_causal_lm
from tests.integration.test_ppo import letter_a_reward, ppo_config, prompt_rows, run_tiny_ppo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_sft_cli(config, tmp_path) -> subprocess.CompletedProcess:
    """``rlhf sft --config`` on ``config`` (saved to tmp_path/sft.yaml) in a subprocess, as a user runs it."""
    from rlhf.config import save_config

    config_path = tmp_path / "sft.yaml"
    save_config(config, str(config_path))
    return subprocess.run([sys.executable, "-m", "rlhf", "sft", "--config", str(config_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- checkpoints that could run code


class RunsCode:
    """Unpickling this calls os.system: what a malicious pytorch_model.bin can carry."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickled_checkpoint_is_refused_in_one_line_naming_the_file(tokenizer_dir, tmp_path):
    model, tokenizer = load_causal_lm(ModelConfig(from_config=tiny_sft_config(tokenizer_dir, "x", None, "y")
                                                  .model.from_config, tokenizer=tokenizer_dir))
    checkpoint = tmp_path / "pickled"
    model.config.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    torch.save({**model.state_dict(), "payload": RunsCode()}, checkpoint / "pytorch_model.bin")
    with pytest.raises(UserError) as caught:
        load_causal_lm(ModelConfig(name_or_path=str(checkpoint)), block="policy")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"policy.name_or_path: '{checkpoint}' holds its weights as a pickle (pytorch_model.bin)")
    assert "safetensors" in message  # the way out
    assert ModelConfig().trust_remote_code is False  # and hub code stays off unless a config turns it on


# ----------------------------------------------------------------------------- a reward model must be one


def test_ppo_refuses_a_causal_lm_as_its_reward_model_but_not_as_its_critic(tokenizer_dir, tmp_path):
    policy, tokenizer = load_causal_lm(ppo_config(tmp_path, tokenizer_dir).policy, seed=0)
    causal_lm = tmp_path / "sft-final"
    policy.save_pretrained(causal_lm)
    tokenizer.save_pretrained(causal_lm)
    config = ppo_config(tmp_path / "run", tokenizer_dir, reward={"function": None, "model_path": str(causal_lm)},
                        critic={"init": "reward"})
    with pytest.raises(UserError) as caught:
        PPOTrainer(config, prompts=prompt_rows()).setup_models()
    assert str(caught.value).startswith(f"reward.model_path: '{causal_lm}' is not a reward model")
    assert "train one with `rlhf rm`" in str(caught.value)
    # A critic may start from a causal LM (a fresh value head on its trunk).
    trainer = run_tiny_ppo(tmp_path / "critic", tokenizer_dir, critic={"init": "policy", "name_or_path": str(causal_lm)})
    assert trainer.critic_model is not None


# ----------------------------------------------------------------------------- bad rows

@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', "line 2: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n',
     "line 2: not valid JSON (Unterminated string starting at column 17)"),
    ('{"prompt": "a", "response": "b"}\n\n["not", "an", "object"]\n', "line 3: expected a JSON object"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": 7, "response": "d"}\n',
     "line 3: column 'prompt' holds a number, but a string on line 1"),
    ('{"prompt": "a", "response": null}\n{"prompt": "c", "response": ["d"]}\n',
     "line 1: column 'response' must be text, found null"),
])


def test_a_bad_row_is_named_by_file_and_line(tokenizer_dir, tmp_path, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_text(content, encoding="utf-8")
    config = tiny_sft_config(tokenizer_dir, str(path), None, str(tmp_path / "run"))
    config.data.eval_fraction = 0.0
    with pytest.raises(UserError) as caught:
        SFTTrainer(config).train()
    assert str(path) in str(caught.value) and expected in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_row_is_named_by_its_line_in_the_file_after_the_eval_split(tokenizer_dir, tmp_path):
    """Without eval_path a share of the rows is held out at random first: the line named is still the file's."""
    rows = [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(40)]
    rows[16] = json.dumps({"prompt": "p16", "response": 16})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = tiny_sft_config(tokenizer_dir, str(path), None, str(tmp_path / "run"))
    config.data.eval_fraction = 0.25
    with pytest.raises(UserError, match=r"line 17: column 'response' must be text, found int"):
        SFTTrainer(config).train()


def test_the_terminal_gets_one_line_and_the_library_log_goes_to_run_log(tokenizer_dir, tmp_path):
    """datasets logs its own failure before raising; that line belongs in run.log, not before our error."""
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"\n', encoding="utf-8")
    config = tiny_sft_config(tokenizer_dir, str(path), None, str(tmp_path / "run"))
    result = run_sft_cli(config, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert all(" INFO rlhf." in line for line in lines[:-1]), result.stderr  # only rlhf's own progress before it
    assert lines[-1] == f"rlhf sft: error: data.path: cannot read file '{path}': line 2: not valid JSON " \
                        "(Expecting ',' delimiter at column 15)"
    assert "Failed to load JSON" in (tmp_path / "run" / "run.log").read_text()  # the library's own line, kept


# ----------------------------------------------------------------------------- non-finite values


@pytest.fixture(params=["checked on the host", "checked on the device"])
def finite_check_mode(request, monkeypatch):
    """Both ways a non-finite loss or gradient norm is caught: read before each optimizer step (CPU), or on the
    device with the update skipped there and the values read a step later (GPU: DeviceFiniteCheck; forced here)."""
    if request.param == "checked on the device":
        monkeypatch.setattr(training_module, "defers_finite_checks", lambda accelerator, optimizer: True)
    return request.param


def test_checking_on_the_device_trains_the_same_run(tokenizer_dir, sft_files, tmp_path, monkeypatch):
    """The update the fused kernel takes with found_inf = 0 is the plain one: the same metrics, step by step."""
    train, evaluation = sft_files
    deferred_steps = []
    original = training_module.DeviceFiniteCheck.optimizer_step

    def counted(self, *args, **kwargs):
        deferred_steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_module.DeviceFiniteCheck, "optimizer_step", counted)
    timing = {"tokens_per_s", "train_runtime_s"}
    runs = {}
    for mode in ("host", "device"):
        if mode == "device":
            monkeypatch.setattr(training_module, "defers_finite_checks", lambda accelerator, optimizer: True)
        config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / mode), max_steps=6, save_every=2)
        SFTTrainer(config).train()
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        runs[mode] = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]
    assert len(deferred_steps) == 6  # the device run went through the deferred check
    assert any("grad_norm" in record for record in runs["device"])
    assert runs["device"] == runs["host"]


def test_a_nan_loss_stops_sft_before_its_optimizer_step(tokenizer_dir, sft_files, tmp_path, finite_check_mode):
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=6, save_every=2)
    model, tokenizer = load_causal_lm(config.model, seed=0)
    forwards = []

    def poison(module, inputs, output):  # the 3rd step's forward turns into NaN (eval forwards run under no_grad)
        if torch.is_grad_enabled():
            forwards.append(1)
            if len(forwards) == 3:
                return output * float("nan")

    model.transformer.ln_f.register_forward_hook(poison)
    with pytest.raises(NonFiniteValue) as caught:
        SFTTrainer(config, model=model, tokenizer=tokenizer).train()
    message = str(caught.value)
    assert message.startswith("step 3: the loss is nan; stopped before the optimizer step")
    assert f"newest checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-2'}" in message
    assert caught.value.exit_code == 3 and "rlhf sft --config" in caught.value.resume_hint
    assert not (tmp_path / "run" / "final").exists()
    # The weights were not touched by the poisoned step: they are step 2's, finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_cli_prints_the_non_finite_stop_on_a_line_of_its_own(tokenizer_dir, sft_files, tmp_path):
    """An absurd learning rate: the loss blows up mid-run. The progress bar (carriage returns, no newline)
    is closed first, so the one line is not glued to the end of the bar."""
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=8, lr=1e30,
                             warmup_ratio=0.0)
    result = run_sft_cli(config, tmp_path)
    assert result.returncode == 3, result.stderr
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert re.match(r"rlhf sft: step \d+: the (loss|gradient norm) is (nan|inf|-inf)", last), repr(last)


def test_an_infinite_gradient_norm_stops_before_the_step(tokenizer_dir, sft_files, tmp_path, finite_check_mode):
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=4)
    model, tokenizer = load_causal_lm(config.model, seed=0)
    backwards = []

    def blow_up(grad):
        backwards.append(1)
        return grad * float("inf") if len(backwards) == 2 else grad

    model.transformer.h[0].mlp.c_fc.weight.register_hook(blow_up)
    with pytest.raises(NonFiniteValue, match=r"^step 2: the gradient norm is (inf|nan)"):
        SFTTrainer(config, model=model, tokenizer=tokenizer).train()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the step was not taken


def test_a_nan_reward_or_value_stops_ppo_before_any_update(tokenizer_dir, tmp_path):
    def nan_for_one(prompts, responses):  # called per forward batch of 4 episodes: one NaN in each
        scores = letter_a_reward(prompts, responses)
        scores[3] = float("nan")
        return scores

    with pytest.raises(NonFiniteValue, match=r"^step 1: the reward is nan in 2 of 8 values") as caught:
        run_tiny_ppo(tmp_path / "reward", tokenizer_dir, reward_fn=nan_for_one)
    assert str(caught.value).endswith("no checkpoint yet (lower training.lr, check the data or the reward, then "
                                      "start again: --resume then starts from step 0)")  # not "resume from none"

    class NanValues(PPOTrainer):
        def episodes(self, *args, **kwargs):
            part = super().episodes(*args, **kwargs)
            part["values"][0, 0] = float("inf")
            return part

    policy, tokenizer = load_causal_lm(ppo_config(tmp_path, tokenizer_dir).policy, seed=0)
    initial = {name: value.clone() for name, value in policy.state_dict().items()}
    trainer = NanValues(ppo_config(tmp_path / "value", tokenizer_dir), policy=policy, tokenizer=tokenizer,
                        reward_fn=letter_a_reward, prompts=prompt_rows())
    with pytest.raises(NonFiniteValue, match=r"^step 1: a value is inf"):
        trainer.train()
    assert all(torch.equal(value, initial[name]) for name, value in policy.state_dict().items())  # no update taken


# ----------------------------------------------------------------------------- one run per output directory

HOLD_LOCK = """
import sys, time
from rlhf.training import RunDirectory
RunDirectory(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tokenizer_dir, sft_files, tmp_path):
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as caught:
            SFTTrainer(config).train()
        assert str(caught.value).startswith(f"output_dir: '{tmp_path / 'run'}' is in use by a run that is still going "
                                            f"(pid {holder.pid} on ")
        assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file is still there, and is simply taken over.
    assert "pid" in (tmp_path / "run" / ".lock").read_text()
    SFTTrainer(config).train()
    assert (tmp_path / "run" / "final").is_dir()
    assert f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()


# ----------------------------------------------------------------------------- quiet logs


def test_checkpoints_print_no_warning_a_user_cannot_act_on(tokenizer_dir, sft_files, tmp_path):
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "run"), max_steps=4, save_every=1,
                             gradient_checkpointing=True)
    result = run_sft_cli(config, tmp_path)
    assert result.returncode == 0, result.stderr
    text_lines = [line for line in result.stderr.replace("\r", "\n").splitlines()
                  if line.strip() and not line.startswith("sft:")]  # the progress bar's redraws
    assert all(" INFO rlhf." in line for line in text_lines), text_lines  # rlhf's own lines, nothing else
    log = (tmp_path / "run" / "run.log").read_text()
    assert "Removed shared tensor" not in log and "use_cache=True" not in log  # silenced / fixed at the source
