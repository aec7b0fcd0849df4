"""The 1B recipe (configs/{sft,rm,ppo}_pythia1b_lora.yaml) end to end on a tiny local GPT-NeoX, Pythia's
architecture: the shipped configs as written, with only the checkpoint, the data files and the sizes
overridden (nothing is downloaded). It checks what the recipe relies on beyond GPT-2: LoRA's default
targets on GPT-NeoX's layers, its scalar head, HH conversations as SFT text, RM comparisons and PPO
prompts, and PPO holding two bases."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import write_jsonl
from rlhf import PPOTrainer, RewardTrainer, SFTTrainer
from rlhf.config import PPOConfig, RewardConfig, SFTConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANIMALS, MOODS = ["cat", "dog", "bird"], ["happy", "sad"]


def hh_rows(count: int, seed: int) -> list[dict]:
    """Anthropic-HH-shaped comparisons: two-turn conversations whose last assistant answers differ."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        animal, mood = rng.choice(ANIMALS), rng.choice(MOODS)
        prompt = (f"\n\nHuman: Tell me about the {animal}.\n\nAssistant: The {animal} is {mood}."
                  f"\n\nHuman: Why?\n\nAssistant:")
        rows.append({"chosen": f"{prompt} Because the {animal} is on the mat.",
                     "rejected": f"{prompt} I do not know."})
    return rows


@pytest.fixture(scope="module")
def tiny_neox(tokenizer_dir, tmp_path_factory) -> str:
    """A randomly initialised GPT-NeoX (2 layers, width 32) with the tests' tokenizer, saved as a hub checkpoint is."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    directory = tmp_path_factory.mktemp("tiny-neox")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(directory)  # Pythia pads its vocabulary too
    tokenizer.save_pretrained(directory)
    return str(directory)


def recipe(config_class, name: str, overrides: list[str]):
    return load_config(config_class, os.path.join(REPO, "configs", name), overrides)


def test_the_1b_recipe_runs_on_a_tiny_gpt_neox(tiny_neox, tmp_path):
    pytest.importorskip("peft")
    train = write_jsonl(tmp_path / "hh_train.jsonl", hh_rows(48, seed=1))
    test = write_jsonl(tmp_path / "hh_test.jsonl", hh_rows(12, seed=2))
    small = ["training.mixed_precision=no", "logging.report_to=[]", "training.save_every=null",
             "training.eval_every=null", "training.lr=1e-2"]
    sft = recipe(SFTConfig, "sft_pythia1b_lora.yaml", [
        f"output_dir={tmp_path / 'sft'}", f"model.name_or_path={tiny_neox}", f"data.path={train}",
        f"data.eval_path={test}", "data.eval_split=train", "training.max_steps=4", "training.batch_size=4",
        "training.gradient_accumulation_steps=1", "logging.num_samples=1", "logging.max_new_tokens=4", *small])
    assert sft.model.lora is not None and sft.training.gradient_checkpointing
    sft_final = SFTTrainer(sft).train()
    assert AutoModelForCausalLM.from_pretrained(sft_final).config.model_type == "gpt_neox"
    adapter = json.load(open(os.path.join(sft_final, "adapter", "adapter_config.json"), encoding="utf-8"))
    # peft's 'all-linear' on GPT-NeoX: the four linear layers of each block, never the output head.
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}

    rm = recipe(RewardConfig, "rm_pythia1b_lora.yaml", [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={sft_final}", f"data.path={train}",
        f"data.eval_path={test}", "data.eval_split=train", "training.max_steps=4", "training.batch_size=4",
        "training.gradient_accumulation_steps=1", "logging.num_samples=0", *small])
    assert rm.data.format == "conversation" and rm.prefix_sharing
    rm_final = RewardTrainer(rm).train()
    assert AutoModelForSequenceClassification.from_pretrained(rm_final).config.rlhf_reward_mean is not None

    ppo = recipe(PPOConfig, "ppo_pythia1b_lora.yaml", [
        f"output_dir={tmp_path / 'ppo'}", f"policy.name_or_path={sft_final}", f"reward.model_path={rm_final}",
        f"data.path={train}", "training.max_steps=2", "ppo.rollout_batch_size=8", "ppo.forward_batch_size=8",
        "ppo.num_minibatches=2", "ppo.num_ppo_epochs=1", "training.batch_size=2", "sampling.max_new_tokens=6",
        "logging.num_samples=1", *small])
    assert ppo.data.format == "conversation"
    trainer = PPOTrainer(ppo)
    final = trainer.train()
    assert trainer.reference is None and trainer.reward_model is None and trainer.reward_in_critic  # two bases
    assert all(text.endswith("\n\nAssistant:") and "on the mat" not in text for text in trainer.prompt_texts)
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "gpt_neox"
    assert os.path.isfile(os.path.join(tmp_path, "ppo", "value_model", "adapter", "adapter_model.safetensors"))
