"""BatchNorm parity: three training steps with a BatchNorm head (`--use_bn_in_head`), dino_keras'
compiled DinoTrainer against the reference's training loop written in torch
(`train_steps` of benchmarks/reference_torch.py), from the same converted initial weights and
the same crops.

The reference keeps its teacher in training mode: the teacher's BatchNorm layers normalise with
the batch statistics and update their own running statistics from the teacher's forward passes
(the EMA averages parameters only). Keras runs the BatchNorm of a layer that is not trainable in
inference mode instead; dino_keras' TorchBatchNormalization does what torch does (and, as torch,
updates the running variance with the unbiased batch variance).

Setup: test_train_step_parity's tiny ViT, crops, schedules and tolerances (TINY), with the
reference's DINOHead with use_bn=True (Linear, BatchNorm1d, GELU, Linear, BatchNorm1d, GELU,
Linear; narrow, to keep the run short), random BatchNorm gains, biases and running statistics,
and a trained last layer. The teacher's BatchNorm sees 2 x 4 rows per step, the student's 4 x 4.

Null gradients: some student gradients are zero in exact arithmetic: the biases of the two
Linears before a BatchNorm and the backbone's final norm bias (constant shifts of a BatchNorm's
input, which it subtracts) and the attention key biases (a constant per query under the
softmax). Both frameworks compute them as rounding noise (measured up to 5e-6 of the largest
gradient), which Adam's first step, lr * g / (|g| + 1e-8), turns into steps of up to lr with
arbitrary signs, and which would reach the running means through those biases. Both sides
therefore check that those gradients are below NULL_GRADIENT_SCALE of the largest and then set
them to exactly zero; the tensors must then stay unchanged on both sides.

Checked, as test_train_step_parity: the loss of each step; the teacher output of each step;
every student and teacher weight, each BatchNorm's running mean and running variance included,
to TOLERANCE (relative, per tensor) and their 3-step changes to CHANGE_TOLERANCE (norm-wise).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import test_train_step_parity as steps
import torch

from benchmarks import reference_torch as ref
from dino_keras.checkpointing import TrainingCheckpoint
from dino_keras.convert import convert
from dino_keras.training import build_trainer

HIDDEN_DIM = 128
BOTTLENECK_DIM = 32
FLAGS = dict(
    use_bn_in_head=True,
    head_hidden_dim=HIDDEN_DIM,
    head_bottleneck_dim=BOTTLENECK_DIM,
    freeze_last_layer=0,
    norm_last_layer=False,
)
STEPS_PER_EPOCH = 3
BN_LAYERS = ("head.mlp.1.", "head.mlp.4.")  # torch Sequential indices = Keras mlp_K
BN_STATS = ("running_mean", "running_var")
NULL_GRADIENT_SCALE = 1e-4  # of the largest gradient


def null_gradient_masks() -> dict[str, np.ndarray]:
    """Student parameter -> 1 where its gradient is zero in exact arithmetic (torch layout,
    which is also the Keras layout of these vectors)."""
    dim = steps.TINY["embed_dim"]
    masks = {
        "head.mlp.0.bias": np.ones(HIDDEN_DIM, np.float32),
        "head.mlp.3.bias": np.ones(HIDDEN_DIM, np.float32),
        "backbone.norm.bias": np.ones(dim, np.float32),
    }
    for i in range(steps.TINY["depth"]):
        keys = np.zeros(3 * dim, np.float32)  # qkv.bias is [q | k | v]
        keys[dim : 2 * dim] = 1.0
        masks[f"backbone.blocks.{i}.attn.qkv.bias"] = keys
    return masks


def torch_student_with_bn_head(config: dict, seed: int) -> torch.nn.Module:
    """test_train_step_parity's tiny ViT with the reference's BatchNorm head, randomised
    (the running statistics too, so that a swapped mean and variance would show)."""
    student = steps.torch_student(config, seed)
    head = ref.DinoHead(
        steps.TINY["embed_dim"],
        steps.TINY["out_dim"],
        use_bn=True,
        norm_last_layer=config["norm_last_layer"],
        hidden_dim=HIDDEN_DIM,
        bottleneck_dim=BOTTLENECK_DIM,
    )
    student.head = ref.randomize_(head, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                size = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    return student


def zero_null_gradients_torch(student: torch.nn.Module, masks: dict) -> dict[str, float]:
    """Gradient hooks; returns the running max |null gradient| and max |gradient|."""
    seen = {"null": 0.0, "all": 0.0}
    for name, parameter in student.named_parameters():
        null = torch.from_numpy(masks[name]) if name in masks else None

        def hook(grad, null=null):
            seen["all"] = max(seen["all"], float(grad.abs().max()))
            if null is None:
                return grad
            seen["null"] = max(seen["null"], float((grad * null).abs().max()))
            return grad * (1.0 - null)

        parameter.register_hook(hook)
    return seen


def zero_null_gradients_keras(trainer, masks: dict, torch_state: dict) -> tf.Variable:
    """The same inside the compiled step; returns [max |null gradient|, max |gradient|]."""
    nulls = {
        variable.path: tf.constant(masks[key])
        for key, variable, _ in steps.keras_torch_pairs(trainer.student, torch_state)
        if key in masks
    }
    assert len(nulls) == len(masks)
    seen = tf.Variable(tf.zeros(2), trainable=False)
    loss_and_gradients = trainer.loss_and_gradients

    def zeroed(crops, step):
        *outputs, gradients = loss_and_gradients(crops, step)
        null_max, all_max, kept = tf.constant(0.0), tf.constant(0.0), []
        for variable, gradient in zip(trainer.student.trainable_variables, gradients, strict=True):
            all_max = tf.maximum(all_max, tf.reduce_max(tf.abs(gradient)))
            null = nulls.get(variable.path)
            if null is not None:
                null_max = tf.maximum(null_max, tf.reduce_max(tf.abs(gradient * null)))
                gradient = gradient * (1.0 - null)
            kept.append(gradient)
        seen.assign(tf.maximum(seen, tf.stack([null_max, all_max])))
        return (*outputs, kept)

    trainer.loss_and_gradients = zeroed
    return seen


class LossesAndTeacherOutputs(steps.PerStepLoss):
    """Each step's loss and teacher output (which the compiled step writes into a variable)."""

    def __init__(self, trainer):
        super().__init__()
        self.last = tf.Variable(tf.zeros((2 * steps.BATCH, steps.TINY["out_dim"])), trainable=False)
        self.teacher_outputs = []
        update_center = trainer.dino_loss.update_center

        def recording(teacher_output):
            self.last.assign(tf.cast(teacher_output, tf.float32))
            return update_center(teacher_output)

        trainer.dino_loss.update_center = recording

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.teacher_outputs.append(self.last.numpy().copy())


def test_three_steps_bn_head(tmp_path, report_diff):
    overrides = dict(steps.TINY, **FLAGS)
    student = torch_student_with_bn_head(overrides, seed=11)
    teacher = ref.make_teacher(student)
    center = 0.05 * torch.randn(
        1, steps.TINY["out_dim"], generator=torch.Generator().manual_seed(12)
    )
    checkpoint = {
        "student": ref.reference_state_dict(student, "module."),
        "teacher": ref.reference_state_dict(teacher),
        "dino_loss": {"center": center.clone()},
        "epoch": 0,
    }
    report = convert(checkpoint, str(tmp_path / "run"), overrides=overrides)
    assert not report.unfilled
    # The BatchNorm step counters are the only unused tensors (the momentum is fixed).
    assert set(report.unused) == {
        f"{who}{layer}num_batches_tracked"
        for who in ("student/module.", "teacher/")
        for layer in BN_LAYERS
    }
    config = report.config
    assert config.use_bn_in_head and config.head_hidden_dim == HIDDEN_DIM

    trainer = build_trainer(config, STEPS_PER_EPOCH, steps.BATCH)
    restored = TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    )
    assert restored.restore().epoch == 0
    # Converted exactly into both networks, the BatchNorm running statistics included.
    initial_state = ref.reference_state_dict(student)
    initial = {}
    for name, network in (("student", trainer.student), ("teacher", trainer.teacher)):
        for key, variable, value in steps.keras_torch_pairs(network, initial_state):
            np.testing.assert_array_equal(np.asarray(variable), value, err_msg=f"{name}/{key}")
            initial[key] = value
    assert {layer + stat for layer in BN_LAYERS for stat in BN_STATS} <= set(initial)

    # dino_keras: the compiled train step on the fixed crops.
    masks = null_gradient_masks()
    keras_seen = zero_null_gradients_keras(trainer, masks, initial_state)
    recorder = LossesAndTeacherOutputs(trainer)
    batches = steps.fixed_crops(seed=13)
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack([batch[i] for batch in batches]) for i in range(4))
    )
    trainer.fit(
        dataset,
        epochs=1,
        steps_per_epoch=steps.STEPS,
        callbacks=[recorder],
        verbose=0,
        shuffle=False,
    )
    assert int(trainer.optimizer.iterations) == steps.STEPS

    # The reference loop in torch; both networks in training mode, as the reference's.
    assert student.training and teacher.training
    torch_seen = zero_null_gradients_torch(student, masks)
    torch_teacher_outputs = []
    teacher.register_forward_hook(
        lambda module, args, output: torch_teacher_outputs.append(output.detach().numpy().copy())
    )
    torch_batches = [
        [torch.from_numpy(c).permute(0, 3, 1, 2).contiguous() for c in batch] for batch in batches
    ]
    losses, _ = ref.train_steps(
        student, teacher, center, torch_batches, config=config, steps_per_epoch=STEPS_PER_EPOCH
    )

    loss_error = max(abs(k - t) / abs(t) for k, t in zip(recorder.losses, losses, strict=True))
    output_errors = [
        steps.relative_error(k, t)
        for k, t in zip(recorder.teacher_outputs, torch_teacher_outputs, strict=True)
    ]
    null_scales = {
        "dino_keras": float(keras_seen[0] / keras_seen[1]),
        "torch": torch_seen["null"] / torch_seen["all"],
    }
    weight_errors, change_errors, unchanged = {}, {}, {}
    for name, network, torch_network in (
        ("student", trainer.student, student),
        ("teacher", trainer.teacher, teacher),
    ):
        state = ref.reference_state_dict(torch_network)
        for key, variable, expected in steps.keras_torch_pairs(network, state):
            got = np.asarray(variable)
            weight_errors[f"{name}/{key}"] = steps.relative_error(got, expected)
            torch_change, keras_change = expected - initial[key], got - initial[key]
            scale = np.max(np.abs(initial[key]))
            if np.max(np.abs(torch_change)) > 1e-6 * scale:
                change_errors[f"{name}/{key}"] = steps.norm_relative_error(
                    keras_change, torch_change
                )
            else:
                unchanged[f"{name}/{key}"] = float(np.max(np.abs(keras_change)) / scale)

    for side, value in null_scales.items():
        report_diff(f"BN head: {side} max |null gradient| / max |gradient|", value)
    report_diff(f"BN head: losses torch {[round(v, 5) for v in losses]}, max relative", loss_error)
    report_diff("BN head: teacher output, max relative over the steps", max(output_errors))
    report_diff("BN head: teacher output of the last step, relative", output_errors[-1])
    for who in ("teacher", "student"):
        for stat in BN_STATS:
            names = [f"{who}/{layer}{stat}" for layer in BN_LAYERS]
            report_diff(
                f"BN head: {who} BatchNorm {stat} after 3 steps, max relative",
                max(weight_errors[n] for n in names),
            )
            report_diff(
                f"BN head: {who} BatchNorm {stat} 3-step change, max norm-wise relative",
                max(change_errors[n] for n in names),
            )
    for who in ("student", "teacher"):
        parameters = {n: e for n, e in weight_errors.items() if n.startswith(who)}
        worst = max(parameters, key=parameters.get)
        report_diff(
            f"BN head: {who}, max relative over {len(parameters)} weights (worst {worst})",
            parameters[worst],
        )
        changes = {n: e for n, e in change_errors.items() if n.startswith(who)}
        worst = max(changes, key=changes.get)
        report_diff(
            f"BN head: {who}, max norm-wise relative 3-step CHANGE over {len(changes)} changed "
            f"weights (worst {worst})",
            changes[worst],
        )
    report_diff(
        f"BN head: null-gradient tensors {sorted(unchanged)}, max relative dino_keras change",
        max(unchanged.values()),
    )

    for side, value in null_scales.items():
        assert value <= NULL_GRADIENT_SCALE, f"{side}: a null gradient is not negligible"
    assert loss_error <= steps.TOLERANCE
    for step, error in enumerate(output_errors):
        assert error <= steps.TOLERANCE, f"teacher output of step {step + 1}"
    for name, error in weight_errors.items():
        assert error <= steps.TOLERANCE, name
    # Everything moves (trained last layer, running statistics updated) but the tensors whose
    # whole gradient is null; those stay unchanged on both sides.
    fully_null = {key for key, mask in masks.items() if mask.all()}
    assert set(unchanged) == {
        f"{who}/{key}" for who in ("student", "teacher") for key in fully_null
    }
    for name, moved in unchanged.items():
        assert moved <= 1e-6, name
    for name, error in change_errors.items():
        assert error <= steps.CHANGE_TOLERANCE, name
