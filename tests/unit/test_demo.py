"""The demo task: grammar, gold scorer, labeler, demonstrator and the shipped data set."""

import hashlib
import json
import math
import random
import string
from pathlib import Path

import pytest

from rlhf.demo import build, compare, gold_reward, gold_score, label_pairs, parse_prompt, rank
from rlhf.demo import grammar
from rlhf.demo.demonstrator import demonstrate, write_response
from rlhf.demo.gold import gold_terms
from rlhf.demo.labeler import DEFAULT_NOISE_TEMPERATURE, prefer_probability

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"
JSONL_FILES = [
    "sft_train.jsonl", "sft_eval.jsonl", "prompts_train.jsonl",
    "prompts_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl",
]
TRAIN_FILES = ["sft_train.jsonl", "prompts_train.jsonl", "pref_train.jsonl"]
EVAL_FILES = ["sft_eval.jsonl", "prompts_eval.jsonl", "pref_eval.jsonl"]
# Agreement of the shipped noisy labels with the noiseless gold preference (labeler.py).
AGREEMENT_BAND = (0.80, 0.90)

CHEERFUL_HARBOR = "Write a cheerful note about the old harbor.\n"
PERFECT = "The old harbor is bright and sunny."  # on topic, all words at +0.8, one sentence


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------
# Grammar
# ------------------------------------------------------------------------------------

def test_parse_prompt_round_trips_every_combination():
    combos = grammar.all_combos()
    assert len(combos) == len(grammar.SUBJECTS) * len(grammar.TONES) * len(grammar.PHRASINGS)
    for subject, tone, phrasing in combos:
        prompt = grammar.render_prompt(subject, tone, phrasing)
        assert prompt.endswith("\n") and not prompt.endswith("\n\n")
        assert parse_prompt(prompt) == (subject, tone)
        assert parse_prompt(prompt.strip()) == (subject, tone)


@pytest.mark.parametrize("not_a_prompt", ["", "hello", "Write a cheerful note about the moon.\n"])
def test_parse_prompt_rejects_text_outside_the_language(not_a_prompt):
    with pytest.raises(ValueError, match="not a demo prompt"):
        parse_prompt(not_a_prompt)


def test_split_is_fixed_and_covers_every_subject_tone_and_phrasing_in_train():
    train, held_out = grammar.train_combos(), grammar.held_out_combos()
    assert set(train).isdisjoint(held_out)
    assert len(train) + len(held_out) == len(grammar.all_combos())
    assert 0.10 < len(held_out) / len(grammar.all_combos()) < 0.20
    assert {subject for subject, _, _ in train} == set(grammar.SUBJECTS)
    assert {tone for _, tone, _ in train} == set(grammar.TONES)
    assert {phrasing for _, _, phrasing in train} == set(grammar.PHRASINGS)


def test_lexicon_tags_only_response_words():
    assert all(-1.0 <= valence <= 1.0 for valence in grammar.LEXICON.values())
    for subject in grammar.SUBJECTS:
        # Naming the subject must not change the tone, nor count as a repetition.
        words = grammar.subject_words(subject)
        assert not set(words) & set(grammar.LEXICON), subject
        assert len(set(words)) == len(words), subject
    assert not set(grammar.TONES) & set(grammar.LEXICON)
    assert not grammar.FUNCTION_WORDS & set(grammar.LEXICON)


# ------------------------------------------------------------------------------------
# Gold scorer
# ------------------------------------------------------------------------------------

def test_gold_perfect_response_scores_one():
    assert gold_terms(CHEERFUL_HARBOR, PERFECT) == {
        "subject": 1.0, "tone": 1.0, "concise": 1.0, "no_repeat": 1.0, "ends": 1.0,
    }
    assert gold_score(CHEERFUL_HARBOR, PERFECT) == 1.0


def test_gold_prefers_on_topic_to_off_topic():
    off_topic = "The stone bridge is bright and sunny."
    also_names_another = "The old harbor is bright. The stone bridge is sunny."
    # subject term: 1 -> -1 costs 0.3 * 2; naming another subject too costs 0.3.
    assert gold_score(CHEERFUL_HARBOR, off_topic) == pytest.approx(0.4)
    assert gold_score(CHEERFUL_HARBOR, also_names_another) == pytest.approx(0.7)


def test_gold_prefers_right_tone_to_neighbouring_to_opposite():
    right = gold_score(CHEERFUL_HARBOR, PERFECT)
    neighbouring = gold_score(CHEERFUL_HARBOR, "The old harbor is warm and gentle.")  # +0.4
    opposite = gold_score(CHEERFUL_HARBOR, "The old harbor is bleak and grim.")  # -0.8
    no_tone = gold_score(CHEERFUL_HARBOR, "The old harbor.")
    assert right > neighbouring > opposite
    # tone term: 1, then 0 (0.4 away), then -1 (clipped); no tagged word counts as 0.
    assert neighbouring == pytest.approx(0.7)
    assert opposite == pytest.approx(0.4)
    assert no_tone == pytest.approx(0.7)
    gloomy_harbor = "Describe the old harbor in a gloomy way.\n"
    assert gold_score(gloomy_harbor, "The old harbor is bleak and grim.") == 1.0


def test_gold_penalises_repeated_words():
    varied = "The old harbor is bright. It is sunny."
    repeated = "The old harbor is bright. The old harbor is bright."
    assert gold_score(CHEERFUL_HARBOR, varied) == 1.0
    # "old", "harbor", "bright" repeated: no_repeat = 1 - 3 * 0.5 = -0.5, costs 0.15 * 1.5.
    assert gold_score(CHEERFUL_HARBOR, repeated) == pytest.approx(1.0 - 0.225)
    # Function words ("it", "is", "and", "the") may repeat freely.
    assert gold_terms(CHEERFUL_HARBOR, "The old harbor is bright. It is sunny. It is merry.")["no_repeat"] == 1.0


def test_gold_penalises_a_missing_final_period():
    assert gold_score(CHEERFUL_HARBOR, PERFECT[:-1]) == pytest.approx(1.0 - 0.2)
    for improper in [PERFECT + " ", PERFECT[:-1] + "..", PERFECT[:-1] + " ."]:
        assert gold_terms(CHEERFUL_HARBOR, improper)["ends"] == -1.0, improper


def test_gold_penalises_length_beyond_two_sentences():
    two = "The old harbor is bright. It is sunny."
    three = "The old harbor is bright. It is sunny. It sparkles happily."
    five = three + " The air feels radiant. Everything around it dances merrily."
    assert gold_score(CHEERFUL_HARBOR, two) > gold_score(CHEERFUL_HARBOR, three) > gold_score(CHEERFUL_HARBOR, five)
    # 20 words and 5 sentences: 1 - 0.1 * 4 - 1.0 * 3, clipped at -1.
    assert gold_terms(CHEERFUL_HARBOR, five)["concise"] == -1.0


def test_gold_ignores_decoded_special_tokens():
    assert gold_score(CHEERFUL_HARBOR, PERFECT + "<|endoftext|><|pad|><|pad|>") == 1.0
    assert gold_score(CHEERFUL_HARBOR, PERFECT + "<|endoftext|> anything after the EOS") == 1.0
    assert gold_score("<|pad|><|pad|>" + CHEERFUL_HARBOR, PERFECT) == 1.0


def test_gold_on_unknown_prompt_uses_only_the_generic_terms():
    assert gold_terms("hello", PERFECT).keys() == {"concise", "no_repeat", "ends"}
    assert gold_score("hello", PERFECT) == 1.0
    # ends = -1 with weight 0.10 / 0.40 after renormalisation.
    assert gold_score("hello", PERFECT[:-1]) == pytest.approx(0.5)


GARBAGE = [
    "", " ", ".", "!!!", "\n\n\n", "\x00\x01\ufffd", "😀 🎉 ünïcödé.", "<|endoftext|>", "<|pad|>" * 50,
    "the the the the the the the the.", "a" * 10_000, "." * 500, "old harbor " * 300,
    "The old harbor is bright and sunny" * 40, "12345.", "It.", "{Subject} is {adjective}.",
]


@pytest.mark.parametrize("prompt", [CHEERFUL_HARBOR, "", "garbage \x00 prompt", "<|pad|>"])
def test_gold_never_raises_and_stays_in_range_on_garbage(prompt):
    rng = random.Random(0)
    alphabet = string.printable + "éß€😀"
    vocabulary = list(grammar.LEXICON) + ["The", "old", "harbor", "It", "is", "and", ".", " ", "\n"]
    random_texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(200)]
    random_texts += [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    for response in GARBAGE + random_texts:
        score = gold_score(prompt, response)
        assert isinstance(score, float) and -1.0 <= score <= 1.0, (prompt, response, score)
    assert -1.0 <= gold_score(None, None) <= 1.0  # type: ignore[arg-type]


def test_gold_reward_is_gold_score_per_sample():
    prompts = [CHEERFUL_HARBOR, CHEERFUL_HARBOR, "hello"]
    responses = [PERFECT, "The stone bridge.", ""]
    assert gold_reward(prompts, responses) == [gold_score(p, r) for p, r in zip(prompts, responses)]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward(prompts[:2], responses[:1])


# ------------------------------------------------------------------------------------
# Labeler
# ------------------------------------------------------------------------------------

def _demonstrator_pairs(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, a, b) with gold(a) != gold(b)."""
    rng = random.Random(seed)
    combos = grammar.train_combos()
    pairs = []
    while len(pairs) < count:
        combo = rng.choice(combos)
        prompt = grammar.render_prompt(*combo)
        a, b = demonstrate(prompt, rng), demonstrate(prompt, rng)
        if gold_score(prompt, a) != gold_score(prompt, b):
            pairs.append((prompt, a, b))
    return pairs


def test_compare_at_temperature_zero_always_picks_the_higher_gold():
    rng = random.Random(0)
    for prompt, a, b in _demonstrator_pairs(300):
        a_is_better = gold_score(prompt, a) > gold_score(prompt, b)
        assert compare(prompt, a, b, rng, noise_temperature=0.0) == a_is_better
        assert compare(prompt, b, a, rng, noise_temperature=0.0) == (not a_is_better)


def test_compare_at_temperature_zero_breaks_exact_ties_with_the_rng():
    rng = random.Random(0)
    outcomes = [compare(CHEERFUL_HARBOR, PERFECT, PERFECT, rng, noise_temperature=0.0) for _ in range(200)]
    assert 60 < sum(outcomes) < 140


def test_compare_at_high_temperature_is_a_coin_flip():
    rng = random.Random(0)
    worse = "The stone bridge is bleak."  # off topic, opposite tone: gold -0.2 against 1.0
    wins = sum(compare(CHEERFUL_HARBOR, PERFECT, worse, rng, noise_temperature=100.0) for _ in range(4000))
    # P = sigmoid(1.2 / 100) = 0.503; binomial std over 4000 draws is 0.008.
    assert 0.46 < wins / 4000 < 0.55


def test_compare_follows_bradley_terry():
    rng = random.Random(1)
    worse = "The old harbor is warm and gentle."  # gold 0.7
    temperature = 0.3
    expected = 1.0 / (1.0 + math.exp(-(1.0 - 0.7) / temperature))  # sigmoid(1) = 0.731
    wins = sum(compare(CHEERFUL_HARBOR, PERFECT, worse, rng, temperature) for _ in range(4000))
    assert wins / 4000 == pytest.approx(expected, abs=0.03)


def test_prefer_probability_is_symmetric_and_never_overflows():
    for gold_a, gold_b, temperature in [(1.0, -1.0, 1e-6), (-1.0, 1.0, 1e-6), (0.3, 0.2, 0.15), (0.5, 0.5, 0.0)]:
        forward = prefer_probability(gold_a, gold_b, temperature)
        backward = prefer_probability(gold_b, gold_a, temperature)
        assert 0.0 <= forward <= 1.0 and forward + backward == pytest.approx(1.0)
    with pytest.raises(ValueError, match="noise_temperature"):
        prefer_probability(0.0, 1.0, -0.1)


@pytest.mark.parametrize("temperature", [0.0, DEFAULT_NOISE_TEMPERATURE, 10.0])
def test_rank_returns_a_permutation(temperature):
    rng = random.Random(0)
    responses = [demonstrate(CHEERFUL_HARBOR, rng) for _ in range(6)] + [PERFECT, PERFECT]
    for _ in range(20):
        ranking = rank(CHEERFUL_HARBOR, responses, rng, temperature)
        assert sorted(ranking) == list(range(len(responses)))


def test_rank_at_temperature_zero_sorts_by_gold():
    rng = random.Random(0)
    responses = [demonstrate(CHEERFUL_HARBOR, rng) for _ in range(8)]
    ranking = rank(CHEERFUL_HARBOR, responses, rng, noise_temperature=0.0)
    scores = [gold_score(CHEERFUL_HARBOR, responses[index]) for index in ranking]
    assert scores == sorted(scores, reverse=True)


def test_label_pairs_writes_reward_model_rows():
    rng = random.Random(0)
    pairs = _demonstrator_pairs(50)
    prompts = [prompt for prompt, _, _ in pairs]
    rows = label_pairs(prompts, [[a, b] for _, a, b in pairs], rng, noise_temperature=0.0, k=2)
    assert len(rows) == 50
    for row in rows:
        assert row.keys() == {"prompt", "chosen", "rejected"}
        assert gold_score(row["prompt"], row["chosen"]) > gold_score(row["prompt"], row["rejected"])

    groups = [[demonstrate(prompt, rng) for _ in range(4)] for prompt in prompts]
    ranked_rows = label_pairs(prompts, groups, rng, noise_temperature=0.0, k=4)
    for row in ranked_rows:
        assert row.keys() == {"prompt", "responses", "ranking"}
        assert sorted(row["ranking"]) == [0, 1, 2, 3]
        best, worst = row["responses"][row["ranking"][0]], row["responses"][row["ranking"][-1]]
        assert gold_score(row["prompt"], best) > gold_score(row["prompt"], worst)


def test_label_pairs_skips_ties_and_checks_k():
    rng = random.Random(0)
    assert label_pairs([CHEERFUL_HARBOR], [[PERFECT, PERFECT]], rng, 0.15, k=2) == []
    with pytest.raises(ValueError, match="expected 2 responses"):
        label_pairs([CHEERFUL_HARBOR], [[PERFECT]], rng, 0.15, k=2)
    with pytest.raises(ValueError, match="at least 2"):
        label_pairs([CHEERFUL_HARBOR], [[PERFECT]], rng, 0.15, k=1)


# ------------------------------------------------------------------------------------
# Demonstrator
# ------------------------------------------------------------------------------------

def test_demonstrator_is_deterministic_and_writes_clean_text():
    first = [write_response("the old harbor", "calm", random.Random(7)) for _ in range(3)]
    again = [write_response("the old harbor", "calm", random.Random(7)) for _ in range(3)]
    assert first == again
    rng = random.Random(0)
    for _ in range(500):
        response = write_response("the old harbor", "calm", rng)
        assert response and response == response.strip()


def test_demonstrator_is_middling():
    rng = random.Random(0)
    combos = grammar.train_combos()
    scores = []
    for _ in range(1000):
        prompt = grammar.render_prompt(*rng.choice(combos))
        scores.append(gold_score(prompt, demonstrate(prompt, rng)))
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((score - mean) ** 2 for score in scores) / len(scores))
    # Room for RLHF: the best score (1.0) is more than one standard deviation above the mean.
    assert 0.3 < mean < 0.75 and mean + std < 1.0
    assert 0.0 < sum(score == 1.0 for score in scores) / len(scores) < 0.25


# ------------------------------------------------------------------------------------
# Generated data
# ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_builds(tmp_path_factory) -> tuple[Path, Path]:
    """Two independent builds with seed 0."""
    directories = tmp_path_factory.mktemp("demo_a"), tmp_path_factory.mktemp("demo_b")
    for directory in directories:
        build.build_demo_data(directory, seed=0)
    return directories


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def test_build_is_deterministic(fresh_builds):
    first, second = fresh_builds
    assert _file_bytes(first) == _file_bytes(second)


def test_shipped_data_files_match_a_fresh_build(fresh_builds):
    shipped = json.loads((SHIPPED_DIR / "MANIFEST.json").read_text())
    fresh = json.loads((fresh_builds[0] / "MANIFEST.json").read_text())
    hint = "data/demo is stale: run `python scripts/make_demo_data.py` and commit data/demo"
    assert shipped["generator_version"] == fresh["generator_version"], hint
    for name in JSONL_FILES:
        assert shipped["files"][name] == fresh["files"][name], f"{name}: {hint}"
        actual_sha256 = hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest()
        assert actual_sha256 == shipped["files"][name]["sha256"], f"{name} edited after generation"


def test_shipped_tokenizer_and_readme_match_a_fresh_build(fresh_builds):
    shipped = json.loads((SHIPPED_DIR / "MANIFEST.json").read_text())
    fresh = json.loads((fresh_builds[0] / "MANIFEST.json").read_text())
    if shipped["generated_with"] != fresh["generated_with"]:
        # The tokenizer's bytes (and the stats in README) depend on library versions.
        pytest.skip(f"shipped with {shipped['generated_with']}, installed {fresh['generated_with']}")
    assert shipped["files"].keys() == fresh["files"].keys()
    for name in shipped["files"]:
        assert shipped["files"][name] == fresh["files"][name], (
            f"{name}: data/demo is stale: run `python scripts/make_demo_data.py`"
        )
        actual_sha256 = hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest()
        assert actual_sha256 == shipped["files"][name]["sha256"], f"{name} edited after generation"


def test_shipped_row_counts_and_formats():
    manifest = json.loads((SHIPPED_DIR / "MANIFEST.json").read_text())
    for name in JSONL_FILES:
        rows = read_jsonl(SHIPPED_DIR / name)
        assert len(rows) == manifest["files"][name]["rows"]
        for row in rows:
            assert row["prompt"].endswith("\n")
            parse_prompt(row["prompt"])
            for key in ("response", "chosen", "rejected"):
                if key in row:
                    assert row[key] and not row[key][0].isspace()
    assert 2500 <= manifest["files"]["sft_train.jsonl"]["rows"] <= 4000
    assert 100 <= manifest["files"]["prompts_eval.jsonl"]["rows"] <= 200
    total_bytes = sum(entry["bytes"] for entry in manifest["files"].values())
    assert total_bytes < 3_000_000


def test_held_out_prompts_never_appear_in_train_files():
    held_out = {grammar.render_prompt(*combo) for combo in grammar.held_out_combos()}
    for name in TRAIN_FILES:
        assert not {row["prompt"] for row in read_jsonl(SHIPPED_DIR / name)} & held_out, name
    for name in EVAL_FILES:
        assert {row["prompt"] for row in read_jsonl(SHIPPED_DIR / name)} <= held_out, name
    prompts_eval = [row["prompt"] for row in read_jsonl(SHIPPED_DIR / "prompts_eval.jsonl")]
    assert sorted(prompts_eval) == sorted(held_out)


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_eval.jsonl"])
def test_noisy_labels_agree_with_noiseless_gold_within_the_documented_band(name):
    rows = read_jsonl(SHIPPED_DIR / name)
    agreeing = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows)
    low, high = AGREEMENT_BAND
    assert low <= agreeing / len(rows) <= high
    assert all(gold_score(r["prompt"], r["chosen"]) != gold_score(r["prompt"], r["rejected"]) for r in rows)


def test_tokenizer_loads_offline_round_trips_and_has_a_dedicated_pad():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_DIR / "tokenizer"))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 128
    assert not getattr(tokenizer, "chat_template", None)
    assert 512 <= len(tokenizer) <= 1024

    rows = read_jsonl(SHIPPED_DIR / "sft_train.jsonl") + read_jsonl(SHIPPED_DIR / "pref_eval.jsonl")
    texts = [row["prompt"] + row.get("response", row.get("chosen", "")) for row in rows]
    odd_texts = ["any text: ünïcödé 😀\ttabs  and  spaces\n", " leading space", ""]
    encoded = tokenizer(texts + odd_texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(encoded) == texts + odd_texts
    # The trainers concatenate prompt + response + EOS: it must fit the demo context.
    assert max(len(ids) + 1 for ids in encoded[: len(texts)]) <= build.MAX_SEQUENCE_TOKENS
