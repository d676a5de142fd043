"""Image sources: one `--data_path` value chooses where the training or evaluation images come from.

A source holds `num_examples` examples in a fixed order. Supported forms of `data_path` (any
path may be a `tf.io.gfile` URL such as ``gs://`` or ``ram://``):

* ``"fashion_mnist"``: the idx files of Debian's `dataset-fashion-mnist` package
  (`FASHION_MNIST_DIR`), else `tfds.load("fashion_mnist")`;
* a folder of MNIST-style idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``);
* ``"tfds:NAME[:SPLIT]"``: a TFDS dataset already prepared in `tfds_data_dir` (never
  downloaded), stored as TFRecord or array_record;
* TFRecord files (a file, a glob or a folder of ``*.tfrecord``/``*.tfrec``) of `tf.train.Example`
  with ``image/encoded`` (JPEG/PNG bytes) and optional ``image/class/label``; their image counts
  come from the count files `scripts/count_records.py` writes once (`record_counts`);
* an image folder (``.jpg``/``.jpeg``/``.png``, recursive; ImageFolder-style labels from the
  first-level subfolders, optional ``train/`` + ``val/`` or ``test/`` split subfolders).
  A folder whose images all have one size, small enough to be cropped in whole batches
  (`augment.crops_whole_batches`), and decode to at most `IN_MEMORY_FOLDER_BYTES` is decoded
  once, when the source is made, and then read as the in-memory sources are; any other folder
  is read and decoded image by image.

How the multi-crop pipeline and the linear probe read them: sources with `records` (TFRecord
files, TFDS TFRecord splits) are streamed by `tf.data.TFRecordDataset` in a seeded file order
through a shuffle buffer (`record_stream`); nothing reads their records at start-up. Every
other source is read by index (`ImageSource.read_example`) in a full permutation per epoch.
Record sources keep a `read_example` too, for code that reads by index in an order of its own;
it indexes the files on first use (`record_index`), which reads all of them once.

Corrupt images are handled in two layers. A cheap check of each image's JPEG/PNG signature and
end marker (a file's first and last bytes; the bytes of a record, when it is counted and again
when it is streamed) drops non-images, empty and truncated files, so `num_examples` and the
steps of an epoch stay exact; dropped files are counted in one warning. Rarer damage inside a
file (e.g. a PNG with a bad chunk) only shows when the image is decoded; `ImageSource.dataset`
and the multi-crop pipeline then skip the element with `tf.data`'s `ignore_errors` instead of
stopping training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import logging
import os
import posixpath
import struct
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dino_keras.data import augment, record_counts
from dino_keras.data.record_index import LazyRecordIndex, RecordIndexError, bytes_look_like_image
from dino_keras.data.record_stream import END_MARKER_SEARCH_BYTES, RecordFiles, images_in_order

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
_HEADER_CHECK_THREADS = 16
IN_MEMORY_FOLDER_BYTES = 256 * 2**20

ReadExample = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class DataSourceError(ValueError):
    """A data flag names something that cannot be read; the message names the flag and path."""


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """A fixed-order list of labelled (or unlabelled, label -1) RGB images.

    `read_example` maps an int64 index in [0, num_examples) to (uint8 [H, W, 3], int64 label)
    inside a `tf.data` graph. `image_shape` is (H, W) when every image has that size (in-memory
    sources); `read_example` then also takes a vector of indices and returns a batch, which lets
    the pipelines read and crop whole batches at once. `records` is set for sources that the
    training pipeline streams instead of reading by index (see the module docstring).
    """

    name: str
    num_examples: int
    num_classes: int | None
    read_example: ReadExample = dataclasses.field(repr=False, compare=False)
    image_shape: tuple[int, int] | None = None
    # The `resolve_source` arguments that made it, so that another process (a loader process,
    # see `loader_processes`) can open the same source; None for sources made otherwise.
    origin: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    records: RecordFiles | None = dataclasses.field(default=None, repr=False, compare=False)

    def dataset(self) -> tf.data.Dataset:
        """(image uint8 [H, W, 3], label int64) for every example, in the fixed order."""
        if self.records is not None:  # read in file order, no index needed
            return images_in_order(self.records).take(self.num_examples).map(
                lambda encoded, label: (decode_image(encoded), label),
                num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
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
        records = source.records and dataclasses.replace(source.records, limit=limit_images)
        source = dataclasses.replace(source, num_examples=limit_images, records=records)
    origin = dict(data_path=data_path, split=split, tfds_data_dir=tfds_data_dir,
                  limit_images=limit_images, flag_name=flag_name)
    return dataclasses.replace(source, origin=origin)


def _resolve(data_path: str, split: str, tfds_data_dir: str | None, flag_name: str) -> ImageSource:
    if data_path == "fashion_mnist":
        return _fashion_mnist_source(split, tfds_data_dir, flag_name)
    if data_path.startswith("tfds:"):
        return _tfds_source(data_path, split, tfds_data_dir, flag_name)
    if tf.io.gfile.isdir(data_path) and (_find_idx_file(data_path, "train", "images")
                                         or _find_idx_file(data_path, "t10k", "images")):
        return _idx_source(data_path, split, flag_name)
    paths = tfrecord_paths(data_path, flag_name)
    if paths:
        return _tfrecord_source(paths, data_path, flag_name)
    return _image_folder_source(data_path, split, flag_name)


def tfrecord_paths(data_path: str, flag_name: str = "--data_path") -> list[str]:
    """The record files `data_path` names: itself (a file), the files a glob matches, or a
    folder's ``*.tfrecord``/``*.tfrec`` files (sorted; [] for a folder without any)."""
    if _is_file(data_path):
        return [data_path]
    if tf.io.gfile.isdir(data_path):
        names = (name.rstrip("/") for name in tf.io.gfile.listdir(data_path))
        return sorted(path for path in (_join(data_path, name) for name in names
                                        if name.lower().endswith(TFRECORD_EXTENSIONS))
                      if not tf.io.gfile.isdir(path))
    if not any(character in data_path for character in GLOB_CHARACTERS):
        raise DataSourceError(f"{flag_name}: {data_path} does not exist")
    paths = sorted(path for path in _glob(data_path) if not tf.io.gfile.isdir(path))
    if not paths:
        raise DataSourceError(f"{flag_name}: no files match {data_path}")
    return paths


# --------------------------------------------------------------------------- #
# Files, through tf.io.gfile (local paths and gs://, ram://, ... alike)
# --------------------------------------------------------------------------- #

def _join(folder: str, name: str) -> str:
    return os.path.join(folder, name) if "://" not in folder else posixpath.join(folder, name)


def _is_file(path: str) -> bool:
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def _glob(pattern: str) -> list[str]:
    try:
        return tf.io.gfile.glob(pattern)
    except tf.errors.NotFoundError:  # some file systems raise for a pattern with no parent
        return []


def _subfolders(folder: str) -> list[str]:
    # Object stores list folders with a trailing slash.
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(folder))
    return sorted(name for name in names if tf.io.gfile.isdir(_join(folder, name)))


def _read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read()


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
        path = _join(folder, name)
        if _is_file(path):
            return path
    return None


def _read_idx(path: str, magic: int, flag_name: str) -> np.ndarray:
    try:
        data = _read_bytes(path)
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, tf.errors.OpError) as error:
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
    if tf.io.gfile.isdir(FASHION_MNIST_DIR):
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

def _record_source(name: str, files: RecordFiles, *, num_classes: int | None,
                   flag_name: str) -> ImageSource:
    if files.num_images == 0:
        raise DataSourceError(f"{flag_name}: {name} holds zero readable image records (a "
                              f"record needs a {files.image_key!r} feature of JPEG/PNG bytes)")
    lazy_index = LazyRecordIndex(files)

    def read_example(example_index):
        try:
            encoded, label = lazy_index.read_example(example_index)
        except RecordIndexError as error:
            raise DataSourceError(f"{flag_name}: {error}") from error
        return decode_image(encoded), label

    return ImageSource(name=name, num_examples=files.num_images, num_classes=num_classes,
                       read_example=read_example, records=files)


def _tfrecord_source(paths: Sequence[str], data_path: str, flag_name: str) -> ImageSource:
    try:
        counts = record_counts.read_counts(paths, data_path=data_path, flag_name=flag_name)
    except record_counts.MissingCountsError as error:
        raise DataSourceError(str(error)) from error
    except (OSError, tf.errors.OpError, ValueError) as error:
        raise DataSourceError(f"{flag_name}: cannot read the record counts of {data_path}: "
                              f"{error}") from error
    num_corrupt = sum(count.records - count.images for count in counts)
    name = f"TFRecord files {data_path}"
    if num_corrupt:
        log.warning("Skipped %d records with unreadable or corrupt images in %s", num_corrupt,
                    name)
    max_label = max(count.max_label for count in counts)
    files = RecordFiles(paths=tuple(paths), images_per_file=tuple(c.images for c in counts),
                        image_key=TFRECORD_IMAGE_KEY, label_key=TFRECORD_LABEL_KEY)
    return _record_source(name, files, num_classes=max_label + 1 if max_label >= 0 else None,
                          flag_name=flag_name)


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
    """A prepared TFDS split: TFRecord shards streamed, array_record read by index through
    TFDS's data-source API. The count comes from the dataset's metadata."""
    dataset_name = builder.info.name
    if split not in builder.info.splits and split == "val" and "validation" in builder.info.splits:
        split = "validation"
    file_format = builder.info.file_format
    if file_format not in (tfds.core.FileFormat.TFRECORD, tfds.core.FileFormat.ARRAY_RECORD):
        raise DataSourceError(f"{flag_name}: TFDS dataset {dataset_name} is stored as "
                              f"{file_format}; only TFRecord and array_record are supported")
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
    num_classes = builder.info.features[label_keys[0]].num_classes if label_keys else None
    name = f"tfds {dataset_name} in {builder.data_dir} ({split})"
    image_key, label_key = image_keys[0], label_keys[0] if label_keys else ""
    if file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _array_record_source(name, builder, split, image_key, label_key,
                                    num_classes=num_classes, flag_name=flag_name)
    files = RecordFiles(
        paths=tuple(os.fspath(instruction.filename) for instruction in instructions),
        images_per_file=tuple(instruction.take for instruction in instructions),
        image_key=image_key, label_key=label_key,
        skips=tuple(instruction.skip for instruction in instructions),
        takes=tuple(instruction.take for instruction in instructions))
    return _record_source(name, files, num_classes=num_classes, flag_name=flag_name)


def _array_record_source(name: str, builder, split: str, image_key: str, label_key: str, *,
                         num_classes: int | None, flag_name: str) -> ImageSource:
    """An array_record split read by index through `builder.as_data_source` (random access, so
    the multi-crop pipeline gives it the full permutation of in-memory sources)."""
    try:
        data_source = builder.as_data_source(
            split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as error:  # a missing array_record package, unreadable files
        raise DataSourceError(f"{flag_name}: cannot open {name} with TFDS's data-source API "
                              f"({type(error).__name__}: {error})") from error
    if len(data_source) == 0:
        raise DataSourceError(f"{flag_name}: {name} holds no examples")

    def read_record(index):
        example = data_source[int(index)]
        label = example[label_key] if label_key else -1
        return np.array(example[image_key], dtype=object), np.int64(label)

    def read_example(example_index):
        encoded, label = tf.numpy_function(read_record, [example_index], (tf.string, tf.int64),
                                           stateful=False)
        return decode_image(tf.ensure_shape(encoded, [])), tf.ensure_shape(label, [])

    return ImageSource(name=name, num_examples=len(data_source), num_classes=num_classes,
                       read_example=read_example)


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #

def _looks_like_complete_image(path: str) -> bool:
    try:
        with tf.io.gfile.GFile(path, "rb") as file:
            head = file.read(16)
            file.seek(max(0, file.size() - END_MARKER_SEARCH_BYTES))
            return bytes_look_like_image(head, file.read())
    except (OSError, tf.errors.OpError):
        return False


def _image_folder_source(root: str, split: str, flag_name: str) -> ImageSource:
    folder, name = root, f"image folder {root}"
    subfolders = set(_subfolders(root))
    if "train" in subfolders and subfolders & {"val", "test"}:
        chosen = next(candidate for candidate in _FOLDER_SPLITS[split] if candidate in subfolders)
        folder, name = _join(root, chosen), f"image folder {root} ({chosen})"

    # Walked top-down in sorted order; each image's class is its first-level subfolder.
    image_paths, image_classes, num_other_files = [], [], 0
    for directory, child_dirs, file_names in tf.io.gfile.walk(folder):
        child_dirs[:] = sorted(child.rstrip("/") for child in child_dirs)
        relative = directory[len(folder):].strip("/" + os.sep)
        class_name = relative.replace(os.sep, "/").split("/")[0] if relative else None
        for file_name in sorted(file_names):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                image_paths.append(_join(directory, file_name))
                image_classes.append(class_name)
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
    image_classes = [class_name for class_name, ok in zip(image_classes, readable, strict=True)
                     if ok]
    image_paths = [path for path, ok in zip(image_paths, readable, strict=True) if ok]
    if not image_paths:
        raise DataSourceError(f"{flag_name}: {folder} contains no readable images")

    class_names = sorted({class_name for class_name in image_classes if class_name is not None})
    class_ids = {class_name: label for label, class_name in enumerate(class_names)}
    labels = [class_ids[class_name] if class_name is not None else -1
              for class_name in image_classes]
    images = _decode_if_small_and_same_size(image_paths)
    if images is not None:
        return _in_memory_source(name, images, np.array(labels), len(class_names) or None)
    paths_tensor = tf.constant(image_paths)
    labels_tensor = tf.constant(labels, tf.int64)

    def read_example(index):
        encoded = tf.io.read_file(tf.gather(paths_tensor, index))
        return decode_image(encoded), tf.gather(labels_tensor, index)

    return ImageSource(name=name, num_examples=len(image_paths),
                       num_classes=len(class_names) or None, read_example=read_example)


def _decode_if_small_and_same_size(image_paths: list[str]) -> np.ndarray | None:
    """All the images, uint8 [N, H, W, 3], if they share one size that is cropped in whole
    batches and take at most `IN_MEMORY_FOLDER_BYTES` decoded; None if not, or if one fails to
    decode (the folder is then read image by image, which skips such an image)."""
    def decode_file(path):
        return decode_image(tf.io.read_file(path))

    try:
        shape = tuple(decode_file(image_paths[0]).shape)
        if (not augment.crops_whole_batches(shape[:2])
                or len(image_paths) * int(np.prod(shape)) > IN_MEMORY_FOLDER_BYTES):
            return None
        images = np.empty((len(image_paths), *shape), np.uint8)
        decoded = tf.data.Dataset.from_tensor_slices(image_paths).map(
            decode_file, num_parallel_calls=tf.data.AUTOTUNE)
        for index, image in enumerate(decoded.as_numpy_iterator()):
            if image.shape != shape:
                return None
            images[index] = image
    except tf.errors.OpError:
        return None
    log.info("Decoded the %d images (%dx%d) into memory", len(images), shape[0], shape[1])
    return images


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes (any channel count or bit depth) -> uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def image_example(encoded: bytes, label: int | None = None) -> bytes:
    """A serialized `tf.train.Example` of the TFRecord format read here: JPEG/PNG bytes under
    `TFRECORD_IMAGE_KEY` and, when `label` is not None, an int64 under `TFRECORD_LABEL_KEY`."""
    feature = {TFRECORD_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    if label is not None:
        feature[TFRECORD_LABEL_KEY] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(label)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
