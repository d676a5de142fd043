"""ViT parity: timm ViTs with random weights, converted, against the reference's forward in
torch (timm blocks + the reference's bicubic position-embedding resize written in
benchmarks/reference_torch.py): CLS features after the final norm and the last block's attention."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch

from benchmarks import reference_torch as ref
from dino_keras.checkpointing import TrainingCheckpoint
from dino_keras.config import TrainConfig
from dino_keras.convert import convert, load_backbone_state_dict
from dino_keras.models.vit import VisionTransformer
from dino_keras.run_loading import load_backbone
from dino_keras.training import build_trainer

TOLERANCE = 1e-5
# (height, width): native, a local-crop size, and non-square both ways.
SIZES = [(224, 224), (96, 96), (224, 160), (160, 224)]


def timm_vit(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return ref.randomize_(model, seed)


def compare(torch_vit, keras_vit, report_diff, label: str, sizes=SIZES, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    for height, width in sizes:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            features, attention = ref.vit_forward(torch_vit, images, with_attention=True)
        nhwc = images.permute(0, 2, 3, 1).numpy()
        keras_features = np.asarray(keras_vit(nhwc))
        keras_attention = np.asarray(keras_vit.get_last_selfattention(nhwc))
        assert keras_attention.shape == tuple(attention.shape)
        feature_diff = report_diff(
            f"{label} {height}x{width} CLS feature max |diff|",
            ref.max_abs_diff(keras_features, features),
        )
        cls_attention_diff = report_diff(
            f"{label} {height}x{width} last-block CLS->patch attention max |diff|",
            ref.max_abs_diff(keras_attention[:, :, 0, 1:], attention[:, :, 0, 1:]),
        )
        full_attention_diff = ref.max_abs_diff(keras_attention, attention)
        assert feature_diff <= TOLERANCE, (height, width)
        assert cls_attention_diff <= TOLERANCE, (height, width)
        assert full_attention_diff <= TOLERANCE, (height, width)


def test_reference_forward_matches_timm_at_native_size():
    """The torch-side helper itself: at 224 px it is timm's own forward."""
    vit = timm_vit("vit_small_patch16_224", seed=0, num_classes=0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(
            ref.vit_forward(vit, images), vit.forward_features(images)[:, 0], atol=1e-6
        )


@pytest.mark.slow
def test_vit_small_16_through_a_converted_run_directory(tmp_path, report_diff):
    """vit_small_patch16_224 state dict -> convert() -> run directory -> TrainingCheckpoint
    restore in a fresh trainer -> teacher and student backbones equal the torch forward."""
    vit = timm_vit("vit_small_patch16_224", seed=0)
    report = convert(vit.state_dict(), str(tmp_path / "run"), overrides={"out_dim": 256})
    assert sorted(report.unused) == ["head.bias", "head.weight"]  # timm's classifier
    with open(tmp_path / "run" / "config.json") as f:
        config = TrainConfig.from_dict(json.load(f))
    assert (config.arch, config.patch_size, config.global_crops_size) == ("vit_small", 16, 224)
    trainer = build_trainer(config, 1, config.batch_size_per_gpu)
    checkpoint = TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    )
    assert checkpoint.restore().epoch == 0
    assert os.path.basename(checkpoint.latest_path) == "latest-0"
    compare(vit, trainer.teacher.backbone, report_diff, "ViT-S/16 teacher")
    # Evaluation and export load runs through run_loading: the converted run works there too.
    loaded = load_backbone(str(tmp_path / "run"), which="teacher")
    compare(vit, loaded.backbone, report_diff, "ViT-S/16 via run_loading", sizes=SIZES[:1])
    # The student backbone holds the same weights.
    for s, t in zip(
        trainer.student.backbone.weights, trainer.teacher.backbone.weights, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(t))


@pytest.mark.slow
def test_vit_base_8_layout(report_diff):
    """vit_base_patch8_224's layout (width 768, 12 heads, patch 8, 28x28 grid), depth cut to
    2 blocks to keep the test fast."""
    vit = timm_vit("vit_base_patch8_224", seed=2, depth=2, num_classes=0)
    keras_vit = VisionTransformer(
        image_size=224, patch_size=8, embed_dim=768, depth=2, num_heads=12
    )
    keras_vit.build((None, None, None, 3))
    result = load_backbone_state_dict(keras_vit, vit.state_dict())
    assert not result.unused
    assert len(result.filled) == len(keras_vit.weights)
    compare(vit, keras_vit, report_diff, "ViT-B/8 (depth 2)")
