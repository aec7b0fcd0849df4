#!/usr/bin/env python
"""The benchmark workload: one fixed piece of RLHF work (SFT, reward model, PPO), generated offline.

Our trainers, the TRL anchors and the plain-torch ceiling (benchmarks/anchors/) all train on these
files, so that their speeds compare as ratios. Everything derives from fixed seeds; no network:

  tokenizer/      byte-level BPE, vocabulary 8192; <|endoftext|> (id 0) is bos, eos, pad and unk
  model/          GPT-2: 6 layers, 6 heads, d=384, 512 positions, dropout 0, tied embeddings,
                  random init under torch.manual_seed(0) (13.8 M parameters), safetensors
  sft.jsonl       512 {prompt, completion}: prompt 56-64 tokens, completion 176-190
  pref.jsonl      256 {prompt, chosen, rejected}: prompt 56-64 tokens, each response 112-127
  ppo.jsonl       128 {prompt}: exactly 32 tokens each
  MANIFEST.json   sha256 and size of every file above, token-length statistics, the versions used

The bytes depend on the tokenizers, transformers and torch versions (tokenizer.json is the BPE
trainer's output, config.json records transformers' version, the weights come from torch's RNG),
so run this with the trl116 venv's python: its pins give the published bytes, whose hashes are in
benchmarks/workload.sha256. ``make bench-setup`` does that. docs/benchmark.md describes the workload.

    python benchmarks/workload.py [--out DIR]    # generate unless DIR already holds the published workload
    python benchmarks/workload.py --force        # regenerate
    python benchmarks/workload.py --check        # hash DIR against its MANIFEST.json and the published hashes
    python benchmarks/workload.py --verify       # regenerate into a scratch directory and compare, file by file
    python benchmarks/workload.py --print-hashes # DIR's hashes as sha256sum lines

DIR defaults to RLHF_BENCH_DIR, else ~/.cache/rlhf-bench/workload. A deliberate change to what this
script writes bumps WORKLOAD_VERSION (benchmarks/common.py) and replaces benchmarks/workload.sha256
with the new ``--print-hashes``. Everything that trains on the workload calls
``common.verify_workload`` first, so every side provably uses the published bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # stdlib only at import: this script runs in the trl116 venv, where rlhf is not installed

SEED = 0  # the master seed: every random stream below derives from it
SPECIAL = "<|endoftext|>"  # the only special token: bos = eos = pad = unk, id 0
VOCAB_SIZE = 8192
N_TOKENIZER_SENTENCES = 40_000  # enough distinct material for the BPE trainer to fill VOCAB_SIZE

# Token-length bands, counted with the generated tokenizer and no special tokens. They are chosen
# so that no trainer ever truncates at max_length 256, even after appending an EOS:
#   SFT 64 + 190 + 1 = 255 <= 256;   RM 64 + 127 + 1 = 192 <= 256.
SFT_N, SFT_PROMPT, SFT_COMPLETION = 512, (56, 64), (176, 190)
PREF_N, PREF_PROMPT, PREF_RESPONSE = 256, (56, 64), (112, 127)
PPO_N, PPO_PROMPT = 128, (32, 32)  # one fixed length: rollout work does not depend on which prompts share a batch

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    n_positions=512,
    n_embd=384,
    n_layer=6,
    n_head=6,
    n_inner=None,  # 4 * n_embd
    activation_function="gelu_new",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    summary_first_dropout=0.0,
    layer_norm_epsilon=1e-5,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=True,
)

# ----------------------------------------------------------------------------- the lexicon
# A small fixed English vocabulary plus deterministic pseudo-words (names, rare nouns): enough
# distinct material for the BPE trainer to fill an 8192-entry vocabulary. The lists are data:
# their order and their repeated words are part of the workload's bytes.
DETS = "the the the a a this that every some each no one another my your our their his her".split()
NOUNS = """
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father power hour
game line end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy process music market sense
nation plan college interest death experience effect class control care field development role effort
rate heart drug show leader light voice wife police mind price report decision son view relationship
town road arm difference value building action model season society tax director position player record
paper space ground form event official matter center couple site project activity star table need court
oil situation cost industry figure street image phone data picture practice piece land product doctor
wall patient worker news test movie north love support technology step baby computer type attention film
tree source organization hair window evidence population site summer garden river mountain forest ocean
island bridge village castle library kitchen window letter engine machine signal network garden bottle
basket candle mirror ladder blanket pocket button hammer needle ribbon saddle wagon lantern compass
harbor meadow valley desert glacier canyon orchard pasture vineyard cottage tower temple market square
train ship boat plane bicycle horse dog cat bird fish wolf bear fox rabbit deer owl eagle whale turtle
apple bread cheese honey salt sugar coffee tea milk butter soup rice corn bean onion pepper lemon
storm cloud rain snow wind thunder sunrise sunset shadow fire stone metal glass wood paper silver gold
song poem dance painting drawing puzzle riddle secret promise journey voyage adventure lesson answer
""".split()
ADJS = """
good new first last long great little own other old right big high different small large next early
young important few public bad same able late hard major better economic strong possible whole free
military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general environmental
financial blue democratic dark various entire close legal religious cold final main green nice huge
popular traditional cultural quiet gentle bright narrow wide ancient modern hidden golden silent curious
brave clever calm eager fierce gentle humble jolly kind lively proud shy wise wild tiny tall heavy light
soft loud sweet bitter sour fresh warm cool empty busy lonely lucky strange famous distant frozen broken
""".split()
VERBS_PAST = """
was had did said went got made knew thought took saw came wanted looked used found gave told worked
called tried asked needed felt became left put meant kept let began seemed helped showed heard played
ran moved liked lived believed brought happened wrote provided sat stood lost paid met included continued
set learned changed led understood watched followed stopped created spoke read allowed added spent grew
opened walked won offered remembered loved considered appeared bought waited served died sent expected
built stayed fell cut reached killed remained suggested raised passed sold required reported decided
pulled carried painted climbed crossed visited explored repaired cleaned cooked planted gathered counted
""".split()
VERBS_BASE = """
be have do say go get make know think take see come want look use find give tell work call try ask need
feel become leave put mean keep let begin seem help show hear play run move like live believe bring
happen write provide sit stand lose pay meet include continue set learn change lead understand watch
follow stop create speak read allow add spend grow open walk win offer remember love consider appear buy
wait serve send expect build stay fall cut reach remain suggest raise pass sell decide pull carry paint
climb cross visit explore repair clean cook plant gather count
""".split()
ADVS = """
quickly slowly quietly loudly carefully gently happily sadly easily finally suddenly always often never
sometimes usually rarely soon today tomorrow yesterday early late again together alone almost nearly
really very quite rather simply clearly probably certainly perhaps still already even also just only
""".split()
PREPS = "in on at by with from to into over under near behind beside across through around after before during without".split()
CONJS = "and but so because while although when until".split()

ONSETS = "b br bl c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sh sk sl sm sn sp st str t th tr v w wh z".split()
VOWELS = "a e i o u a e i o u ai ea ee oa ou io ie".split()
CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "nd", "rk", "st", "th", "ng", "x"]


def pseudo_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct made-up words of 2-4 syllables, in the order ``rng`` draws them."""
    words, seen = [], set()
    while len(words) < count:
        syllables = rng.choice((2, 2, 3, 3, 4))
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        if 4 <= len(word) <= 14 and word not in seen:
            seen.add(word)
            words.append(word)  # a list, not the set, keeps the order: deterministic
    return words


class SentenceGenerator:
    """Random English-like sentences over the fixed lexicon, from one seeded stream.

    A sentence is a list of *pieces* (" word", ".", ",", "?") that fall on GPT-2 byte-level
    pre-tokenization boundaries, so a text's token count is the sum of its pieces' counts: that is
    what lets ``LengthFiller`` hit a token band without re-tokenising after every word.
    """

    def __init__(self, seed: int):
        lexicon_rng = random.Random(f"lexicon-{SEED}")  # the same names and rare nouns whatever the stream's seed
        pseudo = pseudo_words(lexicon_rng, 9000)
        self.names = [word.capitalize() for word in pseudo[:1500]]
        self.rare_nouns = pseudo[1500:]
        # Zipf-like weights: a few rare nouns and names recur often, most seldom (as in real text)
        self.rare_noun_weights = [1.0 / (i + 10) for i in range(len(self.rare_nouns))]
        self.name_weights = [1.0 / (i + 5) for i in range(len(self.names))]
        self.rng = random.Random(seed)

    def noun(self) -> str:
        rng = self.rng
        return rng.choices(self.rare_nouns, self.rare_noun_weights)[0] if rng.random() < 0.25 else rng.choice(NOUNS)

    def name(self) -> str:
        return self.rng.choices(self.names, self.name_weights)[0]

    def noun_phrase(self, topic: str | None = None) -> list[str]:
        """A determiner, maybe an adjective, and a noun: the topic (if any) about a third of the time."""
        rng = self.rng
        determiner = rng.choice(DETS)
        noun = topic if (topic is not None and rng.random() < 0.35) else self.noun()
        return [determiner, rng.choice(ADJS), noun] if rng.random() < 0.45 else [determiner, noun]

    def sentence(self, topic: str | None = None) -> list[str]:
        """One sentence of seven shapes, capitalised and closed by "." (or "?"), as pieces."""
        rng = self.rng
        np = self.noun_phrase
        shape = rng.randrange(7)
        if shape == 0:
            words = np(topic) + [rng.choice(VERBS_PAST), rng.choice(PREPS)] + np(topic)
        elif shape == 1:
            words = [self.name(), rng.choice(VERBS_PAST)] + np(topic) + ["and", rng.choice(VERBS_PAST), rng.choice(ADVS)]
        elif shape == 2:
            words = ["when"] + np(topic) + [rng.choice(VERBS_PAST), ","] + np(topic) + [
                rng.choice(VERBS_PAST), rng.choice(PREPS)] + np(topic)
        elif shape == 3:
            words = np(topic) + ["of", self.name(), "was", rng.choice(ADJS)]
        elif shape == 4:
            words = ["why", "did"] + np(topic) + [rng.choice(VERBS_BASE), rng.choice(PREPS)] + np(topic) + ["?"]
        elif shape == 5:
            words = [self.name(), "and", self.name(), rng.choice(VERBS_PAST)] + np(topic) + [
                rng.choice(CONJS)] + np(topic) + [rng.choice(VERBS_PAST), rng.choice(ADVS)]
        else:
            words = [rng.choice(ADVS)] + np(topic) + [rng.choice(VERBS_PAST)] + np(topic) + [rng.choice(PREPS)] + np(topic)
        if words[-1] != "?":
            words.append(".")
        words[0] = words[0][0].upper() + words[0][1:]
        return [word if word in {".", ",", "?"} else " " + word for word in words]


def pieces_to_text(pieces: list[str], strip_first_space: bool) -> str:
    text = "".join(pieces)
    return text[1:] if strip_first_space and text.startswith(" ") else text


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(out_dir: Path):
    """Train the byte-level BPE on generated text and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = SentenceGenerator(seed=1000 + SEED)
    corpus = []
    for _ in range(N_TOKENIZER_SENTENCES // 4):
        # four sentences a line around one topic word, as the data below are written
        topic = sentences.noun()
        corpus.append(pieces_to_text(sum((sentences.sentence(topic) for _ in range(4)), []), True))

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"BPE reached vocab {tokenizer.get_vocab_size()} != {VOCAB_SIZE}; enlarge the corpus")
    assert tokenizer.token_to_id(SPECIAL) == 0

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        unk_token=SPECIAL,
        model_max_length=MODEL_CONFIG["n_positions"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ----------------------------------------------------------------------------- model

def build_model(out_dir: Path) -> int:
    """Save the randomly initialised GPT-2 (seed SEED) as safetensors; returns its parameter count."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**MODEL_CONFIG)
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- data

class LengthFiller:
    """Writes text to a token budget, counting tokens piece by piece (each piece's count cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def cost(self, piece: str) -> int:
        count = self.cache.get(piece)
        if count is None:
            count = len(self.tokenizer.encode(piece, add_special_tokens=False).ids)
            self.cache[piece] = count
        return count

    def fill(self, sentences: SentenceGenerator, budget: int, topic: str | None) -> list[str]:
        """Whole sentences, then a cut-off last one, ending in "."; at most ``budget`` tokens and at
        least ``budget`` minus the longest piece."""
        pieces, used = [], 0
        while True:
            for piece in sentences.sentence(topic):
                cost = self.cost(piece)
                if used + cost > budget - 1:  # one token stays free for the closing "."
                    if pieces and pieces[-1] in {",", ".", "?"}:
                        pieces[-1] = "."
                    else:
                        pieces.append(".")
                    return pieces
                pieces.append(piece)
                used += cost


def make_text(filler: LengthFiller, sentences: SentenceGenerator, lo: int, hi: int, prefix: list[str],
              suffix: list[str], topic: str | None, strip_first_space: bool) -> tuple[str, int]:
    """A text of ``prefix + body + suffix`` whose token count lands in [lo, hi]; returns it and its count.

    Draws a target length in the band and fills the body to it; the whole text is tokenised once
    more to confirm (pieces meeting at the seams may merge), retrying with a new draw if it missed.
    """
    fixed = sum(filler.cost(piece) for piece in prefix + suffix)
    for _ in range(1000):
        target = sentences.rng.randint(lo, hi)
        body = filler.fill(sentences, target - fixed, topic)
        text = pieces_to_text(prefix + body + suffix, strip_first_space)
        count = len(filler.tokenizer.encode(text, add_special_tokens=False).ids)
        if lo <= count <= hi:
            return text, count
    raise RuntimeError("could not hit token band")


def band(values: list[int]) -> dict:
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 3), "sum": sum(values)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # ensure_ascii and key order are part of the published bytes: not common.write_jsonl
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=True, sort_keys=False) + "\n")


def build_data(tokenizer, root: Path) -> dict:
    """Write sft.jsonl, pref.jsonl and ppo.jsonl; returns their token-length statistics."""
    filler = LengthFiller(tokenizer)
    topic_prefix = lambda topic: ["Topic", ":", f" {topic}", "."]  # noqa: E731
    stats = {}

    # SFT: a prompt naming a topic, and a completion that keeps to it
    sentences = SentenceGenerator(seed=2000 + SEED)
    rows, prompt_lengths, completion_lengths = [], [], []
    for i in range(SFT_N):
        topic = sentences.noun()
        prompt, n_prompt = make_text(filler, sentences, *SFT_PROMPT, topic_prefix(topic),
                                     [" Write", " about", " it", ":"], topic, True)
        completion, n_completion = make_text(filler, sentences, *SFT_COMPLETION, [], [], topic, False)
        # the completion starts with " X", so prompt + completion tokenises as the two concatenated
        n_both = len(tokenizer.encode(prompt + completion, add_special_tokens=False).ids)
        assert n_both == n_prompt + n_completion, (i, n_prompt, n_completion, n_both)
        rows.append({"prompt": prompt, "completion": completion})
        prompt_lengths.append(n_prompt)
        completion_lengths.append(n_completion)
    write_jsonl(root / "sft.jsonl", rows)
    stats["sft"] = {"rows": SFT_N, "prompt_tokens": band(prompt_lengths), "completion_tokens": band(completion_lengths),
                    "total_tokens_no_eos": band([a + b for a, b in zip(prompt_lengths, completion_lengths)])}

    # Preferences: chosen keeps to the prompt's topic, rejected drifts to another: a signal a
    # reward model can learn, so its loss moves as a real one would
    sentences = SentenceGenerator(seed=3000 + SEED)
    rows, prompt_lengths, chosen_lengths, rejected_lengths = [], [], [], []
    for _ in range(PREF_N):
        topic = sentences.noun()
        prompt, n_prompt = make_text(filler, sentences, *PREF_PROMPT, topic_prefix(topic),
                                     [" Write", " about", " it", ":"], topic, True)
        chosen, n_chosen = make_text(filler, sentences, *PREF_RESPONSE, [], [], topic, False)
        other = sentences.noun()
        while other == topic:
            other = sentences.noun()
        rejected, n_rejected = make_text(filler, sentences, *PREF_RESPONSE, [], [], other, False)
        for response, n_response in ((chosen, n_chosen), (rejected, n_rejected)):
            assert len(tokenizer.encode(prompt + response, add_special_tokens=False).ids) == n_prompt + n_response
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        prompt_lengths.append(n_prompt)
        chosen_lengths.append(n_chosen)
        rejected_lengths.append(n_rejected)
    write_jsonl(root / "pref.jsonl", rows)
    stats["pref"] = {"rows": PREF_N, "prompt_tokens": band(prompt_lengths), "chosen_tokens": band(chosen_lengths),
                     "rejected_tokens": band(rejected_lengths),
                     "chosen_total_no_eos": band([a + b for a, b in zip(prompt_lengths, chosen_lengths)]),
                     "rejected_total_no_eos": band([a + b for a, b in zip(prompt_lengths, rejected_lengths)])}

    # PPO prompts
    sentences = SentenceGenerator(seed=4000 + SEED)
    rows, prompt_lengths = [], []
    for _ in range(PPO_N):
        topic = sentences.noun()
        prompt, n_prompt = make_text(filler, sentences, *PPO_PROMPT, topic_prefix(topic), [" Continue", ":"],
                                     topic, True)
        rows.append({"prompt": prompt})
        prompt_lengths.append(n_prompt)
    write_jsonl(root / "ppo.jsonl", rows)
    stats["ppo"] = {"rows": PPO_N, "prompt_tokens": band(prompt_lengths)}
    return stats


# ----------------------------------------------------------------------------- generating and checking

def hash_tree(root: Path) -> dict:
    """``{relative path: {sha256, bytes}}`` of every file under ``root`` but MANIFEST.json."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "MANIFEST.json":
            files[str(path.relative_to(root))] = {"sha256": common.sha256_of(path), "bytes": path.stat().st_size}
    return files


def generate(root: Path) -> dict:
    """Build the whole workload in a scratch directory beside ``root``, then move it into place.

    Building aside and renaming at the end means an interrupted run never leaves a half-written
    workload where a benchmark would find it. Returns the manifest (plus ``_seconds``).
    """
    import tokenizers
    import torch
    import transformers

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-gen-", dir=str(root.parent)))
    try:
        tokenizer = build_tokenizer(scratch / "tokenizer")
        n_params = build_model(scratch / "model")
        stats = build_data(tokenizer, scratch)
        manifest = {
            "workload_version": common.WORKLOAD_VERSION,
            "seed": SEED,
            "files": hash_tree(scratch),
            "stats": stats,
            "model": {"config": MODEL_CONFIG, "n_params": n_params},
            "generated_with": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
        }
        (scratch / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in [scratch, *scratch.rglob("*")]:  # mkdtemp and safetensors create 0700/0600: make it readable to all
            path.chmod(0o755 if path.is_dir() else 0o644)
        if root.exists():
            shutil.rmtree(root)
        scratch.rename(root)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    manifest["_seconds"] = round(time.perf_counter() - started, 2)
    return manifest


def is_published_workload(root: Path) -> bool:
    try:
        common.verify_workload(root)
        return True
    except common.WorkloadError:
        return False


def own_hashes(root: Path) -> dict[str, str]:
    """The hashes ``root``'s MANIFEST.json records (to check a workload's integrity alone)."""
    return {name: entry["sha256"] for name, entry in common.read_manifest(root)["files"].items()}


def verify_by_regenerating(root: Path) -> int:
    """Regenerate into a scratch directory; one line for each file that differs from the published
    workload or from ``root``'s (if ``root`` holds one). 0 when identical to both."""
    expected = common.read_published_hashes()
    existing = own_hashes(root) if (root / "MANIFEST.json").is_file() else {}
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-verify-"))
    try:
        fresh = generate(scratch / "workload")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    regenerated = {name: entry["sha256"] for name, entry in fresh["files"].items()}
    made_with = ", ".join(f"{k} {v}" for k, v in sorted(fresh["generated_with"].items()))
    problems = []
    for name in sorted(set(regenerated) | set(expected)):
        if regenerated.get(name) != expected.get(name):
            problems.append(f"workload: regenerated {name} differs from the published workload "
                            f"(benchmarks/workload.sha256), generated with {made_with}")
        if existing and regenerated.get(name) != existing.get(name):
            problems.append(f"workload: regenerated {name} differs from {root / name}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(json.dumps({"identical": not problems, "seconds": fresh["_seconds"], "files": len(regenerated)}))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.workload_root(), help="the workload directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="regenerate even if present and valid")
    mode.add_argument("--check", action="store_true",
                      help="only hash the files against MANIFEST.json and the published hashes")
    mode.add_argument("--verify", action="store_true",
                      help="regenerate into a scratch directory and compare with the published hashes and --out")
    mode.add_argument("--print-hashes", action="store_true",
                      help="print --out's file hashes as sha256sum lines (the format of benchmarks/workload.sha256)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = args.out.expanduser().absolute()

    try:
        if args.check:
            manifest = common.verify_workload(root)
            print(f"workload: {root}: all {len(manifest['files'])} files match MANIFEST.json and the published hashes")
            return 0
        if args.print_hashes:
            manifest = common.verify_workload(root, published=own_hashes(root))
            sys.stdout.write(common.format_published_hashes(manifest["files"]))
            return 0
        if args.verify:
            return verify_by_regenerating(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        if args.force or not is_published_workload(root):
            manifest = generate(root)
            print(f"workload: generated {root} in {manifest['_seconds']:.0f} s "
                  f"({len(manifest['files'])} files, {manifest['model']['n_params']:,} parameters)")
        else:
            print(f"workload: {root} already holds the published workload")
        # Generated by other library versions? Say so now, not at the first benchmark run.
        common.verify_workload(root)
        return 0
    except common.WorkloadError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
