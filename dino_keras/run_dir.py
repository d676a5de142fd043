"""The run directory: the files a run writes and reads back, all through `tf.io.gfile`.

A run directory may be a local path or any file system TensorFlow supports (`gs://bucket/run`,
`ram://run` in memory). Files a reader may open at any moment (the configuration, the summary)
are replaced atomically: written under a temporary name, then renamed over the old file (on an
object store such as GCS the rename is a copy, but an object still appears only once complete).
A directory written whole (a SavedModel) is moved into place in one rename on a local disk, file
by file elsewhere (`move_tree`).
The JSON-lines log grows one record at a time; a line cut short by a killed process is skipped
when the log is read back, and the next record starts a line of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable

import tensorflow as tf

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #


def join(directory: str, *names: str) -> str:
    return tf.io.gfile.join(str(directory), *names)


def is_local(path: str) -> bool:
    return "://" not in str(path)


def normalize(path: str) -> str:
    """A local path normalised (`a/./b/` -> `a/b`); a URL without its trailing slashes
    (`os.path.normpath` would turn `gs://b` into `gs:/b`)."""
    path = str(path)
    if is_local(path):
        return os.path.normpath(path)
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}"


def absolute(path: str) -> str:
    """A local path made absolute, a URL unchanged: how logs and summaries name a file."""
    return os.path.abspath(path) if is_local(path) else str(path)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(str(path))


def is_dir(path: str) -> bool:
    return tf.io.gfile.isdir(str(path))


def is_file(path: str) -> bool:
    return exists(path) and not is_dir(path)


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(str(path))


def modification_time(path: str) -> float:
    """Seconds since the epoch (TensorFlow's own stat has whole seconds for local files)."""
    if is_local(path):
        return os.path.getmtime(path)
    return tf.io.gfile.stat(path).mtime_nsec / 1e9


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def _temporary_name(path: str) -> str:
    """A hidden name of its own beside `path`, ending with its name (so with its suffix: Keras
    saves only to a `.keras` name). Not `path` plus a suffix: ram:// answers `exists` by prefix,
    so `<path>.tmp` would make `path` seem to exist, and a rename that must not overwrite fail."""
    directory, name = os.path.split(str(path))
    temporary = f".tmp-{uuid.uuid4().hex[:12]}-{name}"  # one per write: never shared
    return join(directory, temporary) if directory else temporary


def write_atomically(path: str, content: str | bytes) -> str:
    """Replace `path` with `content` (its directory made if need be); a reader sees the old
    file or the new one, never a part. Returns `path`."""
    path = str(path)
    directory = os.path.dirname(path)
    if directory:
        makedirs(directory)
    temporary = _temporary_name(path)
    try:
        with tf.io.gfile.GFile(temporary, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        remove(temporary)
        raise
    return path


def write_file_atomically(
    path: str, write: Callable[[str], object], *, overwrite: bool = True
) -> str:
    """Replace `path` with the file that `write(local_path)` makes, for writers that take only a
    local path (Keras' `save`). `local_path` ends with the name of `path`. On a local disk it is
    the temporary name beside `path`; elsewhere a local temporary file, copied beside `path`
    under a temporary name. Either is then renamed over `path`; with `overwrite=False` a `path`
    that appeared meanwhile is kept (`tf.errors.AlreadyExistsError`). Returns `path`."""
    path = str(path)
    directory = os.path.dirname(path)
    if directory:
        makedirs(directory)
    temporary = _temporary_name(path)
    local_dir = None if is_local(path) else tempfile.mkdtemp(prefix="dino_keras_")
    try:
        if local_dir is None:
            write(temporary)
        else:
            local = os.path.join(local_dir, os.path.basename(path))
            write(local)
            tf.io.gfile.copy(local, temporary, overwrite=True)
        tf.io.gfile.rename(temporary, path, overwrite=overwrite)
    finally:
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
        remove(temporary)
    return path


def remove(path: str) -> None:
    """Removes a file or a whole directory; nothing when there is none."""
    # `exists` first would not do: ram:// answers it by prefix.
    try:
        tf.io.gfile.rmtree(str(path))
    except tf.errors.NotFoundError:
        pass


def move_tree(source: str, target: str, *, last: str | None = None) -> str:
    """Moves the directory `source` to `target`, which must not exist; returns `target`.

    On a local disk this is one rename, atomic. Elsewhere it goes file by file: ram:// renames
    only a directory's own entry (its files stay behind), and object stores have no directories
    to rename. `last` (a name relative to `source`, e.g. `saved_model.pb`) is then moved last,
    so that a reader who waits for it finds every other file already in place.
    """
    source, target = normalize(source), normalize(target)
    if is_local(source) and is_local(target):
        tf.io.gfile.rename(source, target)
        return target
    files = []
    for folder, _, names in tf.io.gfile.walk(source):
        relative = folder[len(source) :].strip("/")
        makedirs(join(target, relative) if relative else target)  # empty folders too
        # ram:// lists by prefix: beside `assets.extra/` its `assets/` lists a file `.extra`.
        files.extend(
            join(relative, name) if relative else name
            for name in names
            if exists(join(folder, name))
        )
    for name in sorted(files, key=lambda name: name == last):
        tf.io.gfile.rename(join(source, name), join(target, name))  # never over a file
    remove(source)
    return target


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(str(path), "r") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(str(path), "rb") as f:
        return f.read()


def write_json(path: str, value, *, sort_keys: bool = False) -> str:
    """`value` as indented JSON, replaced atomically."""
    return write_atomically(path, json.dumps(value, indent=2, sort_keys=sort_keys))


def read_json(path: str):
    """The parsed file; raises `tf.errors.NotFoundError` (and other `tf.errors.OpError`s) when it
    cannot be read, `json.JSONDecodeError` when it is not JSON."""
    return json.loads(read_text(path))


def append_jsonl(path: str, record: dict) -> None:
    """Appends one JSON object as one line (the file is created if need be). After a line cut
    short by a killed process the record starts a line of its own, so that it is not lost."""
    line = json.dumps(record) + "\n"
    if not _ends_a_line(path):
        line = "\n" + line
    with tf.io.gfile.GFile(str(path), "a") as f:
        f.write(line)


def _ends_a_line(path: str) -> bool:
    """Whether the file is absent, empty or ends with a newline."""
    if not exists(path):
        return True
    size = tf.io.gfile.stat(str(path)).length
    if size == 0:
        return True
    with tf.io.gfile.GFile(str(path), "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file, in order ([] if there is no file). Lines that do
    not parse (a record cut short by a killed process) are skipped."""
    if not exists(path):
        return []
    records = []
    for line in read_text(path).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# --------------------------------------------------------------------------- #
# The run's own files
# --------------------------------------------------------------------------- #


def config_path(directory: str, name: str = CONFIG_FILE) -> str:
    return join(directory, name)


def write_config(directory: str, values: dict, name: str = CONFIG_FILE) -> str:
    """The run's settings, keys sorted, replaced atomically; returns the path."""
    return write_json(config_path(directory, name), values, sort_keys=True)


def read_config(directory: str, name: str = CONFIG_FILE) -> dict | None:
    """The stored settings, or None when the run has none yet."""
    path = config_path(directory, name)
    if not exists(path):
        return None
    return read_json(path)


def write_summary(directory: str, summary: dict) -> str:
    """`<directory>/summary.json`, replaced atomically; returns the path."""
    return write_json(join(directory, SUMMARY_FILE), summary)
