"""Training-step parity: three steps of dino_keras' compiled DinoTrainer against the reference's
training loop written in torch (`train_steps` of benchmarks/reference_torch.py), from the same
converted initial weights and the same crops.

Tiny ViT (depth 2, width 32, 2 heads, patch 4), 28 px global and 2 x 12 px local crops, out_dim
64, batch 4, no drop path (both sides deterministic). The learning rate has no warm-up (peak
1e-4: every weight moves by about 0.1-1 % per step, and the loss falls without collapsing) and
the teacher momentum is low so that the EMA moves the teacher measurably.

Checked: the loss of each step, every student and teacher weight and the centre to TOLERANCE
(max |diff| / max |torch value|, per tensor) and, more sensitive, the 3-step CHANGE of every
weight, norm-wise (||change_keras - change_torch|| / ||change_torch||, per tensor). The changes
cannot agree element by element: Adam's first step is lr * g / (|g| + 1e-8), so a gradient
element near 1e-8, where the two frameworks' float32 rounding differs by a few 1e-9, moves
differently (measured: g = 3.4e-8 in torch, 4.1e-8 here, out of gradients up to 0.38).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
import timm
import torch

from benchmarks import reference_torch as ref
from dino_keras.checkpointing import TrainingCheckpoint
from dino_keras.convert import backbone_assignments, convert, head_assignments
from dino_keras.training import build_trainer
from tests.helpers import tiny_values

TOLERANCE = 1e-4  # relative
CHANGE_TOLERANCE = 1e-2  # norm-wise relative, of the weight changes
STEPS = 3
BATCH = 4
# configs/tiny.cfg's network and crops, with this test's batch, schedules and temperatures.
TINY = dict(
    **tiny_values(
        "arch",
        "embed_dim",
        "depth",
        "num_heads",
        "patch_size",
        "global_crops_size",
        "local_crops_size",
        "local_crops_number",
        "out_dim",
    ),
    batch_size_per_gpu=BATCH,
    drop_path_rate=0.0,
    epochs=2,
    warmup_epochs=0,
    lr=0.0064,
    min_lr=1e-6,
    weight_decay=4.0,
    weight_decay_end=16.0,
    clip_grad=3.0,
    momentum_teacher=0.9,
    teacher_temp=0.04,
    warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs=0,
)


def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected| (per tensor)."""
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - expected)))
    return diff / scale if scale > 0 else diff


def norm_relative_error(got, expected) -> float:
    """||got - expected|| / ||expected|| (per tensor)."""
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


def torch_student(config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=TINY["global_crops_size"],
        patch_size=TINY["patch_size"],
        embed_dim=TINY["embed_dim"],
        depth=TINY["depth"],
        num_heads=TINY["num_heads"],
        num_classes=0,
        drop_path_rate=0.0,
    )
    head = ref.DinoHead(
        TINY["embed_dim"], TINY["out_dim"], norm_last_layer=config["norm_last_layer"]
    )
    return ref.randomize_(ref.MultiCropWrapper(vit, head), seed)


def fixed_crops(seed: int) -> list[list[np.ndarray]]:
    """STEPS batches of 2 global + 2 local crops, NHWC."""
    rng = np.random.default_rng(seed)
    g, s = TINY["global_crops_size"], TINY["local_crops_size"]
    return [
        [rng.standard_normal((BATCH, size, size, 3)).astype(np.float32) for size in (g, g, s, s)]
        for _ in range(STEPS)
    ]


def keras_torch_pairs(keras_network, torch_state: dict):
    """(name, Keras variable, torch tensor in Keras layout) for every weight of a network."""
    pairs = []
    for part, assignments in (
        ("backbone.", backbone_assignments(keras_network.backbone)),
        ("head.", head_assignments(keras_network.head)),
    ):
        for key, variable, transform in assignments:
            value = transform(torch_state[part + key].numpy())
            pairs.append((part + key, variable, value))
    return pairs


class PerStepLoss(keras.callbacks.Callback):
    """The loss of each step (the trainer's tracker averages over the epoch: reset it)."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_begin(self, batch, logs=None):
        for metric in self.model.metrics:
            metric.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


@dataclasses.dataclass
class Measured:
    losses: list[float]  # torch's
    loss_error: float
    weight_errors: dict[str, float]  # relative, per student/teacher tensor
    change_errors: dict[str, float]  # norm-wise relative, per tensor that changed
    unchanged: dict[str, float]  # tensors torch did not change: max |dino_keras change| / max |w|
    center_error: float


def measure(tmp_path, *, steps_per_epoch: int, keras_hook=None, **flags) -> Measured:
    """Runs both sides from the same converted weights and crops (TINY updated with `flags`);
    `keras_hook(trainer)`, if given, may alter the dino_keras side before training (to see what
    the checks detect)."""
    overrides = dict(TINY, **flags)
    student = torch_student(overrides, seed=11)
    teacher = ref.make_teacher(student)
    center = 0.05 * torch.randn(1, TINY["out_dim"], generator=torch.Generator().manual_seed(12))
    checkpoint = {
        "student": ref.reference_state_dict(student, "module."),
        "teacher": ref.reference_state_dict(teacher),
        "dino_loss": {"center": center.clone()},
        "epoch": 0,
    }
    report = convert(checkpoint, str(tmp_path / "run"), overrides=overrides)
    assert not report.unfilled and not report.unused
    config = report.config

    # dino_keras: the compiled train step on the fixed crops.
    trainer = build_trainer(config, steps_per_epoch, BATCH)
    restored = TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    )
    assert restored.restore().epoch == 0
    if keras_hook is not None:
        keras_hook(trainer)
    batches = fixed_crops(seed=13)
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack([batch[i] for batch in batches]) for i in range(4))
    )
    recorder = PerStepLoss()
    trainer.fit(
        dataset, epochs=1, steps_per_epoch=STEPS, callbacks=[recorder], verbose=0, shuffle=False
    )
    assert int(trainer.optimizer.iterations) == STEPS

    # The reference loop in torch.
    initial = {
        key: value
        for key, _, value in keras_torch_pairs(trainer.student, ref.reference_state_dict(student))
    }
    torch_batches = [
        [torch.from_numpy(c).permute(0, 3, 1, 2).contiguous() for c in batch] for batch in batches
    ]
    losses, torch_center = ref.train_steps(
        student, teacher, center, torch_batches, config=config, steps_per_epoch=steps_per_epoch
    )

    weight_errors, change_errors, unchanged = {}, {}, {}
    for name, network, torch_network in (
        ("student", trainer.student, student),
        ("teacher", trainer.teacher, teacher),
    ):
        state = ref.reference_state_dict(torch_network)
        for key, variable, expected in keras_torch_pairs(network, state):
            got = np.asarray(variable)
            weight_errors[f"{name}/{key}"] = relative_error(got, expected)
            torch_change, keras_change = expected - initial[key], got - initial[key]
            scale = np.max(np.abs(initial[key]))
            # Above float32 rounding of m * w + (1 - m) * w: a real change.
            if np.max(np.abs(torch_change)) > 1e-6 * scale:
                change_errors[f"{name}/{key}"] = norm_relative_error(keras_change, torch_change)
            else:  # e.g. the frozen last layer
                unchanged[f"{name}/{key}"] = float(np.max(np.abs(keras_change)) / scale)
    return Measured(
        losses=losses,
        loss_error=max(abs(k - t) / abs(t) for k, t in zip(recorder.losses, losses, strict=True)),
        weight_errors=weight_errors,
        change_errors=change_errors,
        unchanged=unchanged,
        center_error=relative_error(trainer.center.numpy(), torch_center),
    )


def assert_parity(measured: Measured, label: str, report_diff) -> None:
    report_diff(
        f"{label}: losses torch {[round(v, 5) for v in measured.losses]}, max relative |diff|",
        measured.loss_error,
    )
    worst = max(measured.weight_errors, key=measured.weight_errors.get)
    report_diff(
        f"{label}: max relative |diff| over {len(measured.weight_errors)} student and "
        f"teacher weights (worst {worst})",
        measured.weight_errors[worst],
    )
    worst_change = max(measured.change_errors, key=measured.change_errors.get)
    report_diff(
        f"{label}: max norm-wise relative |diff| of the 3-step weight CHANGES over "
        f"{len(measured.change_errors)} changed weights (worst {worst_change})",
        measured.change_errors[worst_change],
    )
    report_diff(f"{label}: centre max relative |diff|", measured.center_error)
    assert measured.loss_error <= TOLERANCE
    assert measured.weight_errors[worst] <= TOLERANCE, worst
    assert measured.center_error <= TOLERANCE
    assert measured.change_errors[worst_change] <= CHANGE_TOLERANCE, worst_change
    for key, moved in measured.unchanged.items():  # unchanged in torch: unchanged here
        assert moved <= 1e-6, key


@pytest.mark.slow
def test_three_steps_last_layer_frozen(tmp_path, report_diff):
    """freeze_last_layer=1 and 3 steps per epoch: all 3 steps are in the frozen epoch."""
    measured = measure(tmp_path, freeze_last_layer=1, norm_last_layer=True, steps_per_epoch=3)
    assert_parity(measured, "frozen last layer", report_diff)
    assert {"student/head.last_layer.weight_v", "teacher/head.last_layer.weight_v"} <= set(
        measured.unchanged
    )


@pytest.mark.slow
def test_three_steps_last_layer_trained(tmp_path, report_diff):
    """freeze_last_layer=0 and norm_last_layer=False: the last layer's direction and its
    (weight-decayed, 2-D) gain are updated from the first step."""
    measured = measure(tmp_path, freeze_last_layer=0, norm_last_layer=False, steps_per_epoch=3)
    assert_parity(measured, "trained last layer", report_diff)
    assert {
        "student/head.last_layer.weight_g",
        "student/head.last_layer.weight_v",
        "teacher/head.last_layer.weight_g",
    } <= set(measured.change_errors)


@pytest.mark.slow
def test_three_steps_last_layer_unfrozen_in_step_three(tmp_path, report_diff):
    """2 steps per epoch: the last layer is frozen in steps 1-2 (epoch 0) and trained in step 3,
    where its Adam bias correction starts from 1; the teacher temperature warms up per epoch
    (0.04, then 0.07)."""
    measured = measure(
        tmp_path,
        freeze_last_layer=1,
        norm_last_layer=True,
        steps_per_epoch=2,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
    )
    assert_parity(measured, "last layer unfrozen in step 3", report_diff)
    assert "student/head.last_layer.weight_v" in measured.change_errors
