"""scripts/write_records.py: a data set's first images, as counted record files that a run
streams at once, in the source's order; bad input."""

import numpy as np
import pytest

from dino_keras.data.sources import DataSourceError, resolve_source
from tests.helpers import run_script, write_idx_dataset


def images_and_labels(source):
    pairs = list(source.dataset().as_numpy_iterator())
    return np.stack([image for image, _ in pairs]), [int(label) for _, label in pairs]


def test_writes_the_first_images_in_order_as_counted_record_files(tmp_path):
    data = write_idx_dataset(tmp_path / "idx", train=10, test=4)
    output = tmp_path / "records"
    result = run_script("write_records", f"--data_path={data}", f"--output_dir={output}",
                        "--limit_images=7", "--num_files=3")
    assert result["images"] == 7
    assert [p.rsplit("/", 1)[1] for p in result["files"]] == [
        f"part-0000{i}-of-00003.tfrecord" for i in range(3)]
    records = resolve_source(str(output))  # counted: no "run count_records.py" error
    assert records.num_examples == 7 and records.records is not None
    assert records.records.images_per_file == (3, 2, 2)
    expected_images, expected_labels = images_and_labels(resolve_source(data, limit_images=7))
    images, labels = images_and_labels(records)
    np.testing.assert_array_equal(images, expected_images)
    assert labels == expected_labels

    test_split = run_script("write_records", f"--data_path={data}", "--split=test",
                            f"--output_dir={tmp_path / 'test'}")
    assert test_split["images"] == 4 and len(test_split["files"]) == 4  # never an empty file


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    data = write_idx_dataset(tmp_path / "idx", train=4, test=2)
    run_script("write_records", f"--data_path={data}", f"--output_dir={tmp_path / 'out'}",
               "--num_files=1")
    with pytest.raises(DataSourceError, match="--output_dir: .* already holds record files"):
        run_script("write_records", f"--data_path={data}", f"--output_dir={tmp_path / 'out'}")
    with pytest.raises(DataSourceError, match="--num_files must be >= 1"):
        run_script("write_records", f"--data_path={data}", f"--output_dir={tmp_path / 'b'}",
                   "--num_files=0")
    with pytest.raises(DataSourceError, match="--data_path: .*does not exist"):
        run_script("write_records", f"--data_path={tmp_path / 'missing'}",
                   f"--output_dir={tmp_path / 'c'}")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
