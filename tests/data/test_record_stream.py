"""The streamed record epochs: every image once per epoch in a seeded order, the same whatever
the global seed, workers on disjoint files, limited sources on their first images."""

from __future__ import annotations

import tensorflow as tf

from dino_keras.data import multicrop, record_stream
from dino_keras.data.sources import resolve_source


def labels_by_image(source) -> dict[bytes, int]:
    return {encoded: int(label) for encoded, label
            in record_stream.images_in_order(source.records).as_numpy_iterator()}


def stream(source, count: int, **settings) -> list[tuple[int, int, int]]:
    """(epoch, position, label) of the first `count` elements of the streamed epochs."""
    labels = labels_by_image(source)
    elements = multicrop.training_record_stream(source, **settings).take(count)
    return [(int(epoch), int(position), labels[encoded])
            for epoch, position, encoded in elements.as_numpy_iterator()]


def test_each_epoch_streams_every_image_once_in_a_seeded_order(record_source):
    assert record_source.num_examples == 14  # 2 steps of 7: every image in every epoch
    first = stream(record_source, 42, batch_size=7, seed=1, shuffle_buffer=4)
    assert [(epoch, position) for epoch, position, _ in first] == [
        (epoch, position) for epoch in range(3) for position in range(14)]
    orders = [[label for epoch, _, label in first if epoch == e] for e in range(3)]
    assert all(sorted(order) == list(range(14)) for order in orders)
    assert orders[0] != orders[1] != orders[2] and orders[0] != sorted(orders[0])
    assert stream(record_source, 42, batch_size=7, seed=1, shuffle_buffer=4) == first
    assert stream(record_source, 14, batch_size=7, seed=2, shuffle_buffer=4) != first[:14]
    # Dataset.shuffle would also follow tf.random.set_seed, which loader processes never call.
    tf.random.set_seed(1234)
    assert stream(record_source, 42, batch_size=7, seed=1, shuffle_buffer=4) == first


def test_workers_read_disjoint_files_and_the_same_number_of_images(record_source):
    # Files hold images 0-4, 5-9 and 10-13; a worker needs 14 // 2 = 7 -> 2 steps of 3 images.
    per_worker = [stream(record_source, 12, batch_size=3, seed=0, num_shards=2, shard_index=k)
                  for k in range(2)]
    for epoch in range(2):
        files = [{label // 5 for e, _, label in elements if e == epoch}
                 for elements in per_worker]
        assert files[0] and files[1] and not files[0] & files[1]
    for shard_index, elements in enumerate(per_worker):
        assert [position for _, position, _ in elements] == [
            shard_index + 2 * i for i in range(6)] * 2


def test_a_limited_source_streams_its_first_images(record_source, tmp_path):
    limited = resolve_source(str(tmp_path / "records"), limit_images=6)
    assert limited.num_examples == 6 and limited.records.limit == 6
    elements = stream(limited, 12, batch_size=3, seed=0)
    for epoch in range(2):
        assert sorted(label for e, _, label in elements if e == epoch) == list(range(6))


def test_a_worker_with_fewer_images_than_its_share_repeats_its_own(write_record_files, tmp_path):
    # 2 workers over files of 8 and 2 images: each needs 10 // 2 = 5 per epoch.
    write_record_files(tmp_path / "uneven", [8, 2])
    source = resolve_source(str(tmp_path / "uneven"))
    labels = [[label for _, _, label in stream(source, 5, batch_size=5, seed=0, num_shards=2,
                                               shard_index=shard_index)]
              for shard_index in range(2)]
    small, large = sorted(labels, key=max, reverse=True)
    assert len(large) == 5 and len(set(large)) == 5 and max(large) < 8
    assert sorted(small) == [8, 8, 8, 9, 9] or sorted(small) == [8, 8, 9, 9, 9]
