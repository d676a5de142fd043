"""scripts/count_records.py: the count file it writes is what a run then reads; bad input."""

import json

import numpy as np
import pytest

from dino_keras.data.sources import DataSourceError, resolve_source
from tests.helpers import encode_image, run_script, write_tfrecord


def png(value: int) -> bytes:
    return encode_image(np.full((6, 5, 3), value, np.uint8))


def test_counts_images_per_file_for_runs_to_read(tmp_path, capsys):
    write_tfrecord(tmp_path / "a.tfrecord", [png(1), b"not an image", png(2)], [4, 9, 1])
    write_tfrecord(tmp_path / "b.tfrec", [png(3)], [0])
    with pytest.raises(DataSourceError, match="count_records.py"):
        resolve_source(str(tmp_path))

    totals = run_script("count_records", f"--data_path={tmp_path}")
    assert (totals["files"], totals["records"], totals["images"]) == (2, 4, 3)
    assert "3 images in 4 records of 2 files" in capsys.readouterr().out
    with open(tmp_path / "record_counts.json") as file:
        entries = json.load(file)["files"]
    assert entries["a.tfrecord"]["images"] == 2 and entries["a.tfrecord"]["max_label"] == 4
    source = resolve_source(str(tmp_path))
    assert (source.num_examples, source.num_classes) == (3, 5)  # label 9 is the bad record's
    labels = [int(label) for _, label in source.dataset().as_numpy_iterator()]
    assert labels == [4, 1, 0]

    # A glob counts its files into the same count file, keeping the other entries.
    write_tfrecord(tmp_path / "c.tfrecord", [png(4), png(5)], [2, 2])
    assert run_script("count_records", f"--data_path={tmp_path / 'c.*'}")["images"] == 2
    assert resolve_source(str(tmp_path)).num_examples == 5


def test_refuses_what_it_cannot_count(tmp_path):
    with pytest.raises(DataSourceError, match="--data_path: .*holds no"):
        run_script("count_records", f"--data_path={tmp_path}")
    (tmp_path / "x.tfrecord").write_bytes(b"plain text, no records")
    with pytest.raises(DataSourceError, match="x.tfrecord is not a TFRecord file"):
        run_script("count_records", f"--data_path={tmp_path}")
