"""A demonstrator of middling quality: it writes the SFT responses and the candidates the
shipped preference pairs compare.

It mostly names the requested subject, picks words of roughly the requested tone and
stops after one to three sentences. But, like a hurried human writer, it also drifts to
another subject, uses the wrong tone, slips in off-tone words, repeats a sentence, writes
one sentence too many, rambles or trails off, each with the probability below. Few of its
responses are flawless (about 7 %), yet each flaw is avoidable on its own. SFT imitates
this mixture, flaws included, which leaves room for feedback to improve on it: a policy
that keeps only the good habits scores higher by gold than the demonstrator.

Deterministic given the `random.Random` passed in.
"""

import random

from rlhf.demo.grammar import (
    ADJECTIVES_BY_VALENCE,
    ADVERBS_BY_VALENCE,
    FOLLOW_UP_TEMPLATES,
    OPENING_TEMPLATES,
    SUBJECTS,
    TONES,
    VALENCE_LEVELS,
    VERBS_BY_VALENCE,
    parse_prompt,
)

# How many sentences a response has when it does not ramble. Three are common although
# the gold scorer prefers at most two: a mild, frequent flaw.
SENTENCE_COUNT_WEIGHTS: dict[int, float] = {1: 0.2, 2: 0.4, 3: 0.4}

# The flaws, each decided independently per response. Big flaws are rare and small ones
# frequent. Many frequent small flaws lower the mean gold score more than they widen its
# spread, so the best score (1.0) lies about 1.5 standard deviations above the
# demonstrator's mean (0.54 +- 0.32): the bar for PPO in docs/demo.md#measures (gold up by one standard
# deviation of the SFT samples) is then within reach of a policy that drops the flaws.
P_OFF_TOPIC = 0.08  # the whole response is about another subject
P_WANDERS = 0.15  # one extra sentence about another subject
P_WRONG_TONE = 0.10  # writes in another tone throughout
P_WORD_TONE_SLIP = 0.45  # per tagged word: taken from a neighbouring valence level
P_REPEATS = 0.3  # one of its sentences appears twice
P_RAMBLES = 0.15  # goes on for 4 or 5 sentences instead
P_TRAILS_OFF = 0.15  # the final period is missing

RAMBLING_SENTENCE_COUNTS = [4, 5]


class _WordPicker:
    """Draws tagged words for one response, avoiding reuse so that repetition only comes
    from the deliberate P_REPEATS flaw (unless a pool runs out while rambling)."""

    def __init__(self, target_valence: float, rng: random.Random):
        self.target_valence = target_valence
        self.rng = rng
        self.used: set[str] = set()

    def _valence_for_next_word(self) -> float:
        if self.rng.random() >= P_WORD_TONE_SLIP:
            return self.target_valence
        level = VALENCE_LEVELS.index(self.target_valence)
        neighbours = [
            VALENCE_LEVELS[i] for i in (level - 1, level + 1) if 0 <= i < len(VALENCE_LEVELS)
        ]
        return self.rng.choice(neighbours)

    def pick(self, words_by_valence: dict[float, list[str]]) -> str:
        pool = words_by_valence[self._valence_for_next_word()]
        unused = [word for word in pool if word not in self.used]
        word = self.rng.choice(unused or pool)
        self.used.add(word)
        return word

    def fill(self, template: str, subject: str = "") -> str:
        """Fill a sentence template's slots in a fixed order (so draws are reproducible)."""
        slots = {"Subject": subject[:1].upper() + subject[1:]}
        if "{adjective}" in template:
            slots["adjective"] = self.pick(ADJECTIVES_BY_VALENCE)
        if "{adjective2}" in template:
            slots["adjective2"] = self.pick(ADJECTIVES_BY_VALENCE)
        if "{verb}" in template:
            slots["verb"] = self.pick(VERBS_BY_VALENCE)
        if "{adverb}" in template:
            slots["adverb"] = self.pick(ADVERBS_BY_VALENCE)
        return template.format(**slots)


def _other(options: list[str], excluded: str, rng: random.Random) -> str:
    return rng.choice([option for option in options if option != excluded])


def write_response(subject: str, tone: str, rng: random.Random) -> str:
    """The demonstrator's response to a request for `subject` in `tone`."""
    # Every flaw is drawn up front, in a fixed order, so the number of draws does not
    # depend on the words chosen.
    off_topic = rng.random() < P_OFF_TOPIC
    wanders = rng.random() < P_WANDERS
    wrong_tone = rng.random() < P_WRONG_TONE
    repeats = rng.random() < P_REPEATS
    rambles = rng.random() < P_RAMBLES
    trails_off = rng.random() < P_TRAILS_OFF

    written_subject = _other(SUBJECTS, subject, rng) if off_topic else subject
    written_tone = _other(list(TONES), tone, rng) if wrong_tone else tone
    if rambles:
        sentence_count = rng.choice(RAMBLING_SENTENCE_COUNTS)
    else:
        counts = list(SENTENCE_COUNT_WEIGHTS)
        sentence_count = rng.choices(counts, weights=[SENTENCE_COUNT_WEIGHTS[c] for c in counts])[0]

    picker = _WordPicker(TONES[written_tone], rng)
    sentences = [picker.fill(rng.choice(OPENING_TEMPLATES), written_subject)]
    follow_ups = rng.sample(FOLLOW_UP_TEMPLATES, k=min(sentence_count - 1, len(FOLLOW_UP_TEMPLATES)))
    sentences += [picker.fill(template) for template in follow_ups]

    if wanders:
        stray_subject = _other(SUBJECTS, written_subject, rng)
        stray_sentence = picker.fill(rng.choice(OPENING_TEMPLATES), stray_subject)
        sentences.insert(rng.randint(1, len(sentences)), stray_sentence)
    if repeats:
        position = rng.randrange(len(sentences))
        sentences.insert(position + 1, sentences[position])

    response = " ".join(sentences)
    if trails_off:
        response = response[:-1]  # every template ends with "."
    return response


def demonstrate(prompt: str, rng: random.Random) -> str:
    """The demonstrator's response to a prompt of the demo language (see grammar.py)."""
    subject, tone = parse_prompt(prompt)
    return write_response(subject, tone, rng)
