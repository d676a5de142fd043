"""Optimisers with the reference's exact update rules and DINO's per-parameter policies.

One Keras optimiser class implements PyTorch's AdamW, SGD (momentum 0.9) and the reference's
LARS, because Keras' own differ in details that change the numbers: Keras' Adam adds epsilon
before the bias correction of the second moment, Keras' SGD decays weights by decoupled
shrinkage instead of adding `wd * w` to the gradient, and Keras has no LARS. On top of the
update rule, each parameter gets, in this order, as the reference's training loop:

1. per-tensor gradient clipping: g *= min(1, clip / (||g|| + 1e-6));
2. no update at all (no decay, no moment update, no step count) for the head's last layer
   while the step is inside the first `freeze_last_layer` epochs;
3. weight decay from a per-step cosine schedule, only for parameters that are neither biases
   nor 1-D (norm gains);
4. the update with the per-step learning rate.

Each parameter counts its own steps for the Adam bias correction, as PyTorch does, so the
last layer starts its correction from 1 when it is unfrozen.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dino_keras.schedules import CosineSchedule

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
MOMENTUM = 0.9
LARS_ETA = 0.001
CLIP_EPSILON = 1e-6


def is_weight_decayed(variable) -> bool:
    """The reference's rule: no decay for biases and for any 1-D parameter."""
    return not (variable.path.endswith("bias") or len(variable.shape) == 1)


def is_last_layer(variable) -> bool:
    return "last_layer" in variable.path


@keras.saving.register_keras_serializable("dino_keras")
class DinoOptimizer(keras.optimizers.Optimizer):
    """AdamW / SGD / LARS with DINO's clipping, freezing and weight-decay schedule.

    Args:
        kind: "adamw", "sgd" or "lars".
        learning_rate: a schedule of the step (the reference's warm-up + cosine).
        weight_decay_schedule: a schedule of the step for the decayed parameters.
        clip_grad: per-tensor clip norm; 0 disables.
        freeze_last_layer_steps: steps during which `last_layer` parameters are not updated.
    """

    def __init__(
        self,
        kind: str = "adamw",
        learning_rate=1e-3,
        weight_decay_schedule=None,
        clip_grad: float = 0.0,
        freeze_last_layer_steps: int = 0,
        name: str = "dino_optimizer",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if kind not in ("adamw", "sgd", "lars"):
            raise ValueError(f"unknown optimizer kind {kind!r}")
        self.kind = kind
        if weight_decay_schedule is None or isinstance(weight_decay_schedule, (int, float)):
            value = float(weight_decay_schedule or 0.0)
            weight_decay_schedule = CosineSchedule(value, value, 1)
        self.weight_decay_schedule = weight_decay_schedule
        self.clip_grad = clip_grad
        self.freeze_last_layer_steps = freeze_last_layer_steps

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._decayed = [is_weight_decayed(v) for v in variables]
        self._frozen_early = [is_last_layer(v) for v in variables]
        self._steps = [
            self.add_variable((), initializer="zeros", dtype="int64", name=f"{v.name}_step")
            for v in variables
        ]
        if self.kind == "adamw":
            self._moments = self.add_optimizer_variables(variables, "moment")
            self._velocities = self.add_optimizer_variables(variables, "velocity")
        else:
            self._momentum_buffers = self.add_optimizer_variables(variables, "momentum_buffer")

    def current_weight_decay(self):
        return self.weight_decay_schedule(self.iterations)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        gradient = tf.cast(gradient, variable.dtype)
        lr = tf.cast(learning_rate, variable.dtype)
        wd = (
            tf.cast(self.current_weight_decay(), variable.dtype)
            if self._decayed[index]
            else tf.constant(0.0, variable.dtype)
        )
        if self.clip_grad > 0:
            norm = tf.norm(gradient)
            gradient = gradient * tf.minimum(1.0, self.clip_grad / (norm + CLIP_EPSILON))

        def update():
            step = self._steps[index]
            step.assign_add(1)
            if self.kind == "adamw":
                self._adamw(variable, gradient, lr, wd, index, step)
            elif self.kind == "sgd":
                self._sgd(variable, gradient, lr, wd, index)
            else:
                self._lars(variable, gradient, lr, wd, index)
            return tf.constant(True)

        if self._frozen_early[index] and self.freeze_last_layer_steps > 0:
            tf.cond(
                self.iterations >= self.freeze_last_layer_steps, update, lambda: tf.constant(False)
            )
        else:
            update()

    def _adamw(self, variable, gradient, lr, wd, index, step):
        beta1, beta2 = ADAM_BETAS
        m, v = self._moments[index], self._velocities[index]
        variable.assign(variable * (1.0 - lr * wd))
        m.assign(m + (gradient - m) * (1.0 - beta1))
        v.assign(v * beta2 + gradient * gradient * (1.0 - beta2))
        # Bias corrections in float64, as PyTorch computes them from a Python step count.
        t = tf.cast(step, tf.float64)
        bias_correction1 = 1.0 - tf.pow(tf.constant(beta1, tf.float64), t)
        bias_correction2 = 1.0 - tf.pow(tf.constant(beta2, tf.float64), t)
        step_size = tf.cast(tf.cast(lr, tf.float64) / bias_correction1, variable.dtype)
        denom = tf.sqrt(v) / tf.cast(tf.sqrt(bias_correction2), variable.dtype) + ADAM_EPSILON
        variable.assign_sub(step_size * m / denom)

    def _sgd(self, variable, gradient, lr, wd, index):
        buf = self._momentum_buffers[index]
        gradient = gradient + wd * variable
        buf.assign(buf * MOMENTUM + gradient)
        variable.assign_sub(lr * buf)

    def _lars(self, variable, gradient, lr, wd, index):
        buf = self._momentum_buffers[index]
        if len(variable.shape) != 1:
            gradient = gradient + wd * variable
            param_norm = tf.norm(variable)
            update_norm = tf.norm(gradient)
            trust = tf.where(
                (param_norm > 0.0) & (update_norm > 0.0),
                LARS_ETA * param_norm / tf.maximum(update_norm, 1e-30),
                1.0,
            )
            gradient = gradient * trust
        buf.assign(buf * MOMENTUM + gradient)
        variable.assign_sub(lr * buf)

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "weight_decay_schedule": keras.saving.serialize_keras_object(
                self.weight_decay_schedule
            ),
            "clip_grad": self.clip_grad,
            "freeze_last_layer_steps": self.freeze_last_layer_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["weight_decay_schedule"] = keras.saving.deserialize_keras_object(
            config["weight_decay_schedule"], custom_objects=custom_objects
        )
        return super().from_config(config, custom_objects=custom_objects)


@keras.saving.register_keras_serializable("dino_keras")
class DinoLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling, with the step counter indexed by data iteration.

    Keras does not advance `iterations` on a step whose scaled gradients are not finite. That
    counter drives every schedule, the last-layer freeze and the resume position, so each
    skipped step would shift them all. The reference's GradScaler skips the update too, but
    its schedules are indexed by the data iteration, which advances: so does this counter.
    The parameters' own Adam step counts do not advance on a skipped step, as in PyTorch.
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)
