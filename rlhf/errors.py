"""The exceptions the CLI turns into one line.

A ``UserError`` is a mistake the user can fix (a bad config key, a missing column, a file
that does not exist): one line, exit status 2, no traceback. A ``RunStopped`` is a run that
ended early on purpose: preempted by a signal after writing a checkpoint (``Preempted``, exit
128 + the signal), or stopped before an optimizer step would train on a NaN or infinity
(``NonFiniteValue``, exit 3). Everything else is a bug in rlhf and keeps its traceback.
"""

import signal


class UserError(Exception):
    """A mistake in the user's config, data or checkpoint; the message says what and how to fix it."""


def exact_div(numerator: int, denominator: int, what: str) -> int:
    """Divide two integers that must divide exactly, or explain which setting is wrong."""
    if denominator <= 0 or numerator % denominator != 0:
        raise UserError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


class RunStopped(Exception):
    """The run stopped before its end; the message is one line and ``exit_code`` what the shell sees."""

    exit_code = 1
    resume_hint = ""  # how to continue, filled in by whoever knows the command (the trainer, the pipeline)


class Preempted(RunStopped):
    """SIGTERM or SIGINT: the current step was finished and a complete checkpoint written."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | None, before: str | None = None):
        """``before``: a pipeline stopped between its stages, before this one (everything earlier is kept)."""
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"
        name = signal.Signals(signum).name
        if before is not None:
            super().__init__(f"stopped by {name} before {before}; every finished stage is kept")
        else:
            where = f"checkpoint {checkpoint} written" if checkpoint else "nothing to save yet"
            super().__init__(f"stopped by {name} after step {step}; {where}")


class NonFiniteValue(RunStopped):
    """A loss, gradient norm, reward, value or advantage that is NaN or infinite, found before the step."""

    exit_code = 3

    def __init__(self, step: int, quantity: str, detail: str, run=None):
        newest = run.latest_checkpoint() if run is not None else None
        where = (f"newest checkpoint: {newest} (lower training.lr, check the data or the reward, then resume "
                 "from it)" if newest else "no checkpoint yet (lower training.lr, check the data or the reward, "
                 "then start again: --resume then starts from step 0)")
        super().__init__(f"step {step}: {quantity} is {detail}; stopped before the optimizer step, so no weights "
                         f"were changed by it; {where}")
