"""Preference data for the reward model: comparisons -> one example per prompt -> padded (or packed) batches.

Formats (``data.format``, or ``auto`` from the columns present; other names map through
``data.columns``):

- ``pairwise``: ``{prompt, chosen, rejected}``, optional ``margin`` (a number per row).
- ``conversation``: ``{chosen, rejected}`` whole conversations (Anthropic HH); the prompt is
  their longest shared prefix, cut back to a boundary by ``split_conversation``. Optional ``margin``.
- ``ranking``: ``{prompt, responses, ranking}``: ``ranking`` lists indices into ``responses``,
  best first, and gives all K(K−1)/2 ordered pairs (``ranking_to_pairs``); no margin.

Tokens: prompt ids (``add_special_tokens=True``) + response ids + EOS, for every response, in
training and in scoring alike (``encode_prompt`` / ``encode_response``). The score is read at
that EOS (docs/ppo.md#1, docs/ppo.md#2), so a sequence is never truncated: one that would not fit in
``max_length`` is dropped.

One example per prompt: rows with the same prompt text are merged (``group_by_prompt``), each
distinct response is tokenised once (and scored once per batch), and the prompt's pairs are
averaged in the loss, so a prompt counts once however many responses it has (InstructGPT §3.5,
docs/ppo.md#5). An example is::

    {"sequences": [[prompt + response_k + EOS] for each distinct response k],
     "prompt_length": len(prompt ids),
     "pairs": [[better_k, worse_k], ...],       # indices into sequences
     "margins": [float per pair]}               # 0.0 without a margin column

Bad rows. Structural problems mean the data is not what the config says; they stop the run
with a ``UserError`` naming the file, row and fix: a missing column, a value of the wrong type
(text expected, a list of texts, a list of integers, a number), a ranking whose length differs
from the number of responses or that is not a permutation of their indices. Content problems
occur in real datasets (HH has hundreds of identical pairs); they drop the pair, are counted
per reason and logged once: chosen identical to rejected (no preference to learn), an empty
(blank) response, a prompt + response longer than ``max_length``. A prompt left without pairs
is dropped; if nothing is left the run stops with a ``UserError``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from rlhf.data import (check_text, load_table, pack_rows, pad_left, pad_right, quote, rename_columns, require_columns,
                       row_location)
from rlhf.errors import UserError
from rlhf.functional import ranking_to_pairs

logger = logging.getLogger(__name__)

FORMAT_COLUMNS = {
    "pairwise": ["prompt", "chosen", "rejected"],
    "conversation": ["chosen", "rejected"],
    "ranking": ["prompt", "responses", "ranking"],
}


@dataclass
class Comparison:
    """One parsed row: a prompt, its responses (texts) and ordered (better, worse) index pairs."""

    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]
    margins: list[float]
    row_index: int


@dataclass
class PreferenceReport:
    """What happened to the comparisons of one file: pairs kept, and pairs dropped per reason."""

    path: str
    rows: int = 0
    pairs_read: int = 0
    pairs_kept: int = 0
    prompts: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"identical": 0, "empty": 0, "too_long": 0})
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row_index: int, pairs: int = 1) -> None:
        self.skipped[reason] += pairs
        self.first_rows.setdefault(reason, [])
        if len(self.first_rows[reason]) < 3:
            self.first_rows[reason].append(row_index)

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.skipped.items())
        return (f"{self.pairs_kept}/{self.pairs_read} pairs kept over {self.prompts} prompts from {self.rows} rows "
                f"(dropped: {reasons})")


# ----------------------------------------------------------------------------- tokens

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids, with the tokenizer's special tokens (BOS where it has one)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response token ids ending with exactly one EOS: the token the reward is read at."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    return ids


# ----------------------------------------------------------------------------- the HH prefix split

def split_conversation(chosen: str, rejected: str, assistant_marker: str = "\n\nAssistant:") -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two conversations that share their prompt.

    The rule: take the longest common prefix of the two texts (in characters), then cut it back
    to a boundary so no word is split between prompt and response:

    1. if the shared prefix contains ``assistant_marker``, the prompt ends right after the last
       complete one (HH: the prompt is the conversation up to and including the final
       "\\n\\nAssistant:", and the responses start with " ...");
    2. otherwise the prompt ends where the last whitespace run inside the shared prefix begins,
       so each response starts with that whitespace (as byte-level BPE tokens " word" do);
    3. a shared prefix without marker or whitespace gives an empty prompt.

    Example: "Q: pick\\nA: the red cat" vs "Q: pick\\nA: the red car" share "Q: pick\\nA: the red ca";
    the cut backs off to "Q: pick\\nA: the red", responses " cat" and " car".

    Args:
        chosen, rejected: whole conversations (not identical).
        assistant_marker: the turn marker that opens an assistant turn ('' disables rule 1).
    """
    shared = os.path.commonprefix([chosen, rejected])
    marker_at = shared.rfind(assistant_marker) if assistant_marker else -1
    if marker_at >= 0:
        cut = marker_at + len(assistant_marker)
    else:
        # Conservative: even when the shared prefix happens to end on a whole word, the next
        # characters may continue it ("there" vs "therefore"), so always walk back.
        cut = len(shared)
        while cut > 0 and not shared[cut - 1].isspace():
            cut -= 1  # skip the partial word (or the whole last word)
        while cut > 0 and shared[cut - 1].isspace():
            cut -= 1  # put the separating whitespace on the response side
    return chosen[:cut], chosen[cut:], rejected[cut:]


def conversation_prompt(row: dict, index: int, path: str, assistant_marker: str = "\n\nAssistant:") -> str | None:
    """The prompt of an HH-style row for sampling: its ``chosen`` conversation up to and including the last
    ``assistant_marker``; with a ``rejected`` conversation too, the prompt the reward model trains on
    (``split_conversation``). None when there is no such turn left to answer.
    """
    chosen = check_text(row, "chosen", index, path)
    rejected = row.get("rejected")
    if isinstance(rejected, str) and rejected != chosen:
        prompt = split_conversation(chosen, rejected, assistant_marker)[0]
    else:
        prompt = chosen[:chosen.rfind(assistant_marker) + len(assistant_marker)] if assistant_marker in chosen else ""
    return prompt if assistant_marker and prompt.endswith(assistant_marker) else None


# ----------------------------------------------------------------------------- rows -> comparisons

def detect_preference_format(table, requested: str, path: str) -> str:
    """The row format: ``requested``, checked against the columns, or picked from them when 'auto'."""
    names = table.column_names
    if requested != "auto":
        require_columns(table, FORMAT_COLUMNS[requested], path, f"format '{requested}'")
        return requested
    if "responses" in names and "ranking" in names:
        return "ranking"
    if "chosen" in names and "rejected" in names:
        return "pairwise" if "prompt" in names else "conversation"
    raise UserError(f"data: cannot tell the preference format of '{path}': expected columns 'prompt', 'chosen', "
                    f"'rejected'; or 'chosen', 'rejected' (whole conversations); or 'prompt', 'responses', "
                    f"'ranking'; it has {quote(names)} (map yours with data.columns)")


def read_comparisons(table, data_format: str, path: str, report: PreferenceReport,
                     assistant_marker: str = "\n\nAssistant:") -> list[Comparison]:
    """Parse rows into comparisons; structural problems raise, identical/empty pairs are counted and dropped."""
    comparisons = []
    has_margin = "margin" in table.column_names
    if has_margin and data_format == "ranking":
        raise UserError(f"data: '{path}' has a 'margin' column, but a ranking has no single margin for its pairs; "
                        "margins apply to pairwise and conversation rows (drop the column or its mapping)")
    for row_index, row in enumerate(table):
        report.rows += 1
        if data_format == "ranking":
            prompt = check_text(row, "prompt", row_index, path)
            responses = check_text_list(row, "responses", row_index, path)
            ranking = check_ranking(row, len(responses), row_index, path)
            pairs = ranking_to_pairs(len(responses), ranking)
            margins = [0.0] * len(pairs)
        else:
            chosen = check_text(row, "chosen", row_index, path)
            rejected = check_text(row, "rejected", row_index, path)
            margin = check_margin(row, row_index, path) if has_margin else 0.0
            if data_format == "conversation":
                if chosen == rejected:
                    prompt = ""  # nothing to split; dropped below as identical
                    responses = [chosen, rejected]
                else:
                    prompt, chosen_response, rejected_response = split_conversation(chosen, rejected, assistant_marker)
                    responses = [chosen_response, rejected_response]
            else:
                prompt = check_text(row, "prompt", row_index, path)
                responses = [chosen, rejected]
            pairs, margins = [(0, 1)], [margin]
        report.pairs_read += len(pairs)
        kept_pairs, kept_margins = [], []
        for (better, worse), margin in zip(pairs, margins):
            if responses[better] == responses[worse]:
                report.skip("identical", row_index)
            elif not responses[better].strip() or not responses[worse].strip():
                report.skip("empty", row_index)
            else:
                kept_pairs.append((better, worse))
                kept_margins.append(margin)
        if kept_pairs:
            comparisons.append(Comparison(prompt, responses, kept_pairs, kept_margins, row_index))
    return comparisons


def check_text_list(row: dict, column: str, row_index: int, path: str) -> list[str]:
    value = row.get(column)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UserError(f"data: {row_location(path, row_index)}: column '{column}' must be a list of texts")
    return value


def check_ranking(row: dict, num_responses: int, row_index: int, path: str) -> list[int]:
    ranking = row.get("ranking")
    if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise UserError(f"data: {row_location(path, row_index)}: column 'ranking' must be a list of response indices "
                        "(integers), best first")
    if len(ranking) != num_responses:
        raise UserError(f"data: {row_location(path, row_index)}: 'ranking' has {len(ranking)} entries but there are "
                        f"{num_responses} responses; rank every response, best first")
    if sorted(ranking) != list(range(num_responses)):
        raise UserError(f"data: {row_location(path, row_index)}: 'ranking' {ranking} is not a permutation of "
                        f"0..{num_responses - 1}; list each response index once, best first")
    return ranking


def check_margin(row: dict, row_index: int, path: str) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"data: {row_location(path, row_index)}: column 'margin' must be a finite number, found {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- comparisons -> examples

def build_examples(comparisons: list[Comparison], tokenizer, max_length: int, group_by_prompt: bool,
                   report: PreferenceReport) -> list[dict]:
    """Group comparisons by prompt, tokenise each distinct text once, drop sequences over ``max_length``."""
    groups: dict = {}
    for comparison in comparisons:
        key = comparison.prompt if group_by_prompt else comparison.row_index
        group = groups.setdefault(key, {"prompt": comparison.prompt, "texts": {}, "pairs": [], "margins": [],
                                        "row_index": comparison.row_index})
        local = [group["texts"].setdefault(text, len(group["texts"])) for text in comparison.responses]
        for (better, worse), margin in zip(comparison.pairs, comparison.margins):
            group["pairs"].append((local[better], local[worse]))
            group["margins"].append(margin)

    examples = []
    for group in groups.values():
        prompt_ids = encode_prompt(tokenizer, group["prompt"])
        sequences = [prompt_ids + encode_response(tokenizer, text) for text in group["texts"]]
        fits = [len(s) <= max_length for s in sequences]
        pairs, margins, used = [], [], {}
        for (better, worse), margin in zip(group["pairs"], group["margins"]):
            if not (fits[better] and fits[worse]):
                report.skip("too_long", group["row_index"])
                continue
            # Re-index onto the responses that keep at least one pair.
            pairs.append([used.setdefault(better, len(used)), used.setdefault(worse, len(used))])
            margins.append(margin)
        if not pairs:
            continue
        kept_sequences = [None] * len(used)
        for old, new in used.items():
            kept_sequences[new] = sequences[old]
        examples.append({"sequences": kept_sequences, "prompt_length": len(prompt_ids), "pairs": pairs,
                         "margins": margins})
    report.prompts = len(examples)
    report.pairs_kept = sum(len(e["pairs"]) for e in examples)
    return examples


def tokenize_preferences(table, tokenizer, data_format: str, max_length: int, path: str,
                         group_by_prompt: bool = True, assistant_marker: str = "\n\nAssistant:"
                         ) -> tuple[list[dict], PreferenceReport]:
    """Rows of one table -> examples (one per prompt), with the report of what was dropped."""
    report = PreferenceReport(path=path)
    comparisons = read_comparisons(table, data_format, path, report, assistant_marker)
    examples = build_examples(comparisons, tokenizer, max_length, group_by_prompt, report)
    if report.pairs_kept < report.pairs_read:
        rows = "; ".join(f"{reason.replace('_', ' ')} e.g. row(s) {', '.join(map(str, indices))}"
                         for reason, indices in report.first_rows.items())
        logger.warning("%s: %s at max_length=%d [%s]", path, report.summary(), max_length, rows)
    if not examples:
        raise UserError(f"data: no usable comparison in '{path}': of {report.pairs_read} pairs, "
                        f"{report.skipped['identical']} have identical responses, {report.skipped['empty']} an "
                        f"empty response, {report.skipped['too_long']} do not fit in max_length={max_length} "
                        "(raise data.max_length, or check the columns)")
    return examples, report


def load_preference_examples(data_config, tokenizer, max_length: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval examples from the ``data:`` block; without eval_path, eval_fraction of the prompts is held out.

    The hold-out is drawn from the grouped examples, so no prompt has pairs on both sides.
    """
    table = rename_columns(load_table(data_config.path, data_config.split), data_config.columns, data_config.path)
    data_format = detect_preference_format(table, data_config.format, data_config.path)
    if data_config.max_samples is not None:
        table = table.select(range(min(data_config.max_samples, len(table))))
    options = dict(group_by_prompt=data_config.group_by_prompt, assistant_marker=data_config.assistant_marker)
    train, report = tokenize_preferences(table, tokenizer, data_format, max_length, data_config.path, **options)
    logger.info("train comparisons %s: %s (format %s)", data_config.path, report.summary(), data_format)
    if data_config.eval_path:
        eval_table = rename_columns(load_table(data_config.eval_path, data_config.eval_split, "data.eval_path"),
                                    data_config.columns, data_config.eval_path)
        # Detected on its own: eval pairs may come in another format than the training rankings.
        eval_format = detect_preference_format(eval_table, data_config.format, data_config.eval_path)
        evaluation, eval_report = tokenize_preferences(eval_table, tokenizer, eval_format, max_length,
                                                       data_config.eval_path, **options)
        logger.info("eval comparisons %s: %s", data_config.eval_path, eval_report.summary())
        return train, evaluation
    if data_config.eval_fraction > 0 and len(train) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        num_eval = min(len(train) - 1, max(1, round(data_config.eval_fraction * len(train))))
        evaluation = [train[i] for i in sorted(order[:num_eval])]
        train = [train[i] for i in sorted(order[num_eval:])]
        logger.info("held out %d of %d prompts for evaluation", len(evaluation), len(evaluation) + len(train))
        return train, evaluation
    return train, []


def chosen_sequences(examples: list[dict]) -> list[list[int]]:
    """Each prompt's distinct responses that win at least one of its pairs (the default normalisation set).

    For ``{prompt, chosen, rejected}`` rows this is the chosen response; for a ranking, every
    response but the last.
    """
    sequences = []
    for example in examples:
        winners = sorted({better for better, _ in example["pairs"]})
        sequences.extend(example["sequences"][i] for i in winners)
    return sequences


def load_response_sequences(path: str, tokenizer, max_length: int, key: str = "normalization.set") -> list[list[int]]:
    """prompt + response + EOS token ids of a ``{prompt, response}`` file (too-long rows skipped, counted)."""
    table = load_table(path, "train", key)
    require_columns(table, ["prompt", "response"], path, "a file of responses to score")
    sequences, too_long = [], 0
    for row_index, row in enumerate(table):
        ids = encode_prompt(tokenizer, check_text(row, "prompt", row_index, path)) + encode_response(
            tokenizer, check_text(row, "response", row_index, path))
        if len(ids) > max_length:
            too_long += 1
            continue
        sequences.append(ids)
    if too_long:
        logger.warning("%s: skipped %d of %d rows longer than max_length=%d", path, too_long, len(table), max_length)
    if not sequences:
        raise UserError(f"{key}: every row of '{path}' is longer than max_length={max_length}")
    return sequences


# ----------------------------------------------------------------------------- batches

def collate_preferences(examples: list[dict], pad_token_id: int, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """All responses of the batch's prompts in one padded batch, plus the pairs as indices into it.

    Returns:
        pairs_per_prompt: (num_prompts,) long; first key, so the loop counts prompts as examples.
        input_ids, attention_mask: (num_responses, seq_len), right-padded with ``pad_token_id`` / 0:
            prompt + response + EOS; with ``share_prompt`` only response + EOS, and
        prefix_ids, prefix_mask: (num_prompts, prompt_len), left-padded: each prompt once
            (``share_prompt`` only), with
        prefix_index: (num_responses,) the prompt each response continues (``share_prompt`` only).
        chosen_index, rejected_index: (P,) rows of input_ids holding each pair's better / worse response.
        group_ids: (P,) the prompt (position in ``examples``) each pair belongs to.
        margins: (P,) float32.
    """
    # An empty prompt (no BOS, empty text) has nothing to share and no cache to attend to.
    share_prompt = share_prompt and all(example["prompt_length"] > 0 for example in examples)
    sequences, prompts, prefix_index = [], [], []
    for prompt_index, example in enumerate(examples):
        if share_prompt:
            prompt_length = example["prompt_length"]
            prompts.append(example["sequences"][0][:prompt_length])
            sequences.extend(sequence[prompt_length:] for sequence in example["sequences"])
            prefix_index.extend([prompt_index] * len(example["sequences"]))
        else:
            sequences.extend(example["sequences"])
    batch = pair_tensors(examples)
    batch |= {"input_ids": pad_right(sequences, pad_token_id),
              "attention_mask": pad_right([[1] * len(s) for s in sequences], 0)}
    if share_prompt:
        batch["prefix_ids"] = pad_left(prompts, pad_token_id)
        batch["prefix_mask"] = pad_left([[1] * len(p) for p in prompts], 0)
        batch["prefix_index"] = torch.tensor(prefix_index, dtype=torch.long)
    return batch


def pair_tensors(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The pairs of a batch whose responses are numbered example after example, each example's in order:
    ``pairs_per_prompt`` (first key, so the loop counts prompts as examples), ``chosen_index``,
    ``rejected_index``, ``group_ids``, ``margins`` (see ``collate_preferences``)."""
    chosen_index, rejected_index, group_ids, margins, pairs_per_prompt = [], [], [], [], []
    offset = 0
    for prompt_index, example in enumerate(examples):
        for (better, worse), margin in zip(example["pairs"], example["margins"]):
            chosen_index.append(offset + better)
            rejected_index.append(offset + worse)
            group_ids.append(prompt_index)
            margins.append(margin)
        pairs_per_prompt.append(len(example["pairs"]))
        offset += len(example["sequences"])
    return {
        "pairs_per_prompt": torch.tensor(pairs_per_prompt, dtype=torch.long),
        "chosen_index": torch.tensor(chosen_index, dtype=torch.long),
        "rejected_index": torch.tensor(rejected_index, dtype=torch.long),
        "group_ids": torch.tensor(group_ids, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
    }


def collate_preferences_packed(examples: list[dict], pad_token_id: int, capacity: int,
                               share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The batch of ``collate_preferences``, padding-free (``training.packing``): each example is one
    *segment* of a packed row.

    A segment is the example's prompt once followed by each response's own tokens (``share_prompt``), or
    each full sequence (prompt + response + EOS) one after another. A token attends to the earlier tokens
    of its own response and, with ``share_prompt``, to the prompt: a tree that gives each response the
    context of its unshared sequence, whose positions it also keeps (a response's continue from the
    prompt length), so the rewards equal the padded batch's up to float rounding. Segments are packed
    first-fit decreasing into as few rows of at most ``max(capacity, longest segment)`` tokens as they
    fit (a segment is never split), and the rows are right-padded to the longest; padding attends only
    to padding (a query that attends to nothing would give NaN).

    Returns:
        pairs_per_prompt, chosen_index, rejected_index, group_ids, margins: as ``collate_preferences``
            (the responses keep its order, so the indices mean the same).
        input_ids, position_ids: (rows, row_len).
        attention_mask: (rows, row_len), 1 on real tokens: for counting them, not given to the model.
        segment_mask: (rows, 1, row_len, row_len) bool, True where the query (dim 2) attends to the key (dim 3).
        reward_rows, reward_columns: (num_responses,) where each response's last token (its EOS) sits.
    """
    segments = []  # per example: token ids, positions, branches (0: the shared prompt), each response's last column
    for example in examples:
        prompt_length = example["prompt_length"] if share_prompt else 0
        ids, positions = list(example["sequences"][0][:prompt_length]), list(range(prompt_length))
        branches, ends = [0] * prompt_length, []
        for branch, sequence in enumerate(example["sequences"], start=1):
            ids += sequence[prompt_length:]
            positions += range(prompt_length, len(sequence))
            branches += [branch] * (len(sequence) - prompt_length)
            ends.append(len(ids) - 1)
        segments.append((ids, positions, branches, ends))
    lengths = [len(segment[0]) for segment in segments]
    rows = pack_rows(lengths, max(capacity, *lengths))
    starts = {}  # example -> (row, first column)
    row_ids, row_positions, row_segment_ids, row_branches = [], [], [], []
    for row_index, row in enumerate(rows):
        ids, positions, segment_ids, branches = [], [], [], []
        for index in row:
            starts[index] = (row_index, len(ids))
            ids += segments[index][0]
            positions += segments[index][1]
            segment_ids += [index] * lengths[index]
            branches += segments[index][2]
        row_ids.append(ids)
        row_positions.append(positions)
        row_segment_ids.append(segment_ids)
        row_branches.append(branches)
    segment_ids, branches = pad_right(row_segment_ids, -1), pad_right(row_branches, 0)
    query_segment, key_segment = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    query_branch, key_branch = branches.unsqueeze(2), branches.unsqueeze(1)
    column = torch.arange(segment_ids.shape[1])
    causal = column.unsqueeze(0) <= column.unsqueeze(1)  # [query, key]: the key is not after the query
    segment_mask = (query_segment == key_segment) & causal & ((key_branch == 0) | (key_branch == query_branch))
    reward_rows, reward_columns = [], []
    for index, segment in enumerate(segments):
        row_index, start = starts[index]
        reward_rows += [row_index] * len(segment[3])
        reward_columns += [start + end for end in segment[3]]
    batch = pair_tensors(examples)
    batch |= {
        "input_ids": pad_right(row_ids, pad_token_id),
        "position_ids": pad_right(row_positions, 0),
        "attention_mask": pad_right([[1] * len(ids) for ids in row_ids], 0),
        "segment_mask": segment_mask.unsqueeze(1),
        "reward_rows": torch.tensor(reward_rows, dtype=torch.long),
        "reward_columns": torch.tensor(reward_columns, dtype=torch.long),
    }
    return batch
