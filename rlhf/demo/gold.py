"""The gold scorer: the simulated human whose preferences the demo's models must learn.

No model ever sees this function during training; the reward model learns it only from
noisy comparisons (labeler.py), and PPO is judged by it on held-out prompts. As in Gao et
al. 2022, a known gold reward makes over-optimisation of the learned proxy measurable.

The score is a weighted sum of five terms, each in [-1, 1], so the score is in [-1, 1]:

    gold = 0.30 * subject + 0.30 * tone + 0.15 * concise + 0.15 * no_repeat + 0.10 * ends

  subject    +1 if the response mentions the requested subject (its words after "the",
             consecutively, e.g. "old harbor") and no other subject; 0 if it mentions the
             requested subject and another one too; -1 if it does not mention it.
  tone       1 - |mean valence - tone valence| / 0.4, clipped to [-1, 1]. The mean is over
             every occurrence of a LEXICON word in the response. Right tone: 1; one
             off-tone word among three: 0.67; a neighbouring tone (0.4 away): 0; two or
             more steps away: -1. A response without any tagged word expresses no tone
             and gets 0, like a neighbouring tone.
  concise    1 - 0.1 per word beyond 16 - 1 per sentence beyond 2, clipped to [-1, 1].
             A sentence is a stretch of text ending in '.', '!' or '?' (or the unfinished
             stretch at the end).
  no_repeat  1 - 0.5 per repeated content word, clipped to [-1, 1]. A content word is any
             word not in grammar.FUNCTION_WORDS; each occurrence after its first counts.
  ends       +1 if the text ends properly, -1 otherwise. On text, "ends properly" means the
             last character is a '.' directly after a letter: "It glows." does, "It glows"
             (trailed off), "It glows. " (trailing space) and "It glows.." do not. The EOS
             token is not part of the text: whether the model stopped is the trainer's
             business (its missing-EOS penalty, docs/ppo.md#14).

For a prompt outside the demo language only the generic terms apply, with their weights
renormalised so the score still spans [-1, 1]:

    gold = (0.15 * concise + 0.15 * no_repeat + 0.10 * ends) / 0.40

Inputs may be anything a sampled model writes, so nothing here raises on odd text.
Decoded special tokens are tolerated: the response is cut at the first "<|endoftext|>"
(nothing after the EOS belongs to it), and "<|pad|>" / "<|endoftext|>" strings are removed
from prompts (left padding decoded with the prompt).
"""

import re

from rlhf.demo.grammar import FUNCTION_WORDS, LEXICON, SUBJECTS, TONES, parse_prompt, subject_words

SUBJECT_WEIGHT = 0.30
TONE_WEIGHT = 0.30
CONCISE_WEIGHT = 0.15
NO_REPEAT_WEIGHT = 0.15
ENDS_WEIGHT = 0.10

# The length a response may have before the concision term starts to fall. Two sentences
# of the grammar take 7 to 14 words. A third sentence fits the word budget but not the
# sentence budget: the gold scorer prefers one or two sentences, and the demonstrator
# often writes three.
MAX_WORDS = 16
MAX_SENTENCES = 2
PENALTY_PER_EXTRA_WORD = 0.1
PENALTY_PER_EXTRA_SENTENCE = 1.0
PENALTY_PER_REPEATED_WORD = 0.5
# Distance between mean valence and the tone's valence at which the tone term reaches 0:
# one of the grammar's 0.4-wide tone steps, so a neighbouring tone earns nothing and each
# off-tone word in a response costs a visible part of the term.
TONE_DISTANCE_FOR_ZERO = 0.4
SCORE_DECIMALS = 6

EOS_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"

_WORD_PATTERN = re.compile(r"[a-z]+")
_SENTENCE_END_PATTERN = re.compile(r"[.!?]+")

# Each subject as its tuple of mention words, e.g. ("old", "harbor").
_SUBJECT_MENTIONS: dict[str, tuple[str, ...]] = {
    subject: tuple(subject_words(subject)) for subject in SUBJECTS
}
_MENTION_LENGTHS: frozenset[int] = frozenset(len(mention) for mention in _SUBJECT_MENTIONS.values())


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def _words(text: str) -> list[str]:
    """Lower-cased runs of ASCII letters; punctuation, digits and other symbols separate words."""
    return _WORD_PATTERN.findall(text.lower())


def _word_ngrams(words: list[str]) -> set[tuple[str, ...]]:
    """Every run of consecutive words whose length is that of some subject mention."""
    return {
        tuple(words[start : start + size])
        for size in _MENTION_LENGTHS
        for start in range(len(words) - size + 1)
    }


def subject_term(words: list[str], subject: str) -> float:
    """+1 on topic, 0 on topic but also naming another subject, -1 off topic."""
    ngrams = _word_ngrams(words)
    if _SUBJECT_MENTIONS[subject] not in ngrams:
        return -1.0
    names_another = any(
        mention in ngrams for other, mention in _SUBJECT_MENTIONS.items() if other != subject
    )
    return 0.0 if names_another else 1.0


def tone_term(words: list[str], tone: str) -> float:
    """1 at the requested valence, falling linearly with distance; 0 with no tagged word."""
    valences = [LEXICON[word] for word in words if word in LEXICON]
    if not valences:
        return 0.0
    mean_valence = sum(valences) / len(valences)
    return _clip(1.0 - abs(mean_valence - TONES[tone]) / TONE_DISTANCE_FOR_ZERO)


def count_sentences(text: str) -> int:
    """Stretches of text ending in '.', '!' or '?', plus an unfinished final stretch."""
    pieces = _SENTENCE_END_PATTERN.split(text)
    # split leaves one piece after the last terminator; it is a sentence only if it has text.
    finished = len(pieces) - 1
    unfinished = 1 if pieces[-1].strip() else 0
    return finished + unfinished


def concise_term(text: str, words: list[str]) -> float:
    """1 up to MAX_WORDS words and MAX_SENTENCES sentences, falling linearly beyond."""
    extra_words = max(0, len(words) - MAX_WORDS)
    extra_sentences = max(0, count_sentences(text) - MAX_SENTENCES)
    return _clip(
        1.0
        - PENALTY_PER_EXTRA_WORD * extra_words
        - PENALTY_PER_EXTRA_SENTENCE * extra_sentences
    )


def no_repeat_term(words: list[str]) -> float:
    """1 without repetition, minus PENALTY_PER_REPEATED_WORD per repeated content word."""
    content_words = [word for word in words if word not in FUNCTION_WORDS]
    repeated = len(content_words) - len(set(content_words))
    return _clip(1.0 - PENALTY_PER_REPEATED_WORD * repeated)


def ends_term(text: str) -> float:
    """+1 if the text ends with a '.' right after a letter, -1 otherwise."""
    ends_properly = len(text) >= 2 and text[-1] == "." and text[-2].isalpha()
    return 1.0 if ends_properly else -1.0


def clean_response(response: str) -> str:
    """The response text the scorer judges: cut at the first EOS, pad strings removed."""
    return response.split(EOS_TEXT, 1)[0].replace(PAD_TEXT, "")


def clean_prompt(prompt: str) -> str:
    """The prompt without decoded special tokens (left padding, a BOS)."""
    return prompt.replace(PAD_TEXT, "").replace(EOS_TEXT, "")


def gold_terms(prompt: str, response: str) -> dict[str, float]:
    """The five terms of the gold score, each in [-1, 1], keyed by name.

    `subject` and `tone` are absent when the prompt is not one of the demo language's.
    """
    text = clean_response(response)
    words = _words(text)
    terms = {
        "concise": concise_term(text, words),
        "no_repeat": no_repeat_term(words),
        "ends": ends_term(text),
    }
    try:
        subject, tone = parse_prompt(clean_prompt(prompt))
    except ValueError:
        return terms
    terms["subject"] = subject_term(words, subject)
    terms["tone"] = tone_term(words, tone)
    return terms


def gold_score(prompt: str, response: str) -> float:
    """The simulated human's score of `response` to `prompt`, in [-1, 1] (formula above).

    Never raises on any text; a non-string argument is scored as empty text. The score is
    rounded to SCORE_DECIMALS places.
    """
    prompt = prompt if isinstance(prompt, str) else ""
    response = response if isinstance(response, str) else ""
    terms = gold_terms(prompt, response)
    generic = (
        CONCISE_WEIGHT * terms["concise"]
        + NO_REPEAT_WEIGHT * terms["no_repeat"]
        + ENDS_WEIGHT * terms["ends"]
    )
    if "subject" not in terms:
        score = generic / (CONCISE_WEIGHT + NO_REPEAT_WEIGHT + ENDS_WEIGHT)
    else:
        score = SUBJECT_WEIGHT * terms["subject"] + TONE_WEIGHT * terms["tone"] + generic
    # Rounded so that responses of equal quality tie exactly: a mean valence of 0.8 can
    # come out as 0.8000000000000002 depending on the words' order.
    return round(score, SCORE_DECIMALS)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold scores as a PPO `reward_fn` (config: `rlhf.demo.gold:gold_reward`).

    Args:
        prompts: prompt texts, one per sample (decoded special tokens are tolerated).
        responses: response texts, same length as `prompts`, without the EOS token.

    Returns:
        One float in [-1, 1] per sample.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"gold_reward: got {len(prompts)} prompts but {len(responses)} responses"
        )
    return [gold_score(prompt, response) for prompt, response in zip(prompts, responses)]
