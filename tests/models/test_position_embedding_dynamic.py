"""The TensorFlow-op position-embedding interpolation used by graphs of run-time image size
(serving) equals the numpy/trace-time one used by training, and so does the whole ViT."""

import numpy as np
import tensorflow as tf

from dino_keras.models.position_embedding import (
    interpolate_position_embedding_tf,
    position_grid_resize_matrices,
    position_grid_resize_matrices_tf,
)
from dino_keras.models.vit import VisionTransformer


def test_tf_matrices_equal_numpy_ones_exactly():
    resize = tf.function(position_grid_resize_matrices_tf, reduce_retracing=True)
    for num_patches in (4, 49, 196):
        for height, width in [(1, 1), (2, 7), (7, 7), (3, 11), (14, 14), (30, 17), (64, 5)]:
            rows, cols = position_grid_resize_matrices(num_patches, height, width)
            rows_tf, cols_tf = resize(num_patches, tf.constant(height), tf.constant(width))
            np.testing.assert_array_equal(rows_tf.numpy(), rows)
            np.testing.assert_array_equal(cols_tf.numpy(), cols)


def tiny_vit():
    model = VisionTransformer(image_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model(np.zeros((1, 28, 28, 3), np.float32))
    return model


def test_dynamic_embedding_equals_static_one_including_the_native_grid():
    model = tiny_vit()
    model.pos_embed.assign(np.random.default_rng(0).normal(size=model.pos_embed.shape))
    dynamic = tf.function(
        lambda h, w: interpolate_position_embedding_tf(model.pos_embed, h, w),
        input_signature=[tf.TensorSpec([], tf.int32)] * 2,
    )
    for height, width in [(7, 7), (3, 3), (7, 10), (12, 5), (1, 1)]:
        np.testing.assert_allclose(
            dynamic(height, width).numpy(),
            model.interpolate_pos_encoding(height, width).numpy(),
            rtol=1e-6,
            atol=1e-6,
        )
    np.testing.assert_array_equal(dynamic(7, 7).numpy(), model.pos_embed.numpy())


def test_vit_traced_with_unknown_size_equals_eager_static_calls():
    model = tiny_vit()
    dynamic = tf.function(
        lambda images: model.forward_features(images),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
    )
    rng = np.random.default_rng(1)
    for shape in [(2, 28, 28, 3), (1, 28, 40, 3), (2, 12, 8, 3)]:
        images = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(
            dynamic(images).numpy(), model.forward_features(images).numpy(), rtol=1e-5, atol=1e-5
        )
