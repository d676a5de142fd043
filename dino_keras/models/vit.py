"""Vision Transformer backbone with the reference's layout (pre-norm blocks, CLS token).

Token order, parameter shapes and initialisation follow the reference so that its checkpoints
convert one-to-one (`dino_keras.convert`). Images are NHWC.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from dino_keras.models.initializers import (
    dense_initializers,
    layer_seed,
    resolve_seed,
    torch_default_uniform,
    trunc_normal,
)
from dino_keras.models.lean_gradients import (
    attend,
    attention_projection,
    attention_weights,
    layer_norm_dense,
    layer_norm_gelu_mlp,
)
from dino_keras.models.position_embedding import (
    interpolate_position_embedding_tf,
    position_grid_resize_matrices,
)

LAYER_NORM_EPSILON = 1e-6


def dense_tensors(layer: keras.layers.Dense, dtype):
    """A Dense layer's (kernel, bias) as tensors of `dtype`, for `lean_gradients` (a zero bias
    for a layer without one, e.g. qkv with `qkv_bias=False`)."""
    bias = layer.bias if layer.use_bias else ops.zeros((layer.units,))
    return ops.cast(layer.kernel, dtype), ops.cast(bias, dtype)


def layer_norm_tensors(layer: keras.layers.LayerNormalization):
    """A LayerNormalization's (gamma, beta) as float32 tensors (LayerNorm computes in float32)."""
    return ops.cast(layer.gamma, "float32"), ops.cast(layer.beta, "float32")


@keras.saving.register_keras_serializable("dino_keras")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(
            keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        )
        return x / keep * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable("dino_keras")
class Attention(keras.layers.Layer):
    """Multi-head self-attention with a fused qkv projection; can return its weights.

    `seed` seeds the initialisation (None: drawn from NumPy's global generator).
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, seed: int | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias
        self.seed = seed
        seed = resolve_seed(seed)
        self.qkv = keras.layers.Dense(
            3 * dim, use_bias=qkv_bias, name="qkv", **dense_initializers(seed, "qkv")
        )
        self.proj = keras.layers.Dense(dim, name="proj", **dense_initializers(seed, "proj"))

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(tuple(input_shape[:-1]) + (self.dim,))

    def call(self, x, return_attention=False):
        return self.attend(self.qkv(x), return_attention=return_attention)

    def attend(self, qkv, return_attention=False):
        """Attention and output projection from the qkv projection [B, T, 3 * dim]; trained
        through `lean_gradients.attention_projection` (same maths, fewer activations kept)."""
        if not return_attention:
            return attention_projection(
                qkv, *dense_tensors(self.proj, self.proj.compute_dtype), self.num_heads
            )
        _, _, value, attn = attention_weights(qkv, self.num_heads)
        return self.proj(attend(attn, value)), attn

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "qkv_bias": self.qkv_bias,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable("dino_keras")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    `seed` seeds the initialisation and the drop-path masks (None: drawn from NumPy's global
    generator).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.seed = seed
        hidden = int(dim * mlp_ratio)
        seed = resolve_seed(seed)
        self.norm1 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm1")
        self.attn = Attention(dim, num_heads, qkv_bias, seed=layer_seed(seed, "attn"), name="attn")
        self.drop_path = DropPath(
            drop_path_rate, seed=layer_seed(seed, "drop_path"), name="drop_path"
        )
        self.norm2 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm2")
        self.fc1 = keras.layers.Dense(hidden, name="fc1", **dense_initializers(seed, "fc1"))
        self.fc2 = keras.layers.Dense(dim, name="fc2", **dense_initializers(seed, "fc2"))

    def build(self, input_shape):
        for layer in (self.norm1, self.attn, self.norm2, self.fc1):
            layer.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (int(self.dim * self.mlp_ratio),))

    def call(self, x, training=False, return_attention=False):
        # The sub-layers through `lean_gradients` (same maths as norm1 -> attn and
        # norm2 -> fc1 -> gelu -> fc2, fewer activations kept for the backward pass).
        compute_dtype = self.fc1.compute_dtype
        qkv = layer_norm_dense(
            x,
            *layer_norm_tensors(self.norm1),
            *dense_tensors(self.attn.qkv, compute_dtype),
            epsilon=self.norm1.epsilon,
        )
        y = self.attn.attend(qkv, return_attention=return_attention)
        if return_attention:
            y, attn = y
        x = x + self.drop_path(y, training=training)
        y = layer_norm_gelu_mlp(
            x,
            *layer_norm_tensors(self.norm2),
            *dense_tensors(self.fc1, compute_dtype),
            *dense_tensors(self.fc2, compute_dtype),
            epsilon=self.norm2.epsilon,
        )
        x = x + self.drop_path(y, training=training)
        return (x, attn) if return_attention else x

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "drop_path_rate": self.drop_path_rate,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable("dino_keras")
class VisionTransformer(keras.Model):
    """ViT backbone. `call` returns the CLS token after the final LayerNorm: the DINO feature.

    Args:
        image_size: side of the square training images; sets the native position-embedding grid
            (image_size // patch_size)^2. Other sizes, square or not, interpolate it.
        patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the architecture.
        drop_path_rate: stochastic-depth rate of the last block, increasing linearly from 0.
        seed: seed of the initialisation and the drop-path masks (None: drawn from NumPy's
            global generator). Every layer draws from its own seed derived from it.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.seed = seed
        self.num_features = embed_dim
        self.num_patches = (image_size // patch_size) ** 2
        self._init_seed = resolve_seed(seed)
        # Patch embedding as a strided convolution. The reference does not re-initialise it, so
        # it keeps torch's Conv2d default, uniform(+-1/sqrt(fan_in)) for the kernel (this
        # VarianceScaling) and for the bias (set in `build`, once fan_in is known).
        self.patch_embed = keras.layers.Conv2D(
            embed_dim,
            patch_size,
            strides=patch_size,
            padding="valid",
            name="patch_embed",
            kernel_initializer=keras.initializers.VarianceScaling(
                1 / 3, "fan_in", "uniform", seed=layer_seed(self._init_seed, "patch_embed")
            ),
        )
        rates = np.linspace(0.0, drop_path_rate, depth)
        self.blocks = [
            TransformerBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                float(rate),
                seed=layer_seed(self._init_seed, f"blocks_{i}"),
                name=f"blocks_{i}",
            )
            for i, rate in enumerate(rates)
        ]
        self.norm = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm")
        self._resize_cache: dict = {}

    def build(self, input_shape):
        seed = self._init_seed
        self.cls_token = self.add_weight(
            shape=(1, 1, self.embed_dim),
            initializer=trunc_normal(layer_seed(seed, "cls_token")),
            name="cls_token",
        )
        self.pos_embed = self.add_weight(
            shape=(1, self.num_patches + 1, self.embed_dim),
            initializer=trunc_normal(layer_seed(seed, "pos_embed")),
            name="pos_embed",
        )
        fan_in = self.patch_size * self.patch_size * input_shape[-1]
        self.patch_embed.bias_initializer = torch_default_uniform(
            fan_in, layer_seed(seed, "patch_embed/bias")
        )
        self.patch_embed.build((None, None, None, input_shape[-1]))
        token_shape = (None, None, self.embed_dim)
        for block in self.blocks:
            block.build(token_shape)
        self.norm.build(token_shape)
        self.built = True

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, grid_height: int, grid_width: int):
        """Position embedding for an h0 x w0 patch grid (the reference's bicubic formula)."""
        if grid_height * grid_width == self.num_patches and grid_height == grid_width:
            return self.pos_embed
        key = (grid_height, grid_width)
        if key not in self._resize_cache:
            self._resize_cache[key] = position_grid_resize_matrices(
                self.num_patches, grid_height, grid_width
            )
        rows, cols = self._resize_cache[key]
        side = int(math.sqrt(self.num_patches))
        grid = ops.reshape(self.pos_embed[:, 1:], (side, side, self.embed_dim))
        grid = ops.einsum(
            "oh,hwd,pw->opd", ops.convert_to_tensor(rows), grid, ops.convert_to_tensor(cols)
        )
        patch_pos = ops.reshape(grid, (1, grid_height * grid_width, self.embed_dim))
        return ops.concatenate([self.pos_embed[:, :1], patch_pos], axis=1)

    def prepare_tokens(self, images):
        """Patch tokens with the CLS token prepended and position embeddings added.

        Images of a static size (training, evaluation) resize the position embedding with
        matrices computed once at trace time; a graph whose height or width is only known at
        run time (the serving signatures) computes the same matrices with TensorFlow ops.
        """
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            return self._prepare_tokens_dynamic(images)
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(images)
        batch = ops.shape(x)[0]
        x = ops.reshape(x, (batch, grid_height * grid_width, self.embed_dim))
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, self.embed_dim))
        x = ops.concatenate([cls, x], axis=1)
        return x + ops.cast(self.interpolate_pos_encoding(grid_height, grid_width), x.dtype)

    def _prepare_tokens_dynamic(self, images):
        x = self.patch_embed(images)
        shape = ops.shape(x)
        batch, grid_height, grid_width = shape[0], shape[1], shape[2]
        x = ops.reshape(x, (batch, grid_height * grid_width, self.embed_dim))
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, self.embed_dim))
        x = ops.concatenate([cls, x], axis=1)
        pos_embed = interpolate_position_embedding_tf(self.pos_embed, grid_height, grid_width)
        return x + ops.cast(pos_embed, x.dtype)

    # ------------------------------------------------------------------ outputs
    def forward_features(self, images, training=False):
        """All output tokens [B, 1 + N, D] after the final norm."""
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x, training=training)
        return self.norm(x)

    def call(self, images, training=False):
        return self.forward_features(images, training=training)[:, 0]

    def get_last_selfattention(self, images):
        """Self-attention weights of the last block [B, heads, 1 + N, 1 + N]."""
        x = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        _, attn = self.blocks[-1](x, return_attention=True)
        return attn

    def get_intermediate_layers(self, images, n: int = 1):
        """Normed outputs [B, 1 + N, D] of the last `n` blocks, oldest first."""
        x = self.prepare_tokens(images)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "drop_path_rate": self.drop_path_rate,
            "seed": self.seed,
        }
