"""Freed memory kept in the process while a trainer runs (rlhf.allocator, training.keep_freed_memory): the
glibc parameters set and restored, left alone where the environment or the C library decides, and, on this
machine's glibc, a freed buffer really reused without page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from rlhf import allocator
from rlhf.allocator import (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD, M_MMAP_MAX,
                            M_TRIM_THRESHOLD, freed_memory_kept, glibc, tuned_by_environment)
from rlhf.training import stops_gracefully

KEPT = [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)]
RESTORED = [("mallopt", M_MMAP_MAX, DEFAULT_MMAP_MAX), ("mallopt", M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
            ("malloc_trim", 0)]


class FakeLibc:
    """Records the calls a real glibc would get."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_parameters_set_for_the_duration_and_restored_with_a_trim():
    libc = FakeLibc()
    with freed_memory_kept(True, libc=libc, environ={}) as applied:
        assert applied and libc.calls == KEPT
    assert libc.calls == KEPT + RESTORED


def test_restored_when_the_body_raises():
    libc = FakeLibc()
    with pytest.raises(RuntimeError), freed_memory_kept(True, libc=libc, environ={}):
        raise RuntimeError("a training step failed")
    assert libc.calls == KEPT + RESTORED


def test_nested_contexts_set_once_and_restore_when_the_outermost_exits():
    libc = FakeLibc()
    with freed_memory_kept(True, libc=libc, environ={}):
        with freed_memory_kept(True, libc=libc, environ={}) as inner:
            assert inner
        assert libc.calls == KEPT  # the inner exit left the outer run's settings alone
    assert libc.calls == KEPT + RESTORED
    assert allocator._depth == 0


def test_off_by_the_key_or_without_glibc():
    libc = FakeLibc()
    with freed_memory_kept(False, libc=libc, environ={}) as applied:
        assert not applied
    assert libc.calls == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocator, "glibc", lambda: None)  # macOS, Windows, musl
        with freed_memory_kept(True, environ={}) as applied:
            assert not applied


@pytest.mark.parametrize("environ, variable", [
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512:glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ({"LD_PRELOAD": "/opt/libtcmalloc_minimal.so"}, "LD_PRELOAD"),
])
def test_settings_the_environment_gives_are_kept(environ, variable, caplog):
    libc = FakeLibc()
    assert tuned_by_environment(environ) == variable
    with caplog.at_level("INFO", logger="rlhf.allocator"):
        with freed_memory_kept(True, libc=libc, environ=environ) as applied:
            assert not applied
    assert libc.calls == []
    assert variable in caplog.text


def test_unrelated_environment_does_not_count():
    assert tuned_by_environment({"LD_PRELOAD": "/usr/lib/libfaketime.so", "GLIBC_TUNABLES": "glibc.rtld.nns=2",
                                 "MALLOC_CHECK_": ""}) is None


def test_every_trainer_runs_inside_the_context(monkeypatch):
    """stops_gracefully (every trainer's train) enters it with the config's key."""
    seen = []
    monkeypatch.setattr("rlhf.training.freed_memory_kept",
                        lambda enabled: seen.append(enabled) or freed_memory_kept(enabled, libc=FakeLibc(), environ={}))

    class Trainer:
        command = "sft"

        def __init__(self, keep):
            self.config = SimpleNamespace(output_dir="unused", training=SimpleNamespace(keep_freed_memory=keep))

        @stops_gracefully
        def train(self):
            return allocator._depth

    assert Trainer(True).train() == 1
    assert Trainer(False).train() == 0
    assert seen == [True, False]


PAGE_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from rlhf.allocator import freed_memory_kept

    with freed_memory_kept(sys.argv[1] == "on", environ={}):
        torch.empty(16 * 2**20).fill_(1.0)          # 64 MiB allocated, touched and freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for step in range(16):                      # the same size again, as each training step asks
            torch.empty(16 * 2**20).fill_(2.0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(glibc() is None, reason="not glibc")
def test_a_freed_buffer_is_reused_without_page_faults():
    """On this machine's glibc: a 64 MiB buffer freed and asked for again 16 times faults its 16,384 pages in
    afresh every time by default (served by mmap, unmapped on free). Inside the context most requests reuse the
    freed block (measured: 1 to 6 of the 16 take new pages, as torch's aligned allocations split blocks)."""
    def faults(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True,
                                check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
        return int(result.stdout.split()[-1])

    default = faults("off")
    assert default >= 16 * 16_384
    assert faults("on") <= default // 2
