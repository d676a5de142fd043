"""Transformer sub-layers whose gradients keep fewer activations than automatic differentiation.

Differentiated automatically, XLA keeps alive from the forward to the backward pass, in every
block: both LayerNorm outputs, the first MLP layer's output and three pieces of the erf GELU,
and the attention's weighted values. With these gradients instead, the XLA temporary buffer of
the ViT-S/16 step at batch 8 in the multi-crop recipe shrinks from 2.65 to 1.25 GiB (XLA's
buffer assignment; `--xla_dump_to`). These gradients keep only each sub-layer's input (which
the residual stream keeps anyway), the LayerNorm statistics, the MLP pre-activation, qkv and
the attention weights, and recompute the rest in the backward pass: LayerNorm and GELU are
elementwise work that XLA fuses into the loops that need it, and the one recomputed product
(attention weights x values) is about 1% of the step's FLOPs. Same maths as the plain layers
(`tests/models/test_lean_gradients.py` compares both); LayerNorm and softmax in float32
whatever the compute dtype, as before.
"""

from __future__ import annotations

import math

import tensorflow as tf

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _rows(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [-1, x.shape[-1]])


def _like_rows(rows: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """`rows` [N, D'] back to x's leading shape: [..., D']."""
    return tf.reshape(rows, tf.concat([tf.shape(x)[:-1], [rows.shape[-1]]], axis=0))


def _after(x: tf.Tensor, signal: tf.Tensor) -> tf.Tensor:
    """`x`, made to depend on `signal` (adds 0, or NaN if signal's first element is NaN).

    Without the dependency XLA sees a backward-pass recomputation as the same expression as the
    forward pass's, merges the two and keeps the result alive in between, which is what these
    gradients avoid (tf.recompute_grad uses the same device).
    """
    first = tf.reshape(signal, [-1])[:1]
    zero = tf.where(tf.reduce_all(tf.equal(first, first)), 0.0, math.nan)
    return x + tf.cast(zero, x.dtype)


def _layer_norm_statistics(rows: tf.Tensor, epsilon: float):
    mean, variance = tf.nn.moments(rows, axes=[-1], keepdims=True)
    return mean, tf.math.rsqrt(variance + epsilon)


def _apply_layer_norm(rows, mean, inverse_std, gamma, beta):
    scale = inverse_std * gamma
    return rows * scale + (beta - mean * scale)  # Keras' arrangement of the same terms


def _layer_norm_backward(rows, mean, inverse_std, gamma, output_gradient):
    """(input, gamma, beta) gradients of LayerNorm given its output's gradient (float32)."""
    normalized = (rows - mean) * inverse_std
    gamma_gradient = tf.reduce_sum(output_gradient * normalized, axis=0)
    beta_gradient = tf.reduce_sum(output_gradient, axis=0)
    normalized_gradient = output_gradient * gamma
    inputs_gradient = inverse_std * (
        normalized_gradient
        - tf.reduce_mean(normalized_gradient, axis=-1, keepdims=True)
        - normalized * tf.reduce_mean(normalized_gradient * normalized, axis=-1, keepdims=True))
    return inputs_gradient, gamma_gradient, beta_gradient


def _normal_cdf(x: tf.Tensor) -> tf.Tensor:
    return 0.5 * (1.0 + tf.math.erf(x * _INV_SQRT2))


def _gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as torch.nn.GELU() and Keras'."""
    return x * _normal_cdf(x)


def _gelu_and_derivative(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    cdf = _normal_cdf(x)
    return x * cdf, cdf + x * _INV_SQRT_2PI * tf.exp(-0.5 * tf.square(x))


def _layer_norm_dense(x, gamma, beta, kernel, bias, epsilon: float):
    """Forward of LayerNorm(x) @ kernel + bias on rows: (rows, mean, inverse_std, outputs)."""
    rows = tf.cast(_rows(x), tf.float32)
    mean, inverse_std = _layer_norm_statistics(rows, epsilon)
    normalized = tf.cast(_apply_layer_norm(rows, mean, inverse_std, gamma, beta), kernel.dtype)
    return rows, mean, inverse_std, tf.matmul(normalized, kernel) + bias


def _layer_norm_dense_gradients(x, rows, mean, inverse_std, gamma, beta, kernel,
                                dense_gradient, signal):
    """(x, gamma, beta, kernel, bias) gradients of `_layer_norm_dense` given its outputs'
    gradient `dense_gradient`; the LayerNorm output is recomputed after `signal`."""
    normalized = tf.cast(_apply_layer_norm(
        _after(rows, signal), mean, inverse_std, gamma, beta), kernel.dtype)
    normalized_gradient = tf.matmul(dense_gradient, kernel, transpose_b=True)
    inputs_gradient, gamma_gradient, beta_gradient = _layer_norm_backward(
        rows, mean, inverse_std, gamma, tf.cast(normalized_gradient, tf.float32))
    return (
        tf.cast(_like_rows(inputs_gradient, x), x.dtype),
        gamma_gradient,
        beta_gradient,
        tf.matmul(normalized, dense_gradient, transpose_a=True),
        tf.reduce_sum(dense_gradient, axis=0),
    )


def layer_norm_dense(x, gamma, beta, kernel, bias, epsilon: float):
    """LayerNorm(x) @ kernel + bias over the last axis; keeps x and the statistics only.

    LayerNorm runs in float32 (gamma, beta float32); its output is cast to kernel's dtype.
    """

    @tf.custom_gradient
    def forward(x, gamma, beta, kernel, bias):
        rows, mean, inverse_std, outputs = _layer_norm_dense(x, gamma, beta, kernel, bias,
                                                             epsilon)

        def gradient(output_gradient):
            output_gradient = _rows(output_gradient)
            return _layer_norm_dense_gradients(x, rows, mean, inverse_std, gamma, beta, kernel,
                                               output_gradient, signal=output_gradient)

        return _like_rows(outputs, x), gradient

    return forward(x, gamma, beta, kernel, bias)


def layer_norm_gelu_mlp(x, gamma, beta, kernel1, bias1, kernel2, bias2, epsilon: float):
    """gelu(LayerNorm(x) @ kernel1 + bias1) @ kernel2 + bias2 (exact GELU) over the last axis;
    keeps x, the statistics and the pre-activation only."""

    @tf.custom_gradient
    def forward(x, gamma, beta, kernel1, bias1, kernel2, bias2):
        rows, mean, inverse_std, preactivation = _layer_norm_dense(
            x, gamma, beta, kernel1, bias1, epsilon)
        outputs = _like_rows(tf.matmul(_gelu(preactivation), kernel2) + bias2, x)

        def gradient(output_gradient):
            output_gradient = _rows(output_gradient)
            activation, derivative = _gelu_and_derivative(
                _after(preactivation, output_gradient))
            preactivation_gradient = (
                tf.matmul(output_gradient, kernel2, transpose_b=True) * derivative)
            first_layer = _layer_norm_dense_gradients(
                x, rows, mean, inverse_std, gamma, beta, kernel1, preactivation_gradient,
                signal=output_gradient)
            return first_layer + (
                tf.matmul(activation, output_gradient, transpose_a=True),
                tf.reduce_sum(output_gradient, axis=0),
            )

        return outputs, gradient

    return forward(x, gamma, beta, kernel1, bias1, kernel2, bias2)


def attention_weights(qkv, num_heads: int):
    """(query, key, value [B, heads, T, head_dim], softmax attention weights [B, heads, T, T])
    from a fused projection qkv [B, T, 3 * D] ((3, heads, head_dim) order on the last axis).

    The softmax runs in float32; the weights are then cast to qkv's dtype.
    """
    shape = tf.shape(qkv)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    split = tf.transpose(tf.reshape(qkv, [shape[0], shape[1], 3, num_heads, head_dim]),
                         [2, 0, 3, 1, 4])  # [3, B, heads, T, head_dim]
    query, key, value = split[0], split[1], split[2]
    logits = tf.einsum("bhqd,bhkd->bhqk", query, key) * tf.cast(head_dim**-0.5, qkv.dtype)
    weights = tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), qkv.dtype)
    return query, key, value, weights


def attend(weights, value):
    """Attention-weighted values [B, heads, T, head_dim] -> [B, T, D] (heads concatenated)."""
    mixed = tf.einsum("bhqk,bhkd->bqhd", weights, value)
    shape = tf.shape(mixed)
    return tf.reshape(mixed, [shape[0], shape[1], mixed.shape[2] * mixed.shape[3]])


def attention_projection(qkv, kernel, bias, num_heads: int):
    """`attend(*attention_weights(qkv)) @ kernel + bias` (see `attention_weights`); keeps qkv and
    the attention weights only (the weighted values, the output projection's input, are
    recomputed)."""
    dim = kernel.shape[0]
    head_dim = dim // num_heads
    scale = head_dim**-0.5

    @tf.custom_gradient
    def forward(qkv, kernel, bias):
        shape = tf.shape(qkv)
        batch, tokens = shape[0], shape[1]
        query, key, value, weights = attention_weights(qkv, num_heads)

        outputs = _like_rows(tf.matmul(_rows(attend(weights, value)), kernel) + bias, qkv)

        def gradient(output_gradient):
            output_gradient = _rows(output_gradient)
            mixed = _rows(attend(_after(weights, output_gradient), value))
            mixed_gradient = tf.matmul(output_gradient, kernel, transpose_b=True)
            mixed_gradient = tf.transpose(
                tf.reshape(mixed_gradient, [batch, tokens, num_heads, head_dim]), [0, 2, 1, 3])
            weights_gradient = tf.einsum("bhqd,bhkd->bhqk", mixed_gradient, value)
            value_gradient = tf.einsum("bhqk,bhqd->bhkd", weights, mixed_gradient)
            weights32 = tf.cast(weights, tf.float32)
            weights_gradient = tf.cast(weights_gradient, tf.float32)
            logits_gradient = weights32 * (
                weights_gradient - tf.reduce_sum(weights_gradient * weights32, -1, keepdims=True))
            logits_gradient = tf.cast(logits_gradient, qkv.dtype) * tf.cast(scale, qkv.dtype)
            query_gradient = tf.einsum("bhqk,bhkd->bhqd", logits_gradient, key)
            key_gradient = tf.einsum("bhqk,bhqd->bhkd", logits_gradient, query)
            qkv_gradient = tf.reshape(
                tf.transpose(tf.stack([query_gradient, key_gradient, value_gradient]),
                             [1, 3, 0, 2, 4]), shape)
            return (qkv_gradient, tf.matmul(mixed, output_gradient, transpose_a=True),
                    tf.reduce_sum(output_gradient, axis=0))

        return outputs, gradient

    return forward(qkv, kernel, bias)
