"""Counts the images of TFRecord files once, so that runs start without reading every record.

    python scripts/count_records.py --data_path=/data/imagenet/train      # a folder of *.tfrecord
    python scripts/count_records.py --data_path='gs://bucket/imagenet/train-*'

Reads every record of the files named by --data_path (a file, a glob or a folder, as
scripts/train.py's --data_path) with TensorFlow's reader and writes, in each of their folders,
`record_counts.json`: per file its size, records, readable images (JPEG/PNG bytes that start
and end as such, the check training applies) and largest label. Entries of other files already
in that count file are kept. Run it again after a record file changes: a run refuses a file
whose size differs from the counted one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    flags.DEFINE_string("data_path", "", "TFRecord files: a file, a glob or a folder of "
                        "*.tfrecord/*.tfrec files.", flag_values=flag_values)
    flags.DEFINE_string("image_key", "image/encoded", "Feature holding the JPEG/PNG bytes.",
                        flag_values=flag_values)
    flags.DEFINE_string("label_key", "image/class/label", "int64 label feature ('' for none).",
                        flag_values=flag_values)


def run(flag_values) -> dict:
    """Writes the count files; returns {"files": n, "records": n, "images": n, "counts_files"}."""
    from dino_keras.data import record_counts
    from dino_keras.data.sources import DataSourceError, tfrecord_paths

    if not flag_values.data_path:
        raise DataSourceError("--data_path: name the TFRecord files to count")
    paths = tfrecord_paths(flag_values.data_path)
    if not paths:
        raise DataSourceError(f"--data_path: {flag_values.data_path} holds no *.tfrecord or "
                              f"*.tfrec files")
    totals = {"files": 0, "records": 0, "images": 0}

    def report(path, count):
        totals["files"] += 1
        totals["records"] += count.records
        totals["images"] += count.images
        print(f"{path}: {count.images} images in {count.records} records", flush=True)

    try:
        written = record_counts.write_counts(paths, flag_values.image_key, flag_values.label_key,
                                             report=report)
    except record_counts.RecordCountError as error:
        raise DataSourceError(f"--data_path: {error}") from error
    print(f"{totals['images']} images in {totals['records']} records of {totals['files']} "
          f"files; counts written to {', '.join(written)}")
    return dict(totals, counts_files=written)


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
