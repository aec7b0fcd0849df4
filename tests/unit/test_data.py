"""Data layer: formats, exact loss masks, column mapping, truncation, file types and their errors."""

from __future__ import annotations

import json
import logging
import re

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_rows, write_jsonl
from rlhf.config import DataConfig
from rlhf.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    collate_sft,
    load_sft_examples,
    load_table,
    tokenize_sft,
)
from rlhf.errors import UserError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the cat."},
    {"role": "assistant", "content": "The cat is happy."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog is sad."},
]


@pytest.fixture()
def tokenizer(tokenizer_dir):
    """A fresh copy per test: rendering chat data may set a template on it."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tokenize_rows(rows, tokenizer, data_format, max_length=256, train_on_prompt=False):
    return tokenize_sft(datasets.Dataset.from_list(rows), tokenizer, data_format, max_length, train_on_prompt,
                        "rows.jsonl")


def expected_chat_example(tokenizer, text, trained_spans):
    """The oracle for chat data, independent of how rlhf renders turns: tokenise the whole text
    once and train exactly the tokens whose characters lie inside ``trained_spans``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(span_start <= start and end <= span_end for span_start, span_end in trained_spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return encoded["input_ids"], labels


def span_of(text, piece, after=0):
    start = text.index(piece, after)
    return start, start + len(piece)


# ----------------------------------------------------------------------------- prompt/response

def test_prompt_response_labels_only_the_response_and_eos(tokenizer):
    prompt, response = "Tell me about the cat.\n", "The cat sleeps on the mat."
    (example,), report = tokenize_rows([{"prompt": prompt, "response": response}], tokenizer, "prompt_response")
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert len(prompt_ids) == 9 and len(response_ids) > 3  # a real prompt and response, not a degenerate case
    assert example["input_ids"] == prompt_ids + response_ids + [eos]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
    assert tokenizer.decode(example["input_ids"]) == prompt + response + tokenizer.eos_token
    assert (report.rows, report.kept, report.truncated, report.skipped_too_long) == (1, 1, 0, 0)


def test_train_on_prompt_puts_loss_on_every_token(tokenizer):
    row = {"prompt": "Tell me about the dog.\n", "response": "The dog ran."}
    (example,), _ = tokenize_rows([row], tokenizer, "prompt_response", train_on_prompt=True)
    assert example["labels"] == example["input_ids"]
    (masked,), _ = tokenize_rows([row], tokenizer, "prompt_response", train_on_prompt=False)
    assert masked["input_ids"] == example["input_ids"]


def test_text_format_trains_every_token_and_appends_eos(tokenizer):
    text = "The bird sings in the tree."
    (example,), _ = tokenize_rows([{"text": text}], tokenizer, "text")
    assert example["input_ids"] == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


# ----------------------------------------------------------------------------- chat

def test_messages_through_the_fallback_template(tokenizer):
    assert not tokenizer.chat_template
    (example,), _ = tokenize_rows([{"messages": CONVERSATION}], tokenizer, "messages")
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE  # saved with final/, so inference renders the same
    eos = tokenizer.eos_token
    text = ("<|system|>\nBe brief.\n<|user|>\nTell me about the cat.\n<|assistant|>\nThe cat is happy." + eos + "\n"
            "<|user|>\nAnd the dog?\n<|assistant|>\nThe dog is sad." + eos + "\n")
    # Each assistant turn trains its content, the EOS that ends it and the template's newline.
    first = span_of(text, "The cat is happy." + eos + "\n")
    second = span_of(text, "The dog is sad." + eos + "\n")
    input_ids, labels = expected_chat_example(tokenizer, text, [first, second])
    assert example["input_ids"] == input_ids
    assert example["labels"] == labels
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "The cat is happy." + eos + "\nThe dog is sad." + eos + "\n"
    assert trained.count(tokenizer.eos_token_id) == 2  # the model learns to stop after each answer


def test_messages_through_the_tokenizers_own_template(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    (example,), _ = tokenize_rows([{"messages": CONVERSATION}], tokenizer, "messages")
    assert tokenizer.chat_template == CHATML_TEMPLATE  # a tokenizer's own template is never replaced
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    first = span_of(text, "The cat is happy.<|im_end|>\n")
    second = span_of(text, "The dog is sad.<|im_end|>\n")
    input_ids, labels = expected_chat_example(tokenizer, text, [first, second])
    assert example["input_ids"] == input_ids
    assert example["labels"] == labels


def test_messages_train_on_prompt_trains_user_and_system_turns_too(tokenizer):
    (example,), _ = tokenize_rows([{"messages": CONVERSATION}], tokenizer, "messages", train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "Hi"}], "no 'assistant' turn"),
    ([{"role": "user"}], "string 'role' and 'content'"),
    ("not a list", "non-empty list"),
    ([{"role": "assistant", "content": "Hello, how can I help?"}], "starts with an assistant turn"),
])
def test_malformed_conversations_are_user_errors_naming_the_row(tokenizer, messages, match):
    with pytest.raises(UserError, match=match) as caught:
        tokenize_sft(RowList([{"messages": CONVERSATION}, {"messages": messages}]), tokenizer, "messages", 64, False,
                     "chat.jsonl")
    assert "'chat.jsonl' row 2" in str(caught.value)  # the second row, counted from 1


class RowList(list):
    """Rows as plain Python objects: Arrow would coerce a malformed column to one type."""

    column_names = ["messages"]


# ----------------------------------------------------------------------------- columns

def test_column_mapping_and_completion_alias(tmp_path, tokenizer):
    rows = make_rows(6)
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["prompt"], "answer": r["response"], "id": i}
                                                  for i, r in enumerate(rows)])
    completion = write_jsonl(tmp_path / "completion.jsonl", [{"prompt": r["prompt"], "completion": r["response"]}
                                                            for r in rows])
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)

    def load(path, **options):
        train, evaluation = load_sft_examples(DataConfig(path=path, eval_fraction=0.0, **options), tokenizer, 64, 0)
        assert evaluation == []
        return train

    expected = load(plain)
    assert load(renamed, columns={"prompt": "question", "response": "answer"}) == expected
    assert load(completion) == expected
    assert expected[0]["labels"][0] == IGNORE_INDEX  # prompt/response masking, not text


def test_mapping_to_a_missing_column_names_the_file_and_the_columns_found(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as caught:
        load_sft_examples(DataConfig(path=path, columns={"prompt": "Prompt"}), tokenizer, 64, 0)
    message = str(caught.value)
    assert "data.columns.prompt" in message and "'Prompt'" in message and path in message
    assert "'question', 'answer'" in message


def test_unmapped_missing_columns_name_the_file_and_the_columns_found(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as caught:
        load_sft_examples(DataConfig(path=path), tokenizer, 64, 0)
    assert path in str(caught.value) and "'question', 'answer'" in str(caught.value)
    assert "data.columns" in str(caught.value)
    with pytest.raises(UserError, match=r"needs column\(s\) 'response'.*qa.jsonl.*'answer'"):
        load_sft_examples(DataConfig(path=path, format="prompt_response", columns={"prompt": "question"}),
                          tokenizer, 64, 0)


def test_eval_split_and_max_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", make_rows(40))
    config = DataConfig(path=path, eval_fraction=0.25, max_samples=10)
    train, evaluation = load_sft_examples(config, tokenizer, 64, seed=0)
    assert (len(train), len(evaluation)) == (10, 10)
    again = load_sft_examples(config, tokenizer, 64, seed=0)
    assert again == (train, evaluation)  # the split is a function of the seed


# ----------------------------------------------------------------------------- truncation

def test_truncation_cuts_responses_and_skips_rows_without_room_for_one(tokenizer, caplog):
    short = {"prompt": "the cat\n", "response": "sat"}
    long_response = {"prompt": "the dog\n", "response": " ".join(["the big red dog ran"] * 10)}
    long_prompt = {"prompt": " ".join(["the sad bird sings"] * 10) + "\n", "response": "yes"}
    max_length = 16
    assert len(tokenizer(long_prompt["prompt"])["input_ids"]) >= max_length
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        examples, report = tokenize_rows([short, long_response, long_prompt], tokenizer, "prompt_response",
                                         max_length=max_length)
    assert (report.rows, report.kept, report.truncated, report.skipped_too_long) == (3, 2, 1, 1)
    assert "2/3 rows kept (1 with a truncated response, 1 skipped" in caplog.text  # reported, not silent
    cut = examples[1]
    prompt_ids = tokenizer(long_response["prompt"])["input_ids"]
    full_response = tokenizer(long_response["response"], add_special_tokens=False)["input_ids"]
    assert len(cut["input_ids"]) == max_length
    assert cut["labels"] == [IGNORE_INDEX] * len(prompt_ids) + full_response[:max_length - len(prompt_ids)]


def test_prompt_that_fills_max_length_is_skipped_even_when_training_on_prompt(tokenizer):
    long_prompt = {"prompt": " ".join(["the sad bird sings"] * 10) + "\n", "response": "yes"}
    keep = {"prompt": "the cat\n", "response": "sat"}
    examples, report = tokenize_rows([keep, long_prompt], tokenizer, "prompt_response", max_length=16,
                                     train_on_prompt=True)
    # The response was cut away entirely: training on the prompt alone would teach no response.
    assert (report.kept, report.skipped_too_long) == (1, 1)


def test_every_row_too_long_is_a_user_error(tokenizer):
    rows = [{"prompt": " ".join(["the sad bird sings"] * 10), "response": "yes"}] * 3
    with pytest.raises(UserError, match="every one of the 3 rows .*max_length=8"):
        tokenize_rows(rows, tokenizer, "prompt_response", max_length=8)


# ----------------------------------------------------------------------------- files

def test_local_file_types_and_directories_load_the_same_rows(tmp_path):
    rows = make_rows(5)
    table = datasets.Dataset.from_list(rows)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", rows[:3])
    write_jsonl(shards / "part-1.jsonl", rows[3:])
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))

    for path in (jsonl, tmp_path / "rows.json", tmp_path / "rows.csv", tmp_path / "rows.parquet",
                 tmp_path / "saved", tmp_path / "saved_dict"):
        assert load_table(str(path)).to_list() == rows, path
    assert sorted(load_table(str(shards)).to_list(), key=json.dumps) == sorted(rows, key=json.dumps)
    assert load_table(str(tmp_path / "saved_dict"), split="test").to_list() == rows[:1]


def test_empty_file_is_a_user_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="data.path: .*empty.jsonl.* is empty"):
        load_table(str(path))


def test_blank_file_is_a_user_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="blank.jsonl"):
        load_table(str(path))



@pytest.mark.parametrize("name, content", [("blank.jsonl", "\n\n"), ("header.csv", "prompt,response\n")])
def test_a_file_without_rows_says_so_not_the_loaders_words(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"^data.path: '{re.escape(str(path))}' has no rows$"):
        load_table(str(path))

def test_unknown_extension_is_a_user_error(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(UserError, match="extension '.txt'; expected one of .csv, .json, .jsonl, .parquet"):
        load_table(str(path))


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/missing.csv"])
def test_nonexistent_path_is_a_user_error(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(UserError, match=f"data.path: file '{path}' not found"):
        load_table(path)
    with pytest.raises(UserError, match="data.eval_path: file 'missing.jsonl' not found"):
        load_table("missing.jsonl", key="data.eval_path")  # relative, no directory part


def test_unparseable_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": \n', encoding="utf-8")
    with pytest.raises(UserError, match="cannot read file .*broken.jsonl"):
        load_table(str(path))


def test_directory_without_data_files_is_a_user_error(tmp_path):
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="holds no .json/.jsonl/.csv/.parquet files"):
        load_table(str(tmp_path))


# ----------------------------------------------------------------------------- batches

def test_collate_sft_right_pads_with_ignored_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
                {"input_ids": [8], "labels": [8]}]
    batch = collate_sft(examples, pad_token_id=99)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 99, 99]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]))
    assert batch["input_ids"].dtype == torch.long


# ----------------------------------------------------------------------------- PPO prompts from HH-style conversations

HH_CHOSEN = "\n\nHuman: Name a pet.\n\nAssistant: A cat.\n\nHuman: Another one?\n\nAssistant: A dog, they are loyal."
HH_REJECTED = "\n\nHuman: Name a pet.\n\nAssistant: A cat.\n\nHuman: Another one?\n\nAssistant: No."


def test_ppo_prompts_from_hh_conversations_are_the_reward_models_prompts(tokenizer, caplog):
    """The prompt is the conversation up to its last '\\n\\nAssistant:', answers cut off, as the RM splits it."""
    from rlhf.data import tokenize_prompts
    from rlhf.preference import split_conversation

    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": None},  # one conversation only
            {"chosen": "no turn markers at all", "rejected": "none here either"}]  # nothing to answer: skipped
    table = datasets.Dataset.from_list(rows)
    with caplog.at_level(logging.WARNING):
        texts, ids = tokenize_prompts(table, tokenizer, 256, "hh.jsonl")  # format auto: 'chosen' -> conversation
    expected = HH_CHOSEN[:HH_CHOSEN.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    assert texts == [expected, "\n\nHuman: Hi\n\nAssistant:"]
    assert texts[0] == split_conversation(HH_CHOSEN, HH_REJECTED)[0]  # the reward model's prompt exactly
    assert "A dog" not in texts[0] and ids[0] == tokenizer(texts[0])["input_ids"]
    assert "skipped 1 of 3 conversations without an 'Assistant:' turn" in caplog.text


def test_prompt_format_is_checked_against_the_columns(tokenizer):
    from rlhf.data import tokenize_prompts

    table = datasets.Dataset.from_list([{"prompt": "Tell me about the cat.\n"}])
    with pytest.raises(UserError, match=r"format 'conversation'.*'chosen'"):
        tokenize_prompts(table, tokenizer, 64, "p.jsonl", data_format="conversation")
    with pytest.raises(UserError, match=r"need a 'prompt', 'messages' or 'chosen'.*'question'"):
        tokenize_prompts(datasets.Dataset.from_list([{"question": "x"}]), tokenizer, 64, "q.jsonl")


def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "c\xff", "response": "d"}\n')
    with pytest.raises(UserError, match=r"rows.jsonl' line 2: not UTF-8 text"):
        load_table(str(path))
    big = tmp_path / "big.jsonl"  # the bad byte past the first 1 MiB chunk, after a character cut in two
    line = '{"prompt": "é", "response": "b"}\n'
    big.write_bytes((line * 40000).encode("utf-8") + b'{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"big.jsonl' line 40001: not UTF-8 text"):
        load_table(str(big))


def test_pack_rows_fills_rows_first_fit_decreasing_within_capacity():
    from rlhf.data import pack_rows

    lengths = [5, 9, 2, 7, 3, 10]
    rows = pack_rows(lengths, capacity=12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example exactly once
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == [[5, 2], [1, 4], [3, 0]]  # 10+2, 9+3, 7+5: the fewest rows (36 tokens in 3 rows of 12)
    with pytest.raises(ValueError, match="13 tokens does not fit in a row of 12"):
        pack_rows([13], capacity=12)


def test_collate_sft_packed_restarts_positions_and_never_trains_across_a_boundary():
    from rlhf.data import collate_sft_packed

    examples = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
                {"input_ids": [21, 22], "labels": [21, 22]},  # fully trained: its first label still goes
                {"input_ids": [31, 32, 33, 34, 35, 36], "labels": [-100, -100, 33, 34, 35, 36]}]
    batch = collate_sft_packed(examples, pad_token_id=0, capacity=6)
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 35, 36], [11, 12, 13, 21, 22, 0]]
    # Tail padding goes on from its row's last example: causal attention keeps real tokens from seeing it.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 33, 34, 35, 36], [-100, 12, 13, -100, 22, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert int(batch["num_examples"]) == 3
