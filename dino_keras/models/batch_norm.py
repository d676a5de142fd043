"""BatchNormalization with PyTorch's semantics, which the reference's teacher depends on."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

# PyTorch's BatchNorm defaults: momentum 0.1 (Keras' 0.9) and epsilon 1e-5.
TORCH_MOMENTUM = 0.9
TORCH_EPSILON = 1e-5


@keras.saving.register_keras_serializable("dino_keras")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, but as torch's `nn.BatchNorm` / `nn.SyncBatchNorm` in training:

    - `training=True` normalises with the batch statistics and updates the running ones even
      when the layer is not trainable. Keras would switch a frozen layer to inference mode; the
      reference's teacher is frozen to the optimiser but stays in training mode, so its
      BatchNorm uses batch statistics and keeps its own running statistics.
    - The running variance is updated with the unbiased batch variance (n / (n - 1)); the
      batch is normalised with the biased one.
    - With `synchronized=True` the statistics are over the global batch (all replicas); the
      running statistics are then equal on every replica, so the first replica's update is
      the value of all.
    """

    def __init__(self, momentum=TORCH_MOMENTUM, epsilon=TORCH_EPSILON, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)

    def add_weight(self, *args, **kwargs):
        if not kwargs.get("trainable", True):
            # The running statistics are assigned in replica context under a strategy.
            kwargs["aggregation"] = "only_first_replica"
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if not training or mask is not None or self.renorm:
            return super().call(inputs, training=training and self.trainable, mask=mask)
        x = ops.cast(inputs, "float32")
        mean, variance = self._moments(x, None)
        count = 1
        for axis in self._reduction_axes:
            count = count * ops.shape(x)[axis]
        count = ops.cast(count, "float32")
        replica_context = tf.distribute.get_replica_context()
        if self.synchronized and replica_context is not None:
            count = count * replica_context.num_replicas_in_sync
        unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + unbiased * (1.0 - self.momentum)
        )
        outputs = ops.batch_normalization(
            x,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=ops.cast(self.beta, "float32") if self.center else None,
            scale=ops.cast(self.gamma, "float32") if self.scale else None,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)
