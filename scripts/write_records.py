"""Writes an image data set as counted TFRecord files, the form that training streams.

    python scripts/write_records.py --data_path=fashion_mnist --output_dir=DIR/train \
        [--split=train] [--limit_images=16384] [--num_files=16]

Reads --data_path as scripts/train.py does (an image folder, idx files, `fashion_mnist`,
`tfds:NAME`, TFRecord files) in its fixed order, and writes its first --limit_images images
(all by default) as PNGs to DIR/part-NNNNN-of-MMMMM.tfrecord, --num_files files of consecutive
images, with the features scripts/train.py reads (`image/encoded`, `image/class/label`;
unlabelled images get no label). Then counts them as scripts/count_records.py does, so that a
run reads DIR at once: `--data_path=DIR`. DIR must not hold record files already; any path
`tf.io.gfile` writes (gs://) will do.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    flags.DEFINE_string("data_path", "", "The images, as scripts/train.py's --data_path.",
                        flag_values=flag_values)
    flags.DEFINE_string("split", "train", "train, test or val.", flag_values=flag_values)
    flags.DEFINE_string("tfds_data_dir", None, "For tfds: sources.", flag_values=flag_values)
    flags.DEFINE_integer("limit_images", 0, "Write only the first N images (0: all).",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_files", 16, "Number of record files.", flag_values=flag_values)
    flags.DEFINE_string("output_dir", "", "Folder to write the record files to.",
                        flag_values=flag_values)


def _check_flags(flag_values) -> None:
    from dino_keras.data.sources import DataSourceError, tfrecord_paths

    if not flag_values.data_path:
        raise DataSourceError("--data_path: name the images to write")
    if not flag_values.output_dir:
        raise DataSourceError("--output_dir: name the folder to write the record files to")
    if flag_values.num_files < 1:
        raise DataSourceError(f"--num_files must be >= 1, got {flag_values.num_files}")
    if flag_values.limit_images < 0:
        raise DataSourceError(f"--limit_images must be >= 0, got {flag_values.limit_images}")
    import tensorflow as tf

    if tf.io.gfile.isdir(flag_values.output_dir) and tfrecord_paths(flag_values.output_dir):
        raise DataSourceError(f"--output_dir: {flag_values.output_dir} already holds record "
                              f"files; name an empty folder")


def run(flag_values) -> dict:
    """Writes and counts the files; returns {"files": [paths], "images": n}."""
    _check_flags(flag_values)
    import tensorflow as tf

    from dino_keras.data import record_counts
    from dino_keras.data.sources import (
        TFRECORD_IMAGE_KEY,
        TFRECORD_LABEL_KEY,
        image_example,
        resolve_source,
    )

    source = resolve_source(flag_values.data_path, flag_values.split,
                            tfds_data_dir=flag_values.tfds_data_dir,
                            limit_images=flag_values.limit_images or None)
    count = source.num_examples
    num_files = min(flag_values.num_files, count)
    images = source.dataset().map(lambda image, label: (tf.io.encode_png(image), label),
                                  num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator()
    tf.io.gfile.makedirs(flag_values.output_dir)
    paths = []
    for index in range(num_files):
        path = f"{flag_values.output_dir.rstrip('/')}/part-{index:05d}-of-{num_files:05d}.tfrecord"
        # Files of consecutive images, the first ones one image longer when it does not divide.
        size = count // num_files + (index < count % num_files)
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(size):
                encoded, label = next(images)
                writer.write(image_example(encoded, label if label >= 0 else None))
        paths.append(path)
        print(f"{path}: {size} images", flush=True)
    record_counts.write_counts(paths, TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY)
    print(f"{count} images of {source.name} in {num_files} files; counted: "
          f"--data_path={flag_values.output_dir}")
    return {"files": paths, "images": count}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.data.sources import DataSourceError

    try:
        run(flags.FLAGS)
    except DataSourceError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
