"""Image sources: one `--data_path` value chooses where the training or evaluation images come from.

Every source is a fixed-order list of `num_examples` examples that can be read by index inside a
`tf.data` graph (`ImageSource.read_example`), so the multi-crop pipeline shuffles and shards
indices and decodes each image once, after sharding. Supported forms of `data_path`:

* ``"fashion_mnist"``: the idx files of Debian's `dataset-fashion-mnist` package
  (`FASHION_MNIST_DIR`), else `tfds.load("fashion_mnist")`;
* a folder of MNIST-style idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``);
* ``"tfds:NAME[:SPLIT]"``: a TFDS dataset already prepared in `tfds_data_dir` (never downloaded);
* TFRecord files (a file, a glob or a folder of ``*.tfrecord``/``*.tfrec``) of `tf.train.Example`
  with ``image/encoded`` (JPEG/PNG bytes) and optional ``image/class/label``;
* an image folder (``.jpg``/``.jpeg``/``.png``, recursive; ImageFolder-style labels from the
  first-level subfolders, optional ``train/`` + ``val/`` or ``test/`` split subfolders).

Corrupt images are handled in two layers. When a source is resolved, every image is checked for
a JPEG/PNG signature and end marker (a cheap read of the file's first and last bytes, or of the
record already in memory for TFRecords); failures are dropped from the index and counted in one
warning, so `num_examples` and the steps of an epoch stay exact. That catches non-images, empty
and truncated files. Rarer damage inside a file (e.g. a PNG with a bad chunk) only shows when the
image is decoded; `ImageSource.dataset` and the multi-crop pipeline then skip the element with
`tf.data`'s `ignore_errors` instead of stopping training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TFRECORD_EXTENSIONS = (".tfrecord", ".tfrec")
TFRECORD_IMAGE_KEY = "image/encoded"
TFRECORD_LABEL_KEY = "image/class/label"
GLOB_CHARACTERS = "*?["

_IDX_PREFIXES = {"train": "train", "test": "t10k", "val": "t10k"}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"
# JPEG writers may pad after the end-of-image marker; look for it in this many trailing bytes.
_END_MARKER_SEARCH_BYTES = 64
_HEADER_CHECK_THREADS = 16

ReadExample = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class DataSourceError(ValueError):
    """A data flag names something that cannot be read; the message names the flag and path."""


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """A fixed-order list of labelled (or unlabelled, label -1) RGB images.

    `read_example` maps an int64 index in [0, num_examples) to (uint8 [H, W, 3], int64 label)
    inside a `tf.data` graph. `image_shape` is (H, W) when every image has that size (in-memory
    sources); `read_example` then also takes a vector of indices and returns a batch, which lets
    the pipelines read and crop whole batches at once.
    """

    name: str
    num_examples: int
    num_classes: int | None
    read_example: ReadExample = dataclasses.field(repr=False, compare=False)
    image_shape: tuple[int, int] | None = None
    # The `resolve_source` arguments that made it, so that another process (a loader process,
    # see `loader_processes`) can open the same source; None for sources made otherwise.
    origin: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    def dataset(self) -> tf.data.Dataset:
        """(image uint8 [H, W, 3], label int64) for every example, in the fixed order."""
        indices = tf.data.Dataset.range(self.num_examples)
        if self.image_shape is not None:
            return indices.batch(1024).map(self.read_example).unbatch()
        return indices.map(self.read_example, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(
            log_warning=True)


def resolve_source(data_path: str, split: str = "train", *, tfds_data_dir: str | None = None,
                   limit_images: int | None = None, flag_name: str = "--data_path") -> ImageSource:
    """The source named by `data_path` (see the module docstring), `split` "train", "test" or "val".

    Raises `DataSourceError` naming `flag_name` and the path for anything that cannot be read.
    """
    if split not in _FOLDER_SPLITS and not data_path.startswith("tfds:"):
        raise DataSourceError(f"{flag_name}: unknown split {split!r} for {data_path} "
                              f"(expected one of {sorted(_FOLDER_SPLITS)})")
    if limit_images is not None and limit_images <= 0:
        raise DataSourceError(f"--limit_images must be positive, got {limit_images}")
    source = _resolve(data_path, split, tfds_data_dir, flag_name)
    if limit_images is not None and limit_images < source.num_examples:
        # The name stays: it says which data set and split this is, whatever the count.
        source = dataclasses.replace(source, num_examples=limit_images)
    origin = dict(data_path=data_path, split=split, tfds_data_dir=tfds_data_dir,
                  limit_images=limit_images, flag_name=flag_name)
    return dataclasses.replace(source, origin=origin)


def _resolve(data_path: str, split: str, tfds_data_dir: str | None, flag_name: str) -> ImageSource:
    if data_path == "fashion_mnist":
        return _fashion_mnist_source(split, tfds_data_dir, flag_name)
    if data_path.startswith("tfds:"):
        return _tfds_source(data_path, split, tfds_data_dir, flag_name)
    if os.path.isfile(data_path):
        return _tfrecord_source([data_path], data_path, flag_name)
    if not os.path.isdir(data_path):
        if not any(character in data_path for character in GLOB_CHARACTERS):
            raise DataSourceError(f"{flag_name}: {data_path} does not exist")
        paths = sorted(path for path in glob.glob(data_path) if os.path.isfile(path))
        if not paths:
            raise DataSourceError(f"{flag_name}: no files match {data_path}")
        return _tfrecord_source(paths, data_path, flag_name)
    if _find_idx_file(data_path, "train", "images") or _find_idx_file(data_path, "t10k", "images"):
        return _idx_source(data_path, split, flag_name)
    tfrecords = sorted(entry.path for entry in os.scandir(data_path)
                       if entry.is_file() and entry.name.lower().endswith(TFRECORD_EXTENSIONS))
    if tfrecords:
        return _tfrecord_source(tfrecords, data_path, flag_name)
    return _image_folder_source(data_path, split, flag_name)


# --------------------------------------------------------------------------- #
# In-memory sources (idx files, Fashion-MNIST)
# --------------------------------------------------------------------------- #

def _in_memory_source(name: str, images: np.ndarray, labels: np.ndarray,
                      num_classes: int | None) -> ImageSource:
    """A source over uint8 images [N, H, W] (grayscale) or [N, H, W, 3] held in memory."""
    images_tensor = tf.constant(images)
    labels_tensor = tf.constant(labels.astype(np.int64))
    grayscale = images.ndim == 3

    def read_example(index):
        image = tf.gather(images_tensor, index)
        if grayscale:
            image = tf.image.grayscale_to_rgb(image[..., tf.newaxis])
        return image, tf.gather(labels_tensor, index)

    return ImageSource(name=name, num_examples=len(images), num_classes=num_classes,
                       read_example=read_example, image_shape=tuple(images.shape[1:3]))


def _find_idx_file(folder: str, prefix: str, kind: str) -> str | None:
    """Path of `{prefix}-{kind}-idx?-ubyte[.gz]` in `folder`, or None."""
    rank = 3 if kind == "images" else 1
    for name in (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}-idx{rank}-ubyte.gz",
                 f"{prefix}-{kind}.idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte.gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path: str, magic: int, flag_name: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise DataSourceError(f"{flag_name}: cannot read idx file {path}: {error}") from error
    rank = magic & 0xFF
    header_size = 4 * (1 + rank)
    if len(data) < header_size or struct.unpack(">I", data[:4])[0] != magic:
        raise DataSourceError(f"{flag_name}: {path} is not an idx file of rank {rank} "
                              f"(magic number {magic} expected)")
    shape = struct.unpack(f">{rank}I", data[4:header_size])
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        raise DataSourceError(f"{flag_name}: {path} has {len(data)} bytes, its header "
                              f"(shape {shape}) needs {expected_size}: truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _idx_source(folder: str, split: str, flag_name: str) -> ImageSource:
    prefix = _IDX_PREFIXES[split]
    images_path = _find_idx_file(folder, prefix, "images")
    labels_path = _find_idx_file(folder, prefix, "labels")
    if images_path is None or labels_path is None:
        raise DataSourceError(f"{flag_name}: {folder} has no {prefix}-images-idx3-ubyte[.gz] and "
                              f"{prefix}-labels-idx1-ubyte[.gz] for split {split!r}")
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, flag_name)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, flag_name)
    if len(images) != len(labels):
        raise DataSourceError(f"{flag_name}: {images_path} has {len(images)} images but "
                              f"{labels_path} has {len(labels)} labels")
    if len(images) == 0:
        raise DataSourceError(f"{flag_name}: {images_path} holds no images")
    return _in_memory_source(f"idx files in {folder} ({split})", images, labels,
                             num_classes=int(labels.max()) + 1)


def _fashion_mnist_source(split: str, tfds_data_dir: str | None, flag_name: str) -> ImageSource:
    if os.path.isdir(FASHION_MNIST_DIR):
        source = _idx_source(FASHION_MNIST_DIR, split, flag_name)
        return dataclasses.replace(source, name=f"fashion_mnist {source.name}")
    tfds_split = "train" if split == "train" else "test"
    try:
        builder = tfds.builder("fashion_mnist", data_dir=tfds_data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare()
    except Exception as error:  # any download failure gets the same advice
        raise DataSourceError(
            f"{flag_name}=fashion_mnist: {FASHION_MNIST_DIR} does not exist and downloading "
            f"Fashion-MNIST with tensorflow_datasets failed ({type(error).__name__}: {error}). "
            f"Install Debian's dataset-fashion-mnist package (apt-get install "
            f"dataset-fashion-mnist) or pass a folder of idx files with {flag_name}.") from error
    return _tfds_builder_source(builder, tfds_split, flag_name)


# --------------------------------------------------------------------------- #
# Record sources (TFRecord files, prepared TFDS datasets)
# --------------------------------------------------------------------------- #

@dataclasses.dataclass
class _RecordIndex:
    """Where each valid record lies: file, byte offset and length of its payload, label."""

    file_ids: list[int] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    num_corrupt: int = 0


def _index_tfrecord_file(path: str, file_id: int, index: _RecordIndex, *, image_key: str,
                         label_key: str, skip: int = 0, take: int | None = None,
                         flag_name: str) -> None:
    """Appends the records of one TFRecord file (framing: u64 length, u32 crc, data, u32 crc).

    Every record is read and parsed once here, to count it, find its label and check its image
    bytes; training then reads records by offset, so epochs can be fully shuffled.
    """
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        position = 0
        record_number = 0
        while position < file_size and (take is None or record_number < skip + take):
            header = file.read(12)
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else file_size
            if position + 16 + length > file_size:
                raise DataSourceError(f"{flag_name}: {path} is not a TFRecord file or is truncated "
                                      f"(record {record_number} at byte {position})")
            payload = file.read(length)
            file.seek(4, os.SEEK_CUR)
            if record_number >= skip:
                try:
                    example = tf.train.Example.FromString(payload)
                except Exception as error:  # protobuf's DecodeError class is not public
                    raise DataSourceError(f"{flag_name}: record {record_number} of {path} is not "
                                          f"a tf.train.Example ({error})") from error
                features = example.features.feature
                if image_key not in features:
                    raise DataSourceError(f"{flag_name}: record {record_number} of {path} has no "
                                          f"{image_key!r} feature (has {sorted(features)})")
                encoded = features[image_key].bytes_list.value
                if encoded and _has_image_structure(encoded[0][:16], encoded[0][-64:]):
                    labels = features[label_key].int64_list.value if label_key in features else []
                    index.file_ids.append(file_id)
                    index.offsets.append(position + 12)
                    index.lengths.append(length)
                    index.labels.append(labels[0] if labels else -1)
                else:
                    index.num_corrupt += 1
            position += 16 + length
            record_number += 1


def _record_source(name: str, paths: Sequence[str], index: _RecordIndex, *, image_key: str,
                   num_classes: int | None, flag_name: str) -> ImageSource:
    if index.num_corrupt:
        log.warning("Skipped %d records with unreadable or corrupt images in %s",
                    index.num_corrupt, name)
    if not index.offsets:
        raise DataSourceError(f"{flag_name}: {name} holds zero readable image records")
    paths = list(paths)
    file_ids = tf.constant(index.file_ids, tf.int32)
    offsets = tf.constant(index.offsets, tf.int64)
    lengths = tf.constant(index.lengths, tf.int64)
    labels = tf.constant(index.labels, tf.int64)

    # tf.data has no op that reads a byte range of a file (FixedLengthRecordDataset reads up to
    # the offset), so the record is read in Python; the file read releases the GIL.
    def read_record(file_id, offset, length):
        with open(paths[file_id], "rb") as file:
            file.seek(offset)
            return np.array(file.read(length), dtype=object)

    def read_example(example_index):
        serialized = tf.numpy_function(
            read_record, [tf.gather(file_ids, example_index), tf.gather(offsets, example_index),
                          tf.gather(lengths, example_index)], tf.string, stateful=False)
        serialized = tf.ensure_shape(serialized, [])
        encoded = tf.io.parse_single_example(
            serialized, {image_key: tf.io.FixedLenFeature([], tf.string)})[image_key]
        return decode_image(encoded), tf.gather(labels, example_index)

    return ImageSource(name=name, num_examples=len(index.offsets), num_classes=num_classes,
                       read_example=read_example)


def _tfrecord_source(paths: Sequence[str], description: str, flag_name: str) -> ImageSource:
    index = _RecordIndex()
    for file_id, path in enumerate(paths):
        try:
            _index_tfrecord_file(path, file_id, index, image_key=TFRECORD_IMAGE_KEY,
                                 label_key=TFRECORD_LABEL_KEY, flag_name=flag_name)
        except OSError as error:
            raise DataSourceError(f"{flag_name}: cannot read {path}: {error}") from error
    labelled = [label for label in index.labels if label >= 0]
    return _record_source(f"TFRecord files {description}", paths, index,
                          image_key=TFRECORD_IMAGE_KEY,
                          num_classes=max(labelled) + 1 if labelled else None, flag_name=flag_name)


def _tfds_source(data_path: str, split: str, tfds_data_dir: str | None,
                 flag_name: str) -> ImageSource:
    name, _, split_in_path = data_path[len("tfds:"):].partition(":")
    try:
        builder = tfds.builder(name, data_dir=tfds_data_dir)
    except Exception as error:  # DatasetNotFoundError and bad config names alike
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataSourceError(f"{flag_name}={data_path}: unknown TFDS dataset {name!r} "
                              f"({first_line})") from error
    if not builder.is_prepared():
        raise DataSourceError(
            f"{flag_name}={data_path}: TFDS dataset {name!r} is not prepared in "
            f"{builder.data_dir_root} (--tfds_data_dir={tfds_data_dir}); prepare it there on a "
            f"machine with internet (tfds build {name} --data_dir=...): it is never downloaded "
            f"here")
    return _tfds_builder_source(builder, split_in_path or split, flag_name)


def _tfds_builder_source(builder, split: str, flag_name: str) -> ImageSource:
    dataset_name = builder.info.name
    if split not in builder.info.splits and split == "val" and "validation" in builder.info.splits:
        split = "validation"
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        raise DataSourceError(f"{flag_name}: TFDS dataset {dataset_name} is stored as "
                              f"{builder.info.file_format}; only TFRecord is supported")
    image_keys = [key for key, feature in builder.info.features.items()
                  if isinstance(feature, tfds.features.Image)]
    label_keys = [key for key, feature in builder.info.features.items()
                  if isinstance(feature, tfds.features.ClassLabel)]
    if not image_keys:
        raise DataSourceError(f"{flag_name}: TFDS dataset {dataset_name} has no image feature")
    try:
        instructions = builder.info.splits[split].file_instructions
    except (KeyError, ValueError, TypeError) as error:
        raise DataSourceError(f"{flag_name}: TFDS dataset {dataset_name} has no split {split!r} "
                              f"(splits: {sorted(builder.info.splits)})") from error
    index = _RecordIndex()
    paths = [os.fspath(instruction.filename) for instruction in instructions]
    for file_id, (path, instruction) in enumerate(zip(paths, instructions, strict=True)):
        _index_tfrecord_file(path, file_id, index, image_key=image_keys[0],
                             label_key=label_keys[0] if label_keys else "", skip=instruction.skip,
                             take=instruction.take, flag_name=flag_name)
    num_classes = builder.info.features[label_keys[0]].num_classes if label_keys else None
    return _record_source(f"tfds {dataset_name} in {builder.data_dir} ({split})", paths, index,
                          image_key=image_keys[0], num_classes=num_classes, flag_name=flag_name)


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #

def _has_image_structure(head: bytes, tail: bytes) -> bool:
    """Whether bytes start and end like a complete JPEG or PNG file."""
    if head.startswith(_JPEG_START):
        return _JPEG_END in tail
    if head.startswith(_PNG_START):
        return _PNG_END in tail
    return False


def _looks_like_complete_image(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(16)
            file.seek(max(0, os.fstat(file.fileno()).st_size - _END_MARKER_SEARCH_BYTES))
            return _has_image_structure(head, file.read())
    except OSError:
        return False


def _image_folder_source(root: str, split: str, flag_name: str) -> ImageSource:
    folder, name = root, f"image folder {root}"
    subfolders = {entry.name for entry in os.scandir(root) if entry.is_dir()}
    if "train" in subfolders and subfolders & {"val", "test"}:
        chosen = next(candidate for candidate in _FOLDER_SPLITS[split] if candidate in subfolders)
        folder, name = os.path.join(root, chosen), f"image folder {root} ({chosen})"

    image_paths, num_other_files = [], 0
    for directory, child_dirs, file_names in os.walk(folder, followlinks=True):
        child_dirs.sort()
        for file_name in sorted(file_names):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                image_paths.append(os.path.join(directory, file_name))
            else:
                num_other_files += 1
    if num_other_files:
        log.warning("Ignored %d files without a .jpg/.jpeg/.png extension in %s",
                    num_other_files, folder)
    if not image_paths:
        raise DataSourceError(f"{flag_name}: {folder} contains no .jpg, .jpeg or .png images")

    with concurrent.futures.ThreadPoolExecutor(_HEADER_CHECK_THREADS) as pool:
        readable = list(pool.map(_looks_like_complete_image, image_paths))
    corrupt = [path for path, ok in zip(image_paths, readable, strict=True) if not ok]
    if corrupt:
        log.warning("Skipped %d unreadable or corrupt images in %s (first: %s)",
                    len(corrupt), folder, corrupt[0])
    image_paths = [path for path, ok in zip(image_paths, readable, strict=True) if ok]
    if not image_paths:
        raise DataSourceError(f"{flag_name}: {folder} contains no readable images")

    relative_dirs = [os.path.relpath(os.path.dirname(path), folder) for path in image_paths]
    class_names = sorted({rel.split(os.sep)[0] for rel in relative_dirs if rel != os.curdir})
    class_ids = {class_name: label for label, class_name in enumerate(class_names)}
    labels = [class_ids[rel.split(os.sep)[0]] if rel != os.curdir else -1
              for rel in relative_dirs]
    paths_tensor = tf.constant(image_paths)
    labels_tensor = tf.constant(labels, tf.int64)

    def read_example(index):
        encoded = tf.io.read_file(tf.gather(paths_tensor, index))
        return decode_image(encoded), tf.gather(labels_tensor, index)

    return ImageSource(name=name, num_examples=len(image_paths),
                       num_classes=len(class_names) or None, read_example=read_example)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes (any channel count or bit depth) -> uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])
