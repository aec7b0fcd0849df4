"""The one exception for user mistakes.

A ``UserError`` is a mistake the user can fix (a bad config key, a missing column, a file
that does not exist). The CLI prints its message as a single line and exits with status 2,
without a traceback. Everything else is a bug in rlhf and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, data or checkpoint; the message says what and how to fix it."""


def exact_div(numerator: int, denominator: int, what: str) -> int:
    """Divide two integers that must divide exactly, or explain which setting is wrong."""
    if denominator <= 0 or numerator % denominator != 0:
        raise UserError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator
