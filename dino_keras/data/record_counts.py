"""Count files for TFRecord data: how many readable images each record file holds.

Training needs the number of images before it starts (steps per epoch, schedules), and reading
every record to find it takes longer than many runs for ImageNet-sized data. So it is counted
once, by `scripts/count_records.py`, into a small JSON file next to the record files
(`COUNTS_FILE_NAME` in each directory, one entry per file name); a run reads only that file and
the sizes of the record files, which must still be the sizes that were counted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import posixpath
from collections.abc import Sequence

import tensorflow as tf

from dino_keras.data import record_stream

COUNTS_FILE_NAME = "record_counts.json"
COUNT_COMMAND = "python scripts/count_records.py --data_path={data_path}"
_FORMAT = "dino_keras record counts"
_STAT_THREADS = 16


class MissingCountsError(ValueError):
    """A record file has no up-to-date count; the message says which command writes it."""


class RecordCountError(ValueError):
    """A file cannot be counted: not a TFRecord file of `tf.train.Example`, or truncated."""


@dataclasses.dataclass(frozen=True)
class FileCount:
    """One record file: its size when counted, its records, readable images and largest label."""

    num_bytes: int
    records: int
    images: int
    max_label: int  # -1: no labels

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def counts_file_of(path: str) -> str:
    return posixpath.join(posixpath.dirname(path), COUNTS_FILE_NAME)


def count_record_file(path: str, image_key: str, label_key: str) -> FileCount:
    """Reads one record file (with TensorFlow's reader) and counts what a run would read."""
    records = tf.data.TFRecordDataset(path)

    def describe(serialized):
        encoded, label = record_stream.parse_image_record(serialized, image_key, label_key)
        return tf.cast(record_stream.has_image_structure(encoded), tf.int64), label

    def add(totals, element):
        valid, label = element
        return (totals[0] + 1, totals[1] + valid,
                tf.maximum(totals[2], tf.where(valid > 0, label, -1)))

    described = records.map(describe, num_parallel_calls=tf.data.AUTOTUNE)
    try:
        total_records, images, max_label = described.reduce(
            (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(-1, tf.int64)), add)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        first_line = str(error.message).splitlines()[0]
        raise RecordCountError(f"{path} is not a TFRecord file of tf.train.Example or is "
                               f"truncated ({first_line})") from error
    return FileCount(num_bytes=tf.io.gfile.stat(path).length, records=int(total_records),
                     images=int(images), max_label=int(max_label))


def write_counts(paths: Sequence[str], image_key: str, label_key: str,
                 report=lambda path, count: None) -> list[str]:
    """Counts `paths` into the count file of each of their directories (merged with entries
    already there); returns the count files written."""
    by_file: dict[str, dict] = {}
    for path in paths:
        count = count_record_file(path, image_key, label_key)
        report(path, count)
        by_file.setdefault(counts_file_of(path), {})[posixpath.basename(path)] = count.as_json()
    for counts_path, entries in by_file.items():
        existing = _read_counts_file(counts_path) if tf.io.gfile.exists(counts_path) else {}
        existing.update(entries)
        document = {"format": _FORMAT, "image_key": image_key, "label_key": label_key,
                    "files": dict(sorted(existing.items()))}
        with tf.io.gfile.GFile(counts_path, "w") as file:
            file.write(json.dumps(document, indent=1) + "\n")
    return sorted(by_file)


def _read_counts_file(counts_path: str) -> dict:
    with tf.io.gfile.GFile(counts_path, "r") as file:
        document = json.loads(file.read())
    if document.get("format") != _FORMAT:
        raise MissingCountsError(f"{counts_path} is not a count file of scripts/count_records.py")
    return document["files"]


def read_counts(paths: Sequence[str], *, data_path: str, flag_name: str) -> list[FileCount]:
    """The counts of `paths`, from their count files; `MissingCountsError` naming the flag, the
    file and the command that writes the count when one is missing or out of date."""
    command = COUNT_COMMAND.format(data_path=data_path)
    documents: dict[str, dict] = {}
    counts = []
    for path in paths:
        counts_path = counts_file_of(path)
        if counts_path not in documents:
            documents[counts_path] = (_read_counts_file(counts_path)
                                      if tf.io.gfile.exists(counts_path) else {})
        entry = documents[counts_path].get(posixpath.basename(path))
        if entry is None:
            raise MissingCountsError(
                f"{flag_name}={data_path}: {path} has no image count in {counts_path}; count "
                f"the records once with: {command}")
        counts.append(FileCount(**entry))
    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
        sizes = list(pool.map(lambda path: tf.io.gfile.stat(path).length, paths))
    for path, size, count in zip(paths, sizes, counts, strict=True):
        if size != count.num_bytes:
            raise MissingCountsError(
                f"{flag_name}={data_path}: {path} has {size} bytes but was counted at "
                f"{count.num_bytes} bytes in {counts_file_of(path)}; count it again with: "
                f"{command}")
    return counts
