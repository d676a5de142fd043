"""The per-crop augmentation ops against hand-computed or numpy/PIL expectations.

Every op is checked eagerly and inside `tf.data.Dataset.map` (graph mode).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dino_keras.data import augment

LUMA = np.array([0.2989, 0.587, 0.114], np.float32)
SEED = tf.constant([7, 11], tf.int64)


def eager_and_mapped(function, *args) -> list:
    """`function(*args)` run eagerly and as a `tf.data` map function, as numpy structures."""
    args = tf.nest.map_structure(tf.convert_to_tensor, args)
    mapped = next(iter(tf.data.Dataset.from_tensors(args).map(function)))
    return [tf.nest.map_structure(np.asarray, result) for result in (function(*args), mapped)]


@pytest.fixture
def images(rng) -> np.ndarray:
    """A batch of 3 random float images [3, 20, 24, 3] in [0, 1]."""
    return rng.uniform(0, 1, (3, 20, 24, 3)).astype(np.float32)


def test_solarize_inverts_values_from_128():
    levels = np.array([0, 1, 127, 128, 129, 200, 255], np.float32)
    image = np.stack([levels] * 3, axis=-1)[np.newaxis] / 255.0
    expected = np.where(levels >= 128, 255 - levels, levels)
    for result in eager_and_mapped(augment.solarize, image):
        np.testing.assert_allclose(result[0, :, 0] * 255.0, expected, atol=1e-4)


def test_grayscale_uses_itu_601_weights_on_three_channels():
    pixels = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 1.0]]], np.float32)
    expected = pixels @ LUMA
    for result in eager_and_mapped(augment.rgb_to_grayscale, pixels):
        assert result.shape == (1, 4, 3)
        for channel in range(3):
            np.testing.assert_allclose(result[0, :, channel], expected[0], atol=1e-6)


def test_brightness_multiplies_by_the_factor_per_image(images):
    factors = np.array([0.6, 1.0, 1.4], np.float32)
    expected = np.clip(images * factors[:, None, None, None], 0, 1)
    for result in eager_and_mapped(augment.adjust_brightness, images, factors):
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_contrast_blends_with_the_mean_of_the_grayscale_image(images):
    factors = np.array([0.6, 1.0, 1.4], np.float32)
    means = (images @ LUMA).mean(axis=(1, 2))
    expected = np.clip(factors[:, None, None, None] * images
                       + (1 - factors[:, None, None, None]) * means[:, None, None, None], 0, 1)
    for result in eager_and_mapped(augment.adjust_contrast, images, factors):
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_saturation_blends_with_the_grayscale_image(images):
    factors = np.array([0.8, 1.0, 1.2], np.float32)
    gray = (images @ LUMA)[..., np.newaxis]
    expected = np.clip(factors[:, None, None, None] * images
                       + (1 - factors[:, None, None, None]) * gray, 0, 1)
    for result in eager_and_mapped(augment.adjust_saturation, images, factors):
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_hue_shifts_the_hsv_hue_with_wrap_around(images):
    deltas = np.array([-0.1, 0.05, 0.1], np.float32)
    expected = np.empty_like(images)
    for index, (image, delta) in enumerate(zip(images, deltas, strict=True)):
        for y, x in np.ndindex(image.shape[:2]):
            hue, saturation, value = colorsys.rgb_to_hsv(*image[y, x])
            expected[index, y, x] = colorsys.hsv_to_rgb((hue + delta) % 1.0, saturation, value)
    for result in eager_and_mapped(augment.adjust_hue, images, deltas):
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_color_jitter_applies_the_four_ops_in_each_images_order(images):
    factors = np.array([[1.3, 0.7, 1.2, 0.08], [0.6, 1.4, 0.8, -0.1], [1.1, 1.2, 0.9, 0.03]],
                       np.float32)
    orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1]], np.int32)
    single_ops = {augment.BRIGHTNESS: augment.adjust_brightness,
                  augment.CONTRAST: augment.adjust_contrast,
                  augment.SATURATION: augment.adjust_saturation, augment.HUE: augment.adjust_hue}
    expected = []
    for image, image_factors, order in zip(images, factors, orders, strict=True):
        for op in order:
            image = single_ops[op](image, image_factors[op])
        expected.append(image)
    for result in eager_and_mapped(augment.color_jitter, images, factors, orders):
        np.testing.assert_allclose(result, np.stack(expected), atol=1e-5)


def _numpy_gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = augment.BLUR_RADIUS
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(w * padded[k:k + image.shape[0]] for k, w in enumerate(kernel))
    return sum(w * rows[:, k:k + image.shape[1]] for k, w in enumerate(kernel))


def test_blur_of_a_delta_sums_to_one_and_is_symmetric():
    delta = np.zeros((1, 25, 25, 3), np.float32)
    delta[0, 12, 12] = 1.0
    for result in eager_and_mapped(augment.gaussian_blur, delta, np.array([1.5], np.float32)):
        np.testing.assert_allclose(result.sum(axis=(1, 2)), 1.0, atol=1e-5)
        np.testing.assert_allclose(result, result[:, ::-1, :], atol=1e-7)
        np.testing.assert_allclose(result, result[:, :, ::-1], atol=1e-7)
        np.testing.assert_allclose(result, np.swapaxes(result, 1, 2), atol=1e-7)
        profile = result[0, 12, :, 0]
        assert profile[12] > profile[13] > profile[14] > 0


def test_blur_matches_a_separable_gaussian_with_replicated_edges(images):
    sigmas = np.array([0.1, 1.0, 2.0], np.float32)
    expected = np.stack([_numpy_gaussian_blur(image, sigma)
                         for image, sigma in zip(images, sigmas, strict=True)])
    for result in eager_and_mapped(augment.gaussian_blur, images, sigmas):
        np.testing.assert_allclose(result, expected, atol=1e-5)
        np.testing.assert_allclose(result[0], images[0], atol=1e-5)  # sigma 0.1: no blur


def test_flip_mirrors_only_the_chosen_images(images):
    for result in eager_and_mapped(augment.flip_horizontally, images,
                                   np.array([True, False, True])):
        np.testing.assert_array_equal(result[0], images[0, :, ::-1])
        np.testing.assert_array_equal(result[1], images[1])
        np.testing.assert_array_equal(result[2], images[2, :, ::-1])


def test_normalize_uses_imagenet_mean_and_std():
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    image = np.stack([mean, mean + std, mean - 2 * std]).astype(np.float32)[np.newaxis]
    for result in eager_and_mapped(augment.normalize, image):
        np.testing.assert_allclose(result[0], [[0, 0, 0], [1, 1, 1], [-2, -2, -2]], atol=1e-5)


def test_crop_boxes_obey_scale_ratio_and_image_bounds():
    height, width, scale = 200, 300, (0.05, 0.4)
    for boxes in eager_and_mapped(
            lambda s: augment.sample_crop_boxes(s, height, width, scale, [4000]), SEED):
        top, left, crop_height, crop_width = (np.asarray(field, np.float64) for field in boxes)
        area = height * width
        # Rounding moves sqrt(area * ratio) and sqrt(area / ratio) by at most 0.5 each.
        assert np.all((crop_width + 0.5) * (crop_height + 0.5) >= scale[0] * area)
        assert np.all((crop_width - 0.5) * (crop_height - 0.5) <= scale[1] * area)
        assert np.all((crop_width + 0.5) / (crop_height - 0.5) >= 3 / 4)
        assert np.all((crop_width - 0.5) / (crop_height + 0.5) <= 4 / 3)
        assert np.all((top >= 0) & (left >= 0))
        assert np.all((top + crop_height <= height) & (left + crop_width <= width))
        assert abs(np.mean(crop_width * crop_height / area) - np.mean(scale)) < 0.01
        assert top.max() > 0.8 * (height - crop_height).max()  # positions reach the far side
    first = augment.sample_crop_boxes(SEED, height, width, scale, [10])
    again = augment.sample_crop_boxes(SEED, height, width, scale, [10])
    other = augment.sample_crop_boxes(SEED + 1, height, width, scale, [10])
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


@pytest.mark.parametrize("height, width, scale, expected", [
    (100, 10, (0.9, 1.0), (43, 0, 13, 10)),   # too narrow: width kept, height = w / (3/4)
    (10, 100, (0.9, 1.0), (0, 43, 10, 13)),   # too wide: height kept, width = h * 4/3
    (40, 50, (1.5, 2.0), (0, 0, 40, 50)),     # no attempt fits: the whole image
])
def test_crop_boxes_fall_back_to_the_centre_crop(height, width, scale, expected):
    for boxes in eager_and_mapped(
            lambda s: augment.sample_crop_boxes(s, height, width, scale, [5]), SEED):
        np.testing.assert_array_equal(np.stack(boxes).T, [expected] * 5)


@pytest.mark.parametrize("size", [16, 48])  # downsampling (antialiased) and upsampling
def test_crop_and_resize_matches_pil_bicubic(rng, size):
    image = rng.uniform(0, 1, (40, 50, 3)).astype(np.float32)
    top, left, height, width = 5, 7, 30, 33
    crop = image[top:top + height, left:left + width]
    expected = np.stack([np.asarray(Image.fromarray(crop[..., c], mode="F").resize(
        (size, size), Image.BICUBIC)) for c in range(3)], axis=-1).clip(0, 1)
    box = augment.CropBoxes(*(tf.constant(v, tf.int32) for v in (top, left, height, width)))
    for result in eager_and_mapped(lambda x: augment.crop_and_resize(x, box, size), image):
        np.testing.assert_allclose(result, expected, atol=2e-5)
    image_uint8 = np.round(image * 255).astype(np.uint8)
    for result in eager_and_mapped(lambda x: augment.crop_and_resize(x, box, size), image_uint8):
        np.testing.assert_allclose(
            result, augment.crop_and_resize(image_uint8.astype(np.float32) / 255, box, size),
            atol=2e-6)
    batch_boxes = augment.CropBoxes(*(tf.constant([[v]], tf.int32)
                                      for v in (top, left, height, width)))
    for result in eager_and_mapped(
            lambda x: augment.crop_and_resize_batch(x, batch_boxes, size), image[np.newaxis]):
        np.testing.assert_allclose(result[0, 0], expected, atol=2e-5)


def _binomial_tolerance(probability: float, draws: int) -> float:
    return 5 * math.sqrt(probability * (1 - probability) / draws) + 1e-9


@pytest.mark.parametrize("spec", [augment.GLOBAL_1, augment.GLOBAL_2, augment.LOCAL],
                         ids=lambda spec: spec.name)
def test_crop_decisions_have_the_reference_probabilities(spec):
    draws = 4000
    for decisions in eager_and_mapped(
            lambda s: augment.sample_crop_decisions(s, spec, draws), SEED):
        for name, expected in [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2),
                               ("blur", spec.blur_probability),
                               ("solarize", spec.solarize_probability)]:
            rate = np.mean(getattr(decisions, name))
            assert abs(rate - expected) <= _binomial_tolerance(expected, draws), (name, rate)
        assert np.all(np.sort(decisions.jitter_order, axis=1) == np.arange(4))
        first_ops = np.bincount(decisions.jitter_order[:, 0], minlength=4) / draws
        np.testing.assert_allclose(first_ops, 0.25, atol=_binomial_tolerance(0.25, draws))
        factors = decisions.jitter_factors
        for op, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert low <= factors[:, op].min() < low + 0.01
            assert high - 0.01 < factors[:, op].max() <= high
        assert 0.1 <= decisions.blur_sigma.min() and decisions.blur_sigma.max() <= 2.0


def test_solarize_is_drawn_only_for_the_second_global_crop():
    for spec in (augment.GLOBAL_1, augment.LOCAL):
        assert not np.any(augment.sample_crop_decisions(SEED, spec, 4000).solarize)
    assert np.all(augment.sample_crop_decisions(SEED, augment.GLOBAL_1, 4000).blur)


def test_crop_decisions_depend_only_on_the_seed():
    first = augment.sample_crop_decisions(SEED, augment.LOCAL, 64)
    again = augment.sample_crop_decisions(SEED, augment.LOCAL, 64)
    other = augment.sample_crop_decisions(SEED + 1, augment.LOCAL, 64)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.jitter_factors, other.jitter_factors)


def _decisions(count: int, **chosen) -> augment.CropDecisions:
    """Decisions with every step off except `chosen` (name -> per-crop values)."""
    values = {"flip": [False] * count, "jitter": [False] * count,
              "jitter_order": [[0, 1, 2, 3]] * count, "jitter_factors": [[1, 1, 1, 0]] * count,
              "grayscale": [False] * count, "blur": [False] * count, "blur_sigma": [1.0] * count,
              "solarize": [False] * count}
    values.update(chosen)
    dtypes = {"jitter_order": tf.int32, "jitter_factors": tf.float32, "blur_sigma": tf.float32}
    return augment.CropDecisions(**{name: tf.constant(value, dtypes.get(name))
                                    for name, value in values.items()})


def test_augment_crops_applies_each_chosen_step(images):
    count = len(images)
    cases = [
        ({}, images),
        ({"flip": [True, False, False]}, np.stack([images[0, :, ::-1], images[1], images[2]])),
        ({"grayscale": [False, True, False]},
         np.stack([images[0], np.repeat((images[1] @ LUMA)[..., None], 3, -1), images[2]])),
        ({"solarize": [True] * count}, np.where(images >= 128 / 255, 1 - images, images)),
        ({"blur": [True, False, True], "blur_sigma": [1.0, 1.0, 2.0]},
         np.stack([_numpy_gaussian_blur(images[0], 1.0), images[1],
                   _numpy_gaussian_blur(images[2], 2.0)])),
        ({"jitter": [True, True, False], "jitter_factors": [[1.2, 1, 1, 0]] * count},
         np.stack([np.clip(images[0] * 1.2, 0, 1), np.clip(images[1] * 1.2, 0, 1), images[2]])),
    ]
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    for chosen, expected in cases:
        decisions = _decisions(count, **chosen)
        for result in eager_and_mapped(augment.augment_crops, images, decisions):
            np.testing.assert_allclose(result, (expected - mean) / std, atol=1e-4,
                                       err_msg=str(chosen))


def test_augment_crops_with_sampled_decisions_is_the_same_eagerly_and_in_a_map(images):
    decisions = augment.sample_crop_decisions(SEED, augment.GLOBAL_2, len(images))
    eager, mapped = eager_and_mapped(lambda x: augment.augment_crops(x, decisions), images)
    assert eager.shape == images.shape and eager.dtype == np.float32
    np.testing.assert_allclose(eager, mapped, atol=1e-6)
    assert np.all(np.isfinite(eager))



@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_crop_and_resize_equals_tf_image_resize_of_the_crop(rng, dtype):
    """Both axes resampled by the row pass of scale_and_translate: tf.image.resize's result."""
    image = rng.uniform(0, 1, (23, 31, 3)).astype(np.float32)
    if dtype == np.uint8:
        image = np.round(image * 255).astype(np.uint8)
    scale = 255.0 if dtype == np.uint8 else 1.0
    # (top, left, height, width, size): downsampling, upsampling, mixed, a one-pixel-high crop
    for top, left, height, width, size in [(2, 3, 19, 27, 8), (5, 1, 7, 9, 13), (0, 0, 23, 5, 11),
                                           (4, 6, 1, 20, 6)]:
        crop = image[top:top + height, left:left + width]
        expected = np.clip(np.asarray(tf.image.resize(
            crop, [size, size], method="bicubic", antialias=True)) / scale, 0, 1)
        # The box is a tensor argument, so the mapped function sees crops of unknown shape.
        for result in eager_and_mapped(
                lambda x, *box, size=size: augment.crop_and_resize(x, augment.CropBoxes(*box),
                                                                    size),
                image, *(np.int32(v) for v in (top, left, height, width))):
            assert result.shape == (size, size, 3) and result.dtype == np.float32
            np.testing.assert_allclose(result, expected, atol=1e-6)


def test_blur_sigma_range_is_a_setting():
    seed = tf.constant([3, 4], tf.int64)
    default = augment.sample_crop_decisions(seed, augment.GLOBAL_1, 500)
    small = augment.sample_crop_decisions(seed, augment.GLOBAL_1, 500, blur_sigma=(0.1, 0.5))
    assert float(tf.reduce_max(default.blur_sigma)) > 1.5
    assert 0.1 <= float(tf.reduce_min(small.blur_sigma)) <= float(tf.reduce_max(small.blur_sigma))
    assert float(tf.reduce_max(small.blur_sigma)) <= 0.5
    # Only the sigma changes: every other decision is the same draw.
    np.testing.assert_array_equal(default.flip.numpy(), small.flip.numpy())
    with pytest.raises(ValueError, match="blur_sigma"):
        augment.sample_crop_decisions(seed, augment.GLOBAL_1, 5, blur_sigma=(0.1, 3.0))
