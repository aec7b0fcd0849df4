"""Generate the demo's data set: SFT rows, prompt sets, preference pairs and a tokenizer.

`build_demo_data(out_dir, seed)` writes, byte for byte the same for the same seed and
library versions:

    sft_train.jsonl     {"prompt", "response"}  demonstrator answers to train-split prompts
    sft_eval.jsonl      {"prompt", "response"}  demonstrator answers to held-out prompts
    prompts_train.jsonl {"prompt"}              every train-split prompt once (PPO sampling)
    prompts_eval.jsonl  {"prompt"}              every held-out prompt once (evaluation)
    pref_train.jsonl    {"prompt", "chosen", "rejected"}  train-split prompts
    pref_eval.jsonl     {"prompt", "chosen", "rejected"}  held-out prompts
    tokenizer/          byte-level BPE trained on all of the text above
    README.md           what the files are, the gold score and the labeler, measured stats
    MANIFEST.json       row counts, sizes and sha256 of every other file, stats

Prompts end with "\\n" and responses never start with a space: the trainers concatenate
prompt tokens, response tokens and EOS, and this tokenizer splits "\\n" from the next
word, so tokenising the parts separately gives the same ids as tokenising the whole text
(checked below for every row).
"""

import hashlib
import json
import random
import re
import shutil
import statistics
from pathlib import Path

from rlhf.demo import gold, grammar, labeler
from rlhf.demo.demonstrator import write_response

# Bump when a change to the generator changes its output on purpose.
GENERATOR_VERSION = 1

SFT_TRAIN_ROWS = 3000
SFT_EVAL_ROWS = 200
PREF_TRAIN_ROWS = 2000
PREF_EVAL_ROWS = 300

EOS_TOKEN = "<|endoftext|>"
# A dedicated pad token: with pad == eos, the usual `attention_mask = ids != pad` would
# hide the EOS from the reward model and the policy would learn never to stop
# (docs/ppo.md#2 and docs/ppo.md#42).
PAD_TOKEN = "<|pad|>"
# Large enough that nearly every word form in the data ("Write", " harbor") becomes a
# single token (measured and recorded in MANIFEST stats). BPE stops below this size when
# no pair occurs at least twice any more.
TOKENIZER_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 128
# The demo model's context is 64-128 tokens; every prompt + response + EOS must fit 64.
MAX_SEQUENCE_TOKENS = 64

# ------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------

def _rng(seed: int, stream: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so each stream is independent and
    # the same in every process (unlike hash() of a str).
    return random.Random(f"rlhf-demo/{seed}/{stream}")


def _sft_rows(combos: list[tuple[str, str, str]], count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        subject, tone, phrasing = rng.choice(combos)
        prompt = grammar.render_prompt(subject, tone, phrasing)
        rows.append({"prompt": prompt, "response": write_response(subject, tone, rng)})
    return rows


def _prompt_rows(combos: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    prompts = [grammar.render_prompt(*combo) for combo in combos]
    rng.shuffle(prompts)
    return [{"prompt": prompt} for prompt in prompts]


def _pref_rows(
    combos: list[tuple[str, str, str]],
    count: int,
    response_rng: random.Random,
    label_rng: random.Random,
) -> list[dict]:
    """Pairs of demonstrator responses to the same prompt, labelled by the noisy labeler.

    Responses and labels use separate random streams, so a different noise temperature
    changes labels only, never the responses.
    """
    rows: list[dict] = []
    while len(rows) < count:
        subject, tone, phrasing = response_rng.choice(combos)
        prompt = grammar.render_prompt(subject, tone, phrasing)
        pair = [write_response(subject, tone, response_rng) for _ in range(2)]
        # label_pairs drops the pair when both responses have the same gold score.
        rows += labeler.label_pairs(
            [prompt], [pair], label_rng, labeler.DEFAULT_NOISE_TEMPERATURE, k=2
        )
    return rows


# ------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------

def _train_tokenizer(corpus: list[str], out_dir: Path):
    """Train and save the byte-level BPE tokenizer; returns the `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte level: every string encodes, and decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        # The default clean-up rewrites " ." and similar on decode, breaking exact round trips.
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names its own class here ("TokenizersBackend"), which transformers 4
    # cannot load; both load the alias. Rewritten with sorted keys so the bytes do not
    # depend on how a transformers version formats the file.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tokenizer


def _check_tokenization(tokenizer, sequences: list[tuple[str, str]]) -> int:
    """Check the tokenizer on every (prompt, response); returns the longest token count.

    Counts prompt + response + EOS, as the trainers build them.
    """
    prompts = [prompt for prompt, _ in sequences]
    responses = [response for _, response in sequences]
    prompt_encodings = tokenizer.encode_batch(prompts)
    response_encodings = tokenizer.encode_batch(responses)
    whole_encodings = tokenizer.encode_batch([prompt + response for prompt, response in sequences])
    longest = 0
    for prompt, response, prompt_encoding, response_encoding, whole_encoding in zip(
        prompts, responses, prompt_encodings, response_encodings, whole_encodings
    ):
        ids = prompt_encoding.ids + response_encoding.ids
        if whole_encoding.ids != ids:
            raise RuntimeError(f"prompt and response tokenise differently apart: {prompt!r} {response!r}")
        if tokenizer.decode(ids, skip_special_tokens=False) != prompt + response:
            raise RuntimeError(f"tokenizer does not round-trip {prompt + response!r}")
        longest = max(longest, len(ids) + 1)
    if longest > MAX_SEQUENCE_TOKENS:
        raise RuntimeError(f"a prompt + response + EOS takes {longest} > {MAX_SEQUENCE_TOKENS} tokens")
    return longest


def _word_forms(texts: list[str]) -> list[str]:
    """The distinct words of `texts` as the pre-tokenizer sees them: "Write", " harbor"."""
    return sorted({form for text in texts for form in re.findall(r" ?[A-Za-z]+", text)})


# ------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        for row in rows:
            file.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fraction_agreeing(rows: list[dict]) -> float:
    """Share of pairs whose chosen response has the strictly higher gold score."""
    agreeing = sum(
        gold.gold_score(row["prompt"], row["chosen"]) > gold.gold_score(row["prompt"], row["rejected"])
        for row in rows
    )
    return agreeing / len(rows)


def _gold_statistics(rows: list[dict]) -> dict[str, float]:
    scores = [gold.gold_score(row["prompt"], row["response"]) for row in rows]
    return {
        "mean": round(statistics.fmean(scores), 4),
        "std": round(statistics.pstdev(scores), 4),
        "share_perfect": round(sum(score == 1.0 for score in scores) / len(scores), 4),
    }


def build_demo_data(out_dir: str | Path, seed: int = 0) -> dict:
    """Write the demo data set into `out_dir` (created if needed) and return its manifest.

    Deterministic: the same seed and library versions give the same bytes. Train files
    use only train-split prompt combinations; every *_eval file and prompts_eval use only
    held-out ones (grammar.is_held_out), the same for every seed.
    """
    import tokenizers
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_combos = grammar.train_combos()
    held_out_combos = grammar.held_out_combos()

    jsonl_rows = {
        "sft_train.jsonl": _sft_rows(train_combos, SFT_TRAIN_ROWS, _rng(seed, "sft_train")),
        "sft_eval.jsonl": _sft_rows(held_out_combos, SFT_EVAL_ROWS, _rng(seed, "sft_eval")),
        "prompts_train.jsonl": _prompt_rows(train_combos, _rng(seed, "prompts_train")),
        "prompts_eval.jsonl": _prompt_rows(held_out_combos, _rng(seed, "prompts_eval")),
        "pref_train.jsonl": _pref_rows(
            train_combos, PREF_TRAIN_ROWS, _rng(seed, "pref_train"), _rng(seed, "pref_train_labels")
        ),
        "pref_eval.jsonl": _pref_rows(
            held_out_combos, PREF_EVAL_ROWS, _rng(seed, "pref_eval"), _rng(seed, "pref_eval_labels")
        ),
    }
    for name, rows in jsonl_rows.items():
        _write_jsonl(out_dir / name, rows)

    # Every (prompt, response) text in the data, in file order: the tokenizer's corpus.
    sequences: list[tuple[str, str]] = []
    for rows in jsonl_rows.values():
        for row in rows:
            responses = [row[key] for key in ("response", "chosen", "rejected") if key in row]
            sequences += [(row["prompt"], response) for response in responses] or [(row["prompt"], "")]
    # Start from an empty tokenizer/ so no file of an older build (or transformers
    # version) lingers there and gets loaded with the new one.
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    tokenizer = _train_tokenizer([prompt + response for prompt, response in sequences], out_dir / "tokenizer")
    longest_sequence = _check_tokenization(tokenizer, sequences)
    word_forms = _word_forms([prompt + response for prompt, response in sequences])
    single_token_words = sum(len(tokenizer.encode(form).ids) == 1 for form in word_forms)

    stats = {
        "demonstrator_gold_sft_train": _gold_statistics(jsonl_rows["sft_train.jsonl"]),
        "demonstrator_gold_sft_eval": _gold_statistics(jsonl_rows["sft_eval.jsonl"]),
        "label_agreement_with_noiseless_gold_pref_train": round(
            _fraction_agreeing(jsonl_rows["pref_train.jsonl"]), 4
        ),
        "label_agreement_with_noiseless_gold_pref_eval": round(
            _fraction_agreeing(jsonl_rows["pref_eval.jsonl"]), 4
        ),
        "noise_temperature": labeler.DEFAULT_NOISE_TEMPERATURE,
        "train_prompt_combos": len(train_combos),
        "held_out_prompt_combos": len(held_out_combos),
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "max_tokens_prompt_response_eos": longest_sequence,
        "word_forms": len(word_forms),
        "word_forms_single_token": single_token_words,
    }
    (out_dir / "README.md").write_text(_readme(seed, stats, jsonl_rows), encoding="utf-8")

    # Only what this function wrote: other files a user keeps in out_dir are not ours.
    written = [out_dir / name for name in jsonl_rows] + [out_dir / "README.md"]
    written += [path for path in (out_dir / "tokenizer").rglob("*") if path.is_file()]
    files = {}
    for path in sorted(written):
        name = path.relative_to(out_dir).as_posix()
        entry = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        if name in jsonl_rows:
            entry["rows"] = len(jsonl_rows[name])
        files[name] = entry
    manifest = {
        "generator": "rlhf.demo.build",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "files": files,
        "stats": stats,
        # The tokenizer files' bytes depend on these library versions.
        "generated_with": {
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / "MANIFEST.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


# ------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------

def _readme(seed: int, stats: dict, jsonl_rows: dict[str, list[dict]]) -> str:
    counts = {name: len(rows) for name, rows in jsonl_rows.items()}
    sft_gold = stats["demonstrator_gold_sft_train"]
    example = jsonl_rows["pref_train.jsonl"][0]
    tone_list = ", ".join(f"{tone} {valence:+.1f}" for tone, valence in grammar.TONES.items())
    all_combos = stats["train_prompt_combos"] + stats["held_out_prompt_combos"]
    return f"""\
# Demo data (generated; do not edit by hand)

Written by `python scripts/make_demo_data.py --seed {seed}`
(`rlhf.demo.build.build_demo_data`, generator version {GENERATOR_VERSION}).
The same seed gives the same bytes. MANIFEST.json holds the row count, size and sha256 of
every file; the unit tests fail if these files differ from a fresh build.

## The task
A prompt asks for a short text about a subject in a tone, for example
`Write a cheerful note about the old harbor.`

- {len(grammar.SUBJECTS)} subjects, {len(grammar.PHRASINGS)} phrasings and {len(grammar.TONES)} tones, each with a valence:
  {tone_list}.
- {all_combos} combinations; {stats["held_out_prompt_combos"]} of them ({grammar.HELD_OUT_PERCENT} %, chosen by a hash of the combination)
  are held out and never appear in a train file.
- The language is defined in `rlhf/demo/grammar.py`.

## Files
| file | rows | what |
|---|---|---|
| sft_train.jsonl | {counts["sft_train.jsonl"]} | `{{prompt, response}}`: demonstrator responses to train-split prompts |
| sft_eval.jsonl | {counts["sft_eval.jsonl"]} | `{{prompt, response}}`: demonstrator responses to **held-out** prompts |
| prompts_train.jsonl | {counts["prompts_train.jsonl"]} | `{{prompt}}`: every train-split prompt once, shuffled (PPO sampling) |
| prompts_eval.jsonl | {counts["prompts_eval.jsonl"]} | `{{prompt}}`: every held-out prompt once, shuffled (evaluation) |
| pref_train.jsonl | {counts["pref_train.jsonl"]} | `{{prompt, chosen, rejected}}` on train-split prompts |
| pref_eval.jsonl | {counts["pref_eval.jsonl"]} | `{{prompt, chosen, rejected}}` on **held-out** prompts |
| tokenizer/ | | byte-level BPE, {stats["tokenizer_vocab_size"]} tokens; `{EOS_TOKEN}` (id 0) is bos and eos, `{PAD_TOKEN}` (id 1) is pad |

- Every prompt ends with a newline and no response starts with a space. A training
  sequence is prompt tokens + response tokens + EOS: at most {stats["max_tokens_prompt_response_eos"]} tokens here.
- Tokenizer: model_max_length {MODEL_MAX_LENGTH}, no chat template. {stats["word_forms_single_token"]} of the {stats["word_forms"]} distinct word
  forms in the data (a word with or without its leading space) are a single token.

## The demonstrator
`rlhf/demo/demonstrator.py` writes every response. It mostly names the requested subject
in roughly the requested tone. With documented probabilities it also drifts off topic,
takes the wrong tone, slips in words of a neighbouring tone, repeats a sentence, writes
more than two sentences, rambles and trails off.

Gold score of its responses in sft_train: mean {sft_gold["mean"]:.4f}, std {sft_gold["std"]:.4f}; share scoring the
maximum 1.0: {sft_gold["share_perfect"]:.4f}.

## The gold score (the simulated human)
`rlhf/demo/gold.py`: `gold_score(prompt, response)` in [-1, 1]. `gold_reward(prompts,
responses)` is the same as a PPO reward function, `rlhf.demo.gold:gold_reward`.

    gold = {gold.SUBJECT_WEIGHT:.2f} * subject + {gold.TONE_WEIGHT:.2f} * tone + {gold.CONCISE_WEIGHT:.2f} * concise + {gold.NO_REPEAT_WEIGHT:.2f} * no_repeat + {gold.ENDS_WEIGHT:.2f} * ends

| term | value in [-1, 1] |
|---|---|
| subject | +1 if the response names the requested subject (e.g. "old harbor") and no other, 0 if it also names another, -1 if it does not name it |
| tone | 1 - \\|mean valence of the tagged words - tone valence\\| / {gold.TONE_DISTANCE_FOR_ZERO}, clipped; 0 when no tagged word (valences are the grammar's own tags) |
| concise | 1 - {gold.PENALTY_PER_EXTRA_WORD} per word beyond {gold.MAX_WORDS} - {gold.PENALTY_PER_EXTRA_SENTENCE} per sentence beyond {gold.MAX_SENTENCES}, clipped |
| no_repeat | 1 - {gold.PENALTY_PER_REPEATED_WORD} per repeated content word (any word but {", ".join(sorted(grammar.FUNCTION_WORDS))}), clipped |
| ends | +1 if the text's last character is a '.' right after a letter, else -1 (the EOS token is the trainer's business) |

For a prompt outside the language only concise, no_repeat and ends count, with their
weights renormalised to sum to 1. Scores are rounded to {gold.SCORE_DECIMALS} decimals so equal
responses tie exactly.

## The labeler (pref_*.jsonl)
`rlhf/demo/labeler.py`. Each row compares two demonstrator responses to one prompt. Pairs
with equal gold scores (identical responses included) are skipped.

- The label is drawn by Bradley-Terry on the gold difference:
  P(a chosen over b) = sigmoid((g_a - g_b) / T), with T = {labeler.DEFAULT_NOISE_TEMPERATURE}
  (`DEFAULT_NOISE_TEMPERATURE`; T = 0 is a noiseless labeler).
- Rankings of K > 2 responses (`rank`; rows `{{prompt, responses, ranking}}`, ranking =
  indices into responses, best first) use Plackett-Luce with the same T.
- Share of labels that agree with the noiseless gold preference: {stats["label_agreement_with_noiseless_gold_pref_train"]:.4f} on
  pref_train, {stats["label_agreement_with_noiseless_gold_pref_eval"]:.4f} on pref_eval.

Example row of pref_train.jsonl:

    {json.dumps(example, sort_keys=True)}
"""
