"""Bicubic resizing of a ViT position-embedding grid, exactly as the reference does it.

The reference calls `torch.nn.functional.interpolate(grid, scale_factor=((h0 + 0.1) / sqrt(N),
(w0 + 0.1) / sqrt(N)), mode="bicubic")`. With an explicit scale factor PyTorch maps output
pixel `d` to source coordinate `(d + 0.5) / scale - 0.5` (not `in / out`), uses the cubic
convolution kernel with A = -0.75 and clamps source indices at the border. `tf.image.resize`
uses A = -0.5 and `in / out`, so it differs; the interpolation is therefore written here as two
small matrices (bicubic is separable) computed once per crop size at trace time.
"""

from __future__ import annotations

import math

import numpy as np

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
    rows = bicubic_resize_matrix(side, grid_height, (grid_height + 0.1) / math.sqrt(num_native_patches))
    cols = bicubic_resize_matrix(side, grid_width, (grid_width + 0.1) / math.sqrt(num_native_patches))
    return rows, cols
