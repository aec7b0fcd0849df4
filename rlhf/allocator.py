"""Keep freed memory inside the process while a trainer runs (glibc's malloc on Linux).

Every training step allocates and frees the same large buffers: activations, gradients, the logits of the
output projection (1,470 x 8,193 floats = 48 MB in the SFT benchmark). With its default settings glibc
serves blocks above a (dynamic, at most 32 MB) threshold with fresh ``mmap`` calls and gives the top of the
heap back to the system once more than twice that lies free there. Each step then touches those pages for
the first time again, and every 4 KiB page costs a page fault: 3.6 million faults and 10 s of kernel time in
one run of the SFT benchmark, against 0.3 million (the first touch of the working set) and 2 s with the
settings below.

``freed_memory_kept`` sets two of glibc's documented malloc parameters for its duration (``mallopt``):

- ``M_MMAP_MAX = 0``: no block is served by its own ``mmap``; every one comes from the heap, where a freed
  block is reused by the next request of its size;
- ``M_TRIM_THRESHOLD`` at 2 GiB (the most ``mallopt`` takes): the heap's free top is not handed back to the
  system between steps.

Memory freed during training stays with the process for its next step instead of going back to the system,
and peak memory grows a little, as freed blocks are kept and reused where they fit (SFT benchmark: +6 %).
On exit the parameters are set back to glibc's defaults and ``malloc_trim`` returns the free memory.
glibc's adaptive thresholds stay off from the first ``mallopt`` on, for the rest of the process; its fixed
defaults apply instead.

It does nothing where it cannot or should not act: not glibc (macOS, Windows, musl), or the environment
already decides how malloc behaves (a ``MALLOC_*`` variable, ``glibc.malloc`` in ``GLIBC_TUNABLES``, or
jemalloc, tcmalloc or mimalloc preloaded with ``LD_PRELOAD``): those settings are the user's to keep.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from typing import Iterator, Mapping

logger = logging.getLogger(__name__)

# <malloc.h> parameter numbers, and glibc's defaults to restore (malloc/malloc.c: DEFAULT_TRIM_THRESHOLD,
# DEFAULT_MMAP_MAX).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: ~2 GiB of free heap top before glibc trims it

TUNING_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_ARENA_MAX")

_depth = 0  # nested contexts (a trainer called from inside another's run) set and restore once


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc with ``mallopt`` and ``malloc_trim``; None otherwise."""
    try:
        libc = ctypes.CDLL(None)
        for name in ("gnu_get_libc_version", "mallopt", "malloc_trim"):  # the first exists in glibc only
            getattr(libc, name)
    except (AttributeError, OSError, TypeError):  # TypeError: Windows cannot load the process itself
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def tuned_by_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The environment variable that already decides how malloc behaves, if one does; None otherwise."""
    environ = os.environ if environ is None else environ
    for name in TUNING_VARIABLES:
        if environ.get(name):
            return name
    if "malloc" in environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: glibc's settings do not apply
        return "LD_PRELOAD"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True, libc: ctypes.CDLL | None = None,
                      environ: Mapping[str, str] | None = None) -> Iterator[bool]:
    """For the duration, freed memory stays in the process for reuse (see the module docstring).

    ``libc``, ``environ``: for tests (default: this process's glibc and ``os.environ``).
    Yields whether the settings were applied (False: disabled, not glibc, or the environment decides).
    """
    global _depth
    libc = glibc() if libc is None else libc
    variable = tuned_by_environment(environ)
    if not enabled or libc is None or variable is not None:
        if enabled and variable is not None:
            logger.info("training.keep_freed_memory: %s is set; malloc keeps the settings it gives", variable)
        yield False
        return
    _depth += 1
    try:
        if _depth == 1:  # an enclosing context has set them already otherwise
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)  # what training freed goes back to the system now
