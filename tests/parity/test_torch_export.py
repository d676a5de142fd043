"""dino_keras.convert.torch_export and scripts/export_torch.py: a run written as the reference's
checkpoint.pth and as a released-style backbone file. Round trip convert -> export -> convert is
exact; the backbone file loads strictly into timm's ViT (and torchvision's ResNet-50) and gives
dino_keras' features."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch

from benchmarks import reference_torch as ref
from dino_keras.convert import ConversionError, backbone_assignments, convert, torch_state_dict
from dino_keras.convert.torch_export import (
    BACKBONE_FILE,
    CHECKPOINT_FILE,
    export_torch_run,
    read_run_state,
)
from dino_keras.run_loading import load_backbone
from tests.helpers import TINY, make_tiny_run, run_script, tiny_values

# The flags given to the converter: configs/tiny.cfg's architecture and crops (the patch size
# and the global crop size come from the checkpoint), at batch 4.
TINY_FLAGS = {
    **tiny_values(
        "arch", "embed_dim", "depth", "num_heads", "local_crops_size", "local_crops_number"
    ),
    "batch_size_per_gpu": 4,
}


def tiny_timm_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=TINY["global_crops_size"],
        patch_size=TINY["patch_size"],
        embed_dim=TINY["embed_dim"],
        depth=TINY["depth"],
        num_heads=TINY["num_heads"],
        num_classes=0,
    )


def reference_network(seed: int) -> torch.nn.Module:
    """The reference's MultiCropWrapper(ViT, DINOHead) with a BatchNorm head and random
    weights, BatchNorm statistics and a trained weight-norm gain."""
    head = ref.DinoHead(
        32, 64, use_bn=True, norm_last_layer=False, hidden_dim=48, bottleneck_dim=16
    )
    network = ref.MultiCropWrapper(tiny_timm_vit(seed), head)
    ref.randomize_(network, seed)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 1.5)
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return network


def all_variables(state) -> dict:
    return {
        variable.path: variable.numpy()
        for network in (state.student, state.teacher)
        for variable in network.weights
    }


def test_round_trip_convert_export_convert_is_exact(tmp_path):
    student, teacher = reference_network(1), reference_network(2)
    original = {
        "student": ref.reference_state_dict(student, "module."),
        "teacher": ref.reference_state_dict(teacher),
        "dino_loss": {"center": torch.randn(1, 64)},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=4, norm_last_layer=False),
    }
    torch.save(original, tmp_path / "original.pth")
    convert(str(tmp_path / "original.pth"), str(tmp_path / "run_a"), overrides=TINY_FLAGS)
    exported = export_torch_run(str(tmp_path / "run_a"), str(tmp_path / "torch"))
    assert exported.epoch == 3

    # Loadable with torch's default weights_only=True, in the reference's layout.
    checkpoint = torch.load(tmp_path / "torch" / CHECKPOINT_FILE, weights_only=True)
    assert set(checkpoint) == {"student", "teacher", "dino_loss", "epoch", "args"}
    assert checkpoint["epoch"] == 3
    assert checkpoint["args"]["arch"] == "vit_tiny" and checkpoint["args"]["out_dim"] == 64
    assert torch.equal(checkpoint["dino_loss"]["center"], original["dino_loss"]["center"])
    # The BatchNorm head makes the reference wrap the teacher in DDP too: `module.` keys.
    expected = {
        "student": original["student"],
        "teacher": {"module." + k: v for k, v in original["teacher"].items()},
    }
    for name in ("student", "teacher"):
        kept = {k: v for k, v in expected[name].items() if "num_batches_tracked" not in k}
        assert set(checkpoint[name]) == set(kept), name
        for key, value in kept.items():
            assert torch.equal(checkpoint[name][key], value), key

    # The reference's resume loads the student into its MultiCropWrapper (strict).
    resumed = reference_network(5)
    resumed.load_state_dict({k[len("module.") :]: v for k, v in checkpoint["student"].items()})
    for key, value in ref.reference_state_dict(resumed).items():
        if "num_batches_tracked" not in key:
            assert torch.equal(value, original["student"]["module." + key]), key

    convert(
        str(tmp_path / "torch" / CHECKPOINT_FILE), str(tmp_path / "run_c"), overrides=TINY_FLAGS
    )
    first, second = read_run_state(str(tmp_path / "run_a")), read_run_state(str(tmp_path / "run_c"))
    first_variables, second_variables = all_variables(first), all_variables(second)
    assert set(first_variables) == set(second_variables)
    for path, value in first_variables.items():
        np.testing.assert_array_equal(second_variables[path], value, err_msg=path)
    np.testing.assert_array_equal(second.center, first.center)
    assert second.epoch == first.epoch == 3


def test_backbone_file_loads_into_timm_with_the_same_features(tmp_path, report_diff):
    make_tiny_run(tmp_path / "run")
    args = [f"--checkpoint={tmp_path / 'run'}", f"--output_dir={tmp_path / 'torch'}"]
    exported = run_script("export_torch", *args)
    assert exported.which == "teacher"
    with pytest.raises(ConversionError, match="already exist.*--overwrite"):
        run_script("export_torch", *args)

    state = torch.load(tmp_path / "torch" / BACKBONE_FILE, weights_only=True)
    timm_vit = tiny_timm_vit(seed=9).eval()
    timm_vit.load_state_dict(state)  # strict: every key and shape of timm's ViT, nothing else
    images = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        torch_features = timm_vit(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    backbone = load_backbone(str(tmp_path / "run")).backbone
    keras_features = backbone(images).numpy()
    worst = report_diff(
        "exported backbone file in timm vs dino_keras features",
        float(np.max(np.abs(torch_features - keras_features))),
    )
    assert worst < 1e-5
    assert np.max(np.abs(keras_features)) > 0.1  # features, not zeros
    # The teacher, not the student (make_tiny_run moves the teacher away from the student).
    student = torch_state_dict(
        backbone_assignments(load_backbone(str(tmp_path / "run"), "student").backbone)
    )
    assert not np.array_equal(student["norm.weight"], state["norm.weight"].numpy())


@pytest.mark.slow
def test_resnet50_backbone_maps_back_exactly():
    """torchvision ResNet-50 -> dino_keras -> the inverse mapping: the same tensors, and a
    strict load into torchvision's network (its num_batches_tracked counters are filled in)."""
    import torchvision

    from dino_keras.convert import load_backbone_state_dict
    from dino_keras.models.resnet import resnet50

    torch.manual_seed(0)
    source = torchvision.models.resnet50()
    source.fc = torch.nn.Identity()
    ref.randomize_(source, 0)
    original = source.state_dict()
    backbone = resnet50()
    load_backbone_state_dict(backbone, original)
    exported = torch_state_dict(backbone_assignments(backbone))
    kept = {k: v for k, v in original.items() if "num_batches_tracked" not in k}
    assert set(exported) == set(kept)
    for key, value in kept.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    target = torchvision.models.resnet50()
    target.fc = torch.nn.Identity()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
