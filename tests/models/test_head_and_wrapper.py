"""DINO head (weight-normalised prototypes), multi-crop wrapper and the ResNet-50 backbone."""

import numpy as np
import pytest

from dino_keras.models.factory import build_student_and_teacher
from dino_keras.models.head import DinoHead
from dino_keras.models.multicrop_wrapper import MultiCropWrapper
from dino_keras.models.resnet import resnet50
from dino_keras.models.vit import VisionTransformer
from tests.helpers import tiny_config


def gelu(x):
    import math

    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def test_head_matches_numpy_and_gain_is_frozen_with_norm_last_layer():
    head = DinoHead(out_dim=16, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    out = head(x).numpy()
    w = [layer.get_weights() for layer in head.mlp_layers if layer.get_weights()]
    h = gelu(x @ w[0][0] + w[0][1])
    h = gelu(h @ w[1][0] + w[1][1])
    h = h @ w[2][0] + w[2][1]
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v = head.last_layer.kernel_v.numpy()
    np.testing.assert_allclose(
        out, h @ (v / np.linalg.norm(v, axis=0, keepdims=True)), rtol=1e-4, atol=1e-6
    )
    assert not head.last_layer.gain.trainable
    np.testing.assert_array_equal(head.last_layer.gain.numpy(), 1.0)
    assert (
        DinoHead(out_dim=4, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4).get_config()[
            "norm_last_layer"
        ]
        is False
    )


def test_head_with_batchnorm_has_two_batchnorm_layers():
    head = DinoHead(out_dim=16, use_bn=True, hidden_dim=24, bottleneck_dim=8)
    head(np.zeros((4, 12), np.float32))
    assert (
        sum(
            "batch_normalization" in type(layer).__name__.lower()
            or "BatchNormalization" in type(layer).__name__
            for layer in head.mlp_layers
        )
        == 2
    )


def test_multicrop_wrapper_one_backbone_call_per_resolution():
    calls = []
    backbone = VisionTransformer(image_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2)

    original = backbone.call

    def counting_call(images, training=False):
        calls.append(tuple(images.shape))
        return original(images, training=training)

    backbone.call = counting_call
    wrapper = MultiCropWrapper(backbone, DinoHead(out_dim=8, hidden_dim=16, bottleneck_dim=8))
    crops = [np.zeros((3, 28, 28, 3), np.float32)] * 2 + [np.zeros((3, 12, 12, 3), np.float32)] * 4
    wrapper(crops)  # builds
    calls.clear()
    out = wrapper(crops)
    assert out.shape == (18, 8)
    assert calls == [(6, 28, 28, 3), (12, 12, 12, 3)]


def test_student_and_teacher_identical_at_start_and_teacher_frozen():
    student, teacher = build_student_and_teacher(tiny_config())
    crops = [np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)]
    np.testing.assert_array_equal(student(crops).numpy(), teacher(crops).numpy())
    assert teacher.trainable_variables == []
    assert student.backbone.drop_path_rate == 0.0 or teacher.backbone.drop_path_rate == 0.0


@pytest.mark.slow
def test_resnet50_torchvision_layout():
    model = resnet50()
    assert model(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 2048)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == 23_508_032  # torchvision resnet50 without fc: 25,557,032 - 2,049,000
