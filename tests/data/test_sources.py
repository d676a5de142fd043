"""`resolve_source` on every supported `--data_path` form, with tiny data written by the tests."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dino_keras.data import augment, multicrop, record_counts, sources
from dino_keras.data.sources import DataSourceError, resolve_source


def read_all(source: sources.ImageSource) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for image, label in source.dataset().as_numpy_iterator():
        images.append(image)
        labels.append(int(label))
    return images, labels


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.name == sources.__name__]


def tree_snapshot(root) -> dict[str, float]:
    return {os.path.join(directory, name): os.path.getmtime(os.path.join(directory, name))
            for directory, _, names in os.walk(root) for name in names}


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #

@pytest.fixture
def class_folder(tmp_path, rng, write_image, random_image):
    """cats/ (2 images, one nested), dogs/ (1 image), plus non-image files and a corrupt image."""
    root = tmp_path / "pets"
    write_image(root / "dogs" / "d0.PNG", random_image(rng, 12, 10))
    write_image(root / "cats" / "c1.jpg", random_image(rng, 9, 14))
    write_image(root / "cats" / "indoor" / "c0.jpeg", random_image(rng, 16, 16))
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "README").write_text("about these pets")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


def test_image_folder_labels_come_from_sorted_first_level_subfolders(class_folder, caplog):
    before = tree_snapshot(class_folder)
    with caplog.at_level(logging.WARNING):
        source = resolve_source(str(class_folder))
    assert (source.num_examples, source.num_classes) == (3, 2)
    images, labels = read_all(source)
    # Sorted walk: cats/c1.jpg, cats/indoor/c0.jpeg, dogs/d0.PNG.
    assert labels == [0, 0, 1]
    assert [image.shape for image in images] == [(9, 14, 3), (16, 16, 3), (12, 10, 3)]
    assert all(image.dtype == np.uint8 for image in images)
    messages = warnings_of(caplog)
    assert len(messages) == 2
    assert "Ignored 2 files" in messages[0]
    assert "Skipped 1 unreadable or corrupt images" in messages[1] and "broken.jpg" in messages[1]
    assert tree_snapshot(class_folder) == before  # nothing written inside the data folder


def test_training_continues_over_a_folder_with_corrupt_images(class_folder, tmp_path, rng,
                                                              encode_image, random_image):
    # A PNG whose start and end look right but whose data is damaged passes the listing check;
    # it fails only when decoded, and is then skipped too.
    png = bytearray(encode_image(random_image(rng, 20, 20), "PNG"))
    png[60:90] = bytes(30)
    (class_folder / "dogs" / "damaged.png").write_bytes(bytes(png))
    source = resolve_source(str(class_folder))
    assert source.num_examples == 4
    assert len(read_all(source)[0]) == 3
    dataset = multicrop.build_multicrop_dataset(
        source, global_crops_size=16, local_crops_size=8, global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4), local_crops_number=2, batch_size=2, seed=0)
    batches = list(dataset.take(4).as_numpy_iterator())
    assert len(batches) == 4 and all(np.all(np.isfinite(crop)) for crop in batches[-1])


def test_images_in_the_root_are_unlabelled(tmp_path, rng, write_image, random_image):
    for name in ("a.png", "b.jpg"):
        write_image(tmp_path / "flat" / name, random_image(rng, 8, 8))
    source = resolve_source(str(tmp_path / "flat"))
    assert (source.num_examples, source.num_classes) == (2, None)
    assert read_all(source)[1] == [-1, -1]


@pytest.mark.parametrize("split, chosen", [("train", "train"), ("test", "val"), ("val", "val")])
def test_image_folder_split_subfolders(tmp_path, rng, write_image, random_image, split, chosen):
    for folder, count in (("train", 3), ("val", 2)):
        for i in range(count):
            write_image(tmp_path / "ds" / folder / f"class{i % 2}" / f"{i}.png",
                        random_image(rng, 6, 6))
    source = resolve_source(str(tmp_path / "ds"), split)
    assert source.num_examples == {"train": 3, "val": 2}[chosen]
    assert source.name.endswith(f"({chosen})")


@pytest.fixture
def same_size_folder(tmp_path, rng, write_image, random_image):
    """5 images of 7x9 in two classes, grayscale PNG among them: (root, [(image, label)])."""
    written = []
    for i in range(5):
        image = random_image(rng, 7, 9)
        if i == 3:
            image = np.repeat(image[..., :1], 3, axis=-1)  # stored as a grayscale PNG
            write_image(tmp_path / "same" / f"c{i % 2}" / f"{i}.png", image[..., 0])
        else:
            write_image(tmp_path / "same" / f"c{i % 2}" / f"{i}.png", image)
        written.append((image, i % 2))
    # Sorted walk: c0/0, c0/2, c0/4, c1/1, c1/3.
    return tmp_path / "same", [written[i] for i in (0, 2, 4, 1, 3)]


def test_same_size_folder_is_decoded_once_into_memory(same_size_folder, monkeypatch):
    root, expected = same_size_folder
    source = resolve_source(str(root))
    assert source.image_shape == (7, 9)  # the batched cropping path of in-memory sources
    monkeypatch.setattr(tf.io, "read_file", None)  # nothing is read from disk any more
    images, labels = read_all(source)
    assert labels == [label for _, label in expected]
    for image, (written, _) in zip(images, expected, strict=True):
        np.testing.assert_array_equal(image, written)
    batch, batch_labels = source.read_example(tf.constant([4, 0]))
    np.testing.assert_array_equal(batch.numpy()[0], expected[4][0])
    assert batch_labels.numpy().tolist() == [1, 0]


def test_large_or_mixed_size_folders_are_read_per_image(same_size_folder, monkeypatch,
                                                        write_image, random_image, rng):
    root, _ = same_size_folder
    monkeypatch.setattr(sources, "IN_MEMORY_FOLDER_BYTES", 5 * 7 * 9 * 3 - 1)
    assert resolve_source(str(root)).image_shape is None
    monkeypatch.undo()
    monkeypatch.setattr(augment, "BATCH_CROP_MAX_PIXELS", 7 * 9 - 1)  # too large to batch
    assert resolve_source(str(root)).image_shape is None
    monkeypatch.undo()
    write_image(root / "c1" / "9.png", random_image(rng, 9, 7))
    source = resolve_source(str(root))
    assert source.image_shape is None and source.num_examples == 6
    assert sorted(image.shape for image in read_all(source)[0])[-1] == (9, 7, 3)


def test_missing_and_empty_paths_name_the_flag(tmp_path):
    with pytest.raises(DataSourceError, match=r"--data_path: .*nowhere does not exist"):
        resolve_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "list.txt").write_text("x")
    with pytest.raises(DataSourceError, match=r"--eval_data_path: .*empty contains no .jpg"):
        resolve_source(str(tmp_path / "empty"), "test", flag_name="--eval_data_path")
    with pytest.raises(DataSourceError, match="unknown split"):
        resolve_source(str(tmp_path / "empty"), "dev")


def test_folder_with_only_corrupt_images_is_an_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataSourceError, match="--data_path: .*no readable images"):
        resolve_source(str(tmp_path / "bad"))


def test_limit_images_keeps_the_first_examples(class_folder):
    full = read_all(resolve_source(str(class_folder)))
    limited_source = resolve_source(str(class_folder), limit_images=2)
    assert limited_source.num_examples == 2
    limited = read_all(limited_source)
    assert limited[1] == full[1][:2]
    np.testing.assert_array_equal(limited[0][1], full[0][1])
    with pytest.raises(DataSourceError, match="--limit_images"):
        resolve_source(str(class_folder), limit_images=0)


# --------------------------------------------------------------------------- #
# idx files and Fashion-MNIST
# --------------------------------------------------------------------------- #

def test_idx_folder_reads_both_splits_as_rgb(idx_folder):
    folder, train, test = idx_folder
    source = resolve_source(str(folder), "train")
    assert (source.num_examples, source.num_classes, source.image_shape) == (40, 4, (28, 28))
    images, labels = read_all(source)
    assert labels == [i % 4 for i in range(40)]
    assert images[5].shape == (28, 28, 3)
    for channel in range(3):
        np.testing.assert_array_equal(images[5][..., channel], train[5])
    test_source = resolve_source(str(folder), "test")
    assert test_source.num_examples == 10
    np.testing.assert_array_equal(read_all(test_source)[0][9][..., 0], test[9])
    assert resolve_source(str(folder), "train", limit_images=7).num_examples == 7


def test_truncated_idx_file_is_an_error(tmp_path, write_idx):
    write_idx(tmp_path, "train", np.zeros((4, 5, 5), np.uint8), np.zeros(4))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    import gzip

    with gzip.open(path) as file:
        data = file.read()
    with gzip.open(path, "wb") as file:
        file.write(data[:-10])
    with pytest.raises(DataSourceError, match="--data_path: .*train-images.*truncated"):
        resolve_source(str(tmp_path))


def test_embedded_fashion_mnist_reads_the_debian_files():
    train = resolve_source("fashion_mnist", "train")
    test = resolve_source("fashion_mnist", "test")
    assert (train.num_examples, train.num_classes, train.image_shape) == (60000, 10, (28, 28))
    assert (test.num_examples, test.num_classes) == (10000, 10)
    assert sources.FASHION_MNIST_DIR in train.name and train.name != test.name
    image, label = next(train.dataset().as_numpy_iterator())
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and label == 9  # ankle boot


def test_fashion_mnist_without_the_debian_package_explains_what_to_install(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataSourceError, match="--data_path=fashion_mnist: .*dataset-fashion-mnist"):
        resolve_source("fashion_mnist", tfds_data_dir=str(tmp_path / "tfds"))


# --------------------------------------------------------------------------- #
# TFRecord files
# --------------------------------------------------------------------------- #

@pytest.fixture
def tfrecord_folder(tmp_path, rng, encode_image, random_image, write_tfrecord, count_records):
    """Two counted files: 3 labelled PNGs + 1 corrupt record, then 2 labelled JPEGs."""
    folder = tmp_path / "records"
    folder.mkdir()
    arrays = [random_image(rng, 10 + i, 12) for i in range(5)]
    first = [encode_image(array, "PNG") for array in arrays[:3]] + [b"not an image"]
    write_tfrecord(folder / "part-0.tfrecord", first, [0, 1, 2, 1])
    write_tfrecord(folder / "part-1.tfrec", [encode_image(a, "JPEG") for a in arrays[3:]], [3, 0])
    count_records(folder / "part-0.tfrecord", folder / "part-1.tfrec")
    (folder / "notes.txt").write_text("ignored")
    return folder, arrays


def test_tfrecord_folder_file_and_glob(tfrecord_folder, caplog):
    folder, arrays = tfrecord_folder
    with caplog.at_level(logging.WARNING):
        source = resolve_source(str(folder))
    assert (source.num_examples, source.num_classes) == (5, 4)
    assert any("Skipped 1 records" in message for message in warnings_of(caplog))
    images, labels = read_all(source)
    assert labels == [0, 1, 2, 3, 0]
    np.testing.assert_array_equal(images[2], arrays[2])  # PNG: lossless
    assert images[4].shape == arrays[4].shape
    single = resolve_source(str(folder / "part-1.tfrec"))
    assert single.num_examples == 2 and read_all(single)[1] == [3, 0]
    assert resolve_source(str(folder / "part-*")).num_examples == 5
    assert resolve_source(str(folder), limit_images=4).num_examples == 4


def read_all_by_index(source: sources.ImageSource) -> tuple[list[np.ndarray], list[int]]:
    indices = tf.data.Dataset.range(source.num_examples)
    pairs = indices.map(source.read_example).as_numpy_iterator()
    images, labels = zip(*((image, int(label)) for image, label in pairs), strict=True)
    return list(images), list(labels)


def test_record_files_read_by_index_match_the_stream_in_file_order(tfrecord_folder):
    # The linear probe reads by index in its own order: an index is built on first use.
    source = resolve_source(str(tfrecord_folder[0]), limit_images=4)
    streamed, by_index = read_all(source), read_all_by_index(source)
    assert by_index[1] == streamed[1] == [0, 1, 2, 3]
    for a, b in zip(by_index[0], streamed[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_tfrecords_without_labels_are_unlabelled(tmp_path, rng, encode_image, random_image,
                                                 write_tfrecord, count_records):
    path = write_tfrecord(tmp_path / "u.tfrecord",
                          [encode_image(random_image(rng, 5, 5)) for _ in range(2)], None)
    count_records(path)
    source = resolve_source(path)
    assert source.num_classes is None and read_all(source)[1] == [-1, -1]


def test_bad_tfrecord_inputs_are_clear_errors(tmp_path, write_tfrecord, count_records):
    write_tfrecord(tmp_path / "empty.tfrecord", [], None)
    count_records(tmp_path / "empty.tfrecord")
    with pytest.raises(DataSourceError, match="--data_path: .*zero readable image records"):
        resolve_source(str(tmp_path / "empty.tfrecord"))
    (tmp_path / "text.tfrecord").write_text("this is not a record file at all")
    with pytest.raises(record_counts.RecordCountError, match="text.tfrecord is not a TFRecord"):
        count_records(tmp_path / "text.tfrecord")
    with pytest.raises(DataSourceError, match="no files match"):
        resolve_source(str(tmp_path / "missing-*.tfrecord"))


def test_record_files_without_an_up_to_date_count_name_the_command(tmp_path, write_tfrecord,
                                                                   encode_image, rng,
                                                                   random_image, count_records):
    images = [encode_image(random_image(rng, 6, 6)) for _ in range(3)]
    path = write_tfrecord(tmp_path / "a.tfrecord", images, [0, 1, 2])
    with pytest.raises(DataSourceError, match=r"--data_path=.*a\.tfrecord: .*a\.tfrecord has no "
                                              r"image count in .*record_counts\.json; .*"
                                              r"python scripts/count_records\.py --data_path="):
        resolve_source(path)
    count_records(path)
    assert resolve_source(path).num_examples == 3
    write_tfrecord(path, images[:2], [0, 1])  # changed after counting
    with pytest.raises(DataSourceError, match=r"a\.tfrecord has \d+ bytes but was counted at "
                                              r"\d+ bytes.*count it again with: python scripts"):
        resolve_source(path, flag_name="--eval_data_path")


def test_resolving_record_files_reads_no_record(tfrecord_folder):
    folder, _ = tfrecord_folder
    path = folder / "part-0.tfrecord"
    path.write_bytes(bytes(path.stat().st_size))  # same size, no record left
    source = resolve_source(str(folder))
    assert (source.num_examples, source.num_classes) == (5, 4)  # from the count file alone
    # Only reading by index reads every record, and finds the damage.
    with pytest.raises(DataSourceError, match=r"--data_path: record 0 of .*part-0\.tfrecord has "
                                              r"no 'image/encoded' feature"):
        source.read_example(tf.constant(0, tf.int64))


# --------------------------------------------------------------------------- #
# TFDS
# --------------------------------------------------------------------------- #

class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A 3-class data set of 8x8 grayscale images, prepared locally (nothing downloaded)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "test": self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"image": np.full((8, 8, 1), 10 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("tiny_images", data_dir=data_dir).download_and_prepare()
    return data_dir


def test_prepared_tfds_dataset(tfds_dir):
    source = resolve_source("tfds:tiny_images", "train", tfds_data_dir=tfds_dir)
    assert (source.num_examples, source.num_classes) == (7, 3)
    images, labels = read_all(source)
    assert sorted(labels) == sorted(i % 3 for i in range(7))
    for image, label in zip(images, labels, strict=True):
        assert image.shape == (8, 8, 3) and int(image[0, 0, 0]) % 30 == 10 * label
    assert resolve_source("tfds:tiny_images:test", "train",
                          tfds_data_dir=tfds_dir).num_examples == 4
    sliced = resolve_source("tfds:tiny_images:train[2:5]", tfds_data_dir=tfds_dir)
    assert sliced.num_examples == 3 and sliced.records is not None
    assert read_all(sliced)[1] == labels[2:5] == read_all_by_index(sliced)[1]


def test_tfds_never_downloads_and_names_both_flags(tmp_path, tfds_dir):
    with pytest.raises(DataSourceError, match=r"--data_path=tfds:mnist: .*not prepared.*"
                                              r"--tfds_data_dir"):
        resolve_source("tfds:mnist", tfds_data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataSourceError, match="unknown TFDS dataset 'no_such_set'"):
        resolve_source("tfds:no_such_set", tfds_data_dir=str(tmp_path))
    with pytest.raises(DataSourceError, match="has no split 'validation'"):
        resolve_source("tfds:tiny_images:validation", tfds_data_dir=tfds_dir)


def test_in_memory_source_reads_a_batch_of_indices(idx_folder):
    source = resolve_source(str(idx_folder[0]))
    images, labels = source.read_example(tf.constant([3, 0, 5], tf.int64))
    assert images.shape == (3, 28, 28, 3)
    np.testing.assert_array_equal(labels, [3, 0, 1])


def test_tfds_array_record_is_read_through_tfds_data_sources(tmp_path):
    data_dir = str(tmp_path / "array_record")
    builder = tfds.builder("tiny_images", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    source = resolve_source("tfds:tiny_images", tfds_data_dir=data_dir)
    assert (source.num_examples, source.num_classes, source.records) == (7, 3, None)
    images, labels = read_all(source)
    assert sorted(labels) == sorted(i % 3 for i in range(7))
    for image, label in zip(images, labels, strict=True):
        assert image.shape == (8, 8, 3) and int(image[0, 0, 0]) % 30 == 10 * label
    assert resolve_source("tfds:tiny_images:test", tfds_data_dir=data_dir).num_examples == 4
    batches = list(multicrop.build_multicrop_dataset(
        source, global_crops_size=8, local_crops_size=4, global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4), local_crops_number=1, batch_size=3, seed=0)
        .take(2).as_numpy_iterator())
    assert [crop.shape for crop in batches[1]] == [(3, 8, 8, 3)] * 2 + [(3, 4, 4, 3)]


def test_every_file_form_reads_from_a_tf_io_gfile_url(rng, encode_image, random_image, write_idx,
                                                      write_tfrecord, count_records):
    # ram:// is served by TensorFlow's file systems only, as gs:// is: Python's open fails.
    # Its folders exist once made (listing does not infer them from file names).
    root = f"ram://{os.getpid()}_sources"
    for folder in ("folder/class0", "folder/class1", "records", "idx"):
        tf.io.gfile.makedirs(f"{root}/{folder}")
    arrays = [random_image(rng, 7, 9) for _ in range(3)]
    for i, array in enumerate(arrays):
        with tf.io.gfile.GFile(f"{root}/folder/class{i % 2}/{i}.png", "wb") as file:
            file.write(encode_image(array))
    folder = resolve_source(f"{root}/folder")
    assert (folder.num_examples, folder.num_classes) == (3, 2)
    assert read_all(folder)[1] == [0, 0, 1]  # class0/0.png, class0/2.png, class1/1.png
    np.testing.assert_array_equal(read_all(folder)[0][1], arrays[2])

    path = write_tfrecord(f"{root}/records/a.tfrecord", [encode_image(a) for a in arrays],
                          [2, 0, 1])
    count_records(path)
    records = resolve_source(f"{root}/records")
    assert records.num_examples == 3 and read_all(records)[1] == [2, 0, 1]
    assert read_all_by_index(records)[1] == [2, 0, 1]

    digits = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    write_idx(f"{root}/idx", "train", digits, [3, 1, 0, 2], gzipped=False)
    idx = resolve_source(f"{root}/idx")
    images, labels = read_all(idx)
    assert labels == [3, 1, 0, 2]
    np.testing.assert_array_equal(images[2][..., 0], digits[2])
