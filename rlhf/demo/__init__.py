"""The embedded demo task: answer a request for a subject in a tone (see docs/demo.md).

A small generated language (grammar), a gold scorer standing in for the human (gold), a
simulated noisy labeler (labeler), a middling demonstrator (demonstrator) and the data
generator (build). Nothing here downloads anything.
"""

from rlhf.demo.build import build_demo_data
from rlhf.demo.gold import gold_reward, gold_score
from rlhf.demo.grammar import parse_prompt
from rlhf.demo.labeler import compare, label_pairs, rank

__all__ = [
    "build_demo_data",
    "compare",
    "gold_reward",
    "gold_score",
    "label_pairs",
    "parse_prompt",
    "rank",
]
