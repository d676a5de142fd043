"""The teacher's exponential moving average of the student, as the reference's step does it.

Only parameters are averaged: the student's trainable weights plus the frozen weight-norm gain
of the head's last layer. The teacher's BatchNorm statistics come from its own forward passes,
as in the reference.
"""

from __future__ import annotations

import tensorflow as tf

from dino_keras.schedules import CosineSchedule


def momentum_schedule(base_momentum: float, total_steps: int) -> CosineSchedule:
    """The reference's teacher momentum: cosine from `base_momentum` to 1 over the run."""
    return CosineSchedule(base_momentum, 1.0, total_steps)


def matching_parameters(student, teacher):
    """(teacher, student) pairs of the student's parameters and the teacher's twins, matched by
    their path inside the networks."""

    def relative(variable):
        return variable.path.split("/", 1)[1]

    teacher_by_path = {relative(v): v for v in teacher.variables}
    parameters = list(student.trainable_variables) + [
        v for v in student.non_trainable_variables if v.path.endswith("last_layer/gain")
    ]
    return [(teacher_by_path[relative(v)], v) for v in parameters]


def update_teacher(pairs, momentum) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every pair; inside a
    replica context of a strategy, once per (mirrored) variable."""
    replica_context = tf.distribute.get_replica_context()
    if replica_context is not None and tf.distribute.has_strategy():
        replica_context.merge_call(_update_cross_replica, args=(pairs, momentum))
    else:
        for teacher_var, student_var in pairs:
            teacher_var.assign(teacher_var * momentum + student_var * (1.0 - momentum))


def _update_cross_replica(strategy, pairs, momentum):
    def ema(teacher_var, student_value, m):
        return teacher_var.assign(teacher_var * m + student_value * (1.0 - m))

    for teacher_var, student_var in pairs:
        strategy.extended.update(teacher_var.value, ema, args=(student_var.value, momentum))
