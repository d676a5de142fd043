"""The DINO loss: cross-entropy between sharpened, centred teacher and student distributions.

Computed in float32 whatever the compute precision. The centre is a non-trainable
`tf.Variable` updated after the loss from the mean teacher output over the global batch (all
replicas).

The loss is XLA-compiled as part of the trainer's compiled step. It is deliberately not a
`tf.function` of its own there: a nested function differentiated inside a jit-compiled step made
TF 2.21 treat every model variable as a compile-time constant and recompile the step at every
call. `compiled_dino_cross_entropy` is the standalone XLA-compiled form (evaluation, tests).
"""

from __future__ import annotations

import tensorflow as tf

STUDENT_TEMPERATURE = 0.1
CENTER_MOMENTUM = 0.9
SINKHORN_KNOPP_ITERATIONS = 3
KOLEO_EPSILON = 1e-8


def _entropy(probs, log_probs):
    return -tf.reduce_sum(probs * log_probs, axis=-1)


def _all_replicas_sum(value):
    """`value` (a tensor or a list of them) summed over all replicas, in one all-reduce."""
    replica_context = tf.distribute.get_replica_context()
    if replica_context is not None and replica_context.num_replicas_in_sync > 1:
        return replica_context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return value


def sinkhorn_knopp(teacher_logits, iterations: int = SINKHORN_KNOPP_ITERATIONS):
    """DINOv2's Sinkhorn-Knopp teacher targets from logits [N, K] (already / temperature).

    Alternately normalises the prototypes' total mass to 1/K each and every sample's to 1/N
    (N over the global batch), then rescales the rows to distributions: the teacher's
    assignments are spread over all prototypes by construction instead of by a centre.
    """
    logits = tf.cast(teacher_logits, tf.float32)
    # Subtracting one constant from every logit of the global batch only rescales Q, which the
    # first normalisation removes; the mean over replicas of their maxima is one constant.
    replicas = _all_replicas_sum(tf.constant(1.0))
    shift = _all_replicas_sum(tf.reduce_max(logits)) / replicas
    q = tf.exp(logits - shift)
    num_prototypes = tf.cast(tf.shape(q)[1], tf.float32)
    num_samples = _all_replicas_sum(tf.cast(tf.shape(q)[0], tf.float32))
    q = q / _all_replicas_sum(tf.reduce_sum(q))
    for _ in range(iterations):
        q = q / _all_replicas_sum(tf.reduce_sum(q, axis=0, keepdims=True)) / num_prototypes
        q = q / tf.reduce_sum(q, axis=1, keepdims=True) / num_samples
    return q * num_samples


def koleo_loss(features):
    """DINOv2's KoLeo regulariser of features [B, D]: -mean log distance to the nearest other
    sample, after L2 normalisation (the batch's features spread apart)."""
    x = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1, epsilon=KOLEO_EPSILON)
    similarity = tf.matmul(x, x, transpose_b=True)
    similarity = tf.linalg.set_diag(similarity, tf.fill([tf.shape(x)[0]], -2.0))
    nearest = tf.gather(x, tf.argmax(similarity, axis=1))
    # torch.nn.PairwiseDistance(eps=1e-8): || x - y + eps ||.
    distances = tf.norm(x - nearest + KOLEO_EPSILON, axis=-1)
    return -tf.reduce_mean(tf.math.log(distances + KOLEO_EPSILON))


def dino_cross_entropy(
    student_output,
    teacher_output,
    center,
    teacher_temp,
    num_student_crops: int,
    student_temp: float = STUDENT_TEMPERATURE,
    centering: str = "centering",
):
    """Loss and collapse monitors for one batch.

    Args:
        student_output: [num_student_crops * B, K] logits, crop-major.
        teacher_output: [2 * B, K] logits of the two global crops, crop-major.
        center: [1, K].
        teacher_temp: scalar.
        centering: "centering" (softmax of the centred teacher logits, the reference) or
            "sinkhorn_knopp" (`sinkhorn_knopp` of the teacher logits; the centre is unused).
    Returns:
        (loss, monitors): the mean over the 2 * num_student_crops - 2 pairs (teacher crop i,
        student crop v != i) of the batch-mean cross-entropy; monitors holds
        `teacher_entropy` (mean entropy of the per-image teacher distribution),
        `teacher_batch_entropy` (entropy of the batch-mean teacher distribution) and
        `kl_teacher_student` (mean over the same pairs of KL(teacher || student)).
    """
    student_output = tf.cast(student_output, tf.float32)
    teacher_output = tf.cast(teacher_output, tf.float32)
    teacher_temp = tf.cast(teacher_temp, tf.float32)
    student_log_probs = tf.split(
        tf.nn.log_softmax(student_output / student_temp, axis=-1), num_student_crops
    )
    if centering == "sinkhorn_knopp":
        teacher_probs = tf.stop_gradient(sinkhorn_knopp(teacher_output / teacher_temp))
        teacher_log_probs = tf.math.log(tf.maximum(teacher_probs, 1e-30))
    else:
        teacher_logits = (teacher_output - tf.cast(center, tf.float32)) / teacher_temp
        teacher_probs = tf.stop_gradient(tf.nn.softmax(teacher_logits, axis=-1))
        teacher_log_probs = tf.stop_gradient(tf.nn.log_softmax(teacher_logits, axis=-1))
    teacher_entropies = _entropy(teacher_probs, teacher_log_probs)
    teacher_probs = tf.split(teacher_probs, 2)
    teacher_entropies = tf.split(teacher_entropies, 2)

    cross_entropies, kls = [], []
    for i, target in enumerate(teacher_probs):
        for v, log_probs in enumerate(student_log_probs):
            if v == i:
                continue
            ce = tf.reduce_mean(-tf.reduce_sum(target * log_probs, axis=-1))
            cross_entropies.append(ce)
            kls.append(ce - tf.reduce_mean(teacher_entropies[i]))
    loss = tf.add_n(cross_entropies) / len(cross_entropies)

    mean_teacher = tf.reduce_mean(tf.concat(teacher_probs, axis=0), axis=0)
    monitors = {
        "teacher_entropy": tf.reduce_mean(tf.concat(teacher_entropies, axis=0)),
        "teacher_batch_entropy": _entropy(mean_teacher, tf.math.log(mean_teacher + 1e-30)),
        "kl_teacher_student": tf.add_n(kls) / len(kls),
    }
    return loss, monitors


compiled_dino_cross_entropy = tf.function(dino_cross_entropy, jit_compile=True)


class DinoLoss(tf.Module):
    """Owns the centre and the teacher-temperature-aware loss."""

    def __init__(
        self,
        out_dim: int,
        num_student_crops: int,
        student_temp: float = STUDENT_TEMPERATURE,
        center_momentum: float = CENTER_MOMENTUM,
        centering: str = "centering",
        koleo_loss_weight: float = 0.0,
        name: str = "dino_loss",
    ):
        super().__init__(name=name)
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"unknown centering {centering!r}")
        self.centering = centering
        self.koleo_loss_weight = koleo_loss_weight
        self.out_dim = out_dim
        self.num_student_crops = num_student_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # Identical on every replica: it is set from an all-reduced mean, so the first
        # replica's write is the value of all.
        self.center = tf.Variable(
            tf.zeros((1, out_dim)),
            trainable=False,
            name="center",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def __call__(self, student_output, teacher_output, teacher_temp, student_global_features=None):
        """Loss and monitors; with `koleo_loss_weight` > 0 the loss adds the weighted KoLeo term
        of `student_global_features` (the backbone features of the two global crops,
        crop-major, [2 * B, D]; one term per crop, summed, as DINOv2) and the monitors hold it
        as `koleo_loss`."""
        loss, monitors = dino_cross_entropy(
            student_output,
            teacher_output,
            self.center,
            teacher_temp,
            self.num_student_crops,
            self.student_temp,
            self.centering,
        )
        if self.koleo_loss_weight > 0:
            koleo = tf.add_n([koleo_loss(crop) for crop in tf.split(student_global_features, 2)])
            monitors["koleo_loss"] = koleo
            loss = loss + self.koleo_loss_weight * koleo
        return loss, monitors

    def update_center(self, teacher_output):
        """center <- m * center + (1 - m) * mean of teacher outputs over the global batch."""
        teacher_output = tf.cast(teacher_output, tf.float32)
        batch_sum = tf.reduce_sum(teacher_output, axis=0, keepdims=True)
        count = tf.cast(tf.shape(teacher_output)[0], tf.float32)
        batch_sum, count = _all_replicas_sum([batch_sum, count])
        batch_center = batch_sum / count
        self.center.assign(
            self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        )
        return batch_center
