"""ResNet-50 parity: torchvision's resnet50() with random weights and random BatchNorm
statistics (eval mode), converted, against dino_keras' resnet50: pooled 2048-d features."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
import torchvision

from benchmarks import reference_torch as ref
from dino_keras.convert import load_backbone_state_dict
from dino_keras.models.resnet import resnet50

TOLERANCE = 1e-4


@torch.no_grad()
def random_resnet50(seed: int) -> torch.nn.Module:
    """Random conv weights, BN affine parameters and BN running statistics (mean ~ N(0, 0.1),
    variance ~ U(1, 2): wide enough that activations neither explode nor lose precision
    through the 16 blocks), in eval mode, without the classifier."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    ref.randomize_(model, seed)
    generator = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=generator))
            bn.running_var.uniform_(1.0, 2.0, generator=generator)
            bn.num_batches_tracked.fill_(1000)
    return model.eval()


@pytest.mark.slow
def test_resnet50_pooled_features(report_diff):
    torch_model = random_resnet50(seed=3)
    state_dict = torch_model.state_dict()
    keras_model = resnet50()
    result = load_backbone_state_dict(keras_model, state_dict)
    # Every Keras weight is filled; only BatchNorm step counters are left over.
    assert len(result.filled) == len(keras_model.weights)
    assert result.unused and all(k.endswith("num_batches_tracked") for k in result.unused)
    generator = torch.Generator().manual_seed(4)
    # The native size and an odd, non-square one (strided convolutions and the max pool
    # round down there: the padding must be torchvision's).
    for height, width in ((224, 224), (97, 131)):
        images = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = torch_model(images)
        got = np.asarray(keras_model(images.permute(0, 2, 3, 1).numpy(), training=False))
        diff = report_diff(
            f"ResNet-50 {height}x{width} pooled feature max |diff| "
            f"(features up to {float(expected.abs().max()):.2f})",
            ref.max_abs_diff(got, expected),
        )
        assert diff <= TOLERANCE


@pytest.mark.slow
def test_resnet50_same_math_in_float64(report_diff):
    """In float64 the two implementations agree to rounding: any difference in float32 is
    float32 rounding, not a different computation."""
    torch_model = random_resnet50(seed=3).double()
    images = torch.randn(
        2, 3, 224, 224, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    with torch.no_grad():
        expected = torch_model(images)
    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy("float64")
    keras.config.set_floatx("float64")  # the dtype of keras.Input
    try:
        keras_model = resnet50()
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_floatx(floatx)
    load_backbone_state_dict(keras_model, torch_model.state_dict())
    got = np.asarray(keras_model(images.permute(0, 2, 3, 1).numpy(), training=False))
    assert got.dtype == np.float64
    diff = report_diff(
        "ResNet-50 224x224 pooled feature max |diff| in float64", ref.max_abs_diff(got, expected)
    )
    assert diff <= 1e-9
