"""The DINO projection head: MLP, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import keras
from keras import ops

from dino_keras.models.batch_norm import TorchBatchNormalization
from dino_keras.models.initializers import (
    dense_initializers,
    layer_seed,
    resolve_seed,
    torch_default_uniform,
)


@keras.saving.register_keras_serializable("dino_keras")
class WeightNormDense(keras.layers.Layer):
    """Bias-free dense layer with weight normalisation: kernel = gain * v / ||v|| per column.

    `v` is [in_dim, out_dim] and `gain` [1, out_dim] (the reference stores them as `weight_v`
    [out_dim, in_dim] and `weight_g` [out_dim, 1]). The gain starts at 1 and is not trained
    when `trainable_gain` is False (the reference's `norm_last_layer`).
    """

    def __init__(self, units: int, trainable_gain: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.trainable_gain = trainable_gain
        self.seed = seed
        self._init_seed = resolve_seed(seed)

    def build(self, input_shape):
        in_dim = input_shape[-1]
        # The reference creates this layer after its truncated-normal init pass, so it keeps
        # PyTorch's default Linear init: uniform(+-1/sqrt(in_dim)).
        self.kernel_v = self.add_weight(
            shape=(in_dim, self.units),
            initializer=torch_default_uniform(in_dim, self._init_seed),
            name="kernel_v",
        )
        self.gain = self.add_weight(
            shape=(1, self.units), initializer="ones", name="gain", trainable=self.trainable_gain
        )

    def call(self, x):
        v = ops.cast(self.kernel_v, "float32")
        kernel = (
            ops.cast(self.gain, "float32") * v / ops.sqrt(ops.sum(v * v, axis=0, keepdims=True))
        )
        return ops.matmul(x, ops.cast(kernel, x.dtype))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "trainable_gain": self.trainable_gain,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable("dino_keras")
class DinoHead(keras.layers.Layer):
    """Linear-GELU x (nlayers - 1), Linear to the bottleneck, L2-normalise, prototypes."""

    def __init__(
        self,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        synchronized_bn: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.out_dim = out_dim
        self.use_bn = use_bn
        self.norm_last_layer = norm_last_layer
        self.nlayers = max(nlayers, 1)
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.synchronized_bn = synchronized_bn
        self.seed = seed
        seed = resolve_seed(seed)
        self.mlp_layers = []
        for _ in range(self.nlayers - 1):
            name = f"mlp_{len(self.mlp_layers)}"
            self.mlp_layers.append(
                keras.layers.Dense(hidden_dim, name=name, **dense_initializers(seed, name))
            )
            if use_bn:
                self.mlp_layers.append(
                    TorchBatchNormalization(
                        synchronized=synchronized_bn, name=f"mlp_{len(self.mlp_layers)}"
                    )
                )
            # Keras' "gelu" is the exact (erf) form, as torch.nn.GELU.
            self.mlp_layers.append(
                keras.layers.Activation("gelu", name=f"mlp_{len(self.mlp_layers)}")
            )
        name = f"mlp_{len(self.mlp_layers)}"
        self.mlp_layers.append(
            keras.layers.Dense(bottleneck_dim, name=name, **dense_initializers(seed, name))
        )
        self.last_layer = WeightNormDense(
            out_dim,
            trainable_gain=not norm_last_layer,
            seed=layer_seed(seed, "last_layer"),
            name="last_layer",
        )

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.mlp_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.last_layer.build(shape)

    def call(self, x, training=False):
        for layer in self.mlp_layers:
            x = (
                layer(x, training=training)
                if isinstance(layer, keras.layers.BatchNormalization)
                else layer(x)
            )
        # torch.nn.functional.normalize: x / max(||x||, 1e-12).
        x32 = ops.cast(x, "float32")
        norm = ops.sqrt(ops.sum(x32 * x32, axis=-1, keepdims=True))
        x = ops.cast(x32 / ops.maximum(norm, 1e-12), x.dtype)
        return self.last_layer(x)

    def get_config(self):
        return {
            **super().get_config(),
            "out_dim": self.out_dim,
            "use_bn": self.use_bn,
            "norm_last_layer": self.norm_last_layer,
            "nlayers": self.nlayers,
            "hidden_dim": self.hidden_dim,
            "bottleneck_dim": self.bottleneck_dim,
            "synchronized_bn": self.synchronized_bn,
            "seed": self.seed,
        }
