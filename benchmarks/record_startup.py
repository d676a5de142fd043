"""Start-up and throughput of TFRecord input: the byte-offset index against the stream.

    python benchmarks/record_startup.py [--records=10000,200000] [--files=32]
        [--data_dir=/tmp/dino_record_bench] [--batches=20] [--batch_size=128]

For each record count, writes (the first time) that many random 32x32 JPEGs into --files
TFRecord files under --data_dir and counts them with `record_counts` (what
scripts/count_records.py does, timed: the streamed reader pays it once per data set). Then,
each in a fresh process, for both readers:

* indexed: the reader training used before streaming, `record_index.RecordIndex` (every record
  read and parsed at start-up, then each record read by offset in Python), in the multi-crop
  pipeline's full-permutation path;
* streamed: `resolve_source` on the counted files, the multi-crop pipeline's record stream.

It reports the seconds to open the source, the seconds to the first batch of the multi-crop
pipeline (configs/demo.cfg's crops: 2 x 28 px + 4 x 12 px; opening included), and the images/s
of the --batches batches after it. The files are in the page cache for both readers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("records", ["10000", "200000"], "Record counts to measure.")
flags.DEFINE_integer("files", 32, "TFRecord files per data set.")
flags.DEFINE_string("data_dir", "/tmp/dino_record_bench", "Where the generated files go.")
flags.DEFINE_integer("batches", 20, "Measured batches after the first.")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_enum("measure", "", ["", "indexed", "streamed"], "Internal: one measurement.")
flags.DEFINE_string("folder", "", "Internal: the data set of --measure.")
FLAGS = flags.FLAGS

CROPS = dict(global_crops_size=28, local_crops_size=12, global_crops_scale=(0.4, 1.0),
             local_crops_scale=(0.05, 0.4), local_crops_number=4)
IMAGE_SIZE = 32


def write_records(folder: str, count: int, num_files: int) -> None:
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from dino_keras.data.sources import image_example

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for file_number in range(num_files):
        path = os.path.join(folder, f"train-{file_number:05d}-of-{num_files:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(file_number, count, num_files):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
                writer.write(image_example(buffer.getvalue(), index % 10))


def prepare(count: int) -> tuple[str, float]:
    """The folder of `count` records (written the first time), counted; the counting seconds."""
    from dino_keras.data import record_counts
    from dino_keras.data.sources import TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY, tfrecord_paths

    folder = os.path.join(FLAGS.data_dir, f"{count}_in_{FLAGS.files}")
    written = os.path.join(folder, "written")
    if not os.path.exists(written):
        print(f"Writing {count} {IMAGE_SIZE}x{IMAGE_SIZE} JPEG records to {folder}", flush=True)
        write_records(folder, count, FLAGS.files)
        open(written, "w").close()
    start = time.perf_counter()
    record_counts.write_counts(tfrecord_paths(folder), TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY)
    return folder, time.perf_counter() - start


def indexed_source(folder: str):
    """The source as training opened TFRecords before they were streamed."""
    from dino_keras.data.record_index import RecordIndex
    from dino_keras.data.record_stream import RecordFiles
    from dino_keras.data.sources import (
        TFRECORD_IMAGE_KEY,
        TFRECORD_LABEL_KEY,
        ImageSource,
        decode_image,
        tfrecord_paths,
    )

    paths = tuple(tfrecord_paths(folder))
    index = RecordIndex.build(RecordFiles(paths, (0,) * len(paths), TFRECORD_IMAGE_KEY,
                                          TFRECORD_LABEL_KEY))

    def read_example(example_index):
        encoded, label = index.read_example(example_index)
        return decode_image(encoded), label

    return ImageSource(name=f"indexed {folder}", num_examples=index.num_images, num_classes=10,
                       read_example=read_example)


def measure(reader: str, folder: str) -> dict:
    start = time.perf_counter()
    from dino_keras.data.multicrop import build_multicrop_dataset
    from dino_keras.data.sources import resolve_source

    imported = time.perf_counter()
    source = indexed_source(folder) if reader == "indexed" else resolve_source(folder)
    opened = time.perf_counter()
    iterator = iter(build_multicrop_dataset(source, batch_size=FLAGS.batch_size, seed=0, **CROPS))
    next(iterator)
    first = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    end = time.perf_counter()
    return {"reader": reader, "images": source.num_examples,
            "import_seconds": round(imported - start, 2),
            "open_seconds": round(opened - imported, 2),
            "first_batch_seconds": round(first - imported, 2),
            "images_per_second": round(FLAGS.batches * FLAGS.batch_size / (end - first), 1)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.measure:
        print(json.dumps(measure(FLAGS.measure, FLAGS.folder)))
        return
    rows = []
    for count in (int(value) for value in FLAGS.records):
        folder, count_seconds = prepare(count)
        for reader in ("indexed", "streamed"):
            command = [sys.executable, os.path.abspath(__file__), f"--measure={reader}",
                       f"--folder={folder}", f"--batches={FLAGS.batches}",
                       f"--batch_size={FLAGS.batch_size}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            row["count_once_seconds"] = round(count_seconds, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| records | reader | count once (s) | open (s) | first batch (s) | images/s |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        count_once = row["count_once_seconds"] if row["reader"] == "streamed" else "-"
        print(f"| {row['images']} | {row['reader']} | {count_once} | {row['open_seconds']} | "
              f"{row['first_batch_seconds']} | {row['images_per_second']} |")


if __name__ == "__main__":
    app.run(main)
