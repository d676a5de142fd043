"""DINO loss and centre update against a numpy computation."""

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.loss import DinoLoss, compiled_dino_cross_entropy


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_dino_loss(student, teacher, center, temp, ncrops):
    s = np.split(student / 0.1, ncrops)
    t = np.split(softmax((teacher - center) / temp), 2)
    terms = []
    for i, q in enumerate(t):
        for v in range(ncrops):
            if v == i:
                continue
            log_p = np.log(softmax(s[v]))
            terms.append(np.mean(np.sum(-q * log_p, axis=-1)))
    return np.mean(terms), len(terms)


def test_loss_matches_numpy_and_skips_same_crop_pairs():
    rng = np.random.default_rng(0)
    batch, ncrops, k = 3, 4, 5
    student = rng.normal(size=(ncrops * batch, k)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, k)).astype(np.float32)
    center = rng.normal(size=(1, k)).astype(np.float32) * 0.1
    loss, monitors = compiled_dino_cross_entropy(student, teacher, center, 0.04, ncrops)
    expected, n_terms = numpy_dino_loss(student, teacher, center, 0.04, ncrops)
    assert n_terms == 2 * ncrops - 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    probs = softmax((teacher - center) / 0.04)
    entropy = -np.sum(probs * np.log(probs), -1).mean()
    assert float(monitors["teacher_entropy"]) == pytest.approx(entropy, rel=1e-4)
    assert float(monitors["kl_teacher_student"]) == pytest.approx(expected - entropy, rel=1e-4)


def test_identical_crops_give_zero_kl_only_when_temperatures_agree():
    # Student crop equal to the teacher's other crop: KL is zero iff the teacher temperature
    # equals the student's 0.1 (and the centre is zero).
    logits = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    student = np.concatenate([logits, logits])  # 2 crops, batch 1: crop0 == crop1
    teacher = student.copy()
    _, same_temp = compiled_dino_cross_entropy(
        student, teacher, np.zeros((1, 6), np.float32), 0.1, 2
    )
    _, sharper = compiled_dino_cross_entropy(
        student, teacher, np.zeros((1, 6), np.float32), 0.04, 2
    )
    assert abs(float(same_temp["kl_teacher_student"])) < 1e-5
    assert float(sharper["kl_teacher_student"]) > 1e-3


def test_center_update_is_ema_of_batch_mean_after_loss():
    loss = DinoLoss(out_dim=4, num_student_crops=2)
    teacher = np.array([[0.0, 0.02, -0.03, 0.01], [0.5, -0.1, 0.04, 0.0]], np.float32)
    student = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 0.3, -0.2, 0.7]], np.float32)
    loss.center.assign(np.ones((1, 4), np.float32))
    value_before, _ = loss(student, teacher, 0.04)
    loss.update_center(tf.constant(teacher))
    np.testing.assert_allclose(
        loss.center.numpy(), 0.9 * 1.0 + 0.1 * teacher.mean(0, keepdims=True), rtol=1e-6
    )
    # The loss used the old centre: recomputing with the new one differs.
    value_after, _ = loss(student, teacher, 0.04)
    assert float(value_before) == pytest.approx(
        numpy_dino_loss(student, teacher, np.ones((1, 4)), 0.04, 2)[0], rel=1e-5
    )
    assert float(value_after) != pytest.approx(float(value_before))


def test_collapse_monitors_detect_uniform_and_one_hot_teachers():
    k = 8
    uniform_teacher = np.zeros((4, k), np.float32)  # every image: uniform distribution
    _, uniform = compiled_dino_cross_entropy(
        np.zeros((4, k), np.float32), uniform_teacher, np.zeros((1, k), np.float32), 0.04, 2
    )
    assert float(uniform["teacher_entropy"]) == pytest.approx(np.log(k), rel=1e-5)
    one_hot_teacher = np.tile(np.eye(k, dtype=np.float32)[:1] * 50, (4, 1))  # all on prototype 0
    _, collapsed = compiled_dino_cross_entropy(
        np.zeros((4, k), np.float32), one_hot_teacher, np.zeros((1, k), np.float32), 0.04, 2
    )
    assert float(collapsed["teacher_batch_entropy"]) < 1e-3


def numpy_sinkhorn_knopp(logits, iterations=3):
    """DINOv2's sinkhorn_knopp_teacher on one device, written out in numpy (float64)."""
    q = np.exp(logits.astype(np.float64)).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_knopp_matches_dinov2_and_spreads_the_batch():
    from dino_keras.loss import sinkhorn_knopp

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(12, 7)) * 3 + 20).astype(np.float32)  # large: the shift matters
    targets = sinkhorn_knopp(tf.constant(logits)).numpy()
    np.testing.assert_allclose(targets, numpy_sinkhorn_knopp(logits), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
    # Every prototype gets about an equal share of the batch (exactly after many iterations).
    many = sinkhorn_knopp(tf.constant(logits), iterations=50).numpy()
    np.testing.assert_allclose(many.sum(axis=0), 12 / 7, rtol=1e-3)


def test_sinkhorn_knopp_centering_replaces_the_centre():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(4 * 3, 5)).astype(np.float32)
    teacher = rng.normal(size=(2 * 3, 5)).astype(np.float32)
    center = rng.normal(size=(1, 5)).astype(np.float32)
    loss, monitors = compiled_dino_cross_entropy(
        student, teacher, center, 0.5, 4, centering="sinkhorn_knopp"
    )
    targets = np.split(numpy_sinkhorn_knopp(teacher / 0.5), 2)
    log_p = [np.log(softmax(s / 0.1)) for s in np.split(student, 4)]
    terms = [
        np.mean(np.sum(-q * log_p[v], axis=-1))
        for i, q in enumerate(targets)
        for v in range(4)
        if v != i
    ]
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
    probs = np.concatenate(targets)
    entropy = -np.sum(probs * np.log(probs), -1).mean()
    assert float(monitors["teacher_entropy"]) == pytest.approx(entropy, rel=1e-4)


def test_koleo_loss_matches_dinov2():
    from dino_keras.loss import koleo_loss

    rng = np.random.default_rng(3)
    features = rng.normal(size=(9, 6)).astype(np.float32)
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -2)
    nearest = x[similarity.argmax(axis=1)]
    expected = -np.mean(np.log(np.linalg.norm(x - nearest + 1e-8, axis=1) + 1e-8))
    assert float(koleo_loss(tf.constant(features))) == pytest.approx(expected, rel=1e-5)
    # Spreading the batch apart lowers it.
    assert float(koleo_loss(tf.constant(np.eye(6, dtype=np.float32)))) < expected


def test_koleo_weight_adds_the_term_of_each_global_crop():
    from dino_keras.loss import koleo_loss

    rng = np.random.default_rng(4)
    student = rng.normal(size=(3 * 4, 5)).astype(np.float32)
    teacher = rng.normal(size=(2 * 4, 5)).astype(np.float32)
    features = rng.normal(size=(2 * 4, 6)).astype(np.float32)
    plain, _ = DinoLoss(5, num_student_crops=3)(student, teacher, 0.04)
    with_koleo, monitors = DinoLoss(5, num_student_crops=3, koleo_loss_weight=0.1)(
        student, teacher, 0.04, features
    )
    koleo = float(koleo_loss(features[:4])) + float(koleo_loss(features[4:]))
    assert float(monitors["koleo_loss"]) == pytest.approx(koleo, rel=1e-5)
    assert float(with_koleo) == pytest.approx(float(plain) + 0.1 * koleo, rel=1e-5)
