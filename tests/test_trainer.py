"""The compiled DINO train step: teacher init, EMA per optimiser step, centre, freezing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras.teacher_ema import matching_parameters
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
    return trainer


def test_teacher_starts_as_exact_copy_and_is_not_trainable():
    trainer = make_trainer()
    assert trainer.teacher.trainable_variables == []
    for teacher_var, student_var in matching_parameters(trainer.student, trainer.teacher):
        np.testing.assert_array_equal(teacher_var.numpy(), student_var.numpy())


@pytest.fixture(scope="module")
def two_fits_of_one_step():
    """One trainer fitted for one step, then for one more: (trainer, its teacher and centre
    before, the teacher's step-0 outputs, the state after step 1, the second fit's history).
    Shared so that the step is compiled once for the tests that read it."""
    keras.mixed_precision.set_global_policy("float32")
    trainer = make_trainer()
    pairs = matching_parameters(trainer.student, trainer.teacher)
    teacher_before = [t.numpy() for t, _ in pairs]
    teacher_out = trainer.teacher(list(fixed_crops()[:2]), training=True).numpy()
    trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)
    after_one_step = {
        "teacher": [t.numpy() for t, _ in pairs],
        "student": [s.numpy() for _, s in pairs],
        "center": trainer.center.numpy(),
        "iterations": int(trainer.optimizer.iterations),
    }
    history = trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)
    return trainer, teacher_before, teacher_out, after_one_step, history


def test_one_step_applies_ema_with_scheduled_momentum_and_updates_center(two_fits_of_one_step):
    _, teacher_before, teacher_out, after, _ = two_fits_of_one_step
    m = 0.9  # momentum schedule at step 0 is the base value
    for teacher, student, before in zip(
        after["teacher"], after["student"], teacher_before, strict=True
    ):
        np.testing.assert_allclose(teacher, m * before + (1 - m) * student, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        after["center"], 0.1 * teacher_out.mean(0, keepdims=True), rtol=1e-4, atol=1e-6
    )
    assert after["iterations"] == 1
    assert len(teacher_before) > 10


def test_fit_alone_runs_the_momentum_schedule_from_base_to_one(two_fits_of_one_step):
    trainer, *_, history = two_fits_of_one_step
    total = trainer.momentum_schedule.total_steps
    assert total == tiny_config().epochs * STEPS_PER_EPOCH
    assert float(trainer.momentum_schedule(0)) == pytest.approx(0.9)
    # the reference's cosine table over `total` steps: its last entry is just below 1
    last = 1.0 - 0.1 * 0.5 * (1.0 + np.cos(np.pi * (total - 1) / total))
    assert float(trainer.momentum_schedule(total - 1)) == pytest.approx(last)
    assert float(trainer.momentum_schedule(10 * total)) == pytest.approx(last)
    # the second fit's one step is step 1: its logged momentum, and no callback was given
    assert history.history["momentum"][-1] == pytest.approx(float(trainer.momentum_schedule(1)))


def test_logs_report_schedules_and_collapse_monitors(two_fits_of_one_step):
    *_, history = two_fits_of_one_step
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


def test_ema_once_per_optimizer_step_with_steps_per_execution():
    reference = make_trainer()
    reference.fit(crops_dataset(4), epochs=1, steps_per_epoch=4, verbose=0)
    for steps_per_execution in (2, 4):
        grouped = make_trainer(steps_per_execution=steps_per_execution)
        grouped.fit(crops_dataset(4), epochs=1, steps_per_epoch=4, verbose=0)
        assert int(grouped.optimizer.iterations) == 4
        for (a, _), (b, _) in zip(
            matching_parameters(reference.student, reference.teacher),
            matching_parameters(grouped.student, grouped.teacher),
            strict=True,
        ):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            reference.center.numpy(), grouped.center.numpy(), rtol=1e-5, atol=1e-7
        )


def test_last_layer_not_updated_during_first_epoch_then_updated():
    trainer = make_trainer(freeze_last_layer=1)
    last = trainer.student.head.last_layer.kernel_v
    initial = last.numpy()
    trainer.fit(
        crops_dataset(STEPS_PER_EPOCH),
        epochs=1,
        steps_per_epoch=STEPS_PER_EPOCH,
        verbose=0,
    )
    np.testing.assert_array_equal(last.numpy(), initial)
    trainer.fit(
        crops_dataset(STEPS_PER_EPOCH),
        epochs=2,
        initial_epoch=1,
        steps_per_epoch=STEPS_PER_EPOCH,
        verbose=0,
    )
    assert not np.allclose(last.numpy(), initial)


def test_mixed_bfloat16_step_is_finite():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    trainer = make_trainer(precision="mixed_bfloat16")
    history = trainer.fit(crops_dataset(2), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert trainer.student.backbone.cls_token.dtype == "float32"  # variables stay float32


def test_teacher_batchnorm_uses_batch_statistics_and_updates_its_own():
    trainer = make_trainer(use_bn_in_head=True)
    teacher_bn = [v for v in trainer.teacher.variables if "moving_" in v.path]
    student_bn = [v for v in trainer.student.variables if "moving_" in v.path]
    assert len(teacher_bn) == len(student_bn) == 4
    crops = fixed_crops()
    # A frozen Keras BatchNormalization would normalise with the running statistics (0 and 1).
    features = trainer.teacher.backbone(crops[0])
    hidden = trainer.teacher.head.mlp_layers[0](features).numpy()
    normalised = trainer.teacher.head.mlp_layers[1](hidden, training=True).numpy()
    expected = (hidden - hidden.mean(0)) / np.sqrt(hidden.var(0) + 1e-5)
    np.testing.assert_allclose(normalised, expected, rtol=1e-3, atol=1e-4)
    for variable in teacher_bn:  # the probe call above updated them; start again
        initial = np.zeros if "mean" in variable.path else np.ones
        variable.assign(initial(variable.shape))
    trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)
    # One teacher forward pass over both global crops: running = 0.9 * initial + 0.1 * batch.
    both = np.concatenate([trainer.teacher.backbone(c).numpy() for c in crops[:2]])
    hidden = trainer.teacher.head.mlp_layers[0](both).numpy()
    teacher_mean = next(v for v in teacher_bn if v.path.endswith("mlp_1/moving_mean"))
    teacher_var = next(v for v in teacher_bn if v.path.endswith("mlp_1/moving_variance"))
    # (the teacher's weights moved by the EMA after its forward pass; allow for that)
    np.testing.assert_allclose(teacher_mean.numpy(), 0.1 * hidden.mean(0), rtol=0.05, atol=1e-4)
    np.testing.assert_allclose(
        teacher_var.numpy(), 0.9 + 0.1 * hidden.var(0, ddof=1), rtol=0.05, atol=1e-4
    )


def test_fp16_step_skipped_by_the_loss_scaler_still_advances_the_schedules():
    keras.mixed_precision.set_global_policy("mixed_float16")
    trainer = make_trainer(use_fp16=True, freeze_last_layer=0)
    optimizer = trainer.optimizer
    inner = optimizer.inner_optimizer
    weights = [v.numpy() for v in trainer.student.trainable_variables]
    # A loss scale of 2^100 overflows every float16 gradient: the scaler skips the update.
    optimizer.dynamic_scale.assign(2.0**100)
    trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**99
    for before, variable in zip(weights, trainer.student.trainable_variables, strict=True):
        np.testing.assert_array_equal(variable.numpy(), before, err_msg=variable.path)
    assert all(int(step.numpy()) == 0 for step in inner._steps)  # no Adam step counted
    # The data iteration advanced, and with it every schedule (as the reference's `it`).
    assert int(optimizer.iterations.numpy()) == 1
    np.testing.assert_allclose(
        float(inner.learning_rate.numpy()), float(inner._learning_rate(1)), rtol=1e-6
    )
    optimizer.dynamic_scale.assign(1.0)
    trainer.fit(crops_dataset(1), epochs=1, steps_per_epoch=1, verbose=0)
    assert int(optimizer.iterations.numpy()) == 2
    assert all(int(step.numpy()) == 1 for step in inner._steps)
    assert any(
        not np.array_equal(v.numpy(), before)
        for before, v in zip(weights, trainer.student.trainable_variables, strict=True)
    )


def test_a_forward_pass_that_sums_over_replicas_is_not_compiled_on_its_own():
    from dino_keras.loss import DinoLoss
    from dino_keras.models.factory import build_student_and_teacher
    from dino_keras.trainer import DinoTrainer

    def trainer_of(synchronized_bn=False, **overrides):
        config = tiny_config(**overrides)
        student, teacher = build_student_and_teacher(config, synchronized_bn=synchronized_bn)
        loss = DinoLoss(config.out_dim, num_student_crops=4, centering=config.centering)
        return DinoTrainer(student, teacher, loss, momentum_schedule=lambda step: 0.9,
                           steps_per_epoch=1, warmup_teacher_temp=0.04, teacher_temp=0.04,
                           warmup_teacher_temp_epochs=0)

    assert not trainer_of().forward_reduces_across_replicas()
    assert not trainer_of(use_bn_in_head=True).forward_reduces_across_replicas()
    assert trainer_of(centering="sinkhorn_knopp").forward_reduces_across_replicas()
    assert trainer_of(True, use_bn_in_head=True).forward_reduces_across_replicas()
