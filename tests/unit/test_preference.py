"""Preference data: the three formats, the HH prefix split, bad rows, one example per prompt, the collator."""

from __future__ import annotations

import datasets
import pytest
import torch
import yaml

from rlhf.config import ArchitectureConfig, ModelConfig, PreferenceDataConfig, RewardConfig, load_config
from rlhf.errors import UserError
from rlhf.models import load_tokenizer
from rlhf.preference import (
    chosen_sequences,
    collate_preferences,
    collate_preferences_packed,
    encode_prompt,
    encode_response,
    load_preference_examples,
    split_conversation,
    tokenize_preferences,
)

HH_PROMPT = "\n\nHuman: What should I feed my cat?\n\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(ModelConfig(from_config=ArchitectureConfig(), tokenizer=tokenizer_dir))


def table(rows):
    return datasets.Dataset.from_list(rows)


def tokenize(rows, tokenizer, data_format="auto", max_length=64, **options):
    from rlhf.preference import detect_preference_format

    data = table(rows)
    return tokenize_preferences(data, tokenizer, detect_preference_format(data, data_format, "rows"), max_length,
                                "rows", **options)


# ----------------------------------------------------------------------------- the HH prefix split

def test_split_after_the_last_shared_assistant_marker():
    chosen = HH_PROMPT + " Cat food, in small portions."
    rejected = HH_PROMPT + " Chocolate."
    assert split_conversation(chosen, rejected) == (HH_PROMPT, " Cat food, in small portions.", " Chocolate.")


def test_split_keeps_shared_words_of_the_answer_in_the_responses():
    # Both answers start with " I think"; the prompt still ends at the assistant marker.
    chosen = HH_PROMPT + " I think cat food is best."
    rejected = HH_PROMPT + " I think chocolate."
    assert split_conversation(chosen, rejected) == (HH_PROMPT, " I think cat food is best.", " I think chocolate.")


def test_split_uses_the_last_marker_of_a_multi_turn_conversation():
    history = HH_PROMPT + " Cat food.\n\nHuman: How much?\n\nAssistant:"
    prompt, chosen, rejected = split_conversation(history + " A little.", history + " A lot.")
    assert prompt == history and chosen == " A little." and rejected == " A lot."


def test_split_never_cuts_mid_word():
    # Shared prefix "Q: pick one\nA: the red ca" ends inside "cat"/"car": back off to the last whitespace.
    prompt, chosen, rejected = split_conversation("Q: pick one\nA: the red cat", "Q: pick one\nA: the red car")
    assert (prompt, chosen, rejected) == ("Q: pick one\nA: the red", " cat", " car")


def test_split_puts_the_separating_whitespace_on_the_response_side():
    # The shared prefix "Hello there " ends in a space: the responses start with it (" friend").
    assert split_conversation("Hello there friend", "Hello there buddy") == ("Hello there", " friend", " buddy")


def test_split_when_one_conversation_extends_the_other():
    # "Hello there" could continue ("therefore"), so the cut backs off a word; neither response is empty.
    assert split_conversation("Hello there", "Hello there friend") == ("Hello", " there", " there friend")


def test_split_without_a_boundary_gives_an_empty_prompt():
    assert split_conversation("yes", "yeah") == ("", "yes", "yeah")


def test_conversation_rows_become_prompt_plus_responses(tokenizer):
    rows = [{"chosen": HH_PROMPT + " Cat food.", "rejected": HH_PROMPT + " Chocolate."}]
    examples, report = tokenize(rows, tokenizer, max_length=128)
    (example,) = examples
    prompt_ids = encode_prompt(tokenizer, HH_PROMPT)
    assert example["prompt_length"] == len(prompt_ids)
    assert example["sequences"] == [prompt_ids + encode_response(tokenizer, " Cat food."),
                                    prompt_ids + encode_response(tokenizer, " Chocolate.")]
    assert example["pairs"] == [[0, 1]] and report.pairs_kept == 1


# ----------------------------------------------------------------------------- formats and tokens

def test_pairwise_tokens_are_prompt_then_response_then_eos(tokenizer):
    rows = [{"prompt": "Tell me about the cat.\n", "chosen": "The cat is happy.", "rejected": "The cat is sad."}]
    (example,), _ = tokenize(rows, tokenizer)
    prompt_ids = tokenizer("Tell me about the cat.\n", add_special_tokens=True)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    for sequence, text in zip(example["sequences"], ["The cat is happy.", "The cat is sad."]):
        assert sequence == prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        assert sequence.count(eos) == 1 and pad not in sequence


def test_response_already_ending_with_eos_gets_no_second_one(tokenizer):
    assert encode_response(tokenizer, "The cat." + tokenizer.eos_token) == encode_response(tokenizer, "The cat.")


def test_margin_column_is_carried_per_pair(tokenizer):
    rows = [{"prompt": "p one\n", "chosen": "a b", "rejected": "c d", "margin": 2.5},
            {"prompt": "p two\n", "chosen": "a b", "rejected": "c d", "margin": None}]
    examples, _ = tokenize(rows, tokenizer)
    assert [e["margins"] for e in examples] == [[2.5], [0.0]]


def test_ranking_gives_all_ordered_pairs(tokenizer):
    rows = [{"prompt": "Rank these.\n", "responses": ["mid", "worst", "best"], "ranking": [2, 0, 1]}]
    (example,), report = tokenize(rows, tokenizer)
    texts = [tokenizer.decode(s[example["prompt_length"]:-1]) for s in example["sequences"]]
    named = {(texts[b], texts[w]) for b, w in example["pairs"]}
    assert named == {("best", "mid"), ("best", "worst"), ("mid", "worst")}  # K(K-1)/2 = 3
    assert len(example["sequences"]) == 3 and report.pairs_kept == 3


def test_rows_sharing_a_prompt_become_one_example_with_distinct_responses(tokenizer):
    rows = [{"prompt": "Same prompt\n", "chosen": "alpha", "rejected": "beta"},
            {"prompt": "Same prompt\n", "chosen": "alpha", "rejected": "gamma"},
            {"prompt": "Same prompt\n", "chosen": "gamma", "rejected": "beta"},
            {"prompt": "Other prompt\n", "chosen": "alpha", "rejected": "beta"}]
    examples, report = tokenize(rows, tokenizer)
    assert [len(e["sequences"]) for e in examples] == [3, 2]  # each distinct response once
    assert [len(e["pairs"]) for e in examples] == [3, 1] and report.prompts == 2
    ungrouped, _ = tokenize(rows, tokenizer, group_by_prompt=False)
    assert len(ungrouped) == 4


def test_chosen_sequences_are_each_prompts_distinct_winners(tokenizer):
    rows = [{"prompt": "P\n", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
            {"prompt": "Q\n", "chosen": "x", "rejected": "y"}]
    ranking, _ = tokenize(rows[:1], tokenizer)
    pairwise, _ = tokenize(rows[1:], tokenizer)
    assert len(chosen_sequences(ranking)) == 2  # every response but the worst
    assert chosen_sequences(pairwise) == [pairwise[0]["sequences"][0]]


def test_collate_puts_all_responses_in_one_batch_with_pair_indices(tokenizer):
    rows = [{"prompt": "Rank\n", "responses": ["a", "bb", "ccc"], "ranking": [0, 1, 2]},
            {"prompt": "Pick\n", "chosen": "yes", "rejected": "no"}]
    ranked, _ = tokenize(rows[:1], tokenizer)
    paired, _ = tokenize(rows[1:], tokenizer)
    batch = collate_preferences(ranked + paired, tokenizer.pad_token_id)
    assert list(batch)[0] == "pairs_per_prompt" and batch["pairs_per_prompt"].tolist() == [3, 1]
    assert batch["input_ids"].shape[0] == 5  # 3 + 2 responses, one forward
    assert batch["chosen_index"].tolist() == [0, 0, 1, 3] and batch["rejected_index"].tolist() == [1, 2, 2, 4]
    assert batch["group_ids"].tolist() == [0, 0, 0, 1]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(s) for s in ranked[0]["sequences"] + paired[0]["sequences"]]
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert (padded == tokenizer.pad_token_id).all()


def test_collate_with_a_shared_prompt_puts_each_prompt_once_and_responses_after_it(tokenizer):
    rows = [{"prompt": "Rank these\n", "responses": ["a", "bb", "ccc"], "ranking": [0, 1, 2]},
            {"prompt": "Pick\n", "chosen": "yes", "rejected": "no"}]
    examples = tokenize(rows[:1], tokenizer)[0] + tokenize(rows[1:], tokenizer)[0]
    full = collate_preferences(examples, tokenizer.pad_token_id)
    shared = collate_preferences(examples, tokenizer.pad_token_id, share_prompt=True)
    for key in ("pairs_per_prompt", "chosen_index", "rejected_index", "group_ids", "margins"):
        assert torch.equal(full[key], shared[key])
    assert shared["prefix_index"].tolist() == [0, 0, 0, 1, 1]
    prompts = [e["sequences"][0][:e["prompt_length"]] for e in examples]
    # Prompts left-padded (their last token is the last column), responses right-padded after them.
    assert shared["prefix_mask"].sum(1).tolist() == [len(p) for p in prompts]
    assert shared["prefix_mask"][:, -1].all()
    for row, (prompt_index, sequence) in enumerate(zip(shared["prefix_index"].tolist(),
                                                       [s for e in examples for s in e["sequences"]])):
        prompt = shared["prefix_ids"][prompt_index][shared["prefix_mask"][prompt_index].bool()].tolist()
        response = shared["input_ids"][row][shared["attention_mask"][row].bool()].tolist()
        assert prompt + response == sequence


# ----------------------------------------------------------------------------- packed batches (training.packing)

# Hand-made examples: A's prompt [10, 11, 12] with responses [20, 21] and [30, 31, 32]; B's prompt [40] with
# [50] and [60, 61]. Token values only mark where each token lands.
PACKING_EXAMPLES = [
    {"sequences": [[10, 11, 12, 20, 21], [10, 11, 12, 30, 31, 32]], "prompt_length": 3, "pairs": [[1, 0]],
     "margins": [0.5]},
    {"sequences": [[40, 50], [40, 60, 61]], "prompt_length": 1, "pairs": [[0, 1]], "margins": [0.0]},
]


def attended(mask: torch.Tensor) -> dict[int, set[int]]:
    """{query column: the key columns it attends to} of one (row_len, row_len) mask."""
    return {query: set(torch.nonzero(keys).flatten().tolist()) for query, keys in enumerate(mask)}


def test_packed_collate_with_a_shared_prompt_is_a_tree_per_example():
    batch = collate_preferences_packed(PACKING_EXAMPLES, pad_token_id=0, capacity=16, share_prompt=True)
    assert list(batch)[0] == "pairs_per_prompt"
    padded = collate_preferences(PACKING_EXAMPLES, 0, share_prompt=True)
    for key in ("pairs_per_prompt", "chosen_index", "rejected_index", "group_ids", "margins"):
        assert torch.equal(batch[key], padded[key]), key
    # One row (8 + 4 tokens fit in 16): A's prompt once, then each response's own tokens; then B.
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 40, 50, 60, 61]]
    # A response's positions continue from its prompt: those of the unshared prompt + response.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 2]]
    assert batch["segment_mask"].shape == (1, 1, 12, 12) and batch["segment_mask"].dtype == torch.bool
    assert attended(batch["segment_mask"][0, 0]) == {
        0: {0}, 1: {0, 1}, 2: {0, 1, 2},                                  # A's prompt
        3: {0, 1, 2, 3}, 4: {0, 1, 2, 3, 4},                              # A's first response: prompt + itself
        5: {0, 1, 2, 5}, 6: {0, 1, 2, 5, 6}, 7: {0, 1, 2, 5, 6, 7},       # A's second: not the first
        8: {8}, 9: {8, 9}, 10: {8, 10}, 11: {8, 10, 11}}                  # B: only B
    # The rewards are read at each response's EOS, in the padded batch's response order.
    assert batch["reward_rows"].tolist() == [0, 0, 0, 0] and batch["reward_columns"].tolist() == [4, 7, 9, 11]
    # Real tokens, counted as the prefix-shared padded batch counts them (each prompt once).
    assert int(batch["attention_mask"].sum()) == int(padded["attention_mask"].sum() + padded["prefix_mask"].sum()) == 12


def test_packed_collate_without_prompt_sharing_runs_each_sequence_on_its_own():
    batch = collate_preferences_packed(PACKING_EXAMPLES, pad_token_id=0, capacity=16)
    sequences = [s for e in PACKING_EXAMPLES for s in e["sequences"]]
    assert batch["input_ids"].tolist() == [sum(sequences, [])]  # 11 + 5 tokens: one row
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]]
    spans, start = [], 0
    for sequence in sequences:
        spans.append(range(start, start + len(sequence)))
        start += len(sequence)
    assert attended(batch["segment_mask"][0, 0]) == {query: set(range(span.start, query + 1))
                                                     for span in spans for query in span}
    assert batch["reward_columns"].tolist() == [span[-1] for span in spans] and not batch["reward_rows"].any()
    assert torch.equal(batch["chosen_index"], collate_preferences(PACKING_EXAMPLES, 0)["chosen_index"])


def test_packed_collate_fills_rows_first_fit_decreasing_and_gives_a_long_segment_its_own_row():
    def example(length: int) -> dict:  # a segment of `length` tokens: two sequences, no shared prompt
        return {"sequences": [[7] * (length - length // 2), [8] * (length // 2)], "prompt_length": 2,
                "pairs": [[0, 1]], "margins": [0.0]}

    lengths = [6, 5, 4, 3, 12]  # the last is longer than the capacity: rows grow to it, and it fills one
    batch = collate_preferences_packed([example(n) for n in lengths], pad_token_id=0, capacity=10)
    # First-fit decreasing into rows of 12: [12], [6, 5], [4, 3].
    rows = batch["reward_rows"].view(-1, 2)  # per example, the rows of its two responses: one row
    assert torch.equal(rows[:, 0], rows[:, 1])
    row_of = rows[:, 0].tolist()
    assert len(set(row_of)) == 3 and row_of[0] == row_of[1] and row_of[2] == row_of[3]
    assert len({row_of[0], row_of[2], row_of[4]}) == 3
    assert batch["input_ids"].shape == (3, 12)
    real = batch["attention_mask"].sum(1).tolist()
    assert [real[row_of[0]], real[row_of[2]], real[row_of[4]]] == [11, 7, 12]
    # Right padding attends only to padding (and to itself: a query seeing nothing would give NaN);
    # no real token sees it.
    mask, pads = batch["segment_mask"][:, 0], batch["attention_mask"] == 0
    assert mask.diagonal(dim1=1, dim2=2).all()
    assert not (mask & pads.unsqueeze(1) & ~pads.unsqueeze(2)).any()  # real query, pad key
    assert not (mask & ~pads.unsqueeze(1) & pads.unsqueeze(2)).any()  # pad query, real key
    assert (batch["input_ids"][pads] == 0).all()


# ----------------------------------------------------------------------------- bad rows

def test_identical_empty_and_too_long_pairs_are_counted_and_dropped(tokenizer, caplog):
    rows = [{"prompt": "ok\n", "chosen": "good answer", "rejected": "bad answer"},
            {"prompt": "same\n", "chosen": "twin", "rejected": "twin"},
            {"prompt": "blank\n", "chosen": "fine", "rejected": "   "},
            {"prompt": "long " * 40 + "\n", "chosen": "a", "rejected": "b"}]
    with caplog.at_level("WARNING"):
        examples, report = tokenize(rows, tokenizer, max_length=32)
    assert len(examples) == 1 and report.pairs_read == 4 and report.pairs_kept == 1
    assert report.skipped == {"identical": 1, "empty": 1, "too_long": 1}
    assert "1/4 pairs kept" in caplog.text and "1 identical, 1 empty, 1 too long" in caplog.text


def test_too_long_response_drops_only_its_pairs(tokenizer):
    rows = [{"prompt": "Rank\n", "responses": ["short", "word " * 40, "tiny"], "ranking": [0, 1, 2]}]
    (example,), report = tokenize(rows, tokenizer, max_length=24)
    assert len(example["sequences"]) == 2 and example["pairs"] == [[0, 1]]
    assert report.skipped["too_long"] == 2


def test_identical_conversations_are_skipped_not_split(tokenizer):
    rows = [{"chosen": HH_PROMPT + " Same.", "rejected": HH_PROMPT + " Same."},
            {"chosen": HH_PROMPT + " Fish.", "rejected": HH_PROMPT + " Rocks."}]
    examples, report = tokenize(rows, tokenizer, max_length=128)
    assert len(examples) == 1 and report.skipped["identical"] == 1


def test_all_rows_skipped_is_an_error(tokenizer):
    rows = [{"prompt": "p\n", "chosen": "same", "rejected": "same"}, {"prompt": "q\n", "chosen": "", "rejected": "x"}]
    with pytest.raises(UserError, match="no usable comparison.*1 have identical responses, 1 an empty response"):
        tokenize(rows, tokenizer)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "has 2 entries but there are 3 responses"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}, "not a permutation of 0..2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}, "not a permutation of 0..1"),
    ({"prompt": "p", "responses": "a", "ranking": [0]}, "'responses' must be a list of texts"),
])
def test_structural_ranking_problems_are_errors(tokenizer, row, message):
    with pytest.raises(UserError, match=message):
        tokenize([row], tokenizer)


def test_margin_problems_are_errors(tokenizer):
    with pytest.raises(UserError, match="row 1: column 'margin' must be a finite number"):
        tokenize([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], tokenizer)
    with pytest.raises(UserError, match="a ranking has no single margin"):
        tokenize([{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "margin": 1.0}], tokenizer)


def test_missing_columns_name_what_the_file_has(tmp_path, tokenizer):
    path = tmp_path / "pref.jsonl"
    path.write_text('{"question": "q", "good": "a", "bad": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="cannot tell the preference format.*'question', 'good', 'bad'"):
        load_preference_examples(PreferenceDataConfig(path=str(path)), tokenizer, 64, seed=0)
    with pytest.raises(UserError, match="data.columns.chosen: column 'Chosen' not found"):
        load_preference_examples(PreferenceDataConfig(path=str(path), columns={"chosen": "Chosen"}), tokenizer, 64, 0)
    with pytest.raises(UserError, match="format 'ranking' needs column"):
        load_preference_examples(PreferenceDataConfig(path=str(path), format="ranking"), tokenizer, 64, 0)
    mapped = PreferenceDataConfig(path=str(path), columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
                                  eval_fraction=0.0)
    train, evaluation = load_preference_examples(mapped, tokenizer, 64, 0)
    assert len(train) == 1 and evaluation == []


def test_eval_fraction_holds_out_whole_prompts(tmp_path, tokenizer):
    rows = [{"prompt": f"prompt {i % 10}\n", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    path = tmp_path / "pref.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows), encoding="utf-8")
    data_config = PreferenceDataConfig(path=str(path), eval_fraction=0.2)
    train, evaluation = load_preference_examples(data_config, tokenizer, 64, 0)
    assert len(train) == 8 and len(evaluation) == 2
    prompt = lambda e: tuple(e["sequences"][0][: e["prompt_length"]])  # noqa: E731
    assert not {prompt(e) for e in train} & {prompt(e) for e in evaluation}
    assert sum(len(e["pairs"]) for e in train + evaluation) == 40


# ----------------------------------------------------------------------------- config

def test_reward_config_checks(tmp_path):
    base = {"model": {"name_or_path": "runs/sft/final"}, "data": {"path": "pref.jsonl"}}
    config_path = tmp_path / "rm.yaml"
    config_path.write_text(yaml.safe_dump(base), encoding="utf-8")
    config = load_config(RewardConfig, str(config_path))
    assert config.normalization.set == "eval" and config.data.format == "auto" and config.output_dir == "runs/rm"
    assert load_config(RewardConfig, None, ["data.path=x.jsonl"]).model.name_or_path == "runs/sft/final"
    with pytest.raises(UserError) as caught:
        load_config(RewardConfig, str(config_path), ["data.columns={chosen: a, rejectd: b}",
                                                     "normalization.set=missing.jsonl", "data.eval_fraction=0"])
    message = str(caught.value)
    assert "data.columns.rejectd: not a preference column; did you mean 'rejected'?" in message
    assert "normalization.set: 'missing.jsonl' is not eval, train or none" in message
    with pytest.raises(UserError, match="normalization.set: 'eval' needs evaluation data"):
        load_config(RewardConfig, str(config_path), ["data.eval_fraction=0"])
    with pytest.raises(UserError, match="data.format: 'pairs' is not one of"):
        load_config(RewardConfig, str(config_path), ["data.format=pairs"])
