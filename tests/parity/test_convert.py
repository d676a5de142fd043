"""dino_keras.convert on good and bad input: the released checkpoint layouts, refusals naming the
key and shapes, the report of unused keys and unfilled weights, a full-checkpoint round trip
through a .pth file and TrainingCheckpoint, and the command-line script."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision

from benchmarks import reference_torch as ref
from dino_keras.checkpointing import ARCHITECTURE_FLAGS, TrainingCheckpoint
from dino_keras.config import TrainConfig
from dino_keras.convert import (
    ConversionError,
    backbone_assignments,
    convert,
    head_assignments,
    load_torch_checkpoint,
    parse_checkpoint,
    plan_fill,
    resolve_config,
    run_writer,
)
from dino_keras.models.factory import build_backbone
from dino_keras.training import build_trainer
from tests.helpers import TINY, tiny_values, write_idx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The flags given to the converter: configs/tiny.cfg's architecture and crops (the patch size
# and the global crop size come from the checkpoint), at batch 4.
TINY_FLAGS = {
    **tiny_values(
        "arch", "embed_dim", "depth", "num_heads", "out_dim", "local_crops_size",
        "local_crops_number",
    ),
    "batch_size_per_gpu": 4,
}


def shapes_only(shapes: dict) -> dict:
    """A state dict of zero-cost read-only zeros with the given shapes."""
    return {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}


def released_vit_shapes(width: int, depth: int, patch: int, image: int = 224) -> dict:
    """The keys and shapes of the reference's released ViT backbones (`*_pretrain.pth`)."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, (image // patch) ** 2 + 1, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (width,),
                p + "norm1.bias": (width,),
                p + "attn.qkv.weight": (3 * width, width),
                p + "attn.qkv.bias": (3 * width,),
                p + "attn.proj.weight": (width, width),
                p + "attn.proj.bias": (width,),
                p + "norm2.weight": (width,),
                p + "norm2.bias": (width,),
                p + "mlp.fc1.weight": (4 * width, width),
                p + "mlp.fc1.bias": (4 * width,),
                p + "mlp.fc2.weight": (width, 4 * width),
                p + "mlp.fc2.bias": (width,),
            }
        )
    return shapes


def tiny_timm_vit(num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=TINY["global_crops_size"],
        patch_size=TINY["patch_size"],
        embed_dim=TINY["embed_dim"],
        depth=TINY["depth"],
        num_heads=TINY["num_heads"],
        num_classes=num_classes,
    )


@pytest.mark.parametrize(
    "name,width,depth,patch,arch",
    [
        ("ViT-S/16", 384, 12, 16, "vit_small"),
        ("ViT-S/8", 384, 12, 8, "vit_small"),
        ("ViT-B/16", 768, 12, 16, "vit_base"),
        ("ViT-B/8", 768, 12, 8, "vit_base"),
    ],
)
def test_released_vit_layouts(name, width, depth, patch, arch):
    """Every key of a released backbone fills a Keras weight and vice versa; the architecture
    and global_crops_size (224 from the position-embedding grid) are inferred."""
    state = shapes_only(released_vit_shapes(width, depth, patch))
    config, notes = resolve_config(parse_checkpoint(state), {}, "unused")
    assert (config.arch, config.patch_size, config.global_crops_size) == (arch, patch, 224)
    assert (config.embed_dim, config.depth, config.num_heads) == (0, 0, 0)  # the arch defaults
    assert any("global_crops_size = 224" in note for note in notes)
    backbone = build_backbone(config, drop_path_rate=0.0)
    backbone.build((None, None, None, 3))
    writes, result = plan_fill(backbone_assignments(backbone), state, {}, "backbone")
    assert not result.mismatches and not result.unused, name
    assert len(writes) == len(backbone.weights) == len(state)


def test_released_resnet50_layout():
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    for key in ("fc.weight", "fc.bias"):  # the reference replaces fc with nn.Identity
        del state[key]
    config, _ = resolve_config(parse_checkpoint(state), {}, "unused")
    assert config.arch == "resnet50"
    backbone = build_backbone(config, drop_path_rate=0.0)
    writes, result = plan_fill(backbone_assignments(backbone), state, {}, "backbone")
    assert not result.mismatches
    assert len(writes) == len(backbone.weights) == 53 * 4 + 53  # 53 BN (4 each), 53 convs
    assert sorted(set(k.rsplit(".", 1)[1] for k in result.unused)) == ["num_batches_tracked"]


def test_pos_embed_size_decides_global_crops_size():
    state = shapes_only(released_vit_shapes(384, 12, 16, image=96))  # 6x6 grid
    config, _ = resolve_config(parse_checkpoint(state), {}, "unused")
    assert config.global_crops_size == 96
    with pytest.raises(
        ConversionError,
        match=r"--global_crops_size=224 does not match the "
        r"checkpoint: the 6x6 patch grid of pos_embed",
    ):
        resolve_config(parse_checkpoint(state), {"global_crops_size": 224}, "unused")


def test_flags_that_contradict_the_checkpoint_are_refused():
    state = shapes_only(released_vit_shapes(384, 12, 16))
    contents = parse_checkpoint(state)
    with pytest.raises(
        ConversionError,
        match=r"--patch_size=8 does not match the checkpoint: "
        r"patch_embed.proj.weight implies --patch_size=16",
    ):
        resolve_config(contents, {"patch_size": 8}, "unused")
    with pytest.raises(
        ConversionError,
        match=r"--arch=vit_base has embed_dim 768, but "
        r"patch_embed.proj.weight implies 384",
    ):
        resolve_config(contents, {"arch": "vit_base"}, "unused")
    with pytest.raises(ConversionError, match=r"--arch=resnet50 does not match"):
        resolve_config(contents, {"arch": "resnet50"}, "unused")
    with pytest.raises(ConversionError, match=r"pass --num_heads"):
        resolve_config(
            parse_checkpoint(shapes_only(released_vit_shapes(32, 2, 4, 28))), {}, "unused"
        )


def test_wrong_shape_refused_naming_key_and_shapes(tmp_path):
    state = tiny_timm_vit().state_dict()
    state["blocks.1.attn.proj.weight"] = torch.zeros(32, 16)
    out = tmp_path / "run"
    with pytest.raises(ConversionError) as error:
        convert(state, str(out), overrides=dict(TINY_FLAGS))
    message = str(error.value)
    print(f"\n[convert] refusal: {message}")
    assert "blocks.1.attn.proj.weight: expected shape [32, 32], found [32, 16]" in message
    assert not out.exists()  # nothing written


def test_report_lists_unused_keys_and_unfilled_weights(tmp_path):
    state = tiny_timm_vit(num_classes=10).state_dict()  # timm's classifier: head.weight/bias
    state["extra.counter"] = torch.tensor(3)
    report = convert(state, str(tmp_path / "run"), overrides=dict(TINY_FLAGS))
    assert report.unused == {
        "head.weight": "no Keras weight of this name",
        "head.bias": "no Keras weight of this name",
        "extra.counter": "no Keras weight of this name",
    }
    # The heads are fresh (and the teacher's a copy of the student's); the centre is zero.
    assert report.unfilled and all(
        "/head/" in path or path == "dino_loss/center" for path in report.unfilled
    )
    assert {"student/head/last_layer/kernel_v", "teacher/head/mlp_0/kernel"} <= set(report.unfilled)
    text = report.format()
    print(f"\n[convert] report:\n{text}")
    for line in (
        "Checkpoint keys NOT used: 3",
        "  head.weight: no Keras weight of this name",
        "  extra.counter: no Keras weight of this name",
        "Keras weights NOT filled from the checkpoint: 17",
        "    student/head/last_layer/kernel_v",
        "Optimizer state: not converted",
    ):
        assert line in text
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    model, crops = saved["model"], saved["crops"]
    assert (model["arch"], model["embed_dim"], model["patch_size"], crops["global_crops_size"]) == (
        "vit_tiny",
        32,
        4,
        28,
    )


def test_missing_weights_refused_unless_allowed(tmp_path):
    state = tiny_timm_vit().state_dict()
    del state["blocks.0.attn.qkv.bias"]
    with pytest.raises(
        ConversionError,
        match=r"2 Keras weights have no tensor in the "
        r"checkpoint \(first: student/backbone/blocks_0/"
        r"attn/qkv/bias",
    ):
        convert(state, str(tmp_path / "a"), overrides=dict(TINY_FLAGS))
    report = convert(state, str(tmp_path / "b"), overrides=dict(TINY_FLAGS), allow_missing=True)
    assert report.unfilled["teacher/backbone/blocks_0/attn/qkv/bias"].startswith("MISSING")


def torch_network(seed: int, use_bn: bool) -> torch.nn.Module:
    head = ref.DinoHead(
        32, 64, use_bn=use_bn, norm_last_layer=False, hidden_dim=128, bottleneck_dim=16
    )
    network = ref.MultiCropWrapper(tiny_timm_vit(seed=seed), head)
    ref.randomize_(network, seed)
    with torch.no_grad():  # a trained gain (norm_last_layer false)
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 1.5)
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return network


def test_full_checkpoint_round_trip(tmp_path, report_diff):
    """A reference training checkpoint (.pth; student keys with module.backbone./module.head.,
    teacher keys with backbone./head., BN head, trained gain, args, optimizer, centre, epoch)
    -> convert -> a fresh trainer restored with TrainingCheckpoint, as training resumes."""
    student, teacher = torch_network(1, use_bn=True), torch_network(2, use_bn=True)
    center = torch.randn(1, 64)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=4,
        out_dim=64,
        norm_last_layer=False,
        use_bn_in_head=True,
        optimizer="adamw",
        lr=0.0005,
        data_path="/path/to/imagenet/train",
    )
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": ref.reference_state_dict(student, "module."),
            "teacher": ref.reference_state_dict(teacher),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 3,
            "args": args,
            "dino_loss": {"center": center},
            "fp16_scaler": None,
        },
        path,
    )
    out = tmp_path / "run"
    report = convert(
        str(path),
        str(out),
        steps_per_epoch=5,
        overrides={k: v for k, v in TINY_FLAGS.items() if k != "out_dim"},
    )
    assert report.kind == "full" and report.center_restored and report.epoch == 3
    assert set(report.unused) >= {"optimizer", "args", "fp16_scaler"}
    assert report.unused["optimizer"].startswith("optimizer state is not converted")
    assert not report.unfilled
    assert report.config.use_bn_in_head and not report.config.norm_last_layer
    assert (report.config.head_hidden_dim, report.config.head_bottleneck_dim) == (128, 16)
    # BN step counters of the head are the only unused tensors.
    assert {k for k in report.unused if "num_batches_tracked" in k} == {
        f"{who}head.mlp.{i}.num_batches_tracked"
        for who in ("student/module.", "teacher/")
        for i in (1, 4)
    }

    with open(out / "config.json") as f:
        config = TrainConfig.from_dict(json.load(f))
    trainer = build_trainer(config, 5, config.batch_size_per_gpu)
    checkpoint = TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    )
    assert checkpoint.restore().epoch == 3
    assert int(trainer.optimizer.iterations) == 15  # epoch 3 x 5 steps: schedules continue
    np.testing.assert_array_equal(trainer.center.numpy(), center.numpy())
    worst = 0.0
    for network, torch_net in ((trainer.student, student), (trainer.teacher, teacher)):
        state = ref.reference_state_dict(torch_net)
        for part, assignments in (
            ("backbone.", backbone_assignments(network.backbone)),
            ("head.", head_assignments(network.head)),
        ):
            for key, variable, transform in assignments:
                expected = transform(state[part + key].numpy())
                worst = max(worst, ref.max_abs_diff(np.asarray(variable), expected))
    assert report_diff("full-checkpoint round trip, max |diff| over all weights", worst) == 0.0


def test_checkpoint_key_selects_one_network(tmp_path):
    teacher = torch_network(2, use_bn=False)
    checkpoint = {
        "student": ref.reference_state_dict(torch_network(1, use_bn=False), "module."),
        "teacher": ref.reference_state_dict(teacher),
        "epoch": 7,
    }
    report = convert(
        checkpoint,
        str(tmp_path / "run"),
        checkpoint_key="teacher",
        overrides={k: v for k, v in TINY_FLAGS.items() if k != "out_dim"},
    )
    assert report.epoch == 0 and not report.center_restored
    assert set(report.unused) == {"student", "epoch"}
    assert set(report.unfilled) == {"dino_loss/center"}  # heads too come from the teacher


def test_unknown_structure_refused():
    with pytest.raises(ConversionError, match=r"entries: model, step.*--checkpoint_key"):
        parse_checkpoint({"model": {"w": [1, 2]}, "step": 3})
    with pytest.raises(ConversionError, match="cannot recognise the backbone"):
        resolve_config(parse_checkpoint({"fc.weight": torch.zeros(3, 3)}), {}, "unused")


def test_arbitrary_pickles_need_allow_pickle(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"created": datetime.date(2021, 4, 29), **tiny_timm_vit().state_dict()}, path)
    with pytest.raises(ConversionError, match="--allow_pickle"):
        load_torch_checkpoint(str(path))
    assert load_torch_checkpoint(str(path), allow_pickle=True)["created"].year == 2021
    with pytest.raises(ConversionError, match="no such file"):
        load_torch_checkpoint(str(tmp_path / "missing.pth"))


def test_missing_torch_is_explained(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConversionError, match=r"pip install -r requirements-parity.txt"):
        load_torch_checkpoint(str(path))


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow
def test_script_converts_and_refuses(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(tiny_timm_vit(num_classes=10).state_dict(), path)
    flags = [f"--{k}={v}" for k, v in TINY_FLAGS.items()]
    result = run_script(f"--checkpoint={path}", f"--output_dir={tmp_path / 'run'}", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoint keys NOT used: 2" in result.stdout
    assert "head.weight: no Keras weight of this name" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest-0.index").exists()
    with open(tmp_path / "run" / "train_flags.cfg") as f:
        assert "--embed_dim=32\n" in f.read()
    refused = run_script(
        f"--checkpoint={path}", f"--output_dir={tmp_path / 'other'}", *flags, "--patch_size=8"
    )
    assert refused.returncode != 0
    assert (
        "--patch_size=8 does not match the checkpoint: patch_embed.proj.weight implies "
        "--patch_size=4"
    ) in refused.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_train_script_resumes_a_converted_full_checkpoint(tmp_path):
    """convert_checkpoint.py (full checkpoint at epoch 1, 4 steps per epoch) then
    `train.py --flagfile=<out>/train_flags.cfg`: it resumes at epoch 1 and trains epoch 2."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_idx(
        data,
        "train",
        rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 16, dtype=np.uint8),
    )
    write_idx(
        data,
        "t10k",
        rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 8, dtype=np.uint8),
    )
    path = tmp_path / "full.pth"
    torch.save(
        {
            "student": ref.reference_state_dict(torch_network(1, False), "module."),
            "teacher": ref.reference_state_dict(torch_network(2, False)),
            "dino_loss": {"center": torch.randn(1, 64)},
            "epoch": 1,
        },
        path,
    )
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in TINY_FLAGS.items() if k != "out_dim"]
    converted = run_script(
        f"--checkpoint={path}",
        f"--output_dir={run}",
        *flags,
        "--epochs=2",
        "--warmup_epochs=0",
        "--steps_per_epoch=4",
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "step counter set to 4" in converted.stdout
    trained = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--flagfile={run / 'train_flags.cfg'}",
            f"--data_path={data}",
            "--eval_batch_size=8",
            "--verbose=0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    # Epoch 1 complete: training continues with the first batch of epoch 2.
    assert f"Resuming from {run / 'checkpoints' / 'latest-1'} at step " in trained.stdout
    assert "(epoch 2, batch 1 of " in trained.stdout, trained.stdout
    with open(run / "summary.json") as f:
        assert json.load(f)["epochs_completed"] == 2
    with open(run / "log.jsonl") as f:
        trained_epochs = [r["epoch"] for r in map(json.loads, f) if "loss" in r]
    assert trained_epochs == [2]


def test_flagfile_repeats_every_architecture_flag():
    assert set(ARCHITECTURE_FLAGS) <= set(run_writer.FLAGFILE_FIELDS)


def test_reference_args_with_early_arch_names():
    """Early reference checkpoints call ViT-S `deit_small`; unknown names are left to the
    shapes."""
    state = shapes_only(released_vit_shapes(384, 12, 16))
    for arch in ("deit_small", "vit_small", "some_timm_name"):
        contents = parse_checkpoint({"teacher": state, "args": {"arch": arch}}, "teacher")
        assert resolve_config(contents, {}, "unused")[0].arch == "vit_small"
