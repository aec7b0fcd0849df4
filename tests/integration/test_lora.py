"""LoRA (through peft) and gradient checkpointing in every stage, on a tiny GPT-2 (2 layers, width 32).

What must hold: only adapter (and scalar-head) weights move; ``final/`` loads in plain transformers
and gives the trained model's outputs; the adapter alone loads with peft onto its base; each stage
takes the previous stage's LoRA output as its input, merged or not; resume is exact; checkpointing
changes memory, not the loss curve.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import make_rows, tiny_sft_config, write_jsonl
from rlhf import SFTTrainer
from rlhf.config import LoraConfig, ModelConfig, NormalizationConfig, PreferenceDataConfig, RewardConfig, TrainingConfig
from rlhf.config import LoggingConfig
from rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
from rlhf.models.lora import adapters_disabled, apply_lora, merged_state_dict
from rlhf.trainers.reward import RewardTrainer

peft = pytest.importorskip("peft")

LORA = LoraConfig(rank=4, alpha=8.0)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def preference_rows(count: int, seed: int) -> list[dict]:
    """Separable comparisons: 'happy' beats 'sad' (as in test_reward.py)."""
    rows = []
    for row in make_rows(count, seed):
        base = row["response"].removesuffix(".")
        rows.append({"prompt": row["prompt"], "chosen": f"{base} and is happy.", "rejected": f"{base} and is sad."})
    return rows


@pytest.fixture(scope="module")
def sft_lora_run(tokenizer_dir, tmp_path_factory):
    """An SFT run with LoRA on a fresh tiny GPT-2, merged final/ plus final/adapter/."""
    root = tmp_path_factory.mktemp("sft-lora")
    train = write_jsonl(root / "train.jsonl", make_rows(64, seed=1))
    evaluation = write_jsonl(root / "eval.jsonl", make_rows(16, seed=2))
    config = tiny_sft_config(tokenizer_dir, train, evaluation, str(root / "run"), lr=2e-2, max_steps=12, eval_every=12)
    config.model.lora = LORA
    initial, _ = load_causal_lm(config.model, seed=config.training.seed)
    final_dir = SFTTrainer(config).train()
    return config, final_dir, initial.state_dict(), root


def test_sft_lora_trains_only_the_adapters_and_final_loads_merged(sft_lora_run, tokenizer_dir):
    config, final_dir, initial, _ = sft_lora_run
    evals = [m["eval/loss"] for m in read_metrics(config.output_dir) if "eval/loss" in m]
    assert evals[-1] < evals[0] - 0.2  # it learned, with the backbone frozen

    adapter_dir = os.path.join(final_dir, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter_dir))
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)  # the adapter file holds adapters only

    merged = AutoModelForCausalLM.from_pretrained(final_dir).eval()  # plain transformers, no peft
    moved = {name for name, value in merged.state_dict().items() if not torch.equal(value, initial[name])}
    assert moved and all(name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for name in moved), moved

    # The adapter on its base (peft's own loading) is the merged checkpoint.
    base, tokenizer = load_causal_lm(config.model, seed=config.training.seed)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = tokenizer(["Tell me about the sad dog.\n"], return_tensors="pt")
    torch.testing.assert_close(with_adapter(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)


def test_adapter_only_final_feeds_the_next_stage(sft_lora_run, tokenizer_dir):
    """save_merged: false writes the adapter alone; the next stage merges it into its base when it loads it."""
    config, merged_final, _, root = sft_lora_run
    config = tiny_sft_config(tokenizer_dir, config.data.path, None, str(root / "adapter-only"), lr=2e-2, max_steps=4)
    config.model.lora = LoraConfig(rank=4, alpha=8.0, save_merged=False)
    base_dir = root / "base"
    base, tokenizer = load_causal_lm(config.model, seed=0)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config.model = ModelConfig(name_or_path=str(base_dir), lora=config.model.lora)
    final_dir = SFTTrainer(config).train()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final_dir))
    assert "config.json" not in os.listdir(final_dir)  # no full weights: this is the small output

    loaded, _ = load_causal_lm(ModelConfig(name_or_path=final_dir))  # what RM and PPO do with it
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final_dir)
    inputs = tokenizer(["Tell me about the red cat.\n"], return_tensors="pt")
    torch.testing.assert_close(loaded.eval()(**inputs).logits, by_peft.eval()(**inputs).logits, atol=1e-5, rtol=0)
    assert not any("lora" in name for name in loaded.state_dict())  # merged: a plain model


def rm_config(tokenizer_dir: str, sft_final: str, root, name: str, **training) -> RewardConfig:
    train = write_jsonl(root / f"{name}-pref.jsonl", preference_rows(48, seed=4))
    evaluation = write_jsonl(root / f"{name}-pref-eval.jsonl", preference_rows(8, seed=5))
    settings = dict(batch_size=8, lr=2e-2, num_epochs=2, log_every=1, lr_scheduler="constant")
    settings.update(training)
    return RewardConfig(output_dir=str(root / name), model=ModelConfig(name_or_path=sft_final, lora=LORA),
                        data=PreferenceDataConfig(path=train, eval_path=evaluation, max_length=64),
                        training=TrainingConfig(**settings), logging=LoggingConfig(num_samples=0),
                        normalization=NormalizationConfig())


def test_rm_lora_trains_adapters_and_head_from_a_lora_sft(sft_lora_run, tokenizer_dir):
    _, sft_final, _, root = sft_lora_run
    config = rm_config(tokenizer_dir, sft_final, root, "rm-lora")
    final_dir = RewardTrainer(config).train()
    metrics = read_metrics(config.output_dir)
    assert [m["eval/accuracy"] for m in metrics if "eval/accuracy" in m][-1] == 1.0

    trained = AutoModelForSequenceClassification.from_pretrained(final_dir)  # merged, plain transformers
    start = load_scalar_model(ModelConfig(name_or_path=sft_final), load_tokenizer(ModelConfig(name_or_path=sft_final)),
                              head_init="normal", seed=config.training.seed).model
    moved = {name for name, value in trained.state_dict().items() if not torch.equal(value, start.state_dict()[name])}
    assert "score.weight" in moved
    assert all(name == "score.weight" or name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
               for name in moved), moved
    adapter = load_file(os.path.join(final_dir, "adapter", "adapter_model.safetensors"))
    assert any(name.endswith("score.weight") for name in adapter)  # the head travels with the adapter
    assert trained.config.rlhf_reward_mean is not None


def test_gradient_checkpointing_leaves_the_loss_curve_unchanged(sft_lora_run, tokenizer_dir):
    config, _, _, root = sft_lora_run
    curves = {}
    for checkpointing in (False, True):
        run = tiny_sft_config(tokenizer_dir, config.data.path, None, str(root / f"gc-{checkpointing}"),
                              max_steps=4, gradient_checkpointing=checkpointing)
        run.logging.num_samples = 0
        model, _ = load_causal_lm(run.model, seed=0)
        calls = []
        if checkpointing:  # prove the blocks really are recomputed: count their forwards
            model.transformer.h[0].register_forward_hook(lambda *args: calls.append(1))
        SFTTrainer(run, model=model, tokenizer=load_tokenizer(run.model)).train()
        curves[checkpointing] = losses(run.output_dir)
        if checkpointing:
            assert len(calls) > 4 * 1  # more forwards than steps (evaluation excluded: none here)
    assert curves[True] == pytest.approx(curves[False], abs=1e-6)
    assert len(curves[True]) == 4


def test_merged_state_dict_equals_peft_merge_and_unload(tokenizer_dir):
    import copy

    from rlhf.models.lora import peft_wrapper_of

    model, tokenizer = load_causal_lm(ModelConfig(from_config=tiny_sft_config(tokenizer_dir, "x", None, "y").model.from_config,
                                                  tokenizer=tokenizer_dir), seed=3)
    apply_lora(model, LORA, "model.lora")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    ours = merged_state_dict(model, model.state_dict())
    theirs = copy.deepcopy(peft_wrapper_of(model)).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=name)
    inputs = tokenizer(["Tell me about the big bird.\n"], return_tensors="pt")
    with adapters_disabled(model):
        off = model(**inputs).logits
    assert not torch.equal(off, model(**inputs).logits)


def test_adapter_only_reward_model_loads_as_a_reward_model_with_its_normalisation(sft_lora_run, tokenizer_dir):
    """An RM final/ with save_merged: false (adapter + head copy + normalisation file) is what PPO and
    `rlhf score` accept as a reward model, scoring as the merged one does."""
    from rlhf.config import LoraConfig as Lora
    from rlhf.models import load_reward_model
    from rlhf.models.lora import REWARD_NORMALIZATION_FILE

    _, sft_final, _, root = sft_lora_run
    scores = {}
    for merged in (True, False):
        config = rm_config(tokenizer_dir, sft_final, root, f"rm-merged-{merged}", max_steps=3)
        config.model.lora = Lora(rank=4, alpha=8.0, save_merged=merged)
        final_dir = RewardTrainer(config).train()
        assert os.path.isfile(os.path.join(final_dir, REWARD_NORMALIZATION_FILE)) != merged
        model_config = ModelConfig(name_or_path=final_dir)
        tokenizer = load_tokenizer(model_config)
        reward_model = load_reward_model(model_config, tokenizer, key="reward.model_path").eval()
        inputs = tokenizer(["Tell me about the red cat.\nThe red cat is happy.<|endoftext|>"], return_tensors="pt")
        with torch.no_grad():
            scores[merged] = reward_model.score(inputs["input_ids"], inputs["attention_mask"])
        assert reward_model.config.rlhf_reward_mean == pytest.approx(read_metrics(config.output_dir)[-1]["normalization/mean"])
    torch.testing.assert_close(scores[False], scores[True], atol=1e-5, rtol=0)


def test_reward_model_gradient_checkpointing_leaves_the_loss_curve_unchanged(sft_lora_run, tokenizer_dir):
    _, sft_final, _, root = sft_lora_run
    curves = {}
    for checkpointing in (False, True):
        config = rm_config(tokenizer_dir, sft_final, root, f"rm-gc-{checkpointing}", max_steps=3,
                           gradient_checkpointing=checkpointing)
        config.prefix_sharing = False  # checkpointing keeps no key/value cache to share
        RewardTrainer(config).train()
        curves[checkpointing] = losses(config.output_dir)
    assert curves[True] == pytest.approx(curves[False], abs=1e-6) and len(curves[True]) == 3


def test_fused_cross_entropy_with_lora_trains_the_loss_curve_of_the_logits(sft_lora_run, tokenizer_dir):
    # Under LoRA the output layer is frozen: the fused loss makes no gradient for it, and the adapters train as before.
    config, _, _, root = sft_lora_run
    curves = {}
    for fused in (False, True):
        run = tiny_sft_config(tokenizer_dir, config.data.path, None, str(root / f"fused-{fused}"), lr=2e-2,
                              max_steps=4, fused_cross_entropy=fused)
        run.model.lora = LORA
        run.logging.num_samples = 0
        SFTTrainer(run).train()
        curves[fused] = [(m["loss"], m["grad_norm"]) for m in read_metrics(run.output_dir) if "loss" in m]
    assert len(curves[True]) == 4
    for (loss, norm), (fused_loss, fused_norm) in zip(curves[False], curves[True]):
        assert fused_loss == pytest.approx(loss, rel=1e-5) and fused_norm == pytest.approx(norm, rel=1e-4)
