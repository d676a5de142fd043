"""ViT backbone: shapes, outputs, position-embedding interpolation, serialisation, precision."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras.models.position_embedding import bicubic_resize_matrix
from dino_keras.models.vit import VisionTransformer


def tiny_vit(**overrides):
    kwargs = dict(image_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    model(np.zeros((1, 28, 28, 3), np.float32))
    return model


def torch_bicubic_1d(values, out_size, scale):
    """PyTorch's bicubic (A=-0.75, source = (d + 0.5) / scale - 0.5, clamped taps), one
    output at a time: an independent loop form of the matrix in position_embedding.py."""
    a = -0.75

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    out = []
    for d in range(out_size):
        src = (d + 0.5) / scale - 0.5
        base = math.floor(src)
        total = 0.0
        for tap in range(base - 1, base + 3):
            index = min(max(tap, 0), len(values) - 1)
            total += values[index] * kernel(src - tap)
        out.append(total)
    return np.array(out)


def test_call_returns_cls_feature_and_tokens_are_normed():
    model = tiny_vit()
    images = np.random.default_rng(0).normal(size=(3, 28, 28, 3)).astype(np.float32)
    tokens = model.forward_features(images).numpy()
    assert tokens.shape == (3, 50, 32)
    np.testing.assert_allclose(model(images).numpy(), tokens[:, 0], rtol=1e-6)
    np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-5)  # final LayerNorm, beta 0


def test_last_selfattention_rows_are_distributions_and_intermediate_layers():
    model = tiny_vit()
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    attn = model.get_last_selfattention(images).numpy()
    assert attn.shape == (2, 2, 50, 50)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    layers = model.get_intermediate_layers(images, n=2)
    assert len(layers) == 2
    np.testing.assert_allclose(
        layers[-1].numpy(), model.forward_features(images).numpy(), rtol=1e-5, atol=1e-6
    )


def test_position_embedding_identity_at_native_size():
    model = tiny_vit()
    assert model.interpolate_pos_encoding(7, 7) is model.pos_embed


@pytest.mark.parametrize("grid", [(3, 3), (10, 10), (7, 5), (4, 9)])
def test_position_embedding_follows_reference_formula(grid):
    model = tiny_vit()
    h0, w0 = grid
    resized = model.interpolate_pos_encoding(h0, w0).numpy()
    pos = model.pos_embed.numpy()
    assert resized.shape == (1, 1 + h0 * w0, 32)
    np.testing.assert_array_equal(resized[0, 0], pos[0, 0])  # CLS position untouched
    grid_in = pos[0, 1:].reshape(7, 7, 32).astype(np.float64)
    scale_h, scale_w = (h0 + 0.1) / 7.0, (w0 + 0.1) / 7.0
    rows = np.stack(
        [
            np.stack([torch_bicubic_1d(grid_in[:, w, c], h0, scale_h) for c in range(32)], -1)
            for w in range(7)
        ],
        1,
    )  # [h0, 7, C]
    expected = np.stack(
        [
            np.stack([torch_bicubic_1d(rows[h, :, c], w0, scale_w) for c in range(32)], -1)
            for h in range(h0)
        ],
        0,
    )  # [h0, w0, C]
    np.testing.assert_allclose(resized[0, 1:].reshape(h0, w0, 32), expected, atol=1e-6)


def test_bicubic_matrix_rows_sum_to_one():
    np.testing.assert_allclose(bicubic_resize_matrix(14, 6, 6.1 / 14).sum(1), 1.0, rtol=1e-6)


def test_non_square_and_local_crops_run():
    model = tiny_vit()
    assert model(np.zeros((2, 12, 12, 3), np.float32)).shape == (2, 32)
    assert model(np.zeros((2, 28, 20, 3), np.float32)).shape == (2, 32)


def test_drop_path_only_in_training():
    model = tiny_vit(drop_path_rate=0.5, seed=1)
    images = np.random.default_rng(0).normal(size=(8, 28, 28, 3)).astype(np.float32)
    np.testing.assert_allclose(model(images), model(images), rtol=1e-6)
    assert not np.allclose(model(images, training=True), model(images, training=False), atol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "traced", "compiled"])
def test_fit_eager_traced_and_compiled(mode):
    backbone = tiny_vit()
    model = keras.Sequential([backbone, keras.layers.Dense(3)])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=mode == "eager",
        jit_compile=mode == "compiled",
    )
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 3)).astype(np.float32)
    y = np.arange(8) % 3
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_close_to_float32(policy):
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    reference = tiny_vit()
    expected = reference(images).numpy()
    keras.mixed_precision.set_global_policy(policy)
    model = tiny_vit()
    model.set_weights(reference.get_weights())
    out = model(images)
    assert out.dtype == tf.as_dtype(policy.split("_")[1])
    assert model.pos_embed.dtype == "float32"
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, atol=0.1)
