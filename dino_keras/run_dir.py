"""The run directory: the files a run writes and reads back, all through `tf.io.gfile`.

A run directory may be a local path or any file system TensorFlow supports (`gs://bucket/run`,
`ram://run` in memory). Files a reader may open at any moment (the configuration, the summary)
are replaced atomically: written under a temporary name, then renamed over the old file (on an
object store such as GCS the rename is a copy, but an object still appears only once complete).
The JSON-lines log grows one record at a time; a line cut short by a killed process is skipped
when the log is read back, and the next record starts a line of its own.
"""

from __future__ import annotations

import json
import os
import uuid

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


def write_atomically(path: str, content: str | bytes) -> str:
    """Replace `path` with `content` (its directory made if need be); a reader sees the old
    file or the new one, never a part. Returns `path`."""
    path = str(path)
    directory = os.path.dirname(path)
    if directory:
        makedirs(directory)
    # A name of its own per write: two writers never share a temporary file.
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with tf.io.gfile.GFile(temporary, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        if exists(temporary):
            tf.io.gfile.remove(temporary)
        raise
    return path


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
