"""The reward-model stage on a tiny GPT-2 (2 layers, width 32): objective, padding, training, normalisation, output."""

from __future__ import annotations

import json
import math
import os
import random

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhf.cli import main
from rlhf.config import (
    ArchitectureConfig,
    LoggingConfig,
    ModelConfig,
    NormalizationConfig,
    PreferenceDataConfig,
    RewardConfig,
    TrainingConfig,
)
from rlhf.data import pad_left, pad_right
from rlhf.errors import UserError
from rlhf.models import load_scalar_model, load_tokenizer
from rlhf.preference import (chosen_sequences, collate_preferences, collate_preferences_packed,
                             detect_preference_format, tokenize_preferences)
from rlhf.scoring import encode_pair, load_reward_model, raw_scores, score_file, score_texts
from rlhf.trainers.reward import RewardObjective, RewardTrainer, sequence_rewards
from rlhf.training import as_floats
from tests.conftest import write_jsonl

TINY = ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
ANIMALS, COLORS, PLACES = ["cat", "dog", "bird"], ["red", "blue", "big", "small"], ["mat", "log", "tree"]


def preference_rows(count: int, seed: int) -> list[dict]:
    """Separable comparisons: the chosen response says 'happy', the rejected one 'sad'; otherwise alike."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        animal, color, place = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
        verb = rng.choice(["sat", "ran", "sleeps"])
        base = f"The {color} {animal} {verb} on the {place}"
        rows.append({"prompt": f"Tell me about the {color} {animal} on the {place}.\n",
                     "chosen": f"{base} and is very happy.", "rejected": f"{base} and is very sad."})
    return rows


def tiny_rm_config(tokenizer_dir: str, train: str, evaluation: str | None, output_dir: str,
                   normalization: NormalizationConfig | None = None, **training) -> RewardConfig:
    training_args = dict(batch_size=8, lr=3e-3, num_epochs=3, log_every=1, lr_scheduler="constant")
    training_args.update(training)
    return RewardConfig(
        output_dir=output_dir,
        model=ModelConfig(from_config=TINY, tokenizer=tokenizer_dir),
        data=PreferenceDataConfig(path=train, eval_path=evaluation, max_length=64),
        training=TrainingConfig(**training_args),
        logging=LoggingConfig(num_samples=2),
        normalization=normalization or NormalizationConfig(),
    )


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def tiny_model(tokenizer_dir):
    tokenizer = load_tokenizer(ModelConfig(from_config=TINY, tokenizer=tokenizer_dir))
    model = load_scalar_model(ModelConfig(from_config=TINY, tokenizer=tokenizer_dir), tokenizer, seed=3)
    model.eval()
    return model, tokenizer


def examples_of(rows, tokenizer):
    data = datasets.Dataset.from_list(rows)
    examples, _ = tokenize_preferences(data, tokenizer, detect_preference_format(data, "auto", "rows"), 64, "rows")
    return examples


@pytest.fixture(scope="module")
def trained_rm(tokenizer_dir, tmp_path_factory):
    """One RM trained on the separable set, with a fitted gain (scale) so both statistics can be checked."""
    root = tmp_path_factory.mktemp("rm")
    train = write_jsonl(root / "train.jsonl", preference_rows(96, seed=1))
    evaluation = write_jsonl(root / "eval.jsonl", preference_rows(24, seed=2))
    config = tiny_rm_config(tokenizer_dir, train, evaluation, str(root / "run"),
                            normalization=NormalizationConfig(set="eval", scale=True))
    final_dir = RewardTrainer(config).train()
    return config, final_dir, evaluation


# ----------------------------------------------------------------------------- the objective (docs/ppo.md#oracle-8)

def test_objective_weighs_prompts_not_pairs(tiny_model):
    model, tokenizer = tiny_model
    ranked = examples_of([{"prompt": "Rank these.\n", "responses": ["the cat", "a dog is big", "sun"],
                           "ranking": [1, 0, 2]}], tokenizer)
    paired = examples_of([{"prompt": "Pick one.\n", "chosen": "the red bird", "rejected": "moon"}], tokenizer)
    objective = RewardObjective(tokenizer.pad_token_id)
    batch = objective.collate(ranked + paired)
    with torch.no_grad():
        loss_sum, stats = objective.loss_sum(model, batch)
        # Oracle: each response scored alone, unpadded; prompt loss = mean over its pairs of −log σ(Δ).
        alone = [model.raw_score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                 for s in ranked[0]["sequences"] + paired[0]["sequences"]]
    pair_loss = lambda b, w: math.log1p(math.exp(-(alone[b] - alone[w])))  # noqa: E731
    ranking_loss = sum(pair_loss(b, w) for b, w in ranked[0]["pairs"]) / 3
    single_loss = pair_loss(3, 4)
    assert objective.count_units(batch) == 2
    units_loss = loss_sum.item() / objective.count_units(batch)
    assert units_loss == pytest.approx((ranking_loss + single_loss) / 2, abs=1e-5)
    per_pair = (3 * ranking_loss + single_loss) / 4
    assert abs(units_loss - per_pair) > 1e-3  # the weighting matters on this batch
    metrics = objective.summarize(stats, objective.count_units(batch))
    scores_c = [alone[b] for b, _ in ranked[0]["pairs"]] + [alone[3]]
    scores_r = [alone[w] for _, w in ranked[0]["pairs"]] + [alone[4]]
    assert metrics["accuracy"] == pytest.approx(sum(c > r for c, r in zip(scores_c, scores_r)) / 4)
    assert metrics["margin"] == pytest.approx(sum(c - r for c, r in zip(scores_c, scores_r)) / 4, abs=1e-5)
    assert metrics["reward/chosen_mean"] == pytest.approx(sum(scores_c) / 4, abs=1e-5)
    # Split over two micro-batches (accumulation), the prompt-sums add up to the same step loss.
    with torch.no_grad():
        first, _ = objective.loss_sum(model, objective.collate(ranked))
        second, _ = objective.loss_sum(model, objective.collate(paired))
    assert (first + second).item() / 2 == pytest.approx(units_loss, abs=1e-6)


def test_centering_adds_the_weighted_squared_prompt_mean_and_reports_it(tiny_model):
    model, tokenizer = tiny_model
    ranked = examples_of([{"prompt": "Rank these.\n", "responses": ["the cat", "a dog is big", "sun"],
                           "ranking": [1, 0, 2]}], tokenizer)
    paired = examples_of([{"prompt": "Pick one.\n", "chosen": "the red bird", "rejected": "moon"}], tokenizer)
    plain, centred = RewardObjective(tokenizer.pad_token_id), RewardObjective(tokenizer.pad_token_id,
                                                                              center_rewards_coef=0.5)
    batch = plain.collate(ranked + paired)
    with torch.no_grad():
        plain_sum, plain_stats = plain.loss_sum(model, batch)
        centred_sum, centred_stats = centred.loss_sum(model, batch)
        alone = [model.raw_score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                 for s in ranked[0]["sequences"] + paired[0]["sequences"]]
    # Oracle: prompt 1's mean over its 3 responses, prompt 2's over its 2; the penalty is the mean square.
    means = [sum(alone[:3]) / 3, (alone[3] + alone[4]) / 2]
    penalty = (means[0] ** 2 + means[1] ** 2) / 2
    assert centred_sum.item() / 2 == pytest.approx(plain_sum.item() / 2 + 0.5 * penalty, abs=1e-5)
    # "loss" stays the ranking loss; the penalty is reported apart.
    metrics = centred.summarize(centred_stats, 2)
    assert metrics["loss"] == pytest.approx(plain.summarize(plain_stats, 2)["loss"], abs=1e-6)
    assert metrics["centering"] == pytest.approx(penalty, abs=1e-5)
    assert "centering" not in plain.summarize(plain_stats, 2)


def test_equal_scores_give_log2_and_margin_shifts_the_pair(tiny_model):
    model, tokenizer = tiny_model
    # The same response text twice under different prompts is fine; identical *pairs* are dropped,
    # so build equal scores with a zero head instead.
    examples = examples_of([{"prompt": "p\n", "chosen": "the cat", "rejected": "the dog", "margin": 1.0}], tokenizer)
    objective = RewardObjective(tokenizer.pad_token_id)
    head = model.head.weight.detach().clone()
    try:
        model.head.weight.data.zero_()
        batch = objective.collate(examples)
        loss_sum, _ = objective.loss_sum(model, batch)
        assert loss_sum.item() == pytest.approx(math.log1p(math.e), abs=1e-6)  # −log σ(0 − 1) = log(1 + e)
        batch["margins"].zero_()
        loss_sum, _ = objective.loss_sum(model, batch)
        assert loss_sum.item() == pytest.approx(math.log(2), abs=1e-7)
    finally:
        model.head.weight.data.copy_(head)


def test_built_model_has_dropout_off_a_normal_head_and_a_pad_token(tokenizer_dir, tmp_path):
    config = tiny_rm_config(tokenizer_dir, "unused.jsonl", None, str(tmp_path / "run"))
    config.model.from_config = ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, dropout=0.3)
    model, tokenizer = RewardTrainer(config).build_model()
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    model.train()  # dropout off (docs/ppo.md#7): train mode is deterministic
    ids = torch.tensor([[5, 6, 7, tokenizer.eos_token_id]])
    mask = torch.ones_like(ids)
    assert torch.equal(model.raw_score(ids, mask), model.raw_score(ids, mask))
    # Head N(0, 1/sqrt(d+1)) (docs/ppo.md#3): 32 weights, std 1/sqrt(33) ≈ 0.174
    assert 0.08 < model.head.weight.std().item() < 0.3 and model.head.weight.shape == (1, 32)


def test_head_init_keep_continues_a_reward_model_and_refuses_a_causal_lm(trained_rm, tokenizer_dir, tmp_path):
    config, final_dir, evaluation = trained_rm
    continued = tiny_rm_config(tokenizer_dir, config.data.path, evaluation, str(tmp_path / "continued"))
    continued.model = ModelConfig(name_or_path=final_dir)
    continued.head_init = "keep"
    model, _ = RewardTrainer(continued).build_model()
    trained = AutoModelForSequenceClassification.from_pretrained(final_dir)
    assert torch.equal(model.head.weight, trained.score.weight)  # the trained head, not a new draw
    # ... so the continued run starts where the trained one ended (step-0 eval accuracy), unlike a new head
    continued.training = TrainingConfig(batch_size=8, lr=1e-4, max_steps=1, log_every=1, eval_every=1)
    RewardTrainer(continued).train()
    first_eval = [m for m in read_metrics(continued.output_dir) if "eval/accuracy" in m][0]
    assert first_eval["step"] == 0 and first_eval["eval/accuracy"] >= 0.9

    # a causal LM has no trained head to keep: one clear line naming the key
    lm_dir = str(tmp_path / "lm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_config(trained.config).save_pretrained(lm_dir)
    AutoTokenizer.from_pretrained(final_dir).save_pretrained(lm_dir)
    continued.model = ModelConfig(name_or_path=lm_dir)
    with pytest.raises(UserError, match=r"model.name_or_path: head_init=keep .*GPT2LMHeadModel"):
        RewardTrainer(continued).build_model()
    with pytest.raises(UserError, match=r"is not a reward model .*GPT2LMHeadModel"):  # the same check when scoring
        load_reward_model(lm_dir)
    fresh = tiny_rm_config(tokenizer_dir, config.data.path, None, str(tmp_path / "fresh"))
    fresh.head_init = "keep"
    with pytest.raises(UserError, match="head_init: keep needs a trained reward model"):
        fresh.validate()


# ----------------------------------------------------------------------------- the score (docs/ppo.md#oracle-9)

def test_score_ignores_padding_side_amount_and_tokens_after_the_last_valid_one(tiny_model):
    model, tokenizer = tiny_model
    examples = examples_of([{"prompt": "Rank these.\n", "responses": ["the cat", "a dog is big and red", "sun"],
                             "ranking": [1, 0, 2]}], tokenizer)
    examples += examples_of([{"prompt": "Tell me about the happy bird on the log.\n", "chosen": "ok",
                              "rejected": "The bird is sad."}], tokenizer)
    batch = collate_preferences(examples, tokenizer.pad_token_id)
    sequences = [s for e in examples for s in e["sequences"]]
    with torch.no_grad():
        right = sequence_rewards(model, batch)
        # Prefix sharing: each prompt once (left-padded), the responses on its cache.
        shared = sequence_rewards(model, collate_preferences(examples, tokenizer.pad_token_id, share_prompt=True))
        alone = torch.stack([model.raw_score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in sequences])
        left = sequence_rewards(model, {"input_ids": pad_left(sequences, tokenizer.pad_token_id),
                                        "attention_mask": pad_left([[1] * len(s) for s in sequences], 0)})
        extra = 7  # more right padding, and garbage (random ids) instead of pad ids after the last token
        input_ids = torch.cat([batch["input_ids"], torch.full((len(sequences), extra), tokenizer.pad_token_id)], 1)
        attention_mask = torch.cat([batch["attention_mask"], torch.zeros(len(sequences), extra, dtype=torch.long)], 1)
        garbage = torch.randint(0, len(tokenizer), input_ids.shape, generator=torch.Generator().manual_seed(0))
        input_ids = torch.where(attention_mask.bool(), input_ids, garbage)
        noisy = sequence_rewards(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    assert len({len(s) for s in sequences}) > 1  # the batch really is padded
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(noisy, alone, atol=1e-5, rtol=0)
    assert raw_scores(model, sequences, tokenizer.pad_token_id, batch_size=2) == pytest.approx(alone.tolist(), abs=1e-5)


# ----------------------------------------------------------------------------- training

def test_tiny_rm_learns_a_separable_preference(trained_rm):
    config, final_dir, _ = trained_rm
    metrics = read_metrics(config.output_dir)
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["eval/accuracy"] >= 0.9
    train = [m for m in metrics if "loss" in m]
    assert train[-1]["loss"] < train[0]["loss"] and {"accuracy", "margin", "reward/chosen_mean",
                                                     "reward/rejected_std", "tokens_per_s"} <= set(train[-1])
    last = evals[-1]
    assert last["eval/margin"] > 0 and last["eval/reward/chosen_mean"] > last["eval/reward/rejected_mean"]
    assert any("normalization/mean" in m for m in metrics)
    samples = [json.loads(line) for line in open(os.path.join(config.output_dir, "samples.jsonl"), encoding="utf-8")]
    assert samples and samples[0]["chosen_reward"] > samples[0]["rejected_reward"]


def test_centering_coefficient_pulls_each_prompts_reward_level_to_zero(tokenizer_dir, tmp_path):
    # The ranking loss leaves each prompt's level free; the auxiliary term should shrink the
    # prompts' mean raw rewards without costing the ranking (the same run with coefficient 0 as control).
    rows = preference_rows(96, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    levels, accuracies = {}, {}
    for coef in (0.0, 1.0):
        config = tiny_rm_config(tokenizer_dir, train, None, str(tmp_path / f"run-{coef}"),
                                normalization=NormalizationConfig(set="none"))
        config.data.eval_fraction = 0.0
        config.center_rewards_coef = coef
        final_dir = RewardTrainer(config).train()
        model, tokenizer = load_reward_model(final_dir)
        with torch.no_grad():
            chosen = torch.tensor(score_texts(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows]))
            rejected = torch.tensor(score_texts(model, tokenizer, [r["prompt"] for r in rows],
                                                [r["rejected"] for r in rows]))
        levels[coef] = ((chosen + rejected) / 2).square().mean().item()
        accuracies[coef] = (chosen > rejected).float().mean().item()
        logged = [m for m in read_metrics(config.output_dir) if "loss" in m]
        assert ("centering" in logged[-1]) == (coef > 0)
    assert accuracies[1.0] >= 0.9 and accuracies[0.0] >= 0.9
    assert levels[1.0] < 0.1 * levels[0.0]


def test_reward_is_centred_and_scaled_on_the_normalisation_set(trained_rm, tokenizer_dir):
    config, final_dir, evaluation = trained_rm
    model, tokenizer = load_reward_model(final_dir)
    assert model.config.rlhf_reward_std != 1.0
    data = datasets.load_dataset("json", data_files=evaluation, split="train")
    examples, _ = tokenize_preferences(data, tokenizer, "pairwise", 64, evaluation)
    scores = model.normalize(torch.tensor(raw_scores(model, chosen_sequences(examples), tokenizer.pad_token_id),
                                          dtype=torch.float64))
    assert abs(scores.mean().item()) < 1e-5
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_final_loads_in_plain_transformers_with_the_same_score(trained_rm):
    config, final_dir, _ = trained_rm
    prompts = ["Tell me about the red cat on the mat.\n", "Tell me about the big dog on the log.\n", "Hi.\n"]
    responses = ["The red cat sat on the mat and is very happy.", "The big dog ran and is very sad.", "x"]
    model, tokenizer = load_reward_model(final_dir)
    ours = score_texts(model, tokenizer, prompts, responses)
    plain = AutoModelForSequenceClassification.from_pretrained(final_dir).eval()
    sequences = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    with torch.no_grad():  # right padding: transformers reads the rightmost non-pad token, our EOS
        logits = plain(input_ids=pad_right(sequences, tokenizer.pad_token_id),
                       attention_mask=pad_right([[1] * len(s) for s in sequences], 0)).logits[:, 0]
    mean, std = plain.config.rlhf_reward_mean, plain.config.rlhf_reward_std
    torch.testing.assert_close(((logits.double() - mean) / std), torch.tensor(ours, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert ours[0] > ours[1]  # happy beats sad


def test_score_command_scores_a_file(trained_rm, tmp_path, capsys):
    _, final_dir, _ = trained_rm
    rows = [{"prompt": "Tell me about the red cat on the mat.\n", "response": text}
            for text in ("The red cat sat on the mat and is very happy.",
                         "The red cat sat on the mat and is very sad.")]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = str(tmp_path / "scores.jsonl")
    assert main(["score", "--model", final_dir, "--data", data, "--output", output]) == 0
    scored = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert [r["response"] for r in scored] == [r["response"] for r in rows]
    assert scored == [dict(r, score=pytest.approx(s["score"])) for r, s in zip(rows, score_file(final_dir, data))]
    assert scored[0]["score"] > scored[1]["score"]
    assert main(["score", "--model", final_dir, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "rlhf score: error: --data: file" in capsys.readouterr().err
    # --device: where the model runs; a device this machine lacks is one line, not a traceback.
    on_cpu = str(tmp_path / "cpu.jsonl")
    assert main(["score", "--model", final_dir, "--data", data, "--output", on_cpu, "--device", "cpu"]) == 0
    assert [json.loads(line) for line in open(on_cpu, encoding="utf-8")] == scored
    for device, expected in (("gpu0", "'gpu0' is not a device"), ("cuda:7", "'cuda:7' requested")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        assert main(["score", "--model", final_dir, "--data", data, "--device", device]) == 2
        assert f"rlhf score: error: --device: {expected}" in capsys.readouterr().err


def test_score_device_defaults_to_the_accelerator():
    from accelerate import PartialState

    from rlhf.scoring import resolve_device

    assert resolve_device(None) == PartialState().device
    assert resolve_device("cpu") == torch.device("cpu")


def test_resume_gives_bitwise_the_uninterrupted_final(tokenizer_dir, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(48, seed=4))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", preference_rows(8, seed=5))
    settings = dict(num_epochs=2, save_every=2, lr_scheduler="cosine", warmup_ratio=0.2)  # 6 steps
    unbroken = RewardTrainer(tiny_rm_config(tokenizer_dir, train, evaluation, str(tmp_path / "a"), **settings)).train()

    import rlhf.training as training

    save_checkpoint = training.save_checkpoint

    def save_then_die(accelerator, run, state, keep):
        path = save_checkpoint(accelerator, run, state, keep)
        if state.step == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint
        return path

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    broken_config = tiny_rm_config(tokenizer_dir, train, evaluation, str(tmp_path / "b"), **settings)
    with pytest.raises(KeyboardInterrupt):
        RewardTrainer(broken_config).train()
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    assert not os.path.exists(broken_config.output_dir + "/final")
    resumed = RewardTrainer(broken_config).train(resume=True)

    expected = load_file(os.path.join(unbroken, "model.safetensors"))
    actual = load_file(os.path.join(resumed, "model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with open(os.path.join(unbroken, "config.json")) as a, open(os.path.join(resumed, "config.json")) as b:
        config_a, config_b = json.load(a), json.load(b)
    assert config_a["rlhf_reward_mean"] == config_b["rlhf_reward_mean"] and config_a["rlhf_reward_std"] == 1.0
    steps = [m["step"] for m in read_metrics(broken_config.output_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 4: nothing logged twice, nothing repeated


def test_trainer_takes_model_tokenizer_and_datasets_as_objects(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # no pad token: the trainer adds one
    model = load_scalar_model(ModelConfig(from_config=TINY, tokenizer=tokenizer_dir), load_tokenizer(
        ModelConfig(from_config=TINY, tokenizer=tokenizer_dir)))
    config = tiny_rm_config(tokenizer_dir, "", None, str(tmp_path / "run"), num_epochs=1)
    config.model = ModelConfig()  # nothing to load: the model is given
    trainer = RewardTrainer(config, model=model, tokenizer=tokenizer,
                            train_dataset=datasets.Dataset.from_list(preference_rows(16, seed=6)),
                            eval_dataset=datasets.Dataset.from_list(preference_rows(4, seed=7)))
    final_dir = trainer.train()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert AutoModelForSequenceClassification.from_pretrained(final_dir).config.rlhf_reward_std == 1.0


# ----------------------------------------------------------------------------- padding-free batches (training.packing)

def random_preference_examples(count: int, vocab: int, seed: int) -> list[dict]:
    """Examples of random ids: prompts of 1..8 tokens, 2 or 3 responses of 1..12, all pairs of a ranking, margins."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    examples = []
    for _ in range(count):
        prompt = torch.randint(vocab, (draw(1, 9),), generator=generator).tolist()
        sequences = [prompt + torch.randint(vocab, (draw(1, 13),), generator=generator).tolist()
                     for _ in range(draw(2, 4))]
        pairs = [[better, worse] for better in range(len(sequences)) for worse in range(better + 1, len(sequences))]
        examples.append({"sequences": sequences, "prompt_length": len(prompt), "pairs": pairs,
                         "margins": [0.25 * i for i in range(len(pairs))]})
    return examples


@pytest.mark.parametrize("architecture", ["gpt2", "gpt2-eager", "gpt_neox", "llama"])
def test_a_packed_batch_gives_every_response_the_reward_and_gradient_of_the_padded_batch(architecture):
    """Padded, prefix-shared and packed batches, each with the last block trimmed (``trim_last_block``) and
    without, give the rewards of the sequences run alone and the loss and gradients of the padded batch."""
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification,
                              LlamaConfig, LlamaForSequenceClassification)

    from rlhf.models import ScalarHeadModel, check_segment_mask_support

    torch.manual_seed(0)
    if architecture.startswith("gpt2"):
        config = GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64, num_labels=1,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        hf_model = GPT2ForSequenceClassification._from_config(  # eager: the mask is added to the scores
            config, attn_implementation="eager" if architecture.endswith("eager") else "sdpa")
    elif architecture == "gpt_neox":  # rotary positions: a shared prompt's responses must continue its positions
        hf_model = GPTNeoXForSequenceClassification(GPTNeoXConfig(
            vocab_size=300, num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
            max_position_embeddings=64, num_labels=1, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:  # gated feed-forward, RMSNorm
        hf_model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=300, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
            intermediate_size=64, max_position_embeddings=64, num_labels=1, bos_token_id=1, eos_token_id=2,
            pad_token_id=0))
    model = ScalarHeadModel(hf_model)
    model.init_head("normal")
    model.eval()  # no dropout: every batch must see the same function
    check_segment_mask_support(model)
    examples = random_preference_examples(7, 300, seed=1)
    capacity = 64
    padded = collate_preferences(examples, pad_token_id=0)
    for share_prompt in (False, True):
        packed = collate_preferences_packed(examples, pad_token_id=0, capacity=capacity, share_prompt=share_prompt)
        assert 1 < packed["input_ids"].shape[0] < len(examples)  # several examples per row, several rows
        assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1]
                             for e in examples for s in e["sequences"]])

    # The objective the trainer minimises: the same loss, the same gradient, packed or padded, trimmed or not.
    results = []
    for trimmed in (False, True):
        assert not trimmed or model.trim_last_block()
        assert model.trims_last_block == trimmed
        for share_prompt, pack_length in ((False, None), (True, None), (False, capacity), (True, capacity)):
            objective = RewardObjective(0, share_prompt, center_rewards_coef=0.1, pack_length=pack_length)
            batch = objective.collate(examples)
            with torch.no_grad():
                torch.testing.assert_close(sequence_rewards(model, batch), alone, atol=1e-5, rtol=0)
            model.zero_grad()
            loss_sum, stats = objective.loss_sum(model, batch)
            loss_sum.backward()
            assert objective.count_units(batch) == len(examples)
            results.append((loss_sum.item(), as_floats(stats),
                            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    reference_loss, reference_stats, reference_gradients = results[0]
    for loss, stats, gradients in results[1:]:
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert stats == pytest.approx(reference_stats, rel=1e-4, abs=1e-5)
        assert gradients.keys() == reference_gradients.keys()
        for name, reference in reference_gradients.items():  # rounding scales with a tensor's largest entries
            torch.testing.assert_close(gradients[name], reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()),
                                       msg=name)


def test_packed_rm_trains_the_curves_of_padded_rm(tokenizer_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(64, seed=8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, seed=9))
    runs = {}
    # Packed, prefix sharing needs no key/value cache, so it also runs with gradient checkpointing.
    # The last run, padded with the last block untrimmed, is the reference the others (trimmed) must train like.
    for packing, prefix_sharing, checkpointing, trim in ((False, True, False, True), (True, True, False, True),
                                                         (True, False, False, True), (True, True, True, True),
                                                         (False, True, False, False)):
        # lr 3e-4: at 3e-3 Adam amplifies the float rounding between any two layouts of a batch (padded with and
        # without prefix sharing too) past 1e-4 within six steps.
        name = f"run-{packing}-{prefix_sharing}-{checkpointing}-{trim}"
        config = tiny_rm_config(tokenizer_dir, train, evaluation, str(tmp_path / name), max_steps=6, eval_every=3,
                                packing=packing, lr=3e-4, gradient_checkpointing=checkpointing)
        # Rows of 128 tokens hold about three prompts with their two responses each.
        config.model.from_config = ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128)
        config.data.max_length = 128
        config.prefix_sharing = prefix_sharing
        config.training.trim_last_block = trim
        config.logging.num_samples = 0
        config.validate()  # the check the trainer runs: sharing with checkpointing is accepted when packed
        trainer = RewardTrainer(config)
        trainer.train()
        # Gradient checkpointing recomputes the last block outside the trimming: the trainer leaves it off.
        assert trainer.model.trims_last_block == (trim and not checkpointing)
        runs[packing, prefix_sharing, checkpointing, trim] = read_metrics(config.output_dir)
    reference = runs.pop((False, True, False, False))
    for key in ("loss", "accuracy", "grad_norm", "eval/loss", "eval/accuracy"):
        expected = [m[key] for m in reference if key in m]
        assert len(expected) >= 3, key
        for run in runs.values():
            assert [m[key] for m in run if key in m] == pytest.approx(expected, rel=1e-4), key
    tokens = {run: next(m["train_tokens"] for m in metrics if "train_tokens" in m) for run, metrics in runs.items()}
    # real tokens: each prompt once when shared
    assert tokens[True, True, False, True] == tokens[False, True, False, True] < tokens[True, False, False, True]


def test_packing_is_refused_for_a_model_that_ignores_the_4d_mask(tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    class IgnoresMasks(GPT2Model):  # what attention that drops a custom 4D mask does (flash attention, remote code)
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    tokenizer = load_tokenizer(ModelConfig(from_config=TINY, tokenizer=tokenizer_dir))
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config)
    model.transformer = IgnoresMasks(config)
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(16, seed=1))
    config = tiny_rm_config(tokenizer_dir, train, None, str(tmp_path / "run"), max_steps=1, packing=True)
    config.model = ModelConfig()  # nothing to load: the model is given
    with pytest.raises(UserError, match=r"^training.packing: IgnoresMasks .* does not keep packed examples apart"):
        RewardTrainer(config, model=model, tokenizer=tokenizer).train()


def test_cli_bad_column_is_one_line_and_exit_2(tokenizer_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(8, seed=1))
    config_path = tmp_path / "rm.yaml"
    config_path.write_text(json.dumps({
        "output_dir": str(tmp_path / "run"),
        "model": {"from_config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64},
                  "tokenizer": tokenizer_dir},
        "data": {"path": train, "columns": {"chosen": "better"}},
    }), encoding="utf-8")
    assert main(["rm", "--config", str(config_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # rlhf's own progress lines may come first (the model was built); the error is one line, the last.
    assert "Traceback" not in "\n".join(lines) and all(" INFO rlhf." in line for line in lines[:-1])
    assert lines[-1].startswith("rlhf rm: error: data.columns.chosen: column 'better' not found")
