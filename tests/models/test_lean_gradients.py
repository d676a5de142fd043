"""The lean sub-layer gradients against automatic differentiation of the plain layers."""

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.models import lean_gradients
from dino_keras.models.vit import LAYER_NORM_EPSILON, TransformerBlock

DIM, HIDDEN = 8, 32


def _plain_layer_norm(x, gamma, beta):
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) / tf.sqrt(variance + LAYER_NORM_EPSILON) * gamma + beta


def _plain_layer_norm_dense(x, gamma, beta, kernel, bias):
    return _plain_layer_norm(x, gamma, beta) @ kernel + bias


def _plain_layer_norm_gelu_mlp(x, gamma, beta, kernel1, bias1, kernel2, bias2):
    hidden = tf.nn.gelu(_plain_layer_norm(x, gamma, beta) @ kernel1 + bias1, approximate=False)
    return hidden @ kernel2 + bias2


def _plain_attention_projection(qkv, kernel, bias, num_heads=2):
    batch, tokens = qkv.shape[0], qkv.shape[1]
    q, k, v = tf.unstack(tf.reshape(qkv, [batch, tokens, 3, num_heads, -1]), axis=2)
    logits = tf.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mixed = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(logits, axis=-1), v)
    return tf.reshape(mixed, [batch, tokens, -1]) @ kernel + bias


def _lean_attention_projection(qkv, kernel, bias):
    return lean_gradients.attention_projection(qkv, kernel, bias, num_heads=2)


def _lean_layer_norm_dense(*args):
    return lean_gradients.layer_norm_dense(*args, epsilon=LAYER_NORM_EPSILON)


def _lean_layer_norm_gelu_mlp(*args):
    return lean_gradients.layer_norm_gelu_mlp(*args, epsilon=LAYER_NORM_EPSILON)


def _arguments(seed, shapes):
    rng = np.random.default_rng(seed)
    # Non-trivial gamma/beta and inputs with a per-token offset, so every term matters.
    return [tf.constant(rng.normal(0.5, 1.0, shape).astype(np.float32)) for shape in shapes]


CASES = {
    "layer_norm_dense": (
        _lean_layer_norm_dense, _plain_layer_norm_dense,
        [(2, 5, DIM), (DIM,), (DIM,), (DIM, 3 * DIM), (3 * DIM,)]),
    "layer_norm_gelu_mlp": (
        _lean_layer_norm_gelu_mlp, _plain_layer_norm_gelu_mlp,
        [(2, 5, DIM), (DIM,), (DIM,), (DIM, HIDDEN), (HIDDEN,), (HIDDEN, DIM), (DIM,)]),
    "attention_projection": (
        _lean_attention_projection, _plain_attention_projection,
        [(2, 5, 3 * DIM), (DIM, DIM), (DIM,)]),
}


def _value_and_gradients(function, arguments, output_weights):
    with tf.GradientTape() as tape:
        tape.watch(arguments)
        outputs = function(*arguments)
        # A weighted sum, so that every output element gets its own gradient.
        loss = tf.reduce_sum(outputs * output_weights)
    return outputs, tape.gradient(loss, arguments)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_values_and_gradients_match_automatic_differentiation(case, mode):
    lean, plain, shapes = CASES[case]
    arguments = _arguments(0, shapes)
    output_weights = _arguments(1, [plain(*arguments).shape])[0]
    run = _value_and_gradients
    if mode == "xla":
        run = tf.function(_value_and_gradients, jit_compile=True)
    lean_outputs, lean_gradients_ = run(lean, arguments, output_weights)
    plain_outputs, plain_gradients = _value_and_gradients(plain, arguments, output_weights)
    np.testing.assert_allclose(lean_outputs, plain_outputs, rtol=1e-5, atol=1e-5)
    assert len(lean_gradients_) == len(shapes)
    for index, (got, want) in enumerate(zip(lean_gradients_, plain_gradients, strict=True)):
        assert got.shape == want.shape, index
        scale = float(tf.reduce_max(tf.abs(want)))
        assert scale > 0, index
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f"arg {index}")


def test_bfloat16_activations_keep_float32_layer_norm_and_input_dtypes():
    x, gamma, beta, kernel, bias = _arguments(0, CASES["layer_norm_dense"][2])
    low = [tf.cast(x, tf.bfloat16), gamma, beta, tf.cast(kernel, tf.bfloat16),
           tf.cast(bias, tf.bfloat16)]
    outputs, gradients = _value_and_gradients(
        _lean_layer_norm_dense, low, tf.ones([2, 5, 3 * DIM], tf.bfloat16))
    assert outputs.dtype == tf.bfloat16
    assert [g.dtype for g in gradients] == [a.dtype for a in low]
    reference = _plain_layer_norm_dense(x, gamma, beta, kernel, bias)
    np.testing.assert_allclose(tf.cast(outputs, tf.float32), reference, rtol=0.05, atol=0.05)


def test_recomputation_is_not_merged_with_the_forward_pass():
    # The dependency on the output gradient must survive: a NaN gradient makes the
    # recomputed activations NaN (XLA would otherwise be free to reuse the forward values).
    x, gamma, beta, kernel, bias = _arguments(0, CASES["layer_norm_dense"][2])

    @tf.function(jit_compile=True)
    def kernel_gradient(output_gradient):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            outputs = _lean_layer_norm_dense(x, gamma, beta, kernel, bias)
        return tape.gradient(outputs, kernel, output_gradients=output_gradient)

    finite = kernel_gradient(tf.ones([2, 5, 3 * DIM]))
    assert np.isfinite(finite.numpy()).all()
    poisoned = tf.tensor_scatter_nd_update(tf.ones([2, 5, 3 * DIM]), [[0, 0, 0]], [np.nan])
    assert np.isnan(kernel_gradient(poisoned).numpy()).all()


def _plain_attention(block, x):
    # The attention-returning path: plain ops, differentiated automatically.
    return block.attn.attend(block.attn.qkv(x), return_attention=True)[0]


def test_transformer_block_equals_its_plain_layers():
    block = TransformerBlock(DIM, num_heads=2)
    x = _arguments(3, [(2, 5, DIM)])[0]
    block(x)
    for weight in block.weights:  # away from the initial ones and zeros
        weight.assign(weight + 0.1 * _arguments(4, [weight.shape])[0])
    y = x + _plain_attention(block, block.norm1(x))
    hidden = tf.nn.gelu(block.fc1(block.norm2(y)), approximate=False)
    np.testing.assert_allclose(block(x), y + block.fc2(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_transformer_block_gradients_equal_those_of_its_plain_layers(mode):
    block = TransformerBlock(DIM, num_heads=2)
    x = _arguments(5, [(3, 7, DIM)])[0]
    block(x)
    for weight in block.weights:
        weight.assign(weight + 0.1 * _arguments(6, [weight.shape])[0])
    output_weights = _arguments(7, [(3, 7, DIM)])[0]

    def plain(x):
        y = x + _plain_attention(block, block.norm1(x))
        return y + block.fc2(tf.nn.gelu(block.fc1(block.norm2(y)), approximate=False))

    def gradients(function, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(function(x) * output_weights)
        return tape.gradient(loss, [x] + block.trainable_weights)

    lean = gradients if mode == "eager" else tf.function(gradients, jit_compile=True)
    got, want = lean(block, x), gradients(plain, x)
    assert len(got) == 1 + len(block.trainable_weights) == 13
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        # Element-wise relative to each tensor's largest gradient: float32 rounding only.
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(tf.reduce_max(tf.abs(w))),
                                   err_msg=f"gradient {index}")
