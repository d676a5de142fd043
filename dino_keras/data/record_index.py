"""Random access to TFRecord files by a byte-offset index built from one full read.

Training streams record files (`record_stream`) and never needs this. It serves code that reads
records by index in an order of its own (the linear probe's per-epoch permutation): the index is
built the first time a record is read by index, which reads every record of the files once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import threading

import numpy as np
import tensorflow as tf

from dino_keras.data.record_stream import END_MARKER_SEARCH_BYTES, RecordFiles

log = logging.getLogger(__name__)

_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"


class RecordIndexError(ValueError):
    """A record file cannot be indexed (not a TFRecord file, truncated, not an Example)."""


def bytes_look_like_image(head: bytes, tail: bytes) -> bool:
    """Whether bytes start (`head`) and end (`tail`) like a complete JPEG or PNG file."""
    if head.startswith(_JPEG_START):
        return _JPEG_END in tail
    if head.startswith(_PNG_START):
        return _PNG_END in tail
    return False


def open_file(path: str):
    # Python's file objects are several times faster than GFile for the index's many small
    # reads; GFile opens what they cannot (gs://, ram://, ...).
    return open(path, "rb") if "://" not in path else tf.io.gfile.GFile(path, "rb")


@dataclasses.dataclass
class RecordIndex:
    """Where each readable image record lies: file, byte offset and length of its payload."""

    files: RecordFiles
    file_ids: list[int] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    num_corrupt: int = 0

    @classmethod
    def build(cls, files: RecordFiles) -> RecordIndex:
        index = cls(files)
        for file_id, path in enumerate(files.paths):
            skip = files.skips[file_id] if files.skips else 0
            take = files.takes[file_id] if files.takes else -1
            try:
                index._add_file(path, file_id, skip=skip, take=None if take < 0 else take)
            except OSError as error:
                raise RecordIndexError(f"cannot read {path}: {error}") from error
            if files.limit is not None and len(index.offsets) >= files.limit:
                break
        if index.num_corrupt:
            log.warning("Skipped %d records with unreadable or corrupt images in %d record "
                        "files", index.num_corrupt, len(files.paths))
        return index

    def _add_file(self, path: str, file_id: int, *, skip: int, take: int | None) -> None:
        """Appends one file's records (framing: u64 length, u32 crc, data, u32 crc)."""
        with open_file(path) as file:
            file_size = tf.io.gfile.stat(path).length if "://" in path else os.fstat(
                file.fileno()).st_size
            position = 0
            record_number = 0
            while position < file_size and (take is None or record_number < skip + take):
                header = file.read(12)
                length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else file_size
                if position + 16 + length > file_size:
                    raise RecordIndexError(f"{path} is not a TFRecord file or is truncated "
                                           f"(record {record_number} at byte {position})")
                payload = file.read(length)
                file.seek(position + 16 + length)
                if record_number >= skip:
                    self._add_record(payload, path, file_id, record_number, position)
                position += 16 + length
                record_number += 1

    def _add_record(self, payload: bytes, path: str, file_id: int, record_number: int,
                    position: int) -> None:
        try:
            example = tf.train.Example.FromString(payload)
        except Exception as error:  # protobuf's DecodeError class is not public
            raise RecordIndexError(f"record {record_number} of {path} is not a "
                                   f"tf.train.Example ({error})") from error
        features = example.features.feature
        if self.files.image_key not in features:
            raise RecordIndexError(f"record {record_number} of {path} has no "
                                   f"{self.files.image_key!r} feature (has {sorted(features)})")
        encoded = features[self.files.image_key].bytes_list.value
        tail = encoded[0][-END_MARKER_SEARCH_BYTES:] if encoded else b""
        if encoded and bytes_look_like_image(encoded[0][:16], tail):
            label_key = self.files.label_key
            labels = features[label_key].int64_list.value if label_key in features else []
            self.file_ids.append(file_id)
            self.offsets.append(position + 12)
            self.lengths.append(len(payload))
            self.labels.append(labels[0] if labels else -1)
        else:
            self.num_corrupt += 1

    @property
    def num_images(self) -> int:
        return len(self.offsets) if self.files.limit is None else min(len(self.offsets),
                                                                       self.files.limit)

    def read_example(self, example_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """int64 index -> (encoded image bytes, int64 label), inside a `tf.data` graph."""
        paths = list(self.files.paths)
        file_ids = tf.constant(self.file_ids, tf.int32)
        offsets = tf.constant(self.offsets, tf.int64)
        lengths = tf.constant(self.lengths, tf.int64)
        labels = tf.constant(self.labels, tf.int64)

        # tf.data has no op that reads a byte range of a file (FixedLengthRecordDataset reads
        # up to the offset), so the record is read in Python; the file read releases the GIL.
        def read_record(file_id, offset, length):
            with open_file(paths[file_id]) as file:
                file.seek(offset)
                return np.array(file.read(length), dtype=object)

        serialized = tf.numpy_function(
            read_record, [tf.gather(file_ids, example_index), tf.gather(offsets, example_index),
                          tf.gather(lengths, example_index)], tf.string, stateful=False)
        serialized = tf.ensure_shape(serialized, [])
        encoded = tf.io.parse_single_example(
            serialized, {self.files.image_key: tf.io.FixedLenFeature([], tf.string)}
        )[self.files.image_key]
        return encoded, tf.gather(labels, example_index)


class LazyRecordIndex:
    """`RecordIndex.build(files).read_example`, the index built at the first read by index."""

    def __init__(self, files: RecordFiles):
        self.files = files
        self._index: RecordIndex | None = None
        self._lock = threading.Lock()

    def index(self) -> RecordIndex:
        with self._lock:
            if self._index is None:
                log.info("Indexing %d record files for reading by index (one full read)",
                         len(self.files.paths))
                self._index = RecordIndex.build(self.files)
            return self._index

    def read_example(self, example_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return self.index().read_example(example_index)
