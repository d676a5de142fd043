"""Per-step and per-epoch schedules of DINO and of the linear probe, in closed form on the step
counter.

The reference tabulates its schedules with numpy (`np.linspace` for warm-ups, a cosine over
the remaining steps) and indexes the table with the global step. The functions here compute
the same values from the step tensor itself, in float64, so they cost no memory for long runs
and can be traced into the compiled training step.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def _linspace_value(start: float, stop: float, num: int, index: tf.Tensor) -> tf.Tensor:
    """`np.linspace(start, stop, num)[index]` (endpoint included)."""
    if num <= 1:
        return tf.constant(start, tf.float64)
    return start + (stop - start) * tf.cast(index, tf.float64) / float(num - 1)


def cosine_schedule(
    step,
    *,
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> tf.Tensor:
    """The reference's `cosine_scheduler` table, read at `step` (0-based), as float64.

    Linear warm-up from `start_warmup_value` to `base_value` over `warmup_steps` points
    (endpoint included), then `final + (base - final) * (1 + cos(pi * i / n)) / 2` for the
    `n = total_steps - warmup_steps` remaining steps. Steps past the end read the last entry.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    step = tf.minimum(tf.cast(step, tf.int64), total_steps - 1)
    cosine_steps = total_steps - warmup_steps
    i = tf.cast(step - warmup_steps, tf.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1.0 + tf.cos(math.pi * i / float(max(cosine_steps, 1)))
    )
    if warmup_steps == 0:
        return cosine
    warmup = _linspace_value(start_warmup_value, base_value, warmup_steps, step)
    return tf.where(step < warmup_steps, warmup, cosine)


def teacher_temperature(
    epoch, *, warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int
) -> tf.Tensor:
    """Per-epoch teacher temperature: `np.linspace(warmup, final, W)` then constant (float64)."""
    epoch = tf.cast(epoch, tf.int64)
    if warmup_teacher_temp_epochs == 0:
        return tf.constant(teacher_temp, tf.float64)
    warm = _linspace_value(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epoch)
    return tf.where(epoch < warmup_teacher_temp_epochs, warm, tf.constant(teacher_temp, tf.float64))


@keras.saving.register_keras_serializable("dino_keras")
class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`cosine_schedule` as a Keras schedule (float32), for the optimizer's learning rate."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_steps: int,
        warmup_steps: int = 0,
        start_warmup_value: float = 0.0,
    ):
        self.base_value = base_value
        self.final_value = final_value
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_warmup_value = start_warmup_value

    def __call__(self, step):
        value = cosine_schedule(
            step,
            base_value=self.base_value,
            final_value=self.final_value,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            start_warmup_value=self.start_warmup_value,
        )
        return tf.cast(value, tf.float32)

    def get_config(self):
        return {
            "base_value": self.base_value,
            "final_value": self.final_value,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "start_warmup_value": self.start_warmup_value,
        }


def epoch_cosine(peak, epoch, epochs: int):
    """`peak * (1 + cos(pi * epoch / epochs)) / 2`: PyTorch's CosineAnnealingLR(T_max=epochs,
    eta_min=0) after `epoch` epochs. `epoch` is a Python number (a float result) or a float32
    tensor (a float32 tensor)."""
    cos = tf.cos if tf.is_tensor(epoch) else math.cos
    return peak * 0.5 * (1.0 + cos(math.pi * epoch / epochs))


@keras.saving.register_keras_serializable("dino_keras")
class EpochCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`epoch_cosine` stepped once per epoch, as a Keras schedule (float32): the linear
    probe's learning rate."""

    def __init__(self, peak: float, epochs: int, steps_per_epoch: int):
        self.peak = peak
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step):
        epoch = tf.cast(tf.math.floordiv(tf.cast(step, tf.int64), self.steps_per_epoch), tf.float32)
        return epoch_cosine(self.peak, epoch, self.epochs)

    def get_config(self):
        return {"peak": self.peak, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch}
