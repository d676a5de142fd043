"""Every registered dino_keras layer through the shared layer test (tests/helpers.py)."""

import inspect

import keras
import pytest

import dino_keras.models  # noqa: F401  (registers the layers)
from dino_keras.models.batch_norm import TorchBatchNormalization
from dino_keras.models.head import DinoHead, WeightNormDense
from dino_keras.models.vit import Attention, DropPath, TransformerBlock, VisionTransformer
from tests.helpers import run_layer_test

LAYER_CASES = {
    "DropPath": (DropPath, dict(rate=0.25, seed=3), (2, 5, 8)),
    "Attention": (Attention, dict(dim=16, num_heads=2, qkv_bias=True, seed=1), (2, 5, 16)),
    "TransformerBlock": (
        TransformerBlock,
        dict(dim=16, num_heads=2, mlp_ratio=2.0, qkv_bias=False, drop_path_rate=0.1, seed=2),
        (2, 5, 16),
    ),
    "WeightNormDense": (WeightNormDense, dict(units=6, trainable_gain=True, seed=4), (3, 8)),
    "DinoHead": (
        DinoHead,
        dict(out_dim=12, use_bn=True, norm_last_layer=False, nlayers=3, hidden_dim=16,
             bottleneck_dim=8, synchronized_bn=False, seed=5),
        (4, 10),
    ),
    "TorchBatchNormalization": (TorchBatchNormalization, dict(momentum=0.1, epsilon=1e-5),
                                (4, 6)),
    "VisionTransformer": (
        VisionTransformer,
        dict(image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
             qkv_bias=True, drop_path_rate=0.1, seed=6),
        (2, 16, 16, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer(name, tmp_path):
    layer_class, init_kwargs, input_shape = LAYER_CASES[name]
    run_layer_test(layer_class, init_kwargs, input_shape, tmp_path)


def test_every_registered_dino_keras_layer_has_a_case():
    registered = {
        obj.__name__
        for key, obj in keras.saving.get_custom_objects().items()
        if key.startswith("dino_keras>") and inspect.isclass(obj)
        and issubclass(obj, keras.layers.Layer) and obj.__module__.startswith("dino_keras.models")
    }
    assert registered, "no dino_keras layer is registered"
    assert registered <= set(LAYER_CASES), sorted(registered - set(LAYER_CASES))
