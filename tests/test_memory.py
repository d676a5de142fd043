"""Returning freed memory to the system while the step compiles."""

import os
import threading

import pytest

from dino_keras import callbacks, memory


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _threads_named(name):
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def glibc():
    if memory._malloc_trim() is None:
        pytest.fail("this test runs on Linux with glibc (CI's platform)")


def test_release_returns_freed_heap_memory_to_the_system(glibc):
    # 1 KiB objects come from malloc's heap; keeping the last one pins the heap's top, so only
    # malloc_trim can give the pages in between back.
    blocks = [bytes(1024) + bytes([i % 256]) for i in range(300_000)]
    last = blocks[-1]
    del blocks
    before = _resident_bytes()
    assert memory.release_free_memory()
    after = _resident_bytes()
    assert before - after > 100 * 2**20, (before, after)
    assert last[-1] == (300_000 - 1) % 256


def test_releaser_thread_runs_only_inside_the_block(glibc):
    with memory.FreeMemoryReleaser(interval=0.01) as releaser:
        assert len(_threads_named("free-memory-releaser")) == 1
        assert releaser._thread.is_alive()
    assert not _threads_named("free-memory-releaser")


def test_callback_stops_after_the_first_batch_of_each_fit(glibc):
    callback = callbacks.ReleaseFreeMemoryWhileCompiling(interval=0.01)
    for _ in range(2):  # a resumed run calls fit twice
        callback.on_train_begin()
        assert _threads_named("free-memory-releaser")
        callback.on_train_batch_end(0)
        assert not _threads_named("free-memory-releaser")
        callback.on_train_batch_end(1)
        callback.on_train_end()
        assert not _threads_named("free-memory-releaser")
