"""TFRecord files (and TFDS TFRecord splits) read as a stream by TensorFlow's own readers.

Nothing is read before training starts: the number of images comes from TFDS metadata or from
the count files of `record_counts`. One epoch of a worker's stream is

1. the record files in an order seeded by (seed, epoch); with several workers, worker k takes
   every num_shards-th file of that order (sharding by file), so each reads only its files;
2. those files read `READ_CYCLE` at a time by `tf.data.TFRecordDataset`, interleaved record by
   record (`interleave`, deterministic);
3. each record parsed to (encoded image, label) and dropped when its bytes do not start and end
   like a JPEG or PNG (the check `scripts/count_records.py` counts with, so counts match);
4. a shuffle buffer of `SHUFFLE_BUFFER` records seeded by (seed, epoch).

The shuffle is therefore local (file order plus a buffer), not the full permutation the
in-memory sources get; see the README. Sources limited to their first N images
(`--limit_images`) read their files in the fixed order instead, take N, and shard by record.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

SHUFFLE_BUFFER = 10_000
READ_CYCLE = 16
_PARSE_BATCH = 256
# Dataset.shuffle mixes its seed with the graph-level seed (tf.random.set_seed), which a
# training process sets and a loader process or a test does not; the epoch's function graph
# gets this fixed graph-level seed so that the order depends on the run's --seed only.
_GRAPH_SEED = 1

_JPEG_START = b"\xff\xd8\xff"
_PNG_START = b"\x89PNG\r\n\x1a\n"
# JPEG writers may pad after the end-of-image marker; look for it in this many trailing bytes.
END_MARKER_SEARCH_BYTES = 64


@dataclasses.dataclass(frozen=True)
class RecordFiles:
    """Record files of `tf.train.Example` and how many readable images each holds.

    `skips[i]` and `takes[i]` select records of file i (TFDS split slices such as
    ``train[2:5]``; 0 and -1 for whole files). `limit` keeps only the first `limit` images in
    file order.
    """

    paths: tuple[str, ...]
    images_per_file: tuple[int, ...]
    image_key: str
    label_key: str = ""
    skips: tuple[int, ...] | None = None
    takes: tuple[int, ...] | None = None
    limit: int | None = None

    @property
    def num_images(self) -> int:
        total = sum(self.images_per_file)
        return total if self.limit is None else min(total, self.limit)

    def _file_table(self):
        count = len(self.paths)
        return (tf.constant(self.paths, tf.string),
                tf.constant(self.skips or (0,) * count, tf.int64),
                tf.constant(self.takes or (-1,) * count, tf.int64))


def has_image_structure(encoded: tf.Tensor) -> tf.Tensor:
    """Whether each string of `encoded` (any shape) starts and ends like a complete JPEG or PNG
    file."""
    length = tf.strings.length(encoded)
    tail = tf.strings.substr(encoded, tf.maximum(length - END_MARKER_SEARCH_BYTES, 0),
                             tf.fill(tf.shape(length), END_MARKER_SEARCH_BYTES))
    # Zero padding of shorter tails creates no end marker.
    tail = tf.io.decode_raw(tail, tf.uint8, fixed_length=END_MARKER_SEARCH_BYTES)
    jpeg_end = tf.reduce_any((tail[..., :-1] == 0xFF) & (tail[..., 1:] == 0xD9), axis=-1)
    png_end = tf.reduce_any((tail[..., :-3] == ord("I")) & (tail[..., 1:-2] == ord("E"))
                            & (tail[..., 2:-1] == ord("N")) & (tail[..., 3:] == ord("D")), axis=-1)
    is_jpeg = tf.strings.substr(encoded, 0, len(_JPEG_START)) == _JPEG_START
    is_png = tf.strings.substr(encoded, 0, len(_PNG_START)) == _PNG_START
    return (is_jpeg & jpeg_end) | (is_png & png_end)


def parse_image_records(serialized: tf.Tensor, image_key: str,
                        label_key: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Serialized `tf.train.Example`s [N] -> (encoded image bytes [N], int64 labels [N], -1
    where none)."""
    features = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    if label_key:
        features[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    parsed = tf.io.parse_example(serialized, features)
    labels = parsed[label_key] if label_key else -tf.ones(tf.shape(serialized), tf.int64)
    return parsed[image_key], labels


def described_records(records: tf.data.Dataset, image_key: str,
                      label_key: str) -> tf.data.Dataset:
    """Batches of (encoded images, labels, whether each looks like a complete image), parsed a
    batch at a time (a record at a time costs several times more per record)."""
    def describe(serialized):
        encoded, labels = parse_image_records(serialized, image_key, label_key)
        return encoded, labels, has_image_structure(encoded)

    return records.batch(_PARSE_BATCH).map(describe, num_parallel_calls=tf.data.AUTOTUNE,
                                           deterministic=True)


def _read_files(paths, skips, takes, *, interleaved: bool) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices((paths, skips, takes))

    def records_of_file(path, skip, take):
        return tf.data.TFRecordDataset(path).skip(skip).take(take)

    if not interleaved:
        return files.flat_map(records_of_file)
    return files.interleave(records_of_file, cycle_length=READ_CYCLE, block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _images(records: tf.data.Dataset, files: RecordFiles) -> tf.data.Dataset:
    """(encoded image, label) of the records whose bytes look like a complete image."""
    def keep_images(encoded, labels, is_image):
        return tf.boolean_mask(encoded, is_image), tf.boolean_mask(labels, is_image)

    return described_records(records, files.image_key, files.label_key).map(keep_images).unbatch()


def images_in_order(files: RecordFiles) -> tf.data.Dataset:
    """(encoded image, label) of every readable image, in file order (evaluation, counting)."""
    images = _images(_read_files(*files._file_table(), interleaved=False), files)
    return images if files.limit is None else images.take(files.limit)


def epoch_images(files: RecordFiles, *, file_order_seed: tf.Tensor, shuffle_seed: tf.Tensor,
                 num_shards: int = 1, shard_index: int = 0,
                 shuffle_buffer: int = SHUFFLE_BUFFER) -> tf.data.Dataset:
    """One epoch of (encoded image, label) for worker `shard_index` of `num_shards`.

    Call inside a `tf.data` function (e.g. `flat_map` over epochs): it fixes that function
    graph's graph-level seed. The seeds are stateless seed pairs, one per epoch.
    """
    if tf.executing_eagerly():
        raise RuntimeError("epoch_images builds part of a tf.data function: call it in one")
    tf.random.set_seed(_GRAPH_SEED)
    paths, skips, takes = files._file_table()
    if files.limit is None and len(files.paths) >= num_shards:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(files.paths), dtype=tf.int64), file_order_seed)[shard_index::num_shards]
        images = _images(_read_files(tf.gather(paths, order), tf.gather(skips, order),
                                     tf.gather(takes, order), interleaved=True), files)
    else:  # the first N images, or fewer files than workers: every worker reads every file
        images = images_in_order(files)
        if num_shards > 1:
            images = images.shard(num_shards, shard_index)
    operation_seed = tf.random.stateless_uniform([], shuffle_seed, minval=None, maxval=None,
                                                 dtype=tf.int64)
    return images.shuffle(shuffle_buffer, seed=operation_seed, reshuffle_each_iteration=False)
