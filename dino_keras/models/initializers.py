"""The reference's initialisation, with every layer drawing its own values from one seed.

A Keras initializer with an integer seed returns the same values at every call, and one without
a seed is no better: shared by several layers it gives them the same values. So every layer
gets its own integer seed, derived from the network's seed and the layer's path in the network
(`layer_seed`): two builds with one seed are equal, and no two layers start alike.
"""

from __future__ import annotations

import zlib

import keras
import numpy as np

TRUNC_NORMAL_STDDEV = 0.02


def resolve_seed(seed: int | None) -> int:
    """`seed`, or one drawn from NumPy's global generator (set by `keras.utils.set_random_seed`)."""
    return int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)


def layer_seed(seed: int, path: str) -> int:
    """A seed for the layer at `path` (e.g. "blocks_3/fc1") of a network seeded with `seed`."""
    return zlib.crc32(f"{int(seed)}/{path}".encode()) & 0x7FFFFFFF


def trunc_normal(seed: int, stddev: float = TRUNC_NORMAL_STDDEV):
    """The reference's `trunc_normal_(std=0.02)`.

    It truncates at +-2 absolute, which is 100 standard deviations: in effect an untruncated
    normal (Keras' TruncatedNormal would cut at 2 standard deviations).
    """
    return keras.initializers.RandomNormal(stddev=stddev, seed=seed)


def torch_default_uniform(fan_in: int, seed: int):
    """PyTorch's default Linear/Conv weight and bias init: uniform(+-1/sqrt(fan_in))."""
    limit = fan_in**-0.5
    return keras.initializers.RandomUniform(-limit, limit, seed=seed)


def kaiming_normal_fan_out(seed: int):
    """torchvision ResNet convolutions: kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal", seed=seed)


def dense_initializers(seed: int, path: str) -> dict:
    """Kernel and bias initializers of a reference Linear layer (trunc-normal weight, zero bias)."""
    return dict(kernel_initializer=trunc_normal(layer_seed(seed, path)), bias_initializer="zeros")
