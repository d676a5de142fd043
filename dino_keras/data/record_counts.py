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

import numpy as np
import tensorflow as tf

from dino_keras.data import record_stream

COUNTS_FILE_NAME = "record_counts.json"
COUNT_COMMAND = "python scripts/count_records.py --data_path={data_path}"
_FORMAT = "dino_keras record counts"
_STAT_THREADS = 16
_COUNT_BATCH = 1024


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


def count_record_files(paths: Sequence[str], image_key: str,
                       label_key: str) -> list[FileCount]:
    """Reads the record files (one `tf.data` pass with TensorFlow's reader) and counts, per file,
    what a run would read."""
    records = tf.data.Dataset.from_tensor_slices(
        (list(paths), tf.range(len(paths), dtype=tf.int64))).flat_map(
        lambda path, file_id: tf.data.Dataset.zip(
            tf.data.TFRecordDataset(path), tf.data.Dataset.from_tensors(file_id).repeat()))
    described = records.batch(_COUNT_BATCH).map(
        lambda serialized, file_ids: (
            file_ids, *record_stream.parse_image_records(serialized, image_key, label_key)),
        num_parallel_calls=tf.data.AUTOTUNE)
    totals = np.zeros((len(paths), 2), np.int64)  # records, images
    max_labels = np.full(len(paths), -1, np.int64)
    try:
        for file_ids, encoded, labels in described.as_numpy_iterator():
            is_image = record_stream.has_image_structure(encoded).numpy()
            np.add.at(totals, file_ids, np.stack([np.ones_like(is_image), is_image], axis=1))
            np.maximum.at(max_labels, file_ids[is_image], labels[is_image])
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        raise RecordCountError(_unreadable_file_message(paths, image_key, label_key, error)
                               ) from error
    return [FileCount(num_bytes=tf.io.gfile.stat(path).length, records=int(records),
                      images=int(images), max_label=int(max_label))
            for path, (records, images), max_label in zip(paths, totals, max_labels,
                                                          strict=True)]


def _unreadable_file_message(paths, image_key: str, label_key: str, error) -> str:
    """Names the first file of `paths` that fails to read (TensorFlow's error does not)."""
    for path in paths:
        try:
            for serialized in tf.data.TFRecordDataset(path).batch(_COUNT_BATCH):
                record_stream.parse_image_records(serialized, image_key, label_key)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as file_error:
            error = file_error
            break
    else:
        path = f"one of {len(paths)} files"
    first_line = str(error.message).splitlines()[0]
    return (f"{path} is not a TFRecord file of tf.train.Example or is truncated "
            f"({first_line})")


def write_counts(paths: Sequence[str], image_key: str, label_key: str,
                 report=lambda path, count: None) -> list[str]:
    """Counts `paths` into the count file of each of their directories (merged with entries
    already there); returns the count files written."""
    by_file: dict[str, dict] = {}
    for path, count in zip(paths, count_record_files(paths, image_key, label_key), strict=True):
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
