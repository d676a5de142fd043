"""The multi-crop stream made by separate loader processes (`--num_workers`), read in turn.

Why processes: TensorFlow's intra-op thread pool spans every core for the training step, and
the pipeline's XLA-compiled augmentation kernels split their work across that same pool (they
ignore `tf.data`'s `max_intra_op_parallelism`); on two cores the split costs about a quarter
of the loader's throughput. A loader process runs its pipeline with one intra-op thread, as
the reference's DataLoader workers run one thread each.

Loader process k of K builds the training process's own pipeline and keeps batches k, k + K,
... of it (`build_multicrop_dataset(batch_shards=K, batch_shard_index=k)`), so reading the
processes in turn yields the in-process stream batch for batch. A process writes each batch
into one of its slots in an anonymous shared-memory file and names the slot on its stdout.
The training process passes the slot's arrays on as they are (TensorFlow takes aligned numpy
arrays over without copying) and hands the slot back on the process's stdin once nothing
references those arrays any more; a batch that would hold a process's last free slot is
copied instead, so a consumer keeping many batches never stops the stream. A process ends
when its stdin closes, so it never outlives the training process for long.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import select
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from dino_keras.data.multicrop import build_multicrop_dataset
from dino_keras.data.sources import ImageSource

# In-flight batches downstream of the processes: the prefetch buffer, the batch being
# consumed and one more; each process gets enough slots for its share of them plus two.
IN_FLIGHT_BATCHES = 4
_ALIGNMENT = 64  # TensorFlow takes over (does not copy) numpy arrays aligned to 64 bytes
_POLL_SECONDS = 0.005
_READY = "ready"
_ERROR = "error"
# keras-cv imports PyTorch whenever it is installed (+0.5 GiB); a loader process never needs it,
# so it is hidden before anything is imported.
_WORKER_COMMAND = (
    "import json, sys; from dino_keras.hide_torch import hide_torch; hide_torch(); "
    "from dino_keras.data.loader_processes import _worker_main; "
    "_worker_main(json.loads(sys.argv[1]))"
)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LoaderProcessError(RuntimeError):
    """A loader process failed; the message carries its error."""


def multicrop_dataset_from_processes(source: ImageSource, num_workers: int,
                                     **pipeline) -> tf.data.Dataset:
    """`build_multicrop_dataset(source, **pipeline)`'s batches, made by `num_workers` processes.

    The processes start when the dataset is first iterated, one set per iterator, and end
    with the iterator.
    """
    if num_workers < 1:
        raise ValueError(f"--num_workers must be >= 1 for loader processes, got {num_workers}")
    if source.origin is None:
        raise ValueError(f"{source.name} was not opened by resolve_source: loader processes "
                         "cannot open it again; use --num_workers=0")
    for name in ("batch_shards", "batch_shard_index"):
        if name in pipeline:
            raise ValueError(f"{name} is chosen by the loader processes, not the caller")
    element_spec, settings = stream_settings(source, pipeline)

    def generate():
        processes = LoaderProcesses(settings, num_workers)
        try:
            yield from processes.batches()
        finally:
            processes.close()

    return tf.data.Dataset.from_generator(generate, output_signature=element_spec).prefetch(2)


def stream_settings(source: ImageSource, pipeline: dict) -> tuple[tuple, dict]:
    """(element spec, `LoaderProcesses` settings) of `build_multicrop_dataset(source,
    **pipeline)`'s stream."""
    # Built, never iterated: its element spec is the stream's.
    element_spec = build_multicrop_dataset(source, **pipeline).element_spec
    settings = {"source": source.origin, "pipeline": pipeline,
                "shapes": [tuple(spec.shape) for spec in element_spec]}
    return element_spec, settings


class _SlotFile:
    """Batch slots (float32 arrays of `shapes`, each 64-byte aligned) in a shared memory file."""

    def __init__(self, shapes, capacity: int, fd: int):
        self.shapes = [tuple(shape) for shape in shapes]
        self.offsets, offset = [], 0
        for shape in self.shapes:
            self.offsets.append(offset)
            offset += -(-4 * int(np.prod(shape)) // _ALIGNMENT) * _ALIGNMENT
        self.slot_bytes = offset
        self.capacity = capacity
        self.memory = mmap.mmap(fd, self.slot_bytes * capacity)

    @staticmethod
    def size(shapes, capacity: int) -> int:
        return sum(-(-4 * int(np.prod(shape)) // _ALIGNMENT) * _ALIGNMENT
                   for shape in shapes) * capacity

    def arrays(self, slot: int) -> list[np.ndarray]:
        """New views of the batch in `slot`."""
        if not 0 <= slot < self.capacity:
            raise LoaderProcessError(f"slot {slot} is not one of the {self.capacity} slots")
        base = slot * self.slot_bytes
        return [np.frombuffer(self.memory, np.float32, int(np.prod(shape)), base + offset)
                .reshape(shape) for shape, offset in zip(self.shapes, self.offsets, strict=True)]


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    """A copy at a 64-byte aligned address, which TensorFlow takes over without copying again."""
    raw = np.empty(array.nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(copy, array)
    return copy


def _shared_file(size: int) -> int:
    """A file descriptor of `size` bytes of memory no path refers to."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dino_keras_loader")
    else:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
            fd = os.dup(f.fileno())
        os.unlink(f.name)
    os.ftruncate(fd, size)
    return fd


def _reference_counts(arrays: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(array) for array in arrays]


def _let_tensorflow_release_arrays() -> None:
    # TensorFlow gives numpy arrays back (decrements their reference counts) only when it
    # holds the GIL, e.g. when an EagerTensor is deleted: create and delete one.
    tf.constant(0)


class _LoaderProcess:
    """One loader process, its slot file, and which of its slots are where.

    A slot is either the process's (free or being written), announced (written and named on
    the process's stdout), or lent downstream: yielded as arrays on the slot, which TensorFlow
    takes over without copying, until their reference counts fall back.
    """

    def __init__(self, settings: dict, index: int, num_workers: int, env: dict):
        self.index = index
        slots = -(-IN_FLIGHT_BATCHES // num_workers) + 2
        fd = _shared_file(_SlotFile.size(settings["shapes"], slots))
        try:
            self.slots = _SlotFile(settings["shapes"], slots, fd)
            worker = dict(settings, fd=fd, slots=slots, batch_shards=num_workers,
                          batch_shard_index=index)
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, json.dumps(worker)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,), env=env,
                bufsize=0)
        finally:
            os.close(fd)  # the mapping and the process keep the memory
        self.lent: dict[int, tuple[list[np.ndarray], list[int]]] = {}
        self._pending = b""

    def poll_line(self, timeout: float) -> str | None:
        """The process's next line, or None if none came within `timeout` seconds."""
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise self._ended()
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        text = line.decode()
        if text.startswith(_ERROR):
            raise LoaderProcessError(
                f"loader process {self.index}: {json.loads(text[len(_ERROR):])}")
        return text

    def take(self, slot: int) -> tuple[np.ndarray, ...]:
        """The batch in `slot`: lent (its arrays on the slot) while the process keeps another
        slot to write into, else copied and the slot given straight back (so that a consumer
        holding on to many batches never stops the process)."""
        arrays = self.slots.arrays(slot)
        if len(self.lent) + 2 <= self.slots.capacity:
            self.lent[slot] = (arrays, _reference_counts(arrays))
            return tuple(arrays)
        copies = tuple(_aligned_copy(array) for array in arrays)
        self._give(slot)
        return copies

    def give_back_released(self) -> None:
        """Returns to the process every lent slot whose arrays nobody else references."""
        for slot, (arrays, counts) in list(self.lent.items()):
            if _reference_counts(arrays) == counts:
                del self.lent[slot]
                self._give(slot)

    def _give(self, slot: int) -> None:
        try:
            self.process.stdin.write(f"{slot}\n".encode())
        except BrokenPipeError:  # it ended before its stdout's end was read
            raise self._ended() from None

    def _ended(self) -> LoaderProcessError:
        code = self.process.wait()
        return LoaderProcessError(f"loader process {self.index} ended (exit code {code}) "
                                  f"without reporting an error")

    def close(self) -> None:
        # The slot file stays mapped until the last array lent downstream is gone.
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # busy making a batch nobody will read
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class LoaderProcesses:
    """`num_workers` loader processes making `settings`' stream; `batches()` reads it in turn."""

    def __init__(self, settings: dict, num_workers: int):
        _LIVE.add(self)
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = os.pathsep.join(
            [_PACKAGE_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.workers: list[_LoaderProcess] = []
        try:
            for index in range(num_workers):
                self.workers.append(_LoaderProcess(settings, index, num_workers, env))
            for worker in self.workers:
                line = self._next_line(worker)
                if line != _READY:
                    raise LoaderProcessError(
                        f"loader process {worker.index} said {line!r} instead of {_READY!r}")
        except BaseException:
            self.close()
            raise

    def _next_line(self, worker: _LoaderProcess) -> str:
        while True:
            line = worker.poll_line(_POLL_SECONDS)
            if line is not None:
                return line
            _let_tensorflow_release_arrays()
            for other in self.workers:
                other.give_back_released()

    def batches(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The stream: batch t from process t mod num_workers, as arrays on its slot."""
        index = 0
        while True:
            worker = self.workers[index]
            worker.give_back_released()
            yield worker.take(int(self._next_line(worker)))
            index = (index + 1) % len(self.workers)

    def close(self) -> None:
        """Ends the processes (by closing their stdin)."""
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.close()


# Ended before the interpreter shuts down: a dataset iterator still alive then would wait for
# its generator, blocked on a process, while the finalising interpreter no longer runs it.
_LIVE: weakref.WeakSet[LoaderProcesses] = weakref.WeakSet()


@atexit.register
def _close_live_processes() -> None:
    for processes in list(_LIVE):
        processes.close()


def _worker_main(settings: dict) -> None:
    """One loader process: make its share of the stream into its slots until stdin closes."""
    # The protocol owns the real stdout; anything else printed goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        from dino_keras.data.sources import resolve_source

        source = resolve_source(**settings["source"])
        dataset = build_multicrop_dataset(
            source, **settings["pipeline"], batch_shards=settings["batch_shards"],
            batch_shard_index=settings["batch_shard_index"])
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1  # one core per loader process
        dataset = dataset.with_options(options)
        slots = _SlotFile(settings["shapes"], settings["slots"], settings["fd"])
        free = list(range(settings["slots"]))
        protocol.write(f"{_READY}\n")
        for batch in dataset:
            if not free:
                line = sys.stdin.readline()
                if not line:
                    return
                free.append(int(line))
            slot = free.pop(0)
            for view, tensor in zip(slots.arrays(slot), batch, strict=True):
                np.copyto(view, tensor.numpy())
            protocol.write(f"{slot}\n")
    except BrokenPipeError:
        return  # the training process is gone
    except Exception as error:  # noqa: BLE001 - reported to the training process
        try:
            protocol.write(f"{_ERROR}{json.dumps(f'{type(error).__name__}: {error}')}\n")
        except BrokenPipeError:
            pass
        raise SystemExit(1) from error
