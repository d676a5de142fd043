"""Loader processes (--num_workers): the in-process stream batch for batch, batches held
downstream never overwritten, errors of a process reported, processes ending with the stream."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.data import loader_processes, multicrop
from dino_keras.data.sources import ImageSource

PIPELINE = dict(global_crops_size=16, local_crops_size=8, global_crops_scale=(0.4, 1.0),
                local_crops_scale=(0.05, 0.4), local_crops_number=3, batch_size=4, seed=5)


def copies(batches) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.array(crops) for crops in batch) for batch in batches]


def in_process(source, count: int, **position) -> list[tuple[np.ndarray, ...]]:
    dataset = multicrop.build_multicrop_dataset(source, **PIPELINE, **position)
    return copies(itertools.islice(iter(dataset), count))


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for batch_a, batch_b in zip(actual, expected, strict=True):
        assert len(batch_a) == len(batch_b) == 5  # 2 global + 3 local crops
        for crops_a, crops_b in zip(batch_a, batch_b, strict=True):
            np.testing.assert_array_equal(crops_a, crops_b)


def live_pids() -> list[int]:
    return [worker.process.pid for processes in list(loader_processes._LIVE)
            for worker in processes.workers]


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("source_name", ["idx_source", "file_source"])
def test_two_processes_make_the_in_process_stream(request, source_name):
    source = request.getfixturevalue(source_name)
    position = dict(start_epoch=1, skip_steps=1)
    dataset = loader_processes.multicrop_dataset_from_processes(source, 2, **PIPELINE, **position)
    # Over an epoch boundary of both sources (3 and 10 steps per epoch).
    actual = copies(itertools.islice(iter(dataset), 11))
    assert_same_batches(actual, in_process(source, 11, **position))


def test_batches_held_downstream_are_never_overwritten(idx_source):
    dataset = loader_processes.multicrop_dataset_from_processes(idx_source, 1, **PIPELINE)
    iterator = iter(dataset)
    # Tensors kept as they come (on the processes' slots where not copied), more than one
    # process has slots: the stream must go on and every kept batch stay as it was.
    held = [next(iterator) for _ in range(14)]
    processes = next(iter(loader_processes._LIVE))
    assert len(processes.workers[0].lent) >= 3  # held without a copy
    assert_same_batches(copies(held), in_process(idx_source, 14))
    del held
    # Once the tensors are gone their slots are used again, without copies.
    again = copies(itertools.islice(iterator, 12))
    assert_same_batches(again, in_process(idx_source, 26)[14:])


def test_a_process_that_cannot_open_the_source_reports_why(file_source, tmp_path):
    shutil.rmtree(tmp_path / "files")  # gone after the training process resolved it
    dataset = loader_processes.multicrop_dataset_from_processes(file_source, 1, **PIPELINE)
    with pytest.raises(tf.errors.OpError,
                       match=r"loader process 0: DataSourceError: --data_path: .*files"):
        next(iter(dataset))


def test_a_killed_process_is_reported_not_waited_for(idx_source):
    dataset = loader_processes.multicrop_dataset_from_processes(idx_source, 2, **PIPELINE)
    iterator = iter(dataset)
    next(iterator)
    os.kill(live_pids()[1], signal.SIGKILL)
    with pytest.raises(tf.errors.OpError, match=r"loader process 1 ended \(exit code -9\)"):
        for _ in range(20):  # what was already made may still come first
            next(iterator)


def test_a_slot_given_back_to_a_dead_process_reports_its_end(idx_source):
    # The other order of the test above, forced: the process is gone before its stdout's end
    # is read, and the next thing said to it is a slot given back.
    _, settings = loader_processes.stream_settings(idx_source, PIPELINE)
    processes = loader_processes.LoaderProcesses(settings, 1)
    try:
        worker = processes.workers[0]
        worker.process.kill()
        worker.process.wait()
        with pytest.raises(loader_processes.LoaderProcessError,
                           match=r"loader process 0 ended \(exit code -9\)"):
            worker._give(0)
    finally:
        processes.close()


def test_processes_end_with_the_iterator(idx_source):
    dataset = loader_processes.multicrop_dataset_from_processes(idx_source, 2, **PIPELINE)
    iterator = iter(dataset)
    next(iterator)
    pids = live_pids()
    assert len(pids) == 2 and all(is_running(pid) for pid in pids)
    del iterator
    gc.collect()
    assert wait_until(lambda: not any(is_running(pid) for pid in pids))


def test_sources_not_opened_by_resolve_source_are_refused():
    source = ImageSource(name="made by hand", num_examples=8, num_classes=None,
                         read_example=lambda index: None, image_shape=(4, 4))
    with pytest.raises(ValueError, match="--num_workers=0"):
        loader_processes.multicrop_dataset_from_processes(source, 2, **PIPELINE)
