"""Weighted k-NN (dino_keras/evaluation/knn.py) on toy features with hand-computed answers."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.evaluation.knn import KnnEvaluator, extract_features, weighted_knn

# Unit vectors: a bank of four points on the quarter circle and two queries at its ends.
BANK = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], np.float32)
BANK_LABELS = np.array([0, 1, 1, 2])
QUERIES = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)


def knn(query_labels, **kwargs):
    kwargs.setdefault("num_classes", 3)
    return weighted_knn(BANK, BANK_LABELS, QUERIES, np.array(query_labels), **kwargs)


def test_hand_computed_vote_depends_on_temperature():
    # Query 0 has similarities 1, 0.8, 0.6 to its 3 neighbours (classes 0, 1, 1); query 1 has
    # 1, 0.8, 0.6 to classes 2, 1, 1. Class 0 (resp. 2) wins when exp(1/T) beats
    # exp(0.8/T) + exp(0.6/T): for T = 0.07 (e^14.3 vs e^11.4 + e^8.6) but not for T = 1
    # (2.718 vs 2.226 + 1.822).
    assert math.exp(1 / 0.07) > math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)
    assert math.exp(1.0) < math.exp(0.8) + math.exp(0.6)
    assert knn([0, 2], k=3, temperature=0.07) == {"top1": 100.0, "top5": 100.0}
    assert knn([0, 2], k=3, temperature=1.0) == {"top1": 0.0, "top5": 100.0}
    # ... and class 1 is then the answer for both queries.
    assert knn([1, 1], k=3, temperature=1.0)["top1"] == 100.0


def test_nearest_neighbour_and_top5_counts_only_the_k_voted_classes():
    assert knn([0, 2], k=1, temperature=0.07)["top1"] == 100.0
    # With 6 classes and k=2, query 0's votes rank classes 0, 1, then unvoted ones; as in the
    # reference, top-5 looks at the first min(5, k) = 2 predictions only.
    result = knn([1, 0], k=2, temperature=0.07, num_classes=6)
    assert result == {"top1": 0.0, "top5": 50.0}  # query 0: 1 is 2nd; query 1: 0 is unvoted


def test_k_larger_than_the_bank_and_chunking_do_not_change_results():
    full = knn([0, 2], k=200, temperature=0.07)
    assert full == knn([0, 2], k=4, temperature=0.07)
    assert knn([0, 2], k=3, temperature=0.5, chunk_size=1) == knn([0, 2], k=3, temperature=0.5)


def toy_dataset():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 4, 4, 3)).astype(np.float32)
    labels = np.arange(10) % 3
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(4), images, labels


def mean_colour(images, training=False):
    return tf.reduce_mean(images, axis=[1, 2])


def test_extract_features_normalises_and_keeps_order():
    dataset, images, labels = toy_dataset()
    features, extracted_labels = extract_features(mean_colour, dataset)
    expected = images.mean(axis=(1, 2))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(extracted_labels, labels)
    assert extracted_labels.dtype == np.int64
    with pytest.raises(ValueError, match="empty"):
        extract_features(mean_colour, dataset.take(0))


def test_knn_evaluator_of_a_bank_against_itself_is_perfect_at_k1():
    dataset, _, _ = toy_dataset()
    evaluator = KnnEvaluator(dataset, dataset, num_classes=3, k=1, temperature=0.07)
    assert evaluator(mean_colour) == {"top1": 100.0, "top5": 100.0}
