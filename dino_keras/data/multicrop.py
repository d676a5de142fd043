"""The multi-crop training pipeline and the evaluation pipeline, as `tf.data` datasets.

Training stream, per epoch e, for sources read by index: a full permutation of the source's
indices seeded by (seed, e); worker `shard_index` of `num_shards` takes every `num_shards`-th
position of it; only then are images read and decoded, each once, and every crop of an image
is cut from that decoded image. Streamed record sources (`source.records`) instead give each
worker its files of a file order seeded by (seed, e), through a shuffle buffer seeded by
(seed, e) (`record_stream`); records are read and parsed before the position is known, images
decoded after. Randomness is stateless: crop boxes and augmentation choices are derived from
(seed, e, position in the epoch), so a given (seed, epoch, step) always yields the same batch,
whatever the parallelism and also after a resume (a resumed stream re-reads the records of the
epoch's batches already trained, without decoding them).

Two ways to cut the crops, chosen by the source:
* same-size images held in memory (e.g. Fashion-MNIST): a batch is read at once and all its
  crops are resampled together with matrix products (`augment.crop_and_resize_batch`);
* images of any size (files, records): each image is decoded and cropped on its own in a
  parallel map (`augment.resample_crop`), then the fixed-size crops are batched and finished
  (`augment.finish_resampled_crops`) in the first compiled augmentation step.
Either way the colour, blur and solarize steps then run once per batch and crop kind.
"""

from __future__ import annotations

import tensorflow as tf

from dino_keras.data import augment, record_stream, sources
from dino_keras.data.sources import ImageSource

# Independent random streams derived from (seed, epoch).
_PERMUTATION_STREAM, _CROP_BOX_STREAM, _AUGMENT_STREAM = 0, 1, 2
_FILE_ORDER_STREAM, _SHUFFLE_BUFFER_STREAM = 3, 4
_EVAL_RESIZE_RATIO = 256 / 224


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped)."""
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_examples} training images make no full batch of {global_batch_size}: lower "
            f"--batch_size_per_gpu or raise --limit_images")
    return steps


def _seed_of(seed: int, epoch: tf.Tensor, stream: int, position: tf.Tensor | None = None):
    """A stateless seed for (seed, epoch, stream[, position])."""
    derived = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
    derived = tf.random.experimental.stateless_fold_in(derived, stream)
    if position is not None:
        derived = tf.random.experimental.stateless_fold_in(derived, position)
    return derived


def training_index_stream(num_examples: int, *, batch_size: int, seed: int, start_epoch: int = 0,
                          skip_steps: int = 0, num_shards: int = 1,
                          shard_index: int = 0) -> tf.data.Dataset:
    """Endless (epoch, position, example index) int64 triples that one worker reads.

    Epoch e is the permutation of [0, num_examples) seeded by (seed, e); the worker takes
    positions shard_index, shard_index + num_shards, ..., as many as fill
    `steps_per_epoch(num_examples // num_shards, batch_size)` batches. The stream starts at
    `start_epoch` after its first `skip_steps` batches.
    """
    examples_per_epoch = _check_position(num_examples, batch_size, skip_steps, num_shards,
                                         shard_index)

    def epoch_indices(epoch):
        permutation = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), _seed_of(seed, epoch, _PERMUTATION_STREAM))
        first = tf.where(epoch == start_epoch, tf.constant(skip_steps * batch_size, tf.int64), 0)
        positions = shard_index + tf.range(first, examples_per_epoch, dtype=tf.int64) * num_shards
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill(tf.shape(positions), epoch), positions, tf.gather(permutation, positions)))

    return tf.data.Dataset.range(start_epoch, tf.int64.max).flat_map(epoch_indices)


def _check_position(num_examples, batch_size, skip_steps, num_shards, shard_index) -> int:
    """Examples per epoch of one worker, after checking the stream's start and shard."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
    steps = steps_per_epoch(num_examples // num_shards, batch_size)
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps {skip_steps} is not in [0, steps per epoch={steps})")
    return steps * batch_size


def training_record_stream(source: ImageSource, *, batch_size: int, seed: int,
                           start_epoch: int = 0, skip_steps: int = 0, num_shards: int = 1,
                           shard_index: int = 0,
                           shuffle_buffer: int = record_stream.SHUFFLE_BUFFER) -> tf.data.Dataset:
    """Endless (epoch, position, encoded image) triples that one worker streams from
    `source.records`.

    Epoch e is `record_stream.epoch_images` seeded by (seed, e), cut (or, when this worker's
    files hold fewer images, repeated) to exactly `steps_per_epoch(num_examples // num_shards,
    batch_size)` batches; positions are numbered as `training_index_stream`'s. The stream starts
    at `start_epoch` after its first `skip_steps` batches.
    """
    examples_per_epoch = _check_position(source.num_examples, batch_size, skip_steps, num_shards,
                                         shard_index)

    def epoch_examples(epoch):
        images = record_stream.epoch_images(
            source.records, file_order_seed=_seed_of(seed, epoch, _FILE_ORDER_STREAM),
            shuffle_seed=_seed_of(seed, epoch, _SHUFFLE_BUFFER_STREAM), num_shards=num_shards,
            shard_index=shard_index, shuffle_buffer=shuffle_buffer)
        numbered = images.repeat().take(examples_per_epoch).enumerate().map(
            lambda number, image: (epoch, shard_index + number * num_shards, image[0]))
        return numbered.skip(tf.where(epoch == start_epoch,
                                      tf.constant(skip_steps * batch_size, tf.int64), 0))

    return tf.data.Dataset.range(start_epoch, tf.int64.max).flat_map(epoch_examples)


def build_multicrop_dataset(source: ImageSource, *, global_crops_size: int, local_crops_size: int,
                            global_crops_scale: tuple[float, float],
                            local_crops_scale: tuple[float, float], local_crops_number: int,
                            batch_size: int, seed: int,
                            blur_sigma: tuple[float, float] = augment.BLUR_SIGMA_RANGE,
                            start_epoch: int = 0, skip_steps: int = 0,
                            num_shards: int = 1, shard_index: int = 0, batch_shards: int = 1,
                            batch_shard_index: int = 0,
                            shuffle_buffer: int = record_stream.SHUFFLE_BUFFER) -> tf.data.Dataset:
    """Endless batches (global_1, global_2, local_1, ..., local_N) of normalised float32 crops.

    Globals are [batch_size, G, G, 3], locals [batch_size, L, L, 3]. The stream starts at
    `start_epoch`, skipping its first `skip_steps` batches; each epoch has exactly
    `steps_per_epoch(source.num_examples // num_shards, batch_size)` batches. `blur_sigma` is
    the range of the gaussian-blur sigma in pixels of the crop (at most `augment.BLUR_SIGMA_RANGE`'s
    maximum).

    `batch_shards` > 1 keeps only batches batch_shard_index, batch_shard_index + batch_shards,
    ... of that stream, chosen before any image is read: loader processes that each make one
    such share give, read in turn, the same batches as one process making them all (unless an
    image fails to decode: the batches of that share then shift by one image). For a streamed
    source each share reads (not decodes) every record. `shuffle_buffer`: records in the
    shuffle buffer of a streamed source (`record_stream`).
    """
    if local_crops_number < 0:
        raise ValueError(f"--local_crops_number must be >= 0, got {local_crops_number}")
    if not 0 <= batch_shard_index < batch_shards:
        raise ValueError(
            f"batch_shard_index {batch_shard_index} is not in [0, batch_shards={batch_shards})")
    stream_position = dict(batch_size=batch_size, seed=seed, start_epoch=start_epoch,
                           skip_steps=skip_steps, num_shards=num_shards,
                           shard_index=shard_index)
    if source.records is not None:
        # (epoch, position, encoded image) instead of (epoch, position, example index).
        indices = training_record_stream(source, shuffle_buffer=shuffle_buffer, **stream_position)
    else:
        indices = training_index_stream(source.num_examples, **stream_position)
    batched_indices = indices.batch(batch_size, drop_remainder=True)
    if batch_shards > 1:
        batched_indices = batched_indices.shard(batch_shards, batch_shard_index)
    crop_kinds = [(global_crops_scale, 2, global_crops_size)]
    if local_crops_number:
        crop_kinds.append((local_crops_scale, local_crops_number, local_crops_size))

    def augment_batch(epoch, positions, crops_per_kind, resampled_from=None):
        """Resized crops, [count * B, S, S, 3] per kind, crop-major -> the output tuple
        (`resampled_from`: see `augment.augment_crops`)."""
        global_seed, local_seed = tf.unstack(tf.random.experimental.stateless_split(
            _seed_of(seed, epoch[0], _AUGMENT_STREAM, positions[0]), 2))
        global_decisions = augment.concat_decisions([
            augment.sample_crop_decisions(tf.random.experimental.stateless_fold_in(global_seed, i),
                                          spec, batch_size, blur_sigma)
            for i, spec in enumerate((augment.GLOBAL_1, augment.GLOBAL_2))])
        outputs = tf.split(
            augment.augment_crops(crops_per_kind[0], global_decisions, resampled_from), 2)
        if local_crops_number:
            local_decisions = augment.sample_crop_decisions(
                local_seed, augment.LOCAL, local_crops_number * batch_size, blur_sigma)
            outputs += tf.split(
                augment.augment_crops(crops_per_kind[1], local_decisions, resampled_from),
                local_crops_number)
        return tuple(outputs)

    def crop_batch_of_images(epoch, positions, example_indices):
        images = tf.cast(source.read_example(example_indices)[0], tf.float32) / 255.0
        height, width = source.image_shape
        kind_seeds = tf.unstack(tf.random.experimental.stateless_split(
            _seed_of(seed, epoch[0], _CROP_BOX_STREAM, positions[0]), len(crop_kinds)))
        crops_per_kind = []
        for kind_seed, (scale, count, size) in zip(kind_seeds, crop_kinds, strict=True):
            boxes = augment.sample_crop_boxes(kind_seed, height, width, scale, [count, batch_size])
            resized = augment.crop_and_resize_batch(images, boxes, size)
            crops_per_kind.append(tf.reshape(resized, [count * batch_size, size, size, 3]))
        return augment_batch(epoch, positions, crops_per_kind)

    def crop_one_image(epoch, position, example):
        if source.records is not None:
            image = sources.decode_image(example)
        else:
            image = source.read_example(example)[0]
        if image.dtype != tf.uint8:
            raise TypeError(f"{source.name}: images read as {image.dtype.name}, not uint8")
        kind_seeds = tf.unstack(tf.random.experimental.stateless_split(
            _seed_of(seed, epoch, _CROP_BOX_STREAM, position), len(crop_kinds)))
        crops_per_kind = []
        for kind_seed, (scale, count, size) in zip(kind_seeds, crop_kinds, strict=True):
            boxes = augment.sample_crop_boxes(kind_seed, tf.shape(image)[0], tf.shape(image)[1],
                                              scale, [count])
            crops_per_kind.append(tuple(
                augment.resample_crop(image, augment.CropBoxes(*(field[i] for field in boxes)),
                                      size) for i in range(count)))
        return epoch, position, tuple(crops_per_kind)

    def augment_batch_of_crops(epoch, positions, crops_per_kind):
        # Per kind, `count` batches [B, S, S, 3] -> [count * B, S, S, 3], crop-major.
        return augment_batch(epoch, positions,
                             [tf.concat(crops, axis=0) for crops in crops_per_kind], tf.uint8)

    if augment.crops_whole_batches(source.image_shape):
        batches = batched_indices.map(crop_batch_of_images, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        # ignore_errors: see the sources module docstring on images that fail to decode.
        crops = batched_indices.unbatch().map(
            crop_one_image, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
        batches = crops.batch(batch_size, drop_remainder=True).map(
            augment_batch_of_crops, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # One thread per op inside the map functions: tf.data already runs calls in parallel, and
    # ops splitting themselves across the same cores cost more in contention than they gain.
    options.threading.max_intra_op_parallelism = 1
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


def _eval_transform(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """The reference's evaluation transform of uint8 [..., H, W, 3]: resize the shorter side to
    round(image_size * 256 / 224) (bicubic), centre crop image_size, normalise."""
    shorter_side = round(image_size * _EVAL_RESIZE_RATIO)
    height = tf.cast(tf.shape(images)[-3], tf.float32)
    width = tf.cast(tf.shape(images)[-2], tf.float32)
    # torchvision truncates the longer side: int(size * long / short).
    new_height = tf.where(height <= width, float(shorter_side),
                          tf.floor(shorter_side * height / width))
    new_width = tf.where(height <= width, tf.floor(shorter_side * width / height),
                         float(shorter_side))
    resized = tf.image.resize(tf.cast(images, tf.float32) / 255.0,
                              tf.cast(tf.stack([new_height, new_width]), tf.int32),
                              method="bicubic", antialias=True)
    top = tf.cast(tf.round((new_height - image_size) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - image_size) / 2), tf.int32)
    cropped = resized[..., top:top + image_size, left:left + image_size, :]
    return augment.normalize(tf.clip_by_value(cropped, 0.0, 1.0))


def build_eval_dataset(source: ImageSource, *, image_size: int, batch_size: int) -> tf.data.Dataset:
    """(float32 [B, image_size, image_size, 3] normalised, int64 labels [B]) in source order.

    The last batch keeps the remainder.
    """
    def transform(images, labels):
        cropped = _eval_transform(images, image_size)
        return tf.ensure_shape(cropped, cropped.shape[:-3] + [image_size, image_size, 3]), labels

    dataset = source.dataset()
    if source.image_shape is not None:  # same-size images: transform whole batches
        dataset = dataset.batch(batch_size).map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)
