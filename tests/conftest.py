"""Shared fixtures: a tiny tokenizer trained on the spot, tiny data files, tiny configs. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random

import pytest

# One intra-op thread, set before torch is imported (here and in the CLI subprocesses, which inherit
# it): tiny models gain nothing from more, and on a busy 2-core machine OpenMP spin-waiting makes
# every step several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "happy", "sad", "red", "blue", "big", "small",
         "sun", "moon", "and", "a", "is", "was", "very", "quite", "bird", "tree", "sings", "sleeps"]


def make_rows(count: int, seed: int = 0) -> list[dict]:
    """Prompt/response rows with a learnable rule: the response repeats the prompt's animal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        animal = rng.choice(["cat", "dog", "bird"])
        mood = rng.choice(["happy", "sad"])
        rows.append({"prompt": f"Tell me about the {mood} {animal}.\n",
                     "response": f"The {animal} is very {mood} and sleeps on the mat."})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer with EOS but *no pad token* (the loader must add a dedicated one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + r["response"] for r in make_rows(200)] + [" ".join(WORDS)] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   model_max_length=128)
    fast.save_pretrained(directory)
    return str(directory)


@pytest.fixture()
def sft_files(tmp_path) -> tuple[str, str]:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", make_rows(16, seed=2))
    return train, evaluation


def tiny_sft_config(tokenizer_dir: str, train: str, evaluation: str | None, output_dir: str, **training):
    """An SFTConfig for a 2-layer, width-32 GPT-2 (seconds on CPU)."""
    from rlhf.config import ArchitectureConfig, DataConfig, LoggingConfig, ModelConfig, SFTConfig, TrainingConfig

    training_args = dict(batch_size=8, lr=3e-3, num_epochs=2, log_every=1, lr_scheduler="constant")
    training_args.update(training)
    return SFTConfig(
        output_dir=output_dir,
        model=ModelConfig(from_config=ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64),
                          tokenizer=tokenizer_dir),
        data=DataConfig(path=train, eval_path=evaluation, max_length=64),
        training=TrainingConfig(**training_args),
        logging=LoggingConfig(num_samples=2, max_new_tokens=12),
    )


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound: one torch thread is faster and immune to a busy machine
    (OMP_NUM_THREADS above only applies when the environment does not set it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
