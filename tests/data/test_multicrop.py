"""The multi-crop training stream (shapes, determinism, resume, sharding) and the eval stream.

`record_source` (streamed TFRecords) cuts its crops as `file_source` does, so the crop tests
run on the two others only.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from dino_keras.data import augment, multicrop
from dino_keras.data.sources import resolve_source

GLOBAL_SIZE, LOCAL_SIZE, BATCH = 16, 8, 4
CROPS = dict(global_crops_size=GLOBAL_SIZE, local_crops_size=LOCAL_SIZE,
             global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=3)


def take(dataset, count: int) -> list[tuple[np.ndarray, ...]]:
    return list(dataset.take(count).as_numpy_iterator())


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second, strict=True):
        for crop_a, crop_b in zip(batch_a, batch_b, strict=True):
            np.testing.assert_array_equal(crop_a, crop_b)


def test_steps_per_epoch_floors_and_names_the_flags():
    assert multicrop.steps_per_epoch(60000, 256) == 234
    assert multicrop.steps_per_epoch(512, 256) == 2
    with pytest.raises(ValueError, match="--batch_size_per_gpu.*--limit_images"):
        multicrop.steps_per_epoch(100, 256)


@pytest.mark.parametrize("source_name", ["idx_source", "file_source"])
def test_every_crop_has_its_shape_dtype_and_normalisation(request, source_name):
    source = request.getfixturevalue(source_name)
    batches = take(multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=0, **CROPS), 3)
    for batch in batches:
        assert len(batch) == 2 + CROPS["local_crops_number"]
        assert [crop.shape for crop in batch] == (
            [(BATCH, GLOBAL_SIZE, GLOBAL_SIZE, 3)] * 2 + [(BATCH, LOCAL_SIZE, LOCAL_SIZE, 3)] * 3)
        for crop in batch:
            assert crop.dtype == np.float32 and np.all(np.isfinite(crop))
            low = (0 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD
            high = (1 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD
            assert np.all(crop >= low - 1e-4) and np.all(crop <= high + 1e-4)
        assert not np.array_equal(batch[0], batch[1])


def test_images_held_in_memory_above_the_batch_crop_size_are_cropped_one_by_one(idx_source,
                                                                               monkeypatch):
    assert augment.crops_whole_batches(idx_source.image_shape)
    batched = take(multicrop.build_multicrop_dataset(idx_source, batch_size=BATCH, seed=0,
                                                     **CROPS), 1)[0]
    monkeypatch.setattr(augment, "BATCH_CROP_MAX_PIXELS", 28 * 28 - 1)

    def no_batch_cropping(*args):
        raise AssertionError("crop_and_resize_batch called")

    monkeypatch.setattr(augment, "crop_and_resize_batch", no_batch_cropping)
    one_by_one = take(multicrop.build_multicrop_dataset(idx_source, batch_size=BATCH, seed=0,
                                                        **CROPS), 1)[0]
    assert [crop.shape for crop in one_by_one] == [crop.shape for crop in batched]
    assert all(np.all(np.isfinite(crop)) for crop in one_by_one)


def test_crops_cut_one_by_one_come_out_upright(tmp_path, rng, write_image):
    """Images whose rows are each one colour give crops whose rows are each one colour (every
    step keeps that), not columns: the crops resampled one by one are transposed back."""
    for i in range(8):
        rows = rng.integers(0, 256, (20 + i, 1, 3), dtype=np.uint8)
        write_image(tmp_path / "rows" / f"{i}.png", np.repeat(rows, 30 - i, axis=1))
    source = resolve_source(str(tmp_path / "rows"))
    assert not augment.crops_whole_batches(source.image_shape)
    batch = take(multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=0, **CROPS), 1)[0]
    for crop in batch:
        across_rows = crop.max(axis=2) - crop.min(axis=2)
        across_columns = crop.max(axis=1) - crop.min(axis=1)
        assert across_rows.max() < 1e-4 and across_columns.max() > 0.1


def test_no_local_crops(idx_source):
    options = dict(CROPS, local_crops_number=0)
    batch = take(multicrop.build_multicrop_dataset(idx_source, batch_size=BATCH, seed=0,
                                                   **options), 1)[0]
    assert len(batch) == 2


@pytest.mark.parametrize("source_name", ["idx_source", "file_source", "record_source"])
def test_same_seed_same_batches_and_other_seed_other_batches(request, source_name):
    source = request.getfixturevalue(source_name)

    def first_batches(seed):
        return take(multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=seed,
                                                      **CROPS), 3)

    reference = first_batches(seed=5)
    assert_same_batches(reference, first_batches(seed=5))
    other = first_batches(seed=6)
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(reference, other, strict=True))


@pytest.mark.parametrize("source_name", ["idx_source", "file_source", "record_source"])
def test_resume_mid_epoch_continues_the_uninterrupted_stream(request, source_name):
    source = request.getfixturevalue(source_name)
    steps = multicrop.steps_per_epoch(source.num_examples, BATCH)
    uninterrupted = take(multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=3,
                                                           **CROPS), steps + 4)
    resumed = take(multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=3,
                                                     start_epoch=1, skip_steps=2, **CROPS), 2)
    assert_same_batches(resumed, uninterrupted[steps + 2:steps + 4])
    with pytest.raises(ValueError, match="skip_steps"):
        multicrop.build_multicrop_dataset(source, batch_size=BATCH, seed=3, skip_steps=steps,
                                          **CROPS)


def test_each_epoch_is_a_fresh_full_permutation():
    stream = multicrop.training_index_stream(42, batch_size=5, seed=1)
    elements = list(stream.take(2 * 40).as_numpy_iterator())  # 8 steps of 5 per epoch
    epochs, positions, indices = (np.array(column) for column in zip(*elements, strict=True))
    np.testing.assert_array_equal(epochs, [0] * 40 + [1] * 40)
    np.testing.assert_array_equal(positions, list(range(40)) * 2)
    for epoch in (0, 1):
        epoch_indices = indices[epochs == epoch]
        assert len(set(epoch_indices)) == 40 and set(epoch_indices) <= set(range(42))
    assert not np.array_equal(indices[:40], indices[40:])
    again = list(multicrop.training_index_stream(42, batch_size=5, seed=1).take(80)
                 .as_numpy_iterator())
    np.testing.assert_array_equal(np.array(again)[:, 2], indices)


def test_shards_read_disjoint_examples_and_the_same_number_of_steps():
    num_shards, batch_size, per_epoch = 3, 4, 12  # 40 // 3 = 13 examples -> 3 steps of 4
    shards = []
    for shard_index in range(num_shards):
        stream = multicrop.training_index_stream(40, batch_size=batch_size, seed=2,
                                                 num_shards=num_shards, shard_index=shard_index)
        shards.append(list(stream.take(2 * per_epoch).as_numpy_iterator()))
    for epoch in (0, 1):
        seen = [{int(index) for e, _, index in shard if e == epoch} for shard in shards]
        assert all(len(indices) == per_epoch for indices in seen)
        for a, b in itertools.combinations(seen, 2):
            assert not a & b
    with pytest.raises(ValueError, match="shard_index"):
        multicrop.training_index_stream(40, batch_size=4, seed=0, num_shards=2, shard_index=2)


@pytest.mark.parametrize("source_name", ["idx_source", "file_source", "record_source"])
def test_batch_shards_read_in_turn_are_the_whole_stream(request, source_name):
    source = request.getfixturevalue(source_name)
    settings = dict(batch_size=BATCH, seed=4, start_epoch=1, skip_steps=1, **CROPS)
    whole = take(multicrop.build_multicrop_dataset(source, **settings), 7)
    shares = [take(multicrop.build_multicrop_dataset(source, batch_shards=3,
                                                     batch_shard_index=index, **settings), 3)
              for index in range(3)]
    assert_same_batches([shares[t % 3][t // 3] for t in range(7)], whole)
    with pytest.raises(ValueError, match="batch_shard_index"):
        multicrop.build_multicrop_dataset(source, batch_shards=2, batch_shard_index=2, **settings)


def test_sharded_multicrop_streams_differ(idx_source):
    batches = [take(multicrop.build_multicrop_dataset(idx_source, batch_size=BATCH, seed=0,
                                                      num_shards=2, shard_index=shard, **CROPS), 2)
               for shard in (0, 1)]
    assert not np.array_equal(batches[0][0][0], batches[1][0][0])


def _reference_eval_transform(image: np.ndarray, image_size: int) -> np.ndarray:
    """torchvision Resize(round(size * 256 / 224), bicubic) + CenterCrop(size), on floats."""
    height, width = image.shape[:2]
    short = round(image_size * 256 / 224)
    new_h, new_w = (short, int(short * width / height)) if height <= width else (
        int(short * height / width), short)
    resized = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32) / 255,
                                                   mode="F").resize((new_w, new_h), Image.BICUBIC))
                        for c in range(3)], axis=-1).clip(0, 1)
    top, left = round((new_h - image_size) / 2), round((new_w - image_size) / 2)
    crop = resized[top:top + image_size, left:left + image_size]
    return (crop - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD


@pytest.mark.parametrize("source_name", ["idx_source", "file_source", "record_source"])
def test_eval_dataset_keeps_order_labels_and_the_remainder(request, source_name):
    source = request.getfixturevalue(source_name)
    batches = list(multicrop.build_eval_dataset(source, image_size=12, batch_size=3)
                   .as_numpy_iterator())
    sizes = [len(labels) for _, labels in batches]
    assert sizes == [3] * (source.num_examples // 3) + [source.num_examples % 3]
    assert all(images.shape[1:] == (12, 12, 3) and images.dtype == np.float32
               for images, _ in batches)
    expected_images, expected_labels = zip(*source.dataset().as_numpy_iterator(), strict=True)
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]),
                                  expected_labels)
    first = batches[0][0][0]
    np.testing.assert_allclose(first, _reference_eval_transform(expected_images[0], 12),
                               atol=1e-4)
