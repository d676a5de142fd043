"""The optimiser's update rules and DINO's per-parameter policies, against numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras.optim import DinoOptimizer, is_weight_decayed
from dino_keras.schedules import CosineSchedule


def make_variables():
    return [
        keras.Variable(np.full((2, 3), 0.5, np.float32), name="kernel"),
        keras.Variable(np.full((3,), 0.5, np.float32), name="bias"),
        keras.Variable(np.full((3,), 0.5, np.float32), name="gamma"),
    ]


def constant_optimizer(kind, lr=0.1, wd=0.5, **kwargs):
    return DinoOptimizer(kind, CosineSchedule(lr, lr, 100), CosineSchedule(wd, wd, 100), **kwargs)


def numpy_adamw(p, grads, lr, wd, steps_done=0):
    """PyTorch's AdamW (decoupled decay first), in float32 like the variables."""
    p, lr, wd = np.float32(p), np.float32(lr), np.float32(wd)
    grads = [np.float32(g) for g in grads]
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=steps_done + 1):
        p = p * (1 - lr * wd)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        denom = np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8
        p = p - lr / (1 - 0.9**t) * m / denom
    return p


def test_weight_decay_excludes_biases_and_1d_parameters():
    kernel, bias, gamma = make_variables()
    assert is_weight_decayed(kernel)
    assert not is_weight_decayed(bias) and not is_weight_decayed(gamma)


def test_adamw_matches_pytorch_formula_with_decay_only_on_matrices():
    variables = make_variables()
    optimizer = constant_optimizer("adamw")
    grads = [np.full(v.shape, 0.01 * (i + 1), np.float32) for i, v in enumerate(variables)]
    for _ in range(3):
        optimizer.apply([tf.constant(g) for g in grads], variables)
    np.testing.assert_allclose(
        variables[0].numpy(), numpy_adamw(np.full((2, 3), 0.5), [grads[0]] * 3, 0.1, 0.5), rtol=2e-6
    )
    np.testing.assert_allclose(
        variables[1].numpy(), numpy_adamw(np.full(3, 0.5), [grads[1]] * 3, 0.1, 0.0), rtol=1e-5
    )


def test_sgd_adds_decay_to_gradient_and_uses_momentum():
    variables = make_variables()
    optimizer = constant_optimizer("sgd")
    g = np.full((2, 3), 0.2, np.float32)
    p, buf = np.full((2, 3), 0.5), np.zeros((2, 3))
    for _ in range(2):
        optimizer.apply([tf.constant(g), tf.zeros(3), tf.zeros(3)], variables)
        d = g + 0.5 * p
        buf = 0.9 * buf + d
        p = p - 0.1 * buf
    np.testing.assert_allclose(variables[0].numpy(), p, rtol=1e-6)
    np.testing.assert_allclose(variables[1].numpy(), 0.5)  # zero gradient, no decay


def test_lars_trust_ratio_on_matrices_only():
    variables = make_variables()
    optimizer = constant_optimizer("lars")
    g = np.full((2, 3), 0.2, np.float32)
    gb = np.full((3,), 0.2, np.float32)
    optimizer.apply([tf.constant(g), tf.constant(gb), tf.zeros(3)], variables)
    p = np.full((2, 3), 0.5)
    d = g + 0.5 * p
    q = 0.001 * np.linalg.norm(p) / np.linalg.norm(d)
    np.testing.assert_allclose(variables[0].numpy(), p - 0.1 * d * q, rtol=1e-6)
    np.testing.assert_allclose(variables[1].numpy(), 0.5 - 0.1 * gb, rtol=1e-6)  # no adaptation


def test_per_tensor_clipping_scales_each_gradient_by_its_own_norm():
    variables = make_variables()
    optimizer = constant_optimizer("sgd", lr=1.0, wd=0.0, clip_grad=1.0)
    big = np.full((2, 3), 3.0, np.float32)  # norm 7.35 -> clipped to norm 1
    small = np.full((3,), 0.1, np.float32)  # norm 0.17 -> untouched
    optimizer.apply([tf.constant(big), tf.constant(small), tf.zeros(3)], variables)
    step = 0.5 - variables[0].numpy()
    assert np.linalg.norm(step) == pytest.approx(1.0 / (1.0 + 1e-6 / np.linalg.norm(big)), rel=1e-5)
    np.testing.assert_allclose(0.5 - variables[1].numpy(), small, rtol=1e-6)


def test_last_layer_frozen_then_updated_with_its_own_step_count():
    last = keras.Variable(np.full((2, 2), 0.5, np.float32), name="kernel_v")
    other = keras.Variable(np.full((2, 2), 0.5, np.float32), name="kernel")
    # The optimiser recognises the head's last layer by its path.
    with keras.name_scope("last_layer"):
        last = keras.Variable(np.full((2, 2), 0.5, np.float32), name="kernel_v")
    assert "last_layer" in last.path
    optimizer = constant_optimizer("adamw", wd=0.1, freeze_last_layer_steps=2)
    g = tf.fill((2, 2), 0.3)
    for _ in range(2):
        optimizer.apply([g, g], [last, other])
    np.testing.assert_array_equal(last.numpy(), 0.5)  # no update, no decay while frozen
    assert not np.allclose(other.numpy(), 0.5)
    optimizer.apply([g, g], [last, other])
    # First real step for the last layer: bias correction of step 1, not step 3.
    np.testing.assert_allclose(
        last.numpy(), numpy_adamw(np.full((2, 2), 0.5), [0.3], 0.1, 0.1), rtol=1e-5
    )
