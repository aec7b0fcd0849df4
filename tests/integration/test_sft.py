"""The SFT stage on a tiny GPT-2 (2 layers, width 32): it learns, writes its run directory, resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import make_rows, tiny_sft_config, write_jsonl
from rlhf import SFTConfig, SFTTrainer, TrainingConfig, UserError, load_config
from rlhf.config import to_dict
from rlhf.models import PAD_TOKEN, load_causal_lm
from rlhf.trainers.sft import LanguageModelingObjective

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def generate_from(final_dir: str, prompt: str) -> tuple[str, object, object]:
    """Load final/ with plain transformers (no rlhf code) and greedily continue ``prompt``."""
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]), model, tokenizer


@pytest.fixture(scope="module")
def finished_run(tokenizer_dir, tmp_path_factory):
    """One ordinary SFT run (2 epochs over 64 rows, 16 steps), shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("sft")
    train = write_jsonl(root / "train.jsonl", make_rows(64, seed=1))
    evaluation = write_jsonl(root / "eval.jsonl", make_rows(16, seed=2))
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(root / "run"), eval_every=8)
    final_dir = SFTTrainer(config).train()
    return config, final_dir


def test_sft_lowers_eval_loss(finished_run):
    config, _ = finished_run
    evals = [m for m in read_metrics(config.output_dir) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 8, 16]
    first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
    assert last < 0.8 * first, (first, last)
    assert evals[-1]["eval/perplexity"] == pytest.approx(torch.tensor(last).exp().item(), rel=1e-6)


def test_sft_writes_the_run_directory(finished_run):
    config, final_dir = finished_run
    assert final_dir == os.path.join(config.output_dir, "final")
    train_lines = [m for m in read_metrics(config.output_dir) if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 17))
    for line in train_lines:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(line)
        assert line["tokens_per_s"] > 0 and line["grad_norm"] > 0 and line["lr"] == pytest.approx(3e-3)
    assert train_lines[-1]["epoch"] == 2.0
    # config.yaml is the fully resolved config: loading it gives back the run's config.
    assert load_config(SFTConfig, os.path.join(config.output_dir, "config.yaml")) == config
    with open(os.path.join(config.output_dir, "samples.jsonl"), encoding="utf-8") as handle:
        samples = [json.loads(line) for line in handle]
    assert len(samples) == config.logging.num_samples
    assert all({"prompt", "response", "reference"} <= set(s) and s["prompt"].startswith("Tell me about")
               for s in samples)
    assert not [name for name in os.listdir(config.output_dir) if name.startswith(".tmp")]  # nothing half-written


def test_final_loads_with_plain_transformers_and_generates(finished_run):
    _, final_dir = finished_run
    text, model, tokenizer = generate_from(final_dir, "Tell me about the happy cat.\n")
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_custom_local_gpt2_without_pad_fine_tunes_and_reloads(tokenizer_dir, sft_files, tmp_path):
    """Done-when: a local GPT-2 checkpoint whose tokenizer has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token is None
    checkpoint = tmp_path / "my-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    train, evaluation = sft_files
    # The same overrides a user gives on the command line: `model.name_or_path=<dir>`.
    config = load_config(SFTConfig, None, [f"{key}={value}" for key, value in {
        "output_dir": tmp_path / "run", "model.name_or_path": checkpoint, "data.path": train,
        "data.eval_path": evaluation, "training.max_steps": 4, "training.lr": 3e-3, "logging.num_samples": 1,
    }.items()])
    final_dir = SFTTrainer(config).train()
    evals = [m["eval/loss"] for m in read_metrics(config.output_dir) if "eval/loss" in m]
    assert evals[-1] < evals[0]

    _, model, loaded_tokenizer = generate_from(final_dir, "Tell me about the sad dog.\n")
    assert len(loaded_tokenizer) == len(tokenizer) + 1 == model.config.vocab_size
    assert loaded_tokenizer.pad_token == PAD_TOKEN and loaded_tokenizer.pad_token_id == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 1


def test_batch_8_equals_batch_2_with_4_accumulation_steps(tokenizer_dir, sft_files, tmp_path):
    train, evaluation = sft_files
    whole = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "b8"), batch_size=8, max_steps=4)
    accumulated = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / "b2x4"), batch_size=2,
                                  gradient_accumulation_steps=4, max_steps=4)
    for config in (whole, accumulated):
        config.logging.num_samples = 0
        SFTTrainer(config).train()
    reference, result = final_weights(whole.output_dir), final_weights(accumulated.output_dir)
    initial, _ = load_causal_lm(whole.model, seed=whole.training.seed)  # what both runs started from
    initial = initial.state_dict()
    assert reference.keys() == result.keys()
    for name in reference:
        assert torch.allclose(result[name], reference[name], atol=1e-5, rtol=0), name
    moved = max((reference[name] - initial[name]).abs().max().item() for name in reference)
    assert moved > 1e-3  # the runs trained: equal weights are not equal by standing still
    losses = [[m["loss"] for m in read_metrics(c.output_dir) if "loss" in m] for c in (whole, accumulated)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_library_use_with_own_model_tokenizer_and_dataset(tokenizer_dir, tmp_path):
    """Item 7: no CLI, no model block, no data file: a config built in Python plus objects of one's own."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # no pad token: the trainer adds one
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    conversations = [{"messages": [{"role": "user", "content": row["prompt"].strip()},
                                   {"role": "assistant", "content": row["response"]}]} for row in make_rows(24)]
    config = SFTConfig(output_dir=str(tmp_path / "run"),
                       training=TrainingConfig(batch_size=8, lr=3e-3, max_steps=3, log_every=1))
    config.logging.num_samples = 1
    trainer = SFTTrainer(config, model=model, tokenizer=tokenizer,
                         train_dataset=datasets.Dataset.from_list(conversations[:16]),
                         eval_dataset=datasets.Dataset.from_list(conversations[16:]))
    final_dir = trainer.train()

    metrics = read_metrics(config.output_dir)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert metrics[-1]["eval/loss"] < metrics[0]["eval/loss"]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    # The chat template used for training is saved with the tokenizer, so inference renders alike.
    _, _, loaded = generate_from(final_dir, "<|user|>\nTell me about the happy cat.\n<|assistant|>\n")
    assert loaded.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("data_format", ["text", "train_on_prompt"])
def test_fully_trained_examples_train_and_sample(tokenizer_dir, tmp_path, data_format):
    """{text} rows (here from csv), or prompt/response with train_on_prompt: no token is an untrained
    prompt, yet the run ends with samples (the first half of each example serves as the prompt)."""
    rows = make_rows(24)
    if data_format == "text":
        rows = [{"text": row["prompt"] + row["response"]} for row in rows]
    train = str(tmp_path / "train.csv")
    datasets.Dataset.from_list(rows).to_csv(train, index=False)
    config = tiny_sft_config(tokenizer_dir, train, None, str(tmp_path / "run"), max_steps=2)
    config.data.eval_fraction = 0.25
    config.data.train_on_prompt = data_format == "train_on_prompt"
    SFTTrainer(config).train()
    with open(os.path.join(config.output_dir, "samples.jsonl"), encoding="utf-8") as handle:
        samples = [json.loads(line) for line in handle]
    assert len(samples) == config.logging.num_samples
    for sample in samples:
        assert sample["prompt"].startswith("Tell me about") and sample["reference"]


def test_run_without_eval_data_logs_only_training_lines(tokenizer_dir, sft_files, tmp_path):
    train, _ = sft_files
    config = tiny_sft_config(tokenizer_dir, train, None, str(tmp_path / "run"), max_steps=3, eval_every=1)
    config.data.eval_fraction = 0.0
    SFTTrainer(config).train()
    metrics = read_metrics(config.output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("loss" in m for m in metrics)
    assert os.path.isfile(os.path.join(config.output_dir, "samples.jsonl"))  # sampled from training prompts


# ----------------------------------------------------------------------------- kill and resume, for real

def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def launch(config_path: str, log_path, *extra: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "rlhf", "sft", "--config", config_path, *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO)


def complete_steps(run_dir: str) -> list[int]:
    checkpoints = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return []
    return sorted(int(name[5:]) for name in os.listdir(checkpoints)
                  if name.startswith("step-") and os.path.isfile(os.path.join(checkpoints, name, "trainer_state.json")))


def test_killed_run_resumes_to_the_same_weights(tokenizer_dir, sft_files, tmp_path):
    """`rlhf sft` is SIGKILLed after its step-4 checkpoint; `--resume` must end bitwise equal to an
    unbroken run. Dropout is on, so the restored RNG state matters, not only weights and optimizer."""
    train, evaluation = sft_files
    config = tiny_sft_config(tokenizer_dir, train, evaluation, "unused", max_steps=32, save_every=2, eval_every=8,
                             keep_checkpoints=3, lr_scheduler="cosine", warmup_ratio=0.1)
    config.model.from_config.dropout = 0.1
    config.model.disable_dropout = False
    config.logging.num_samples = 1
    paths = {}
    for name in ("broken", "unbroken"):
        config.output_dir = str(tmp_path / name)
        paths[name] = str(tmp_path / f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as handle:
            yaml.safe_dump(to_dict(config), handle)

    unbroken = launch(paths["unbroken"], tmp_path / "unbroken.log")
    broken = launch(paths["broken"], tmp_path / "broken.log")
    broken_dir = str(tmp_path / "broken")
    deadline = time.monotonic() + 120
    while not any(step >= 4 for step in complete_steps(broken_dir)):
        assert broken.poll() is None, (tmp_path / "broken.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    broken.send_signal(signal.SIGKILL)
    broken.wait()
    assert not os.path.exists(os.path.join(broken_dir, "final")), "killed too late: the run had finished"
    killed_at = max(complete_steps(broken_dir))

    # Without --resume the half-finished run is not clobbered (checked in-process: no extra launch).
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        SFTTrainer(load_config(SFTConfig, paths["broken"])).train()

    resumed = launch(paths["broken"], tmp_path / "resumed.log", "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert unbroken.wait(timeout=300) == 0, (tmp_path / "unbroken.log").read_text()
    assert f"resumed from {os.path.join(broken_dir, 'checkpoints', f'step-{killed_at}')}" in (
        tmp_path / "resumed.log").read_text()

    expected, result = final_weights(str(tmp_path / "unbroken")), final_weights(broken_dir)
    assert expected.keys() == result.keys()
    for name in expected:
        assert torch.equal(result[name], expected[name]), name

    # metrics.jsonl reads as one run: every step once, the same losses as the unbroken run.
    metrics = read_metrics(broken_dir)
    train_lines = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 33))
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 8, 16, 24, 32]
    unbroken_losses = [m["loss"] for m in read_metrics(str(tmp_path / "unbroken")) if "loss" in m]
    assert [m["loss"] for m in train_lines] == unbroken_losses


def test_length_grouped_batches_train_on_less_padding(tokenizer_dir, sft_files, tmp_path, monkeypatch):
    train, _ = sft_files
    padding = {}
    collate = LanguageModelingObjective.collate
    for grouped in (False, True):
        config = tiny_sft_config(tokenizer_dir, train, None, str(tmp_path / f"run-{grouped}"), num_epochs=1,
                                 group_by_length=grouped)
        config.data.eval_fraction = 0.0
        config.logging.num_samples = 0
        pads = []

        def recording_collate(self, examples, pads=pads):
            batch = collate(self, examples)
            pads.append(batch["attention_mask"].numel() - int(batch["attention_mask"].sum()))
            return batch

        monkeypatch.setattr(LanguageModelingObjective, "collate", recording_collate)
        SFTTrainer(config).train()
        padding[grouped] = sum(pads)
        last = read_metrics(config.output_dir)[-1]
        assert last["train_tokens"] > 0 and last["train_runtime_s"] > 0 and math.isfinite(last["loss"])
    assert padding[True] < padding[False]


# ----------------------------------------------------------------------------- padding-free batches (training.packing)

def random_examples(count: int, vocab: int, seed: int) -> list[dict]:
    """SFT examples of 2..24 tokens, the first third of each untrained (a prompt), the rest trained."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(2, 25, (1,), generator=generator))
        ids = torch.randint(vocab, (length,), generator=generator).tolist()
        prompt = length // 3
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def per_example_losses(model, batch: dict, segments: list[list[tuple[int, int]]]) -> list[float]:
    """Summed next-token loss of each example; ``segments[row]``: (start, length) of its examples."""
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    logits = model(**inputs, use_cache=False).logits.float()
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   reduction="none", ignore_index=-100)
    token_loss = torch.nn.functional.pad(token_loss, (1, 0))  # token_loss[:, t]: the loss of predicting token t
    return [float(token_loss[row, start:start + length].sum().detach()) for row, spans in enumerate(segments)
            for start, length in spans]


@pytest.mark.parametrize("architecture", ["gpt2", "gpt2-eager", "gpt_neox"])
def test_a_packed_batch_gives_every_example_the_loss_and_gradient_of_the_padded_batch(tokenizer_dir, architecture):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf.data import collate_sft, collate_sft_packed, pack_rows
    from rlhf.models import check_packing_support

    torch.manual_seed(0)
    if architecture.startswith("gpt2"):  # eager attention: transformers builds the packed mask for it too
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64))
        model.set_attn_implementation("eager" if architecture.endswith("eager") else "sdpa")
    else:  # rotary positions: packing must restart them too
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, num_hidden_layers=2, num_attention_heads=2,
                                                 hidden_size=32, intermediate_size=64, max_position_embeddings=64))
    model.eval()  # no dropout: the two batches must see the same function
    check_packing_support(model)
    examples = random_examples(9, 300, seed=1)
    capacity = 40
    padded = collate_sft(examples, pad_token_id=0)
    packed = collate_sft_packed(examples, pad_token_id=0, capacity=capacity)
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    assert packed["input_ids"].shape[0] == len(rows) < len(examples)  # fewer rows ...
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # ... and fewer tokens than padding
    assert int(packed["num_examples"]) == len(examples)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())

    alone = per_example_losses(model, padded, [[(0, len(e["input_ids"]))] for e in examples])
    segments, order = [], []
    for row in rows:
        spans, start = [], 0
        for index in row:
            spans.append((start, len(examples[index]["input_ids"])))
            start += len(examples[index]["input_ids"])
            order.append(index)
        segments.append(spans)
    together = per_example_losses(model, packed, segments)
    for index, loss in zip(order, together):
        assert loss == pytest.approx(alone[index], rel=1e-4, abs=1e-5), index

    # The objective the trainer minimises: the same sum, the same gradient.
    gradients = []
    for objective in (LanguageModelingObjective(0), LanguageModelingObjective(0, pack_length=capacity)):
        model.zero_grad()
        batch = objective.collate(examples)
        loss_sum, _ = objective.loss_sum(model, batch)
        loss_sum.backward()
        assert objective.count_units(batch) == int((padded["labels"][:, 1:] != -100).sum())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    for name in gradients[0]:
        assert torch.allclose(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("architecture", ["gpt2", "gpt2-eager", "gpt_neox"])
def test_the_loss_of_right_padded_rows_needs_no_padding_mask(architecture):
    # The objective leaves the padding mask out (so attention takes its unmasked causal kernels): its loss
    # and gradients must be those of the forward that is given the mask.
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf.data import collate_sft
    from rlhf.models import kept_logits

    torch.manual_seed(0)
    if architecture.startswith("gpt2"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64))
        model.set_attn_implementation("eager" if architecture.endswith("eager") else "sdpa")
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, num_hidden_layers=2, num_attention_heads=2,
                                                 hidden_size=32, intermediate_size=64, max_position_embeddings=64))
    model.eval()
    examples = random_examples(7, 300, seed=3)
    batch = collate_sft(examples, pad_token_id=5)  # a pad id the rows also use: only the mask could tell them apart
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths
    targets = batch["labels"][:, 1:]
    trained = torch.nn.functional.pad(targets != -100, (0, 1), value=False)
    results = []
    for masked in (True, False):
        model.zero_grad()
        if masked:  # the reference: the forward given the padding mask
            logits = kept_logits(model, batch["input_ids"], batch["attention_mask"], trained)
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets[targets != -100], reduction="sum")
        else:
            loss_sum, _ = LanguageModelingObjective(5).loss_sum(model, batch)
        loss_sum.backward()
        results.append((loss_sum.item(), {name: p.grad.clone() for name, p in model.named_parameters()
                                          if p.grad is not None}))
    (reference, reference_grads), (loss, grads) = results
    assert loss == pytest.approx(reference, rel=1e-5)
    for name, gradient in reference_grads.items():
        torch.testing.assert_close(grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    # Negative control: with the padding on the left, leaving the mask out changes the logits.
    left = {key: torch.stack([row.roll(int((mask == 0).sum())) for row, mask in zip(value, batch["attention_mask"])])
            for key, value in batch.items()}
    keep = torch.nn.functional.pad(left["labels"][:, 1:] != -100, (0, 1), value=False)
    with torch.no_grad():
        difference = (kept_logits(model, left["input_ids"], None, keep)
                      - kept_logits(model, left["input_ids"], left["attention_mask"], keep)).abs().max()
    assert difference > 1e-3


def test_packed_sft_trains_the_loss_curve_of_padded_sft(tokenizer_dir, sft_files, tmp_path):
    train, evaluation = sft_files
    runs = {}
    # Padded; packed; packed through eager attention (model.attn_implementation), the same function again.
    for packing, attention in ((False, None), (True, None), (True, "eager")):
        config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / f"packing-{packing}-{attention}"),
                                 max_steps=6, eval_every=3, packing=packing)
        config.model.attn_implementation = attention
        config.logging.num_samples = 0
        SFTTrainer(config).train()
        runs[packing, attention] = read_metrics(config.output_dir)
    for key in ("loss", "eval/loss", "grad_norm"):
        padded = [m[key] for m in runs[False, None] if key in m]
        for packed_run in (runs[True, None], runs[True, "eager"]):
            packed = [m[key] for m in packed_run if key in m]
            assert len(padded) >= 3 and packed == pytest.approx(padded, rel=1e-4), key
    tokens = [next(m["train_tokens"] for m in run if "train_tokens" in m) for run in runs.values()]
    assert tokens[0] == tokens[1] == tokens[2] > 0  # real tokens counted, not padding


def test_fused_cross_entropy_trains_the_loss_curve_of_the_logits(tokenizer_dir, sft_files, tmp_path):
    # training.fused_cross_entropy: the loss from hidden states and output layer, never the logits; padded and
    # packed batches must train the curves of the plain loss (GPT-2: the output layer tied to the embeddings).
    train, evaluation = sft_files
    runs = {}
    for fused, packing in ((False, False), (True, False), (True, True)):
        config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / f"fused-{fused}-{packing}"),
                                 max_steps=6, eval_every=3, packing=packing, fused_cross_entropy=fused)
        config.logging.num_samples = 0
        SFTTrainer(config).train()
        runs[fused, packing] = read_metrics(config.output_dir)
    for key in ("loss", "eval/loss", "grad_norm"):
        plain = [m[key] for m in runs[False, False] if key in m]
        for run in (runs[True, False], runs[True, True]):
            fused = [m[key] for m in run if key in m]
            assert len(plain) >= 3 and fused == pytest.approx(plain, rel=1e-4), key


@pytest.mark.parametrize("architecture", ["gpt2", "gpt-neox"])
def test_fused_objective_gives_the_loss_and_gradients_of_the_logits(architecture):
    # GPT-NeoX's output layer (embed_out) is its own weight, GPT-2's is the embedding: both get their gradient.
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf.data import collate_sft

    torch.manual_seed(0)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, num_hidden_layers=2, num_attention_heads=2,
                                                 hidden_size=32, intermediate_size=64, max_position_embeddings=64))
    model.eval()  # no dropout: both forwards see the same network
    batch = collate_sft(random_examples(7, 300, seed=4), pad_token_id=5)
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss_sum, stats = LanguageModelingObjective(5, fused=fused).loss_sum(model, batch)
        loss_sum.backward()
        results.append((loss_sum.item(), stats["loss"].item(),
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (plain, _, plain_grads), (fused, fused_stat, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-5) and fused_stat == pytest.approx(fused)
    assert plain_grads.keys() == fused_grads.keys()
    for name, gradient in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: the plain path, no gradients made
        evaluated, _ = LanguageModelingObjective(5, fused=True).loss_sum(model, batch)
        assert evaluated.item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("architecture", ["gpt2", "gpt-neox", "llama"])
def test_a_trimmed_last_block_gives_the_loss_and_gradients_of_the_full_model(architecture):
    # training.trim_last_block: the last block's feed-forward only at the positions that predict a trained token;
    # padded, packed and with the fused cross-entropy, the loss and every gradient of the untrimmed model.
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhf.models import last_feed_forward, trimmable_feed_forward

    torch.manual_seed(0)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64))
    elif architecture == "gpt-neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, num_hidden_layers=2, num_attention_heads=2,
                                                 hidden_size=32, intermediate_size=64, max_position_embeddings=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, hidden_size=32, intermediate_size=64,
                                             max_position_embeddings=64))
    model.eval()  # no dropout: every forward sees the same network
    feed_forward = trimmable_feed_forward(model)
    assert feed_forward is not None and feed_forward is last_feed_forward(model)
    examples = random_examples(7, 300, seed=4)
    trained_targets = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    rows_seen = []
    handle = feed_forward.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[:-1].numel()))
    results = []
    try:
        for trimmed, fused, pack_length in ((None, False, None), (feed_forward, False, None),
                                            (feed_forward, True, None), (feed_forward, False, 40)):
            objective = LanguageModelingObjective(5, pack_length=pack_length, fused=fused,
                                                  trimmed_feed_forward=trimmed)
            model.zero_grad()
            loss_sum, _ = objective.loss_sum(model, objective.collate(examples))
            loss_sum.backward()
            results.append((loss_sum.item(), {name: p.grad.clone() for name, p in model.named_parameters()
                                              if p.grad is not None}))
    finally:
        handle.remove()
    assert rows_seen[0] > trained_targets and rows_seen[1:] == [trained_targets] * 3  # trimmed: trained rows only
    (reference, reference_grads), *others = results
    for loss, grads in others:
        assert loss == pytest.approx(reference, rel=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, gradient in reference_grads.items():
            torch.testing.assert_close(grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_trimmed_sft_trains_the_curves_of_the_untrimmed_model(tokenizer_dir, sft_files, tmp_path):
    train, evaluation = sft_files
    runs = {}
    for trim, checkpointing in ((False, False), (True, False), (True, True)):
        config = tiny_sft_config(tokenizer_dir, train, evaluation, str(tmp_path / f"trim-{trim}-{checkpointing}"),
                                 max_steps=6, eval_every=3, trim_last_block=trim,
                                 gradient_checkpointing=checkpointing)
        config.logging.num_samples = 0
        trainer = SFTTrainer(config)
        trainer.train()
        # Gradient checkpointing recomputes the last block outside the trimming: the trainer leaves it off.
        assert trainer.trims_last_block == (trim and not checkpointing)
        runs[trim, checkpointing] = read_metrics(config.output_dir)
    for key in ("loss", "eval/loss", "grad_norm"):
        untrimmed = [m[key] for m in runs[False, False] if key in m]
        for run in (runs[True, False], runs[True, True]):
            assert len(untrimmed) >= 3 and [m[key] for m in run if key in m] == pytest.approx(untrimmed, rel=1e-4), key


def test_fused_cross_entropy_is_refused_for_a_head_that_changes_its_logits(tokenizer_dir, sft_files, tmp_path):
    class CappedLogits(GPT2LMHeadModel):  # what logit soft-capping (Gemma 2) or a logit scale (Cohere) does
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = 30.0 * torch.tanh(output.logits / 30.0)
            return output

    _, tokenizer = load_causal_lm(tiny_sft_config(tokenizer_dir, "x", None, "y").model)
    model = CappedLogits(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64))
    torch.nn.init.normal_(model.lm_head.weight, std=30.0)  # logits large enough for the cap to show
    train, _ = sft_files
    config = tiny_sft_config(tokenizer_dir, train, None, str(tmp_path / "run"), max_steps=1, fused_cross_entropy=True)
    with pytest.raises(UserError, match=r"^training.fused_cross_entropy: CappedLogits's logits are not its output "
                                        r"layer applied to its last hidden states"):
        SFTTrainer(config, model=model, tokenizer=tokenizer).train()
    assert not os.path.exists(os.path.join(config.output_dir, "final"))


def test_packing_is_refused_for_a_model_that_attends_across_examples(tokenizer_dir, sft_files, tmp_path):
    class IgnoresPositions(GPT2LMHeadModel):  # what remote code written before packed position ids does
        def forward(self, input_ids=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    _, tokenizer = load_causal_lm(tiny_sft_config(tokenizer_dir, "x", None, "y").model)
    model = IgnoresPositions(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64))
    train, _ = sft_files
    config = tiny_sft_config(tokenizer_dir, train, None, str(tmp_path / "run"), max_steps=1, packing=True)
    with pytest.raises(UserError, match=r"^training.packing: IgnoresPositions .* attends across packed examples"):
        SFTTrainer(config, model=model, tokenizer=tokenizer).train()
