"""Fixtures writing tiny synthetic data sets (image files, idx files, TFRecords) for the data tests.

The writers are exposed as factory fixtures (a fixture returning the function), so the test
modules need no imports from this file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dino_keras.data.sources import resolve_source
from tests.helpers import count_records, encode_image, write_idx, write_tfrecord


def write_image(path, array: np.ndarray, image_format: str | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image_format = image_format or ("JPEG" if str(path).lower().endswith((".jpg", ".jpeg"))
                                    else "PNG")
    with open(path, "wb") as file:
        file.write(encode_image(array, image_format))
    return str(path)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_record_files(folder, sizes: list[int], *, first_label: int = 0) -> list[str]:
    """Counted TFRecord files of PNGs of different sizes; label = number of the image, so
    every image can be told apart by its label."""
    generator = np.random.default_rng(2)
    paths, label = [], first_label
    os.makedirs(folder, exist_ok=True)
    for file_number, size in enumerate(sizes):
        encoded, labels = [], []
        for _ in range(size):
            encoded.append(encode_image(random_image(generator, 18 + label % 5, 24 - label % 7)))
            labels.append(label)
            label += 1
        paths.append(write_tfrecord(os.path.join(folder, f"part-{file_number}.tfrecord"),
                                    encoded, labels))
    count_records(*paths)
    return paths


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def idx_folder(tmp_path):
    """idx files: 40 train images (28x28, labels 0..3) and 10 test images."""
    generator = np.random.default_rng(1)
    train = generator.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    test = generator.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "idx", "train", train, np.arange(40) % 4)
    write_idx(tmp_path / "idx", "t10k", test, np.arange(10) % 4)
    return tmp_path / "idx", train, test


@pytest.fixture
def idx_source(idx_folder):
    """40 same-size images held in memory: the batched cropping path."""
    return resolve_source(str(idx_folder[0]))


@pytest.fixture
def file_source(tmp_path, rng, write_image, random_image):
    """14 PNG files of different sizes (3 steps of 4 per epoch): the per-image cropping path."""
    for i in range(14):
        write_image(tmp_path / "files" / f"c{i % 2}" / f"{i}.png",
                    random_image(rng, 20 + i, 30 - i))
    return resolve_source(str(tmp_path / "files"))


@pytest.fixture
def record_source(tmp_path):
    """14 labelled PNG records of different sizes in 3 counted files (3 steps of 4 per epoch):
    the streamed path."""
    write_record_files(tmp_path / "records", [5, 5, 4])
    return resolve_source(str(tmp_path / "records"))


@pytest.fixture(name="count_records")
def count_records_fixture():
    return count_records


@pytest.fixture(name="write_record_files")
def write_record_files_fixture():
    return write_record_files


@pytest.fixture(name="encode_image")
def encode_image_fixture():
    return encode_image


@pytest.fixture(name="write_image")
def write_image_fixture():
    return write_image


@pytest.fixture(name="random_image")
def random_image_fixture():
    return random_image


@pytest.fixture(name="write_idx")
def write_idx_fixture():
    return write_idx


@pytest.fixture(name="write_tfrecord")
def write_tfrecord_fixture():
    return write_tfrecord
