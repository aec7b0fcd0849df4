"""The demo's small generated language: requests, responses and the sentiment lexicon.

A prompt asks for a short text about a SUBJECT ("the old harbor") in a TONE ("gloomy"),
in one of several PHRASINGS:

    Write a gloomy note about the old harbor.
    Describe the old harbor in a gloomy way.

A response is one to a few short sentences built from templates whose slots take
adjectives, verbs and adverbs. Every such word carries a valence in [-1, 1] (the
LEXICON); a tone is a target valence. The gold scorer (gold.py) reads these tags to judge
whether a response has the requested tone, and the demonstrator (demonstrator.py) uses
them to write responses.

Everything here is a constant or a pure function of constants, so the language, and the
split of prompt combinations into train and held-out, never depend on a seed.
"""

import hashlib

# ------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------

# Subjects as they appear in a sentence (with the article). The words after "the" are
# what a response must contain to mention the subject; none of them is in the LEXICON,
# so naming the subject never changes a response's tone.
SUBJECTS: list[str] = [
    "the old harbor",
    "the broken lantern",
    "the stone bridge",
    "the little garden",
    "the empty station",
    "the narrow street",
    "the northern lighthouse",
    "the village bakery",
    "the wooden boat",
    "the far mountain",
    "the river mill",
    "the city library",
    "the summer field",
    "the winter forest",
    "the hidden well",
    "the iron gate",
    "the clock tower",
    "the night train",
    "the morning market",
    "the painted door",
    "the silver lake",
    "the red barn",
    "the school yard",
    "the grey cat",
    "the young fox",
    "the sleeping dog",
    "the country road",
    "the glass window",
    "the copper kettle",
    "the paper kite",
    "the apple orchard",
    "the sandy beach",
    "the castle wall",
    "the mountain cabin",
    "the marble fountain",
    "the fishing village",
]

# Tone -> target valence. Five evenly spaced levels, so a neighbouring tone is always
# 0.4 away and the opposite tone 1.6 away; the gold scorer's tone term is linear in
# that distance.
TONES: dict[str, float] = {
    "cheerful": 0.8,
    "hopeful": 0.4,
    "calm": 0.0,
    "wistful": -0.4,
    "gloomy": -0.8,
}

# Request templates. Each ends with a period; render_prompt adds the final newline that
# separates prompt from response in the training text.
PHRASINGS: list[str] = [
    "Write a {tone} note about {subject}.",
    "Describe {subject} in a {tone} way.",
    "Say something {tone} about {subject}.",
    "Tell me about {subject} in a {tone} voice.",
    "Give a {tone} description of {subject}.",
    "In a {tone} tone, describe {subject}.",
]

# Fraction of (subject, tone, phrasing) combinations kept out of every training file and
# used only for evaluation (prompts_eval, sft_eval, pref_eval).
HELD_OUT_PERCENT = 15

# ------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------

# Sentiment-tagged words by part of speech and valence level. The levels are exactly the
# tone valences, so a response written entirely at one level has that tone's valence.
# Tone names themselves are left out so a policy cannot just copy the tone from the prompt.
ADJECTIVES_BY_VALENCE: dict[float, list[str]] = {
    0.8: ["bright", "joyful", "sunny", "merry", "radiant", "lively"],
    0.4: ["warm", "gentle", "pleasant", "fresh", "kind", "friendly"],
    0.0: ["quiet", "still", "plain", "steady", "simple", "ordinary"],
    -0.4: ["faded", "lonely", "pale", "dim", "weary", "tired"],
    -0.8: ["bleak", "dreary", "grim", "dismal", "miserable", "dark"],
}
VERBS_BY_VALENCE: dict[float, list[str]] = {
    0.8: ["shines", "sparkles", "laughs", "sings", "dances"],
    0.4: ["hums", "smiles", "blooms", "glows", "welcomes"],
    0.0: ["stands", "waits", "sits", "stays", "remains"],
    -0.4: ["sighs", "fades", "lingers", "drifts", "sags"],
    -0.8: ["crumbles", "groans", "weeps", "rots", "decays"],
}
ADVERBS_BY_VALENCE: dict[float, list[str]] = {
    0.8: ["happily", "brightly", "joyfully", "merrily", "gladly"],
    0.4: ["warmly", "gently", "softly", "kindly", "sweetly"],
    0.0: ["quietly", "slowly", "steadily", "evenly", "plainly"],
    -0.4: ["sadly", "wearily", "faintly", "dimly", "vaguely"],
    -0.8: ["bitterly", "grimly", "miserably", "darkly", "coldly"],
}

# The valence levels in increasing order; the demonstrator's tone noise moves one step.
VALENCE_LEVELS: list[float] = sorted(TONES.values())

# First sentence of a response: names the subject. {Subject} is capitalised.
OPENING_TEMPLATES: list[str] = [
    "{Subject} is {adjective}.",
    "{Subject} is {adjective} and {adjective2}.",
    "{Subject} {verb} {adverb}.",
]
# Later sentences refer back with "it" or describe the surroundings, so a good response
# never needs to repeat a content word.
FOLLOW_UP_TEMPLATES: list[str] = [
    "It {verb} {adverb}.",
    "It is {adjective}.",
    "It is {adjective} and {adjective2}.",
    "The air feels {adjective}.",
    "Everything around it {verb} {adverb}.",
]

# Words every sentence may need; the repetition check ignores them. Any other word
# (subject words, "air", "feels", tagged words) counts as repeated on its second use.
FUNCTION_WORDS: frozenset[str] = frozenset({"the", "a", "an", "it", "is", "and"})


def _build_lexicon() -> dict[str, float]:
    lexicon: dict[str, float] = {}
    for words_by_valence in (ADJECTIVES_BY_VALENCE, VERBS_BY_VALENCE, ADVERBS_BY_VALENCE):
        for valence, words in words_by_valence.items():
            for word in words:
                assert word not in lexicon, f"{word!r} tagged twice"
                lexicon[word] = valence
    return lexicon


# word -> valence in [-1, 1]: the grammar's own sentiment tags.
LEXICON: dict[str, float] = _build_lexicon()


def subject_words(subject: str) -> list[str]:
    """The words that mention `subject` in a response: "the old harbor" -> ["old", "harbor"]."""
    words = subject.split()
    return words[1:] if words and words[0] == "the" else words


# ------------------------------------------------------------------------------------
# Prompt combinations and the train / held-out split
# ------------------------------------------------------------------------------------

def render_prompt(subject: str, tone: str, phrasing: str) -> str:
    """The prompt text of one combination, ending with the newline that precedes a response."""
    return phrasing.format(subject=subject, tone=tone) + "\n"


def all_combos() -> list[tuple[str, str, str]]:
    """Every (subject, tone, phrasing) combination, in a fixed order."""
    return [
        (subject, tone, phrasing)
        for subject in SUBJECTS
        for tone in TONES
        for phrasing in PHRASINGS
    ]


def is_held_out(subject: str, tone: str, phrasing: str) -> bool:
    """Whether a combination is reserved for evaluation.

    Decided by a hash of the combination itself, not by a seed or by list positions, so
    the split stays the same across seeds and when subjects or phrasings are added.
    """
    key = f"{subject}|{tone}|{phrasing}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return bucket < HELD_OUT_PERCENT


# Computed once: callers sample from these lists in loops.
_TRAIN_COMBOS = tuple(combo for combo in all_combos() if not is_held_out(*combo))
_HELD_OUT_COMBOS = tuple(combo for combo in all_combos() if is_held_out(*combo))


def train_combos() -> list[tuple[str, str, str]]:
    """The combinations training files may use, in a fixed order."""
    return list(_TRAIN_COMBOS)


def held_out_combos() -> list[tuple[str, str, str]]:
    """The combinations used only for evaluation, in a fixed order."""
    return list(_HELD_OUT_COMBOS)


def _build_prompt_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    for subject, tone, phrasing in all_combos():
        text = render_prompt(subject, tone, phrasing).strip()
        assert text not in index, f"two combinations render as {text!r}"
        index[text] = (subject, tone)
    return index


# Stripped prompt text -> (subject, tone). The language is small enough to enumerate,
# which makes parsing exact: no regex can disagree with render_prompt.
_PROMPT_INDEX: dict[str, tuple[str, str]] = _build_prompt_index()


def parse_prompt(prompt: str) -> tuple[str, str]:
    """The (subject, tone) a prompt of this language asks for.

    Surrounding whitespace, such as the prompt's final newline, is ignored.

    Raises:
        ValueError: `prompt` is not a prompt of this language.
    """
    parsed = _PROMPT_INDEX.get(prompt.strip())
    if parsed is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return parsed
