"""Bicubic resizing of a ViT position-embedding grid, exactly as the reference does it.

The reference calls `torch.nn.functional.interpolate(grid, scale_factor=((h0 + 0.1) / sqrt(N),
(w0 + 0.1) / sqrt(N)), mode="bicubic")`. With an explicit scale factor PyTorch maps output
pixel `d` to source coordinate `(d + 0.5) / scale - 0.5` (not `in / out`), uses the cubic
convolution kernel with A = -0.75 and clamps source indices at the border. `tf.image.resize`
uses A = -0.5 and `in / out`, so it differs; the interpolation is therefore written here as two
small matrices (bicubic is separable) computed once per crop size at trace time.

Graphs whose image size is only known at run time (the serving signatures of
`dino_keras.export`) use `interpolate_position_embedding_tf`, the same matrices built with
TensorFlow ops from the run-time grid size (equal to the numpy ones; see its test).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

_CUBIC_A = -0.75


def _cubic_near(x: np.ndarray) -> np.ndarray:
    """Kernel for |x| <= 1."""
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:
    """Kernel for 1 < |x| < 2."""
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def bicubic_resize_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """Matrix `M` [out_size, in_size] with `M @ x` = PyTorch's 1-D bicubic resize of `x`.

    The computation follows PyTorch's float32 arithmetic so that the result matches it to
    float rounding.
    """
    inverse_scale = np.float32(1.0 / scale_factor)  # PyTorch: double division, then float
    dst = np.arange(out_size, dtype=np.float32)
    src = inverse_scale * (dst + np.float32(0.5)) - np.float32(0.5)
    floor = np.floor(src)
    t = (src - floor).astype(np.float32)
    weights = np.stack(
        [_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t)], axis=1
    )
    matrix = np.zeros((out_size, in_size), np.float64)
    for offset in range(4):
        index = np.clip(floor.astype(np.int64) - 1 + offset, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, offset])
    return matrix.astype(np.float32)


def position_grid_resize_matrices(
    num_native_patches: int, grid_height: int, grid_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices that resize a square sqrt(N) x sqrt(N) grid to h0 x w0.

    Uses the reference's scale factors ((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N)); the +0.1
    keeps `floor(scale * sqrt(N))` from rounding down to h0 - 1.
    """
    side = int(math.sqrt(num_native_patches))
    if side * side != num_native_patches:
        raise ValueError(f"native patch count {num_native_patches} is not a square")
    rows = bicubic_resize_matrix(
        side, grid_height, (grid_height + 0.1) / math.sqrt(num_native_patches)
    )
    cols = bicubic_resize_matrix(
        side, grid_width, (grid_width + 0.1) / math.sqrt(num_native_patches)
    )
    return rows, cols


def bicubic_resize_matrix_tf(in_size: int, out_size, scale_factor) -> tf.Tensor:
    """`bicubic_resize_matrix` as TensorFlow ops, for an `out_size` (int32 scalar tensor) and a
    `scale_factor` (float64 scalar tensor) known only when the graph runs."""
    inverse_scale = tf.cast(1.0 / tf.cast(scale_factor, tf.float64), tf.float32)
    dst = tf.cast(tf.range(out_size), tf.float32)
    src = inverse_scale * (dst + 0.5) - 0.5
    floor = tf.floor(src)
    t = src - floor
    weights = tf.stack(
        [_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t)], axis=1
    )
    index = tf.clip_by_value(
        tf.cast(floor, tf.int32)[:, tf.newaxis] - 1 + tf.range(4), 0, in_size - 1
    )
    # Summed in float64 as `np.add.at` does where clamped taps fall on the same border pixel.
    taps = tf.one_hot(index, in_size, dtype=tf.float64) * tf.cast(weights, tf.float64)[..., None]
    return tf.cast(tf.reduce_sum(taps, axis=1), tf.float32)


def position_grid_resize_matrices_tf(num_native_patches: int, grid_height, grid_width):
    """`position_grid_resize_matrices` for an h0 x w0 grid given as int32 scalar tensors."""
    side = int(math.sqrt(num_native_patches))
    if side * side != num_native_patches:
        raise ValueError(f"native patch count {num_native_patches} is not a square")
    root = math.sqrt(num_native_patches)
    rows = bicubic_resize_matrix_tf(
        side, grid_height, (tf.cast(grid_height, tf.float64) + 0.1) / root
    )
    cols = bicubic_resize_matrix_tf(
        side, grid_width, (tf.cast(grid_width, tf.float64) + 0.1) / root
    )
    return rows, cols


def interpolate_position_embedding_tf(pos_embed, grid_height, grid_width) -> tf.Tensor:
    """A ViT's position embedding [1, 1 + N, D] for an h0 x w0 patch grid known at run time.

    The native square grid keeps the embedding unchanged (as the static path does); any other
    grid gets the reference's bicubic resize of the patch part.
    """
    pos_embed = tf.convert_to_tensor(pos_embed)
    num_patches = pos_embed.shape[1] - 1
    dim = pos_embed.shape[2]
    side = int(math.sqrt(num_patches))
    grid_height = tf.cast(grid_height, tf.int32)
    grid_width = tf.cast(grid_width, tf.int32)

    def resized():
        rows, cols = position_grid_resize_matrices_tf(num_patches, grid_height, grid_width)
        grid = tf.reshape(pos_embed[:, 1:], (side, side, dim))
        grid = tf.einsum("oh,hwd,pw->opd", rows, grid, cols)
        patch_pos = tf.reshape(grid, (1, grid_height * grid_width, dim))
        return tf.concat([pos_embed[:, :1], patch_pos], axis=1)

    native = tf.logical_and(tf.equal(grid_height, side), tf.equal(grid_width, side))
    return tf.cond(native, lambda: pos_embed, resized)
