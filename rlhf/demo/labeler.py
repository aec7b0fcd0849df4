"""Simulated annotators: noisy comparisons and rankings drawn from the gold score.

A real annotator prefers the better response most of the time and errs more when two
responses are close. The Bradley-Terry model says exactly that:

    P(a preferred to b) = sigmoid((g_a - g_b) / temperature)

with g the gold score (gold.py). temperature = 0 is a noiseless annotator (the higher gold
score always wins, an exact tie is a coin flip); a large temperature is a coin flip
everywhere. Rankings of K > 2 responses use the Plackett-Luce model with the same
temperature (choose the best among the remaining responses with probability proportional
to exp(g / temperature), remove it, repeat), which reduces to Bradley-Terry for K = 2.

All randomness comes from the `random.Random` passed in, so labels are reproducible.
"""

import math
import random

from rlhf.demo.gold import gold_score

# Default label noise for the shipped preference files. Chosen so that 80-90 % of the
# labels agree with the noiseless gold preference on pairs of demonstrator responses (the
# measured value is in data/demo/README.md): noisy like people, though cleaner than the
# roughly 65-77 % agreement between human labelers reported for summarisation and
# instruction following, so a small reward model can still pass the 75 % bar of docs/demo.md#measures.
DEFAULT_NOISE_TEMPERATURE = 0.15


def _check_temperature(noise_temperature: float) -> None:
    if not noise_temperature >= 0:  # also rejects NaN
        raise ValueError(f"noise_temperature must be >= 0, got {noise_temperature}")


def prefer_probability(gold_a: float, gold_b: float, noise_temperature: float) -> float:
    """Bradley-Terry probability that a response with gold score `gold_a` is preferred.

    At temperature 0 this is 1, 0 or 0.5 (exact tie).
    """
    _check_temperature(noise_temperature)
    if noise_temperature == 0:
        return 1.0 if gold_a > gold_b else 0.0 if gold_a < gold_b else 0.5
    scaled_difference = (gold_a - gold_b) / noise_temperature
    # Two branches keep exp() from overflowing for large |difference| / small temperature.
    if scaled_difference >= 0:
        return 1.0 / (1.0 + math.exp(-scaled_difference))
    exp_difference = math.exp(scaled_difference)
    return exp_difference / (1.0 + exp_difference)


def compare(
    prompt: str,
    response_a: str,
    response_b: str,
    rng: random.Random,
    noise_temperature: float = DEFAULT_NOISE_TEMPERATURE,
) -> bool:
    """One simulated comparison: True if `response_a` is preferred to `response_b`.

    Draws exactly one number from `rng` at every temperature, so runs that differ only in
    temperature see the same draws and their labels differ only where the noise decides.
    """
    probability_a = prefer_probability(
        gold_score(prompt, response_a), gold_score(prompt, response_b), noise_temperature
    )
    return rng.random() < probability_a


def rank(
    prompt: str,
    responses: list[str],
    rng: random.Random,
    noise_temperature: float = DEFAULT_NOISE_TEMPERATURE,
) -> list[int]:
    """A simulated ranking: indices into `responses`, best first (a permutation).

    Plackett-Luce sampling: repeatedly pick the best of the remaining responses with
    probability softmax(gold / temperature), i.e. one Bradley-Terry-consistent choice per
    position. At temperature 0 it sorts by gold score, breaking exact ties at random.
    """
    _check_temperature(noise_temperature)
    gold_scores = [gold_score(prompt, response) for response in responses]
    if noise_temperature == 0:
        tie_breakers = [rng.random() for _ in responses]
        return sorted(
            range(len(responses)),
            key=lambda index: (-gold_scores[index], tie_breakers[index]),
        )
    remaining = list(range(len(responses)))
    ranking: list[int] = []
    while remaining:
        # Subtract the best score before exp() so the largest weight is exactly 1.
        best_score = max(gold_scores[index] for index in remaining)
        weights = [
            math.exp((gold_scores[index] - best_score) / noise_temperature)
            for index in remaining
        ]
        threshold = rng.random() * sum(weights)
        chosen_position = len(remaining) - 1  # fallback for rounding at the very top
        cumulative = 0.0
        for position, weight in enumerate(weights):
            cumulative += weight
            if threshold < cumulative:
                chosen_position = position
                break
        ranking.append(remaining.pop(chosen_position))
    return ranking


def label_pairs(
    prompts: list[str],
    responses_per_prompt: list[list[str]],
    rng: random.Random,
    noise_temperature: float = DEFAULT_NOISE_TEMPERATURE,
    k: int = 2,
) -> list[dict]:
    """Label K responses per prompt into reward-model rows (docs/stages.md#data).

    A prompt whose responses all have the same gold score (identical responses included)
    carries no preference signal, only label noise, so it yields no row; the result can
    therefore be shorter than `prompts`.

    Args:
        prompts: one prompt text per group.
        responses_per_prompt: for each prompt, exactly `k` candidate responses.
        rng: source of the label noise.
        noise_temperature: Bradley-Terry / Plackett-Luce temperature (0 = noiseless).
        k: responses compared per prompt, at least 2.

    Returns:
        k == 2: rows {"prompt", "chosen", "rejected"}.
        k > 2:  rows {"prompt", "responses", "ranking"}, where ranking lists indices into
                responses, best first.
    """
    if k < 2:
        raise ValueError(f"label_pairs: k must be at least 2, got {k}")
    if len(prompts) != len(responses_per_prompt):
        raise ValueError(
            f"label_pairs: got {len(prompts)} prompts but "
            f"{len(responses_per_prompt)} response lists"
        )
    rows: list[dict] = []
    for prompt, responses in zip(prompts, responses_per_prompt):
        if len(responses) != k:
            raise ValueError(
                f"label_pairs: expected {k} responses per prompt, got {len(responses)} "
                f"for prompt {prompt!r}"
            )
        if len({gold_score(prompt, response) for response in responses}) == 1:
            continue
        if k == 2:
            response_a, response_b = responses
            a_preferred = compare(prompt, response_a, response_b, rng, noise_temperature)
            chosen, rejected = (response_a, response_b) if a_preferred else (response_b, response_a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            ranking = rank(prompt, responses, rng, noise_temperature)
            rows.append({"prompt": prompt, "responses": list(responses), "ranking": ranking})
    return rows
