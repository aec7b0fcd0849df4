"""Every data loader on randomly corrupted files: the outcome is a dataset or our one-line ``UserError``
naming the file, never another exception (a traceback is a bug: the user gets no answer).

Loaders: SFT rows, the three reward-model formats (pairwise, conversation, ranking) and PPO prompts.
Corruptions: a value of another type, a missing or extra column, a broken or non-object JSON line,
invalid UTF-8, blank lines, bad rankings and margins. Seeded, so a failure names a reproducible case.
"""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from rlhf.config import DataConfig, PreferenceDataConfig
from rlhf.data import load_sft_examples, load_table, rename_columns, tokenize_prompts
from rlhf.errors import UserError
from rlhf.preference import load_preference_examples

CASES_PER_LOADER = 40
ODD_VALUES = [None, 0, 7, -1, 2.5, float("inf"), True, False, "", " ", "x" * 2000, "emoji 🙂 and \u0000 nul",
              [], ["a"], ["a", 3], [1, 0], {"role": "user"}, {"nested": {"deep": [1]}}, [[1, 2]]]


def valid_rows(kind: str, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(12):
        prompt = f"Tell me about cat {i}.\n"
        if kind == "sft":
            rows.append({"prompt": prompt, "response": f"The cat {i} is happy."})
        elif kind == "pairwise":
            rows.append({"prompt": prompt, "chosen": f"Cat {i} is happy.", "rejected": f"Cat {i} is sad."})
        elif kind == "conversation":
            head = f"\n\nHuman: {prompt}\n\nAssistant:"
            rows.append({"chosen": head + " It is happy.", "rejected": head + " It is sad."})
        elif kind == "ranking":
            rows.append({"prompt": prompt, "responses": ["good one", "fine one", "bad one"],
                         "ranking": rng.sample(range(3), 3)})
        else:  # prompts
            rows.append({"prompt": prompt})
    return rows


def corrupt(rows: list[dict], rng: random.Random) -> bytes:
    """The rows as JSON lines with one to three random corruptions."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(lines))
        try:  # an earlier corruption may have broken this line already
            row = json.loads(lines[index])
        except ValueError:
            row = {}
        row = row if isinstance(row, dict) else {}
        action = rng.choice(["retype", "retype", "drop", "extra", "truncate", "garbage", "array", "blank",
                             "empty_object", "ranking", "margin"])
        if action == "retype" and row:
            row[rng.choice(list(row))] = rng.choice(ODD_VALUES)
        elif action == "drop" and row:
            row.pop(rng.choice(list(row)))
        elif action == "extra":
            row[rng.choice(["note", "prompt ", "Chosen", "margin"])] = rng.choice(ODD_VALUES)
        elif action == "ranking":
            row["ranking"] = rng.choice([[0, 0, 1], [3, 1, 0], [-1, 0, 1], [0.5, 1, 2], [0, 1], "0,1,2", [True, 0, 1]])
        elif action == "margin":
            row["margin"] = rng.choice(["big", float("nan"), float("-inf"), [1], None, 1e30])
        elif action == "empty_object":
            row = {}
        if action == "truncate":
            lines[index] = lines[index][: rng.randrange(1, max(2, len(lines[index])))]
        elif action == "garbage":
            lines[index] = rng.choice(["not json at all", "{'single': 'quotes'}", "{\"a\": }", "]", "nul\x00byte"])
        elif action == "array":
            lines[index] = json.dumps(list(row.values()), ensure_ascii=False)
        elif action == "blank":
            lines.insert(index, "   ")
        else:
            lines[index] = json.dumps(row, ensure_ascii=False, allow_nan=True)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if rng.random() < 0.1:  # a byte that is not UTF-8
        position = rng.randrange(len(data))
        data = data[:position] + b"\xff\xfe" + data[position:]
    return data


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def load(kind: str, path: str, tokenizer) -> None:
    if kind == "sft":
        load_sft_examples(DataConfig(path=path, eval_fraction=0.0, max_length=64), tokenizer, 64, seed=0)
    elif kind == "prompts":
        table = rename_columns(load_table(path, "train"), {}, path)
        tokenize_prompts(table, tokenizer, 64, path)
    else:
        load_preference_examples(PreferenceDataConfig(path=path, format=kind, eval_fraction=0.0, max_length=64),
                                 tokenizer, 64, seed=0)


@pytest.mark.parametrize("kind", ["sft", "pairwise", "conversation", "ranking", "prompts"])
def test_corrupted_rows_give_a_dataset_or_one_line_naming_the_file(kind, tokenizer, tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES_PER_LOADER):
        rng = random.Random(f"{kind}-{case}")
        path = tmp_path / f"{kind}-{case}.jsonl"
        path.write_bytes(corrupt(valid_rows(kind, rng), rng))
        try:
            load(kind, str(path), tokenizer)
            outcomes["loaded"] += 1
        except UserError as error:
            message = str(error)
            assert "\n" not in message and str(path) in message, (case, message)
            outcomes["refused"] += 1
        except Exception as error:  # noqa: BLE001 - the point: anything else is a bug
            pytest.fail(f"{kind} case {case}: {type(error).__name__}: {error}\n{path.read_bytes()[:2000]!r}")
    assert outcomes["refused"] > 0  # the corruptions do bite (and some files stay loadable)
