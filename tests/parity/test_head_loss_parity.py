"""Head and loss parity: a DINO head built from torch.nn primitives (weight-normalised last
layer), its state dict converted into dino_keras' DinoHead; the loss formula and the centre
update in torch against dino_keras.loss."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

from benchmarks import reference_torch as ref
from dino_keras.convert import load_head_state_dict
from dino_keras.loss import DinoLoss, compiled_dino_cross_entropy
from dino_keras.models.head import DinoHead

TOLERANCE = 1e-6
IN_DIM, OUT_DIM, BATCH, LOCAL_CROPS = 384, 4096, 8, 2
# The loss is about ln(out_dim) ~ 7 at 1024, where one float32 ulp is 4.8e-7. XLA's CPU exp and
# log and its reduction order depend on the CPU: on one machine the compiled loss was within
# 2 ulps of the float64 loss, on an AMD EPYC (Zen 4) 2.6 ulps (1.24e-6). Losses are held to
# 4 ulps of float32, against torch's float32 loss and against the float64 loss.
LOSS_OUT_DIM = 1024
LOSS_ULPS = 4


def loss_tolerance(loss: float) -> float:
    return LOSS_ULPS * float(np.spacing(np.float32(abs(loss))))


def converted_heads(use_bn: bool, norm_last_layer: bool, seed: int, out_dim: int = OUT_DIM):
    torch.manual_seed(seed)
    torch_head = ref.randomize_(
        ref.DinoHead(IN_DIM, out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer), seed
    )
    if not norm_last_layer:  # a trained gain
        with torch.no_grad():
            torch_head.last_layer.parametrizations.weight.original0.uniform_(0.5, 1.5)
    keras_head = DinoHead(out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer)
    keras_head.build((None, IN_DIM))
    result = load_head_state_dict(keras_head, ref.reference_state_dict(torch_head, "head."))
    assert len(result.filled) == len(keras_head.weights)
    unused = set(result.unused)
    assert unused == ({f"head.mlp.{i}.num_batches_tracked" for i in (1, 4)} if use_bn else set())
    return torch_head, keras_head


@pytest.mark.parametrize("use_bn,norm_last_layer", [(False, True), (True, False)])
def test_head_outputs(use_bn, norm_last_layer, report_diff):
    torch_head, keras_head = converted_heads(use_bn, norm_last_layer, seed=6)
    features = torch.randn(2 * BATCH, IN_DIM, generator=torch.Generator().manual_seed(7))
    if use_bn:
        # Eval mode first, on the converted running statistics. (A train-mode forward would
        # update them differently: torch's running_var takes the unbiased batch variance,
        # Keras' moving_variance the biased one.)
        torch_head.eval()
        with torch.no_grad():
            expected = torch_head(features)
        got = np.asarray(keras_head(features.numpy(), training=False))
        diff = report_diff(
            "head output max |diff| (use_bn=True, eval mode)", ref.max_abs_diff(got, expected)
        )
        assert diff <= TOLERANCE
    torch_head.train()  # as during DINO training (BatchNorm on batch statistics)
    with torch.no_grad():
        expected = torch_head(features)
    got = np.asarray(keras_head(features.numpy(), training=True))
    diff = report_diff(
        f"head output max |diff| (use_bn={use_bn}, norm_last_layer={norm_last_layer})",
        ref.max_abs_diff(got, expected),
    )
    assert diff <= TOLERANCE


@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_loss_and_center_update(teacher_temp, report_diff):
    """Loss of head outputs (the values the loss sees in training) and the centre update."""
    torch_head, _ = converted_heads(False, True, seed=8, out_dim=LOSS_OUT_DIM)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        student_output = torch_head(
            torch.randn((2 + LOCAL_CROPS) * BATCH, IN_DIM, generator=generator)
        )
        teacher_output = torch_head(torch.randn(2 * BATCH, IN_DIM, generator=generator))
    center = 0.05 * torch.randn(1, LOSS_OUT_DIM, generator=generator)
    crops = 2 + LOCAL_CROPS
    expected_loss = float(
        ref.dino_loss(student_output, teacher_output, center, teacher_temp, crops)
    )
    exact_loss = float(
        ref.dino_loss(
            student_output.double(), teacher_output.double(), center.double(), teacher_temp, crops
        )
    )
    loss, monitors = compiled_dino_cross_entropy(
        tf.constant(student_output.numpy()),
        tf.constant(teacher_output.numpy()),
        tf.constant(center.numpy()),
        tf.constant(teacher_temp, tf.float32),
        crops,
    )
    diff = report_diff(
        f"loss |diff| (teacher_temp {teacher_temp}, loss {expected_loss:.4f})",
        abs(float(loss) - expected_loss),
    )
    exact_diff = report_diff(
        "  dino_keras loss vs the float64 torch loss", abs(float(loss) - exact_loss)
    )
    report_diff("  torch float32 loss vs the float64 torch loss", abs(expected_loss - exact_loss))
    assert diff <= loss_tolerance(exact_loss)
    assert exact_diff <= loss_tolerance(exact_loss)
    assert set(monitors) == {"teacher_entropy", "teacher_batch_entropy", "kl_teacher_student"}

    dino_loss = DinoLoss(LOSS_OUT_DIM, num_student_crops=crops)
    dino_loss.center.assign(center.numpy())
    module_loss, _ = dino_loss(
        tf.constant(student_output.numpy()), tf.constant(teacher_output.numpy()), teacher_temp
    )
    assert abs(float(module_loss) - expected_loss) <= loss_tolerance(exact_loss)
    dino_loss.update_center(tf.constant(teacher_output.numpy()))
    diff = report_diff(
        "centre update max |diff|",
        ref.max_abs_diff(dino_loss.center.numpy(), ref.updated_center(center, teacher_output)),
    )
    assert diff <= TOLERANCE


def test_loss_gradient(report_diff):
    """The gradient of the loss with respect to the student output (what trains the student)."""
    generator = torch.Generator().manual_seed(10)
    student_output = torch.randn((2 + LOCAL_CROPS) * BATCH, 256, generator=generator)
    teacher_output = torch.randn(2 * BATCH, 256, generator=generator)
    center = 0.1 * torch.randn(1, 256, generator=generator)
    student = student_output.clone().requires_grad_(True)
    ref.dino_loss(student, teacher_output, center, 0.04, 2 + LOCAL_CROPS).backward()
    keras_student = tf.Variable(student_output.numpy())
    dino_loss = DinoLoss(256, num_student_crops=2 + LOCAL_CROPS)
    dino_loss.center.assign(center.numpy())
    with tf.GradientTape() as tape:
        loss, _ = dino_loss(keras_student, tf.constant(teacher_output.numpy()), 0.04)
    gradient = tape.gradient(loss, keras_student)
    diff = report_diff("loss gradient max |diff|", ref.max_abs_diff(gradient.numpy(), student.grad))
    assert diff <= TOLERANCE
