"""The compiled DINO train step: teacher init, EMA per optimiser step, centre, freezing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras.callbacks import TeacherMomentum, matching_parameters
from dino_keras.training import build_trainer
from tests.helpers import tiny_config

STEPS_PER_EPOCH = 4


def fixed_crops(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    globals_ = [rng.normal(size=(batch, 28, 28, 3)).astype(np.float32) for _ in range(2)]
    locals_ = [rng.normal(size=(batch, 12, 12, 3)).astype(np.float32) for _ in range(2)]
    return tuple(globals_ + locals_)


def crops_dataset(num_batches):
    batches = [fixed_crops(seed=i) for i in range(num_batches)]
    return tf.data.Dataset.from_tensor_slices(
        tuple(np.stack([b[c] for b in batches]) for c in range(4))
    )


def make_trainer(**overrides):
    keras.utils.set_random_seed(0)  # identical initial weights for every trainer of a test
    config = tiny_config(momentum_teacher=0.9, **overrides)
    trainer = build_trainer(config, STEPS_PER_EPOCH, config.batch_size_per_gpu)
    ema = TeacherMomentum(config.momentum_teacher, config.epochs * STEPS_PER_EPOCH)
    return trainer, ema


def test_teacher_starts_as_exact_copy_and_is_not_trainable():
    trainer, _ = make_trainer()
    assert trainer.teacher.trainable_variables == []
    for teacher_var, student_var in matching_parameters(trainer.student, trainer.teacher):
        np.testing.assert_array_equal(teacher_var.numpy(), student_var.numpy())


def test_one_step_applies_ema_with_scheduled_momentum_and_updates_center():
    trainer, ema = make_trainer()
    pairs = matching_parameters(trainer.student, trainer.teacher)
    teacher_before = [t.numpy() for t, _ in pairs]
    crops = fixed_crops()
    teacher_out = trainer.teacher(list(crops[:2]), training=True).numpy()
    trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, callbacks=[ema], verbose=0)
    m = 0.9  # momentum schedule at step 0 is the base value
    for (teacher_var, student_var), before in zip(pairs, teacher_before, strict=False):
        np.testing.assert_allclose(
            teacher_var.numpy(), m * before + (1 - m) * student_var.numpy(), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(
        trainer.center.numpy(), 0.1 * teacher_out.mean(0, keepdims=True), rtol=1e-4, atol=1e-6
    )
    assert int(trainer.optimizer.iterations) == 1


@pytest.mark.parametrize("steps_per_execution", [2, 4])
def test_ema_once_per_optimizer_step_with_steps_per_execution(steps_per_execution):
    reference, ema = make_trainer()
    reference.fit(crops_dataset(4), epochs=1, steps_per_epoch=4, callbacks=[ema], verbose=0)
    grouped, ema_grouped = make_trainer(steps_per_execution=steps_per_execution)
    grouped.fit(crops_dataset(4), epochs=1, steps_per_epoch=4, callbacks=[ema_grouped], verbose=0)
    assert int(grouped.optimizer.iterations) == 4
    for (a, _), (b, _) in zip(
        matching_parameters(reference.student, reference.teacher),
        matching_parameters(grouped.student, grouped.teacher), strict=False,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        reference.center.numpy(), grouped.center.numpy(), rtol=1e-5, atol=1e-7
    )


def test_last_layer_not_updated_during_first_epoch_then_updated():
    trainer, ema = make_trainer(freeze_last_layer=1)
    last = trainer.student.head.last_layer.kernel_v
    initial = last.numpy()
    trainer.fit(
        crops_dataset(STEPS_PER_EPOCH),
        epochs=1,
        steps_per_epoch=STEPS_PER_EPOCH,
        callbacks=[ema],
        verbose=0,
    )
    np.testing.assert_array_equal(last.numpy(), initial)
    trainer.fit(
        crops_dataset(STEPS_PER_EPOCH),
        epochs=2,
        initial_epoch=1,
        steps_per_epoch=STEPS_PER_EPOCH,
        callbacks=[ema],
        verbose=0,
    )
    assert not np.allclose(last.numpy(), initial)


def test_fit_without_teacher_momentum_callback_is_a_clear_error():
    trainer, _ = make_trainer()
    with pytest.raises(RuntimeError, match="TeacherMomentum"):
        trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)


def test_logs_report_schedules_and_collapse_monitors():
    trainer, ema = make_trainer()
    history = trainer.fit(crops_dataset(2), epochs=1, steps_per_epoch=2, callbacks=[ema], verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    for name in (
        "loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "teacher_batch_entropy",
        "kl_teacher_student",
        "center_norm",
    ):
        assert np.isfinite(logs[name]), name
    assert 0.0 <= logs["teacher_entropy"] <= np.log(64) + 1e-4
    assert logs["center_norm"] > 0


def test_mixed_bfloat16_step_is_finite():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    trainer, ema = make_trainer(precision="mixed_bfloat16")
    history = trainer.fit(crops_dataset(2), epochs=1, steps_per_epoch=2, callbacks=[ema], verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert trainer.student.backbone.cls_token.dtype == "float32"  # variables stay float32
