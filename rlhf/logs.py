"""Where log lines go when ``rlhf`` runs from the command line.

The terminal shows rlhf's own lines (progress, what a stage is doing, its result) and its one-line
errors. Everything else that libraries log (datasets, transformers, accelerate, peft, torch) and
every Python warning goes to ``<output_dir>/run.log`` of the run, beside rlhf's own lines, so
nothing is lost and nothing buries the one line that matters. A few messages that repeat at every
step or checkpoint and that a user cannot act on are dropped altogether (``SILENCED``, each with
the reason).

A library user who calls the trainers from Python keeps their own logging setup: nothing here runs
unless ``setup_cli_logging`` was called.
"""

from __future__ import annotations

import logging
import os

LIBRARIES = ("datasets", "transformers", "accelerate", "peft", "torch", "urllib3", "filelock", "httpx", "huggingface_hub")
RUN_LOG = "run.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger name, message text, and a comment on why it is dropped rather than kept in run.log)
SILENCED = (
    # accelerate.save_state, at every checkpoint of a model with tied input and output embeddings (GPT-2):
    # safetensors stores a tied tensor once and accelerate says so each time. Reloading restores the tie
    # (every resume test reloads such a model bitwise); there is nothing for the user to do.
    ("accelerate", "Removed shared tensor"),
)

_cli_logging = False
_terminal: logging.Handler | None = None
_run_handlers: dict[str, logging.Handler] = {}


class _OnlyRlhf(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "rlhf" or record.name.startswith("rlhf.")


class _Silenced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any((record.name == name or record.name.startswith(name + ".")) and start in message
                       for name, start in SILENCED)


def setup_cli_logging() -> None:
    """Terminal: rlhf's lines only; libraries and warnings: the run's run.log (``attach_run_log``)."""
    global _cli_logging, _terminal
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if _terminal is not None:  # called again in one process (tests call the CLI in-process): today's stderr
        root.removeHandler(_terminal)
    _terminal = logging.StreamHandler()
    _terminal.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    _terminal.addFilter(_OnlyRlhf())
    root.addHandler(_terminal)
    for name in LIBRARIES:  # their INFO is chatter; WARNING and above reach run.log
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of 'py.warnings': run.log, not the terminal
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets.utils.logging as datasets_logging
    import transformers

    # Both libraries print through a handler of their own besides propagating; let only ours decide.
    datasets_logging._get_library_root_logger().handlers.clear()
    datasets_logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    transformers.utils.logging.set_verbosity_warning()
    _cli_logging = True


def attach_run_log(directory: str, replace_previous: bool = True) -> str | None:
    """Also write every log record (rlhf's and the libraries') to ``directory/run.log`` (appending).

    Does nothing unless ``setup_cli_logging`` ran. ``replace_previous``: stop writing to the run.log
    of the previous run (a pipeline's stages each get theirs; the pipeline keeps its own with False).
    """
    if not _cli_logging:
        return None
    path = os.path.join(directory, RUN_LOG)
    root = logging.getLogger()
    if replace_previous:
        for other, handler in list(_run_handlers.items()):
            if getattr(handler, "replaceable", True) and other != path:
                root.removeHandler(handler)
                handler.close()
                del _run_handlers[other]
    if path not in _run_handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_Silenced())
        handler.replaceable = replace_previous
        root.addHandler(handler)
        _run_handlers[path] = handler
    return path
