"""The DINO trainer: a Keras model whose `train_step` is one step of the reference's loop.

Per step (all inside one XLA-compiled function when `jit_compile=True`):
teacher forward on the two global crops, student forward on all crops, loss with the current
centre and teacher temperature, gradients, the optimiser update (clipping, last-layer freezing,
scheduled lr and weight decay: `dino_keras.optim`), the teacher EMA with the scheduled momentum
(`dino_keras.teacher_ema`) and the centre update. Every schedule reads the optimiser's step
counter, so a restored optimiser resumes every schedule. No callback takes part in the step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dino_keras.loss import DinoLoss
from dino_keras.schedules import teacher_temperature
from dino_keras.teacher_ema import matching_parameters, update_teacher

MONITOR_NAMES = ("loss", "teacher_entropy", "teacher_batch_entropy", "kl_teacher_student")


class DinoTrainer(keras.Model):
    """Holds student, teacher and the loss centre; trained with `fit` on multi-crop batches.

    Args:
        student, teacher: `MultiCropWrapper`s with identical architecture.
        dino_loss: the `DinoLoss` (owns the centre variable).
        momentum_schedule: the teacher momentum as a function of the optimiser step
            (`teacher_ema.momentum_schedule`).
        steps_per_epoch: optimiser steps per epoch (for the per-epoch teacher temperature).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the temperature schedule.

    `compile(jit_compile=True)` XLA-compiles the whole step on one device or a TPU; under a
    strategy with several CPU or GPU devices it compiles each replica's forward and backward
    pass instead (XLA cannot compile a step that touches every replica's variables), unless
    that pass sums over replicas (Sinkhorn-Knopp centering, synchronised BatchNorm): then the
    step runs uncompiled.
    """

    def __init__(
        self,
        student,
        teacher,
        dino_loss: DinoLoss,
        *,
        momentum_schedule,
        steps_per_epoch: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.dino_loss = dino_loss
        self.center = dino_loss.center
        self.steps_per_epoch = steps_per_epoch
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.momentum_schedule = momentum_schedule
        self.teacher_student_pairs = matching_parameters(student, teacher)
        self.replica_jit_compile = False
        self._compiled_gradients = None
        monitor_names = MONITOR_NAMES + (("koleo_loss",) if dino_loss.koleo_loss_weight else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in monitor_names}
        # Student and teacher come built; saying so spares Keras a symbolic build of the crops.
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' fit under a strategy draws and all-reduces one batch to build the model
        # symbolically; ours is built, and that reduction fails for multi-worker batches.
        return

    @property
    def metrics(self):
        return list(self.trackers.values())

    def compile(self, optimizer, *, jit_compile: bool = True, steps_per_execution: int = 1):
        strategy = tf.distribute.get_strategy()
        per_replica = (strategy.num_replicas_in_sync > 1
                       and not isinstance(strategy, tf.distribute.TPUStrategy))
        super().compile(optimizer=optimizer, jit_compile=jit_compile and not per_replica,
                        steps_per_execution=steps_per_execution)
        # A replica's compiled pass is a function of its own, and in one a cross-replica sum
        # (Sinkhorn-Knopp, synchronised BatchNorm) is refused: such a step runs as a graph.
        self.replica_jit_compile = (jit_compile and per_replica
                                    and not self.forward_reduces_across_replicas())

    def forward_reduces_across_replicas(self) -> bool:
        """Whether the loss or a network sums over replicas before the gradients."""
        if self.dino_loss.centering == "sinkhorn_knopp":
            return True
        return any(getattr(layer, "synchronized", False)
                   for network in (self.student, self.teacher)
                   for layer in network._flatten_layers())

    def current_teacher_temperature(self, step):
        return teacher_temperature(
            step // self.steps_per_epoch,
            warmup_teacher_temp=self.warmup_teacher_temp,
            teacher_temp=self.teacher_temp,
            warmup_teacher_temp_epochs=self.warmup_teacher_temp_epochs,
        )

    def call(self, crops, training=False):
        return self.student(crops, training=training)

    def compute_loss_and_outputs(self, crops, step, training=True):
        """Loss, monitors and teacher output for one batch of crops (no update)."""
        crops = list(crops)
        teacher_output = tf.stop_gradient(self.teacher(crops[:2], training=training))
        student_features, student_output = self.student.features_and_outputs(
            crops, training=training
        )
        temperature = self.current_teacher_temperature(step)
        global_batch_rows = 2 * tf.shape(crops[0])[0]
        loss, monitors = self.dino_loss(
            student_output, teacher_output, temperature, student_features[:global_batch_rows]
        )
        return loss, monitors, teacher_output, temperature

    def loss_and_gradients(self, crops, step):
        """Loss, monitors, teacher output, temperature and this replica's gradients.

        The loss is divided by the number of replicas before differentiation: the optimiser
        sums gradients over replicas, so the update follows the mean over the global batch.
        """
        variables = self.student.trainable_variables
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss, monitors, teacher_output, temperature = self.compute_loss_and_outputs(
                crops, step
            )
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled_loss, variables)
        return loss, monitors, teacher_output, temperature, gradients

    def train_step(self, data):
        # Keras wraps single-element batches as (x,): unwrap to the crops.
        crops = data[0] if len(data) == 1 else data
        step = tf.identity(self.optimizer.iterations)
        variables = self.student.trainable_variables
        if self.replica_jit_compile:
            # Several devices (MirroredStrategy): XLA cannot compile the whole step, which
            # touches every replica's variables, so each replica's forward and backward pass is
            # compiled on its own; the cross-replica updates run outside it.
            if self._compiled_gradients is None:
                self._compiled_gradients = tf.function(self.loss_and_gradients, jit_compile=True)
            outputs = self._compiled_gradients(crops, step)
        else:
            outputs = self.loss_and_gradients(crops, step)
        loss, monitors, teacher_output, temperature, gradients = outputs
        inner_optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        lr, wd = inner_optimizer.learning_rate, inner_optimizer.current_weight_decay()
        self.optimizer.apply(gradients, variables)
        momentum = self.momentum_schedule(step)
        update_teacher(self.teacher_student_pairs, momentum)
        self.dino_loss.update_center(teacher_output)

        self.trackers["loss"].update_state(loss)
        for name, value in monitors.items():
            self.trackers[name].update_state(value)
        logs = {name: tracker.result() for name, tracker in self.trackers.items()}
        logs.update(
            lr=lr,
            wd=wd,
            momentum=momentum,
            teacher_temp=temperature,
            center_norm=tf.norm(self.center),
        )
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages multi-worker logs with strategy.reduce(..., axis=0), which needs
            # a batch axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs
