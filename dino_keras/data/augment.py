"""DINO's per-crop augmentations with torchvision semantics, as stateless TensorFlow ops.

Per crop the reference applies: random-resized-crop (bicubic) -> horizontal flip (p 0.5) ->
colour jitter (p 0.8; brightness, contrast, saturation, hue in random order) -> grayscale
(p 0.2) -> gaussian blur (p per crop kind) -> solarize (p per crop kind) -> ImageNet normalise.

Images are float32 in [0, 1] with shape [..., H, W, 3]; per-image parameters have the leading
shape [...], so one call transforms a whole batch, each image with its own parameters. Every
random draw is a `tf.random.stateless_*` op of an explicit seed (`sample_crop_boxes`,
`sample_crop_decisions`), so results depend on the seed only, not on parallelism or call order.
The reference transforms uint8 PIL images, rounding after every op; these ops stay in float32
(torchvision's tensor semantics), which differs by less than 1/255 per op.

keras-cv 0.9.0 layers checked against the reference (timed inside tf.data on this 2-core CPU):
- Grayscale(output_channels=3) is exact (it calls tf.image.rgb_to_grayscale, ITU-R 601) and as
  fast as that op (within run-to-run noise): used for the grayscale step.
- Solarization(threshold_factor=(128, 128)) is exact on 0..255 but rescales [0, 1] inputs to
  0..255 and back (1 ulp changes) and was 1.3-2.3x slower than one tf.where: not used.
- RandomColorJitter: additive brightness, per-channel contrast mean, HSV saturation scaling and
  a fixed op order, where torchvision blends with black / the grayscale mean / the grayscale
  image in random order: not used.
- RandomGaussianBlur: fixed kernel size, zero padding (dark borders), one sigma per call and a
  per-image map: not used (PIL replicates edges; sigma is drawn per image).
- RandomFlip, RandomCropAndResize: stateful random generators and a bilinear crop_and_resize,
  not torchvision's crop-box algorithm with bicubic resampling: not used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_STRENGTHS = (0.4, 0.4, 0.2, 0.1)  # indexed by BRIGHTNESS, CONTRAST, SATURATION, HUE
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Gaussian taps beyond 4 sigma weigh < 4e-4 of the centre tap.
BLUR_RADIUS = math.ceil(4 * BLUR_SIGMA_RANGE[1])
SOLARIZE_THRESHOLD = 128  # on the 0..255 scale; values >= threshold are inverted
_BICUBIC_A = -0.5  # Keys' cubic convolution, as in PIL and tf.image's "bicubic" with antialias


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """The per-crop-kind probabilities of the reference's multi-crop recipe."""

    name: str
    blur_probability: float
    solarize_probability: float


GLOBAL_1 = CropSpec("global_1", blur_probability=1.0, solarize_probability=0.0)
GLOBAL_2 = CropSpec("global_2", blur_probability=0.1, solarize_probability=0.2)
LOCAL = CropSpec("local", blur_probability=0.5, solarize_probability=0.0)


class CropBoxes(NamedTuple):
    """Crop windows in pixels (int32), each field of the same shape."""

    top: tf.Tensor
    left: tf.Tensor
    height: tf.Tensor
    width: tf.Tensor


class CropDecisions(NamedTuple):
    """The random choices for a set of crops, each field with leading shape [num_crops]."""

    flip: tf.Tensor            # bool
    jitter: tf.Tensor          # bool: colour jitter applied
    jitter_order: tf.Tensor    # int32 [num_crops, 4], a permutation of BRIGHTNESS..HUE
    jitter_factors: tf.Tensor  # float32 [num_crops, 4], indexed by BRIGHTNESS..HUE
    grayscale: tf.Tensor       # bool
    blur: tf.Tensor            # bool
    blur_sigma: tf.Tensor      # float32
    solarize: tf.Tensor        # bool


# --------------------------------------------------------------------------- #
# Random-resized-crop
# --------------------------------------------------------------------------- #

def sample_crop_boxes(seed, image_height, image_width, scale: tuple[float, float],
                      shape) -> CropBoxes:
    """torchvision's RandomResizedCrop.get_params for crops of the given `shape`.

    Up to 10 attempts with area fraction ~ U(scale) and log aspect ratio ~ U(log 3/4, log 4/3);
    the first attempt whose rounded box fits is used, at a uniform position; otherwise the centre
    crop clamped to the ratio range. `image_height`/`image_width` broadcast to `shape`.
    """
    shape = tf.TensorShape(shape).as_list()
    height = tf.broadcast_to(tf.cast(image_height, tf.float32), shape)
    width = tf.broadcast_to(tf.cast(image_width, tf.float32), shape)
    area_seed, ratio_seed, position_seed = tf.unstack(tf.random.experimental.stateless_split(
        seed, 3))
    attempts_shape = shape + [CROP_ATTEMPTS]
    target_area = (height * width)[..., tf.newaxis] * tf.random.stateless_uniform(
        attempts_shape, area_seed, scale[0], scale[1])
    log_ratio = (math.log(ASPECT_RATIO_RANGE[0]), math.log(ASPECT_RATIO_RANGE[1]))
    aspect_ratio = tf.exp(tf.random.stateless_uniform(attempts_shape, ratio_seed, *log_ratio))
    attempt_widths = tf.round(tf.sqrt(target_area * aspect_ratio))
    attempt_heights = tf.round(tf.sqrt(target_area / aspect_ratio))
    fits = ((attempt_widths > 0) & (attempt_widths <= width[..., tf.newaxis])
            & (attempt_heights > 0) & (attempt_heights <= height[..., tf.newaxis]))
    first_fit = tf.one_hot(tf.argmax(tf.cast(fits, tf.int32), axis=-1), CROP_ATTEMPTS)
    any_fit = tf.reduce_any(fits, axis=-1)

    input_ratio = width / height
    too_narrow = input_ratio < ASPECT_RATIO_RANGE[0]
    too_wide = input_ratio > ASPECT_RATIO_RANGE[1]
    fallback_width = tf.where(too_wide, tf.round(height * ASPECT_RATIO_RANGE[1]), width)
    fallback_height = tf.where(too_narrow, tf.round(width / ASPECT_RATIO_RANGE[0]), height)

    crop_width = tf.where(any_fit, tf.reduce_sum(attempt_widths * first_fit, -1), fallback_width)
    crop_height = tf.where(any_fit, tf.reduce_sum(attempt_heights * first_fit, -1),
                           fallback_height)
    position = tf.random.stateless_uniform(shape + [2], position_seed)
    top = tf.where(any_fit, tf.floor(position[..., 0] * (height - crop_height + 1)),
                   tf.floor((height - crop_height) / 2))
    left = tf.where(any_fit, tf.floor(position[..., 1] * (width - crop_width + 1)),
                    tf.floor((width - crop_width) / 2))
    return CropBoxes(*(tf.cast(value, tf.int32) for value in (top, left, crop_height, crop_width)))


def crop_and_resize(image: tf.Tensor, box: CropBoxes, size: int) -> tf.Tensor:
    """One crop of one image of any size -> float32 [size, size, 3], bicubic as PIL resamples it.

    `image` is float in [0, 1] or uint8 (then scaled to [0, 1]; resizing uint8 directly saves
    casting the whole image). Antialiased Keys cubic (tf.image's scale_and_translate, what
    tf.image.resize(method="bicubic", antialias=True) runs) widens the kernel when downsampling
    and renormalises the weights at the borders, like PIL.

    Same result, bit for bit, as tf.image.resize of the crop, which resamples the rows (a
    vectorised weighted sum of whole rows) and then the columns (a scalar loop per pixel and
    channel, 3x slower). Here both axes go through the fast row pass: rows, transpose, rows
    again (`resample_crop`), transpose back (`finish_resampled_crops`).
    """
    return finish_resampled_crops(resample_crop(image, box, size)[tf.newaxis], image.dtype)[0]


def resample_crop(image: tf.Tensor, box: CropBoxes, size: int) -> tf.Tensor:
    """`crop_and_resize` without its last steps: float32 [size, size, 3] transposed ([x, y,
    channel]), in the image's range (0..255 for uint8) and not clipped to it.

    The multi-crop pipeline finishes a whole batch of these at once (`finish_resampled_crops`,
    inside its first compiled augmentation step) instead of crop by crop: a transpose whose
    last axis is the 3 channels is slow as a TensorFlow op.
    """
    crop = image[box.top:box.top + box.height, box.left:box.left + box.width]
    channels = crop.shape[-1] if crop.shape[-1] is not None else tf.shape(crop)[-1]
    resized = _resample_rows(tf.reshape(crop, [box.height, -1]), size)  # [size, width * C]
    resized = tf.transpose(tf.reshape(resized, [size, box.width, channels]), [1, 0, 2])
    resized = _resample_rows(tf.reshape(resized, [box.width, -1]), size)  # [size, size * C]
    return tf.reshape(resized, [size, size, channels])


def finish_resampled_crops(crops: tf.Tensor, image_dtype: tf.DType) -> tf.Tensor:
    """Crops [N, S, S, C] from `resample_crop` of images of `image_dtype` -> [0, 1], upright."""
    crops = tf.transpose(crops, [0, 2, 1, 3])
    if image_dtype == tf.uint8:
        crops /= 255.0
    return tf.clip_by_value(crops, 0.0, 1.0)


def _resample_rows(rows: tf.Tensor, size: int) -> tf.Tensor:
    """[H, M] -> float32 [size, M]: the H rows resampled to `size` rows as tf.image.resize
    (bicubic, antialias) resamples an image's height; M is treated as channels of one column."""
    height, row_length = tf.shape(rows)[0], tf.shape(rows)[1]
    resampled = tf.raw_ops.ScaleAndTranslate(
        images=tf.reshape(rows, [1, height, 1, row_length]), size=tf.constant([size, 1]),
        scale=tf.stack([size / tf.cast(height, tf.float32), 1.0]), translation=tf.zeros([2]),
        kernel_type="keyscubic", antialias=True)
    return tf.reshape(resampled, [size, row_length])


def _keys_cubic(distance: tf.Tensor) -> tf.Tensor:
    a = _BICUBIC_A
    t = tf.abs(distance)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return tf.where(t < 1, near, tf.where(t < 2, far, tf.zeros_like(t)))


def _resize_matrix(start: tf.Tensor, length: tf.Tensor, input_size: int,
                   output_size: int) -> tf.Tensor:
    """[..., output_size, input_size]: PIL's antialiased bicubic weights resampling the pixels
    [start, start + length) of an axis of `input_size` pixels to `output_size` pixels."""
    start = tf.cast(start, tf.float32)[..., tf.newaxis, tf.newaxis]
    length = tf.cast(length, tf.float32)[..., tf.newaxis, tf.newaxis]
    scale = length / output_size
    kernel_scale = tf.maximum(scale, 1.0)
    centres = start + (tf.range(output_size, dtype=tf.float32)[:, tf.newaxis] + 0.5) * scale
    pixels = tf.range(input_size, dtype=tf.float32)
    weights = _keys_cubic((pixels + 0.5 - centres) / kernel_scale)
    weights = tf.where((pixels >= start) & (pixels < start + length), weights, 0.0)
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


# Largest image (height x width) that `crop_and_resize_batch` crops faster than
# `crop_and_resize` does crop by crop: its dense resize matrices cost in proportion to the
# image's pixels, per-crop resampling only to the crop's (README, Performance, "The loader's
# cause").
BATCH_CROP_MAX_PIXELS = 128 * 128


def crops_whole_batches(image_shape: tuple[int, int] | None) -> bool:
    """Whether images of `image_shape` (None: sizes vary) are cropped by `crop_and_resize_batch`."""
    return image_shape is not None and image_shape[0] * image_shape[1] <= BATCH_CROP_MAX_PIXELS


@tf.function(jit_compile=True)  # 3x faster than op by op
def crop_and_resize_batch(images: tf.Tensor, boxes: CropBoxes, size: int) -> tf.Tensor:
    """N crops of each of B same-size images: [B, H, W, C], boxes [N, B] -> [N, B, size, size, C].

    Same result as `crop_and_resize` per crop, as two matrix products for all the crops at once.
    """
    height, width = images.shape[1], images.shape[2]
    rows = _resize_matrix(boxes.top, boxes.height, height, size)
    columns = _resize_matrix(boxes.left, boxes.width, width, size)
    resized = tf.einsum("nboh,bhwc->nbowc", rows, images)
    resized = tf.einsum("nbpw,nbowc->nbopc", columns, resized)
    return tf.clip_by_value(resized, 0.0, 1.0)


# --------------------------------------------------------------------------- #
# Per-crop colour and geometry ops
# --------------------------------------------------------------------------- #

def _per_image(values, images: tf.Tensor) -> tf.Tensor:
    """Per-image values [...] reshaped to broadcast against images [..., H, W, C]."""
    values = tf.convert_to_tensor(values)
    values = values if values.dtype == tf.bool else tf.cast(values, images.dtype)
    return tf.reshape(values, tf.concat([tf.shape(values), [1, 1, 1]], axis=0))


def flip_horizontally(images: tf.Tensor, flip) -> tf.Tensor:
    """Mirrors left-right the images whose `flip` is true."""
    return tf.where(_per_image(flip, images), tf.reverse(images, axis=[-2]), images)


@functools.cache
def _grayscale_layer():
    # float32 whatever the global Keras dtype policy (mixed_float16 would cast the crops).
    # Built on first use, not at import: creating a layer starts the TensorFlow runtime, after
    # which logical devices (--cpu_replicas) can no longer be configured. keras_cv is imported
    # here too, so that processes which never augment (export, evaluation) skip its import.
    import keras_cv

    return keras_cv.layers.Grayscale(output_channels=3, dtype="float32")


def rgb_to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma (0.2989 R + 0.587 G + 0.114 B) repeated on 3 channels."""
    return _grayscale_layer()(images)


_LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # tf.image.rgb_to_grayscale's ITU-R 601 weights


def _luma(images: tf.Tensor) -> tf.Tensor:
    """[..., H, W, 1] ITU-R 601 luma as a sum over the channels, which XLA fuses into the loop
    using it (`tf.image.rgb_to_grayscale`'s product compiles to a dot: a pass over the images
    and a luma tensor of its own)."""
    red, green, blue = images[..., 0:1], images[..., 1:2], images[..., 2:3]
    return red * _LUMA_WEIGHTS[0] + green * _LUMA_WEIGHTS[1] + blue * _LUMA_WEIGHTS[2]


def _mean_luma(images: tf.Tensor) -> tf.Tensor:
    """[N, 1, 1, 1]: the mean luma of each image of [N, H, W, 3] (static H, W), as one
    matrix-vector product: XLA's CPU reduction over an image's pixels runs well below memory
    speed, its matrix-vector product at it."""
    pixels = images.shape[-3] * images.shape[-2]
    weights = tf.tile(tf.constant(_LUMA_WEIGHTS, images.dtype) / pixels, [pixels])
    rows = tf.reshape(images, [-1, pixels * 3])
    return tf.reshape(tf.linalg.matvec(rows, weights), [-1, 1, 1, 1])


def _blend(images: tf.Tensor, other: tf.Tensor, factor) -> tf.Tensor:
    factor = _per_image(factor, images)
    return tf.clip_by_value(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(images: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: blend with black, i.e. multiply by `factor`."""
    return _blend(images, tf.zeros_like(images), factor)


def adjust_contrast(images: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: blend with the mean of the grayscale image."""
    return _blend(images, tf.reduce_mean(_luma(images), axis=[-3, -2, -1], keepdims=True), factor)


def adjust_saturation(images: tf.Tensor, factor) -> tf.Tensor:
    """torchvision: blend with the grayscale image."""
    return _blend(images, _luma(images), factor)


def adjust_hue(images: tf.Tensor, delta) -> tf.Tensor:
    """torchvision: shift the HSV hue by `delta` (in turns, wrapping), per image."""
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., :1] + _per_image(delta, images), 1.0)
    return tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))


# The augmentation steps are compiled with XLA one by one: XLA fuses each step's elementwise
# ops (2-4x faster than op by op on 2 CPU cores), but compiled as one chain it fuses the steps
# into each other and recomputes them (6 jitter blends cost 12x one blend). XLA needs static
# shapes, so each step runs on the whole batch and masks select per image.
@tf.function(jit_compile=True)
def _jitter_blend(images: tf.Tensor, op: tf.Tensor, factor: tf.Tensor,
                  active: tf.Tensor) -> tf.Tensor:
    """One brightness, contrast or saturation step per image (by `op`); identity where not
    `active`. All three are `blend(x, target, f)` with target black, the grayscale mean or the
    grayscale image, so one blend serves a batch that mixes them."""
    factor = _per_image(tf.where(active & tf.not_equal(op, HUE), factor, 1.0), images)
    is_saturation = _per_image(tf.cast(tf.equal(op, SATURATION), images.dtype), images)
    is_contrast = _per_image(tf.cast(tf.equal(op, CONTRAST), images.dtype), images)
    target = is_saturation * _luma(images) + is_contrast * _mean_luma(images)
    return tf.clip_by_value(factor * images + (1.0 - factor) * target, 0.0, 1.0)


_compiled_adjust_hue = tf.function(adjust_hue, jit_compile=True)


def color_jitter(images: tf.Tensor, factors: tf.Tensor, order: tf.Tensor) -> tf.Tensor:
    """torchvision's ColorJitter on a batch [N, H, W, 3]: per image, the four ops in `order`.

    `factors` [N, 4] holds the brightness, contrast and saturation factors and the hue shift.
    The hue shift is the costly op, so it runs once for the batch: first each image's blends
    that come before its hue step, then the hue shift, then the blends after it.
    """
    hue_slot = tf.argmax(tf.cast(tf.equal(order, HUE), tf.int32), axis=-1, output_type=tf.int32)

    def blends(images, slots, before_hue):
        for slot in slots:
            op = order[:, slot]
            active = slot < hue_slot if before_hue else slot > hue_slot
            images = _jitter_blend(images, op, tf.gather(factors, op, batch_dims=1), active)
        return images

    images = blends(images, range(3), before_hue=True)
    images = _compiled_adjust_hue(images, factors[:, HUE])
    return blends(images, range(1, 4), before_hue=False)


def _blur_kernels(sigma: tf.Tensor) -> tf.Tensor:
    """[N, 2 * BLUR_RADIUS + 1]: normalised 1-D gaussians of std `sigma` [N]."""
    offsets = tf.cast(tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma[:, tf.newaxis]))
    return kernel / tf.reduce_sum(kernel, axis=-1, keepdims=True)


def _replicate_edges(x: tf.Tensor, axis: int) -> tf.Tensor:
    first = tf.gather(x, [0], axis=axis)
    last = tf.gather(x, [tf.shape(x)[axis] - 1], axis=axis)
    repeats = [BLUR_RADIUS if a == axis else 1 for a in range(4)]
    return tf.concat([tf.tile(first, repeats), x, tf.tile(last, repeats)], axis=axis)


def gaussian_blur(images: tf.Tensor, sigma) -> tf.Tensor:
    """Separable gaussian blur of [N, H, W, C] with per-image `sigma` [N] (PIL's
    GaussianBlur(radius=sigma): a 1-D gaussian of radius 8, edges replicated).

    The N images are laid side by side as the channels of one image, so that one depthwise
    convolution per axis applies every image's own kernel (2x faster on CPU than band-matrix
    products; XLA compiles this convolution badly, so it runs as TensorFlow ops).
    """
    sigma = tf.cast(tf.convert_to_tensor(sigma), tf.float32)
    # (a convolution refuses an empty filter: no images drew the blur)
    return tf.cond(tf.shape(images)[0] > 0, lambda: _blur(images, sigma), lambda: images)


def _blur(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    channels = images.shape[-1]
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, -1])
    # [taps, N * C]: channel n * C + c filters with image n's kernel.
    taps = tf.transpose(tf.repeat(_blur_kernels(sigma), channels, axis=0))
    size = 2 * BLUR_RADIUS + 1
    blurred = tf.nn.depthwise_conv2d(
        _replicate_edges(stacked, 1), tf.reshape(taps, [size, 1, -1, 1]), [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(
        _replicate_edges(blurred, 2), tf.reshape(taps, [1, size, -1, 1]), [1, 1, 1, 1], "VALID")
    blurred = tf.reshape(blurred, [height, width, count, channels])
    return tf.transpose(blurred, [2, 0, 1, 3])


def solarize(images: tf.Tensor) -> tf.Tensor:
    """Inverts values >= 128/255 (PIL's ImageOps.solarize(threshold=128))."""
    threshold = tf.constant(SOLARIZE_THRESHOLD, tf.float32) / 255.0
    return tf.where(images >= threshold, 1.0 - images, images)


def normalize(images: tf.Tensor) -> tf.Tensor:
    """ImageNet mean/std normalisation of [0, 1] images."""
    return (images - IMAGENET_MEAN) / IMAGENET_STD


# --------------------------------------------------------------------------- #
# Per-crop decisions and the whole chain
# --------------------------------------------------------------------------- #

def sample_crop_decisions(seed, spec: CropSpec, num_crops: int,
                          blur_sigma: tuple[float, float] = BLUR_SIGMA_RANGE) -> CropDecisions:
    """The reference's random choices for `num_crops` crops of one kind, from `seed` only.

    `blur_sigma`: the range of the blur's sigma, at most `BLUR_SIGMA_RANGE`'s maximum (the
    blur kernel's radius is sized for it).
    """
    if not 0.0 < blur_sigma[0] <= blur_sigma[1] <= BLUR_SIGMA_RANGE[1]:
        raise ValueError(f"blur_sigma needs 0 < min <= max <= {BLUR_SIGMA_RANGE[1]}, "
                         f"got {blur_sigma!r}")
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))

    def happens(stream_seed, probability):
        return tf.random.stateless_uniform([num_crops], stream_seed) < probability

    # torchvision: factors uniform in [1 - strength, 1 + strength], the hue shift in
    # [-strength, strength].
    centres = tf.constant([1.0, 1.0, 1.0, 0.0])
    offsets = tf.random.stateless_uniform([num_crops, 4], seeds[3], -1.0, 1.0)
    return CropDecisions(
        flip=happens(seeds[0], FLIP_PROBABILITY),
        jitter=happens(seeds[1], JITTER_PROBABILITY),
        jitter_order=tf.argsort(tf.random.stateless_uniform([num_crops, 4], seeds[2]), axis=-1),
        jitter_factors=centres + tf.constant(JITTER_STRENGTHS) * offsets,
        grayscale=happens(seeds[4], GRAYSCALE_PROBABILITY),
        blur=happens(seeds[5], spec.blur_probability),
        blur_sigma=tf.random.stateless_uniform([num_crops], seeds[6], *blur_sigma),
        solarize=happens(seeds[7], spec.solarize_probability),
    )


def concat_decisions(decisions: list[CropDecisions]) -> CropDecisions:
    """Decisions of several crop sets, in order, as one set."""
    return CropDecisions(*(tf.concat(fields, axis=0) for fields in zip(*decisions, strict=True)))


def _apply_to_rows(function, images: tf.Tensor, rows_mask: tf.Tensor, *row_values) -> tf.Tensor:
    """`function(images[rows], *values[rows])` written back into the batch."""
    rows = tf.where(rows_mask)
    updated = function(tf.gather_nd(images, rows), *(tf.gather_nd(v, rows) for v in row_values))
    return tf.tensor_scatter_nd_update(images, rows, updated)


@tf.function(jit_compile=True)
def _flip_step(crops: tf.Tensor, flip: tf.Tensor, resampled_from: tf.DType | None) -> tf.Tensor:
    if resampled_from is not None:
        crops = finish_resampled_crops(crops, resampled_from)
    return flip_horizontally(crops, flip)


@tf.function(jit_compile=True)
def _jitter_and_grayscale_step(crops: tf.Tensor, jittered: tf.Tensor, jitter: tf.Tensor,
                               grayscale: tf.Tensor) -> tf.Tensor:
    crops = tf.where(_per_image(jitter, crops), jittered, crops)
    return tf.where(_per_image(grayscale, crops), rgb_to_grayscale(crops), crops)


@tf.function(jit_compile=True)
def _solarize_and_normalize_step(crops: tf.Tensor, solarize_mask: tf.Tensor) -> tf.Tensor:
    return normalize(tf.where(_per_image(solarize_mask, crops), solarize(crops), crops))


def augment_crops(crops: tf.Tensor, decisions: CropDecisions,
                  resampled_from: tf.DType | None = None) -> tf.Tensor:
    """The reference's per-crop chain on resized crops [N, S, S, 3] in [0, 1], normalised.

    `resampled_from`: the crops are from `resample_crop`, of images of that dtype, and are
    finished here.
    """
    crops = _flip_step(crops, decisions.flip, resampled_from)
    jittered = color_jitter(crops, decisions.jitter_factors, decisions.jitter_order)
    crops = _jitter_and_grayscale_step(crops, jittered, decisions.jitter, decisions.grayscale)
    # Blur only the images that draw it (at 224 px it is the costliest step).
    crops = _apply_to_rows(gaussian_blur, crops, decisions.blur, decisions.blur_sigma)
    return _solarize_and_normalize_step(crops, decisions.solarize)
