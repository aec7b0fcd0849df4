"""Data: ``datasets`` tables -> tokenised examples -> padded batches.

Sources: a hub dataset name, or a local .json/.jsonl/.csv/.parquet file, or a directory of
them (or one written by ``Dataset.save_to_disk``). Columns are renamed to ours through
``data.columns`` (ours -> theirs). Every mistake names the file and the columns it has.

SFT formats:
- ``prompt_response``: ``{prompt, response}`` (``completion`` is accepted for ``response``);
  tokens = prompt tokens + response tokens + EOS; loss on the response and EOS only.
- ``messages``: ``{messages: [{role, content}, ...]}`` rendered with the tokenizer's chat
  template (or ``FALLBACK_CHAT_TEMPLATE``); loss on assistant turns only.
- ``text``: ``{text}``; loss on every token, EOS appended.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
SOURCE_ROW = "__rlhf_source_row__"  # a row's index in its file, kept through the eval split

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Used for ``messages`` data when the tokenizer has no chat template. Each turn is
# "<|role|>\n" + content + "\n"; an assistant turn ends with EOS before the newline so the
# model learns to stop. The generation prompt is "<|assistant|>\n". It is saved with the
# tokenizer in final/, so inference renders conversations exactly as training did.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- loading tables

def load_table(path: str, split: str = "train", key: str = "data.path"):
    """A ``datasets.Dataset`` from a hub name, a local file or a local directory."""
    import datasets

    datasets.disable_progress_bars()
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or os.path.splitext(path)[1] in LOCAL_FORMATS
    try:
        if os.path.isfile(path):
            extension = os.path.splitext(path)[1].lower()
            if extension not in LOCAL_FORMATS:
                raise UserError(f"{key}: '{path}' has extension '{extension}'; expected one of "
                                f"{', '.join(sorted(LOCAL_FORMATS))}")
            if os.path.getsize(path) == 0:
                raise UserError(f"{key}: '{path}' is empty")
            if extension != ".parquet":
                check_utf8(path, key)
            table = datasets.load_dataset(LOCAL_FORMATS[extension], data_files=path, split="train")
        elif os.path.isdir(path):
            if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
                table = datasets.load_from_disk(path)
                if isinstance(table, datasets.DatasetDict):
                    table = table[split]
            else:
                files = [f for f in glob.glob(os.path.join(path, "*")) if os.path.splitext(f)[1] in LOCAL_FORMATS]
                if not files:
                    raise UserError(f"{key}: directory '{path}' holds no .json/.jsonl/.csv/.parquet files")
                table = datasets.load_dataset(path, split=split)
        elif looks_local:
            raise UserError(f"{key}: file '{path}' not found")
        else:
            table = datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except KeyError as error:
        raise UserError(f"{key}: '{path}' has no split {error}") from None
    except Exception as error:  # datasets raises many types for unreadable input
        if "corresponds to no data" in str(error):  # a file of blank lines, a CSV header alone: read, but no rows
            raise UserError(f"{key}: '{path}' has no rows") from None
        what = "file" if looks_local else "hub dataset"
        raise UserError(f"{key}: cannot read {what} '{path}': {read_error_detail(path, error)}") from None
    if len(table) == 0:
        raise UserError(f"{key}: '{path}' has no rows")
    return table


def read_error_detail(path: str, error: BaseException) -> str:
    """What is wrong with an unreadable data file, in one line: for JSON, the first line that does not parse
    (the loader only says it failed); else the innermost error, which datasets wraps in its own."""
    extension = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and extension in (".json", ".jsonl"):
        bad_line = first_invalid_json_line(path)
        if bad_line is not None:
            return bad_line
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def first_invalid_json_line(path: str) -> str | None:
    """'line N: <why>' for the first line of a JSON-lines file that is not a JSON object (a file holding one
    JSON document, starting with '[', is parsed whole); None when every line parses."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        line = text_line_of_byte(path, error.start)
        return f"line {line}: not UTF-8 text (byte {error.object[error.start]:#04x})"
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except ValueError as error:
            return f"line {getattr(error, 'lineno', '?')}: not valid JSON ({getattr(error, 'msg', error)})"
        return None
    first_seen: dict[str, tuple[str, int]] = {}  # column -> (JSON type, line) where it first held a value
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            return f"line {line_number}: not valid JSON ({str(getattr(error, 'msg', error)).removesuffix(' at')} at column {getattr(error, 'colno', '?')})"
        if not isinstance(value, dict):
            return f"line {line_number}: expected a JSON object ({{\"column\": value, ...}}), found {type(value).__name__}"
        # Arrow gives a column one type for the whole file: a value of another type (null aside) fails the load.
        for column, cell in value.items():
            kind = json_type(cell)
            if kind == "null":
                continue
            seen = first_seen.setdefault(column, (kind, line_number))
            if seen[0] != kind:
                return f"line {line_number}: column '{column}' holds {kind}, but {seen[0]} on line {seen[1]}"
    return None


def json_type(value) -> str:
    """The JSON type of a parsed value, as a message names it ('a string', 'a number', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def check_utf8(path: str, key: str) -> None:
    """A text data file must be UTF-8: the JSON and CSV readers load other bytes without a word and the rows
    fail later, when read. One streaming pass, the line named."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:  # error.start counts from the pending bytes
                bad = offset - pending + error.start
                raise UserError(f"{key}: '{path}' line {text_line_of_byte(path, bad)}: not UTF-8 text") from None
            offset += len(chunk)


def text_line_of_byte(path: str, offset: int) -> int:
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def rename_columns(table, columns: dict[str, str], path: str, key: str = "data.columns"):
    """Rename the dataset's columns to ours (``columns`` maps ours -> theirs)."""
    renames = {}
    for ours, theirs in columns.items():
        if theirs not in table.column_names:
            raise UserError(f"{key}.{ours}: column '{theirs}' not found in '{path}'; it has {quote(table.column_names)}")
        if theirs != ours:
            renames[theirs] = ours
    return table.rename_columns(renames) if renames else table


def require_columns(table, needed: list[str], path: str, what: str) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise UserError(f"data: {what} needs column(s) {quote(missing)}, not found in '{path}'; it has "
                        f"{quote(table.column_names)} (map yours with data.columns)")


def quote(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


# ----------------------------------------------------------------------------- SFT examples

@dataclass
class TokenizeReport:
    """What happened to the rows: kept whole, kept with a truncated response, or skipped."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_too_long: int = 0

    def summary(self) -> str:
        return (f"{self.kept}/{self.rows} rows kept ({self.truncated} with a truncated response, "
                f"{self.skipped_too_long} skipped: prompt leaves no room for a response)")


def detect_sft_format(table, requested: str, path: str) -> str:
    names = table.column_names
    if requested != "auto":
        needed = {"prompt_response": ["prompt"], "messages": ["messages"], "text": ["text"]}[requested]
        require_columns(table, needed, path, f"format '{requested}'")
        if requested == "prompt_response" and "response" not in names and "completion" not in names:
            require_columns(table, ["response"], path, "format 'prompt_response'")
        return requested
    if "messages" in names:
        return "messages"
    if "prompt" in names and ("response" in names or "completion" in names):
        return "prompt_response"
    if "text" in names:
        return "text"
    raise UserError(f"data: cannot tell the format of '{path}': expected columns 'prompt' and 'response', "
                    f"or 'messages', or 'text'; it has {quote(names)} (map yours with data.columns)")


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented fallback one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def tokenize_sft(table, tokenizer, data_format: str, max_length: int, train_on_prompt: bool,
                 path: str) -> tuple[list[dict], TokenizeReport]:
    """Tokenise SFT rows into ``{input_ids, labels}`` examples (lists of ints).

    A row whose prompt leaves no room for at least one response token is skipped and counted:
    we never train on a prompt whose response was cut away entirely (with ``train_on_prompt`` too).
    """
    report = TokenizeReport(rows=len(table))
    examples = []
    if data_format == "messages":
        ensure_chat_template(tokenizer)
    response_column = "response" if "response" in table.column_names else "completion"
    for row_index, row in enumerate(table):
        row_index = row.get(SOURCE_ROW, row_index)
        if data_format == "prompt_response":
            prompt = check_text(row, "prompt", row_index, path)
            response = check_text(row, response_column, row_index, path)
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            segments = [(prompt_ids, False), (response_ids, True)]
        elif data_format == "messages":
            segments = chat_segments(row.get("messages"), tokenizer, False, row_index, path)
        else:
            text = check_text(row, "text", row_index, path)
            segments = [(tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id], True)]
        # Segments mark response tokens as trained, so the cut is judged on the response alone;
        # train_on_prompt then trains every kept token.
        example = pack_segments(segments, max_length)
        if example is None:
            report.skipped_too_long += 1
            continue
        if train_on_prompt:
            example["labels"] = list(example["input_ids"])
        if example.pop("truncated"):
            report.truncated += 1
        examples.append(example)
    report.kept = len(examples)
    if report.truncated or report.skipped_too_long:
        logger.warning("%s: %s at max_length=%d", path, report.summary(), max_length)
    if not examples:
        raise UserError(f"data: every one of the {report.rows} rows of '{path}' leaves no room for a response "
                        f"within max_length={max_length}; raise data.max_length or shorten the prompts")
    return examples, report


def pack_segments(segments: list[tuple[list[int], bool]], max_length: int) -> dict | None:
    """Concatenate (token ids, trains) segments, cut at ``max_length``.

    Returns None when no trained token survives the cut (the row would teach nothing).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trains in segments:
        input_ids.extend(ids)
        labels.extend(ids if trains else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # labels[0] never gets a loss (nothing predicts the first token), so require a trained token after it.
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def chat_segments(messages, tokenizer, train_on_prompt: bool, row_index: int, path: str) -> list[tuple[list[int], bool]]:
    """Split a rendered conversation into (tokens, trains) segments: assistant turns train.

    Each assistant turn's tokens are those the template adds between the conversation so far
    (with the generation prompt) and the conversation including that turn.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"data: {row_location(path, row_index)}: column 'messages' must be a non-empty list of "
                        "{role, content} objects")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise UserError(f"data: {row_location(path, row_index)}: each message needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"data: {row_location(path, row_index)}: the conversation has no 'assistant' turn to learn from")
    if messages[0]["role"] == "assistant":  # chat templates cannot render the empty history it answers
        raise UserError(f"data: {row_location(path, row_index)}: the conversation starts with an assistant turn; "
                        "start it with the user or system turn it answers")

    def render(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    segments: list[tuple[list[int], bool]] = []
    done: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(index, generation_prompt=True)
        after = render(index + 1, generation_prompt=False)
        if before[:len(done)] != done or after[:len(before)] != before:
            raise UserError("data: the tokenizer's chat template does not render conversations as growing prefixes, "
                            "so assistant turns cannot be located; use the prompt/response format instead")
        segments.append((before[len(done):], train_on_prompt))
        segments.append((after[len(before):], True))
        done = after
    full = render(len(messages), generation_prompt=False)
    if len(full) > len(done):  # trailing non-assistant turns
        segments.append((full[len(done):], train_on_prompt))
    return segments


def row_location(path: str, row_index: int) -> str:
    """Where row ``row_index`` (0-based, as ``datasets`` counts) is, for an error message: the line of a
    local JSON-lines file (blank lines skipped, as the loader skips them), else the row, counted from 1."""
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            rows_seen = -1
            for line_number, line in enumerate(handle, start=1):
                rows_seen += bool(line.strip())
                if rows_seen == row_index:
                    return f"'{path}' line {line_number}"
    return f"'{path}' row {row_index + 1}"


def check_text(row: dict, column: str, row_index: int, path: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise UserError(f"data: {row_location(path, row_index)}: column '{column}' must be text, found "
                        f"{'null' if value is None else type(value).__name__}")
    return value


def load_sft_examples(data_config, tokenizer, max_length: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval examples for SFT from the ``data:`` block (eval split off when no eval_path)."""
    table = rename_columns(load_table(data_config.path, data_config.split), data_config.columns, data_config.path)
    data_format = detect_sft_format(table, data_config.format, data_config.path)
    if data_config.eval_path:
        eval_table = rename_columns(load_table(data_config.eval_path, data_config.eval_split, "data.eval_path"),
                                    data_config.columns, data_config.eval_path)
        detect_sft_format(eval_table, data_format, data_config.eval_path)
    elif data_config.eval_fraction > 0 and len(table) > 1:
        # Each row keeps its place in the file, so an error in either part names the right line.
        table = table.add_column(SOURCE_ROW, list(range(len(table))))
        parts = table.train_test_split(test_size=data_config.eval_fraction, seed=seed)
        table, eval_table = parts["train"], parts["test"]
    else:
        eval_table = None
    if data_config.max_samples is not None:
        table = table.select(range(min(data_config.max_samples, len(table))))
    train, report = tokenize_sft(table, tokenizer, data_format, max_length, data_config.train_on_prompt, data_config.path)
    logger.info("train data %s: %s (format %s)", data_config.path, report.summary(), data_format)
    evaluation: list[dict] = []
    if eval_table is not None:
        evaluation, _ = tokenize_sft(eval_table, tokenizer, data_format, max_length, data_config.train_on_prompt,
                                     data_config.eval_path or data_config.path)
    return train, evaluation


def prompt_of(example: dict) -> list[int]:
    """The untrained prefix of an SFT example: what a model is asked to continue."""
    labels = example["labels"]
    first_trained = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return example["input_ids"][:first_trained]


# ----------------------------------------------------------------------------- batches

def pad_right(sequences: list[list[int]], pad_value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_value] * (longest - len(s)) for s in sequences], dtype=torch.long)


def pad_left(sequences: list[list[int]], pad_value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([[pad_value] * (longest - len(s)) + s for s in sequences], dtype=torch.long)


def collate_sft(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on padding)."""
    input_ids = pad_right([e["input_ids"] for e in examples], pad_token_id)
    attention_mask = pad_right([[1] * len(e["input_ids"]) for e in examples], 0)
    labels = pad_right([e["labels"] for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into as few rows of at most ``capacity`` tokens as first-fit
    decreasing finds (each length must fit on its own); rows in order of their first member."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > capacity:
            raise ValueError(f"an example of {lengths[index]} tokens does not fit in a row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def collate_sft_packed(examples: list[dict], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """The examples of one micro-batch packed into rows of at most ``capacity`` tokens, padding-free.

    Returns ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 on each example, so a model
    that reads packed position ids attends only within an example), ``attention_mask`` (1 on real
    tokens: for counting, not given to the model) and ``num_examples``. Each example's first label
    is IGNORE_INDEX: the previous example's last token must not be trained to predict it (in a padded
    batch, nothing predicts a row's first token either). The tail of a shorter row is padding that
    continues the row's last example (its positions go on, its labels are ignored): causal attention
    keeps every real token from seeing it, and a row holding one example stays one segment, which
    attention runs without a packed mask. Same loss as ``collate_sft``.
    """
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    input_rows, label_rows, position_rows = [], [], []
    for row in rows:
        input_ids, labels, positions = [], [], []
        for index in row:
            example = examples[index]
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += list(range(len(example["input_ids"])))
        input_rows.append(input_ids)
        label_rows.append(labels)
        position_rows.append(positions)
    longest = max(len(ids) for ids in input_rows)
    tails = [longest - len(ids) for ids in input_rows]
    return {"input_ids": pad_right(input_rows, pad_token_id),
            "labels": pad_right(label_rows, IGNORE_INDEX),
            "position_ids": torch.tensor([p + list(range(p[-1] + 1, p[-1] + 1 + t)) for p, t in zip(position_rows, tails)],
                                         dtype=torch.long),
            "attention_mask": pad_right([[1] * len(ids) for ids in input_rows], 0),
            "num_examples": torch.tensor(len(examples))}

# ----------------------------------------------------------------------------- prompts (PPO)

# The column each prompt format reads, in the order ``format: auto`` tries them.
PROMPT_FORMAT_COLUMNS = {"prompt": "prompt", "messages": "messages", "conversation": "chosen"}


def detect_prompt_format(table, requested: str, path: str) -> str:
    """The prompt format: ``requested``, checked against the columns, or picked from them when 'auto'."""
    names = table.column_names
    if requested != "auto":
        require_columns(table, [PROMPT_FORMAT_COLUMNS[requested]], path, f"format '{requested}'")
        return requested
    for data_format, column in PROMPT_FORMAT_COLUMNS.items():
        if column in names:
            return data_format
    raise UserError(f"data: prompts need a 'prompt', 'messages' or 'chosen' (conversation) column, not found in "
                    f"'{path}'; it has {quote(names)} (map yours with data.columns)")


def tokenize_prompts(table, tokenizer, max_prompt_length: int, path: str, data_format: str = "auto",
                     assistant_marker: str = "\n\nAssistant:") -> tuple[list[str], list[list[int]]]:
    """Prompt texts and token ids of ``table``'s rows; too-long prompts are counted and skipped.

    A ``messages`` row is rendered with the chat template and the generation prompt, so the
    policy answers as the assistant; a conversation is cut after its last ``assistant_marker``
    (``rlhf.preference.conversation_prompt``), so the policy writes that turn.
    """
    data_format = detect_prompt_format(table, data_format, path)
    if data_format == "prompt":
        texts = [check_text(row, "prompt", i, path) for i, row in enumerate(table)]
    elif data_format == "messages":
        ensure_chat_template(tokenizer)
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
                 for row in table]
    else:
        from rlhf.preference import conversation_prompt  # preference.py builds on this module

        texts = [conversation_prompt(row, i, path, assistant_marker) for i, row in enumerate(table)]
        unanswerable = sum(text is None for text in texts)
        if unanswerable:
            logger.warning("%s: skipped %d of %d conversations without an '%s' turn to answer", path, unanswerable,
                           len(texts), assistant_marker.strip())
        texts = [text for text in texts if text is not None]
    kept_texts, kept_ids = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=data_format != "messages")["input_ids"]
        if 0 < len(ids) <= max_prompt_length:
            kept_texts.append(text)
            kept_ids.append(ids)
    skipped = len(texts) - len(kept_ids)
    if skipped:
        logger.warning("%s: skipped %d of %d prompts longer than max_prompt_length=%d (or empty)", path, skipped,
                       len(texts), max_prompt_length)
    if not kept_ids:
        raise UserError(f"data: every prompt of '{path}' is empty or longer than data.max_prompt_length="
                        f"{max_prompt_length}; raise it")
    return kept_texts, kept_ids
