"""ResNet-50 backbone in torchvision's layout (the reference's convnet).

`keras.applications.ResNet50` is ResNet v1: it strides the first 1x1 convolution of each stage
and gives every convolution a bias, and Keras' "same" padding pads stride-2 convolutions
asymmetrically. The reference (torchvision) strides the 3x3 convolution (v1.5), has no conv
biases and pads symmetrically, so its checkpoints cannot be loaded into the Keras application.
This module builds torchvision's network with Keras layers instead; the feature is the
2048-d global average pool.
"""

from __future__ import annotations

import keras
from keras import layers

from dino_keras.models.batch_norm import TorchBatchNormalization
from dino_keras.models.initializers import kaiming_normal_fan_out, layer_seed, resolve_seed


def _conv(filters, kernel, stride, name, seed):
    return layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="valid",
        use_bias=False,
        kernel_initializer=kaiming_normal_fan_out(layer_seed(seed, name)),
        name=name,
    )


def _bn(name, synchronized):
    return TorchBatchNormalization(synchronized=synchronized, name=name)


def _bottleneck(x, filters, stride, downsample, name, synchronized, seed):
    identity = x
    out = _conv(filters, 1, 1, f"{name}_conv1", seed)(x)
    out = layers.ReLU()(_bn(f"{name}_bn1", synchronized)(out))
    out = layers.ZeroPadding2D(1)(out)
    out = _conv(filters, 3, stride, f"{name}_conv2", seed)(out)
    out = layers.ReLU()(_bn(f"{name}_bn2", synchronized)(out))
    out = _conv(filters * 4, 1, 1, f"{name}_conv3", seed)(out)
    out = _bn(f"{name}_bn3", synchronized)(out)
    if downsample:
        identity = _conv(filters * 4, 1, stride, f"{name}_downsample_0", seed)(x)
        identity = _bn(f"{name}_downsample_1", synchronized)(identity)
    return layers.ReLU()(layers.Add()([out, identity]))


def resnet50(
    synchronized_bn: bool = False, seed: int | None = None, name: str = "resnet50"
) -> keras.Model:
    """torchvision's ResNet-50 without its classifier: images [B, H, W, 3] -> [B, 2048].

    `seed` seeds the convolutions' initialisation, each its own draw (None: drawn from NumPy's
    global generator).
    """
    seed = resolve_seed(seed)
    images = keras.Input((None, None, 3))
    x = layers.ZeroPadding2D(3)(images)
    x = _conv(64, 7, 2, "conv1", seed)(x)
    x = layers.ReLU()(_bn("bn1", synchronized_bn)(x))
    # Zero padding equals torchvision's -inf padding here: the input is >= 0 after the ReLU.
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    for stage, (filters, blocks, stride) in enumerate(
        [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
    ):
        for block in range(blocks):
            x = _bottleneck(
                x,
                filters,
                stride if block == 0 else 1,
                block == 0,
                f"layer{stage}_{block}",
                synchronized_bn,
                seed,
            )
    features = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(images, features, name=name)
    model.num_features = 2048
    return model
