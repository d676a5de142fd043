"""Schedules against the reference's numpy tables, written out here independently."""

import numpy as np
import pytest

from dino_keras.schedules import CosineSchedule, cosine_schedule, teacher_temperature


def reference_cosine_table(base, final, epochs, steps_per_epoch, warmup_epochs=0, start=0.0):
    warmup_iters = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_lr_schedule_matches_reference_table(warmup_epochs):
    table = reference_cosine_table(5e-4 * 512 / 256, 1e-6, 10, 7, warmup_epochs)
    schedule = CosineSchedule(5e-4 * 512 / 256, 1e-6, 70, warmup_steps=7 * warmup_epochs)
    values = np.array([float(schedule(step)) for step in range(70)])
    np.testing.assert_allclose(values, table, rtol=1e-6, atol=1e-12)
    assert values[0] == 0.0 if warmup_epochs else values[0] == pytest.approx(1e-3)


def test_weight_decay_and_momentum_schedules_match_reference_table():
    steps = np.arange(40)
    wd = cosine_schedule(steps, base_value=0.04, final_value=0.4, total_steps=40).numpy()
    np.testing.assert_allclose(wd, reference_cosine_table(0.04, 0.4, 4, 10), rtol=1e-12)
    momentum = cosine_schedule(steps, base_value=0.996, final_value=1.0, total_steps=40).numpy()
    np.testing.assert_allclose(momentum, reference_cosine_table(0.996, 1.0, 4, 10), rtol=1e-12)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] < 1.0


def test_schedule_past_the_end_reads_last_entry():
    last = cosine_schedule(9, base_value=1.0, final_value=0.0, total_steps=10).numpy()
    assert cosine_schedule(25, base_value=1.0, final_value=0.0, total_steps=10).numpy() == last


@pytest.mark.parametrize("warmup_epochs", [0, 1, 30])
def test_teacher_temperature_matches_reference_table(warmup_epochs):
    epochs = 100
    table = np.concatenate(
        (np.linspace(0.04, 0.07, warmup_epochs), np.ones(epochs - warmup_epochs) * 0.07)
    )
    values = [
        float(
            teacher_temperature(
                e,
                warmup_teacher_temp=0.04,
                teacher_temp=0.07,
                warmup_teacher_temp_epochs=warmup_epochs,
            )
        )
        for e in range(epochs)
    ]
    np.testing.assert_allclose(values, table, rtol=1e-12)
