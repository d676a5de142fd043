"""Weighted k-NN evaluation of frozen features (the reference's `eval_knn` protocol)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


def embedding_function(backbone, strategy=None):
    """(images, labels) batch -> (L2-normalised backbone features, labels), XLA-compiled.

    Kept and reused across evaluations, it is compiled once per batch shape; a new one per
    call would compile the backbone afresh each time. With a multi-replica `strategy` each
    batch is split across the replicas (and workers), and the features and labels are gathered
    back from all of them.
    """

    @tf.function(jit_compile=True, reduce_retracing=True)
    def embed(images):
        return tf.math.l2_normalize(tf.cast(backbone(images, training=False), tf.float32), axis=-1)

    if strategy is None:
        return lambda images, labels: (embed(images), labels)

    @tf.function
    def embed_everywhere(images, labels):
        per_replica = strategy.run(lambda x, y: (embed(x), y), args=(images, labels))
        return tuple(strategy.gather(value, axis=0) for value in per_replica)

    return embed_everywhere


def extract_features(
    backbone, dataset, strategy=None, embed=None
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised backbone features and labels of every (images, labels) batch, through
    `embed` (an `embedding_function` of `backbone` and `strategy`; a new one if None)."""
    embed = embed or embedding_function(backbone, strategy)
    if strategy is not None:
        dataset = strategy.experimental_distribute_dataset(dataset)
    features, labels = [], []
    for images, batch_labels in dataset:
        batch_features, batch_labels = embed(images, batch_labels)
        features.append(batch_features.numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise ValueError("the evaluation dataset is empty")
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


def extract_pixels(dataset) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel baseline's features (what a backbone's features have to beat): the
    evaluation images exactly as the backbone sees them, flattened and L2-normalised; and the
    labels."""
    features, labels = [], []
    for images, batch_labels in dataset:
        flat = tf.reshape(tf.cast(images, tf.float32), [tf.shape(images)[0], -1])
        features.append(tf.math.l2_normalize(flat, axis=-1).numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise ValueError("the evaluation dataset is empty")
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


def weighted_knn(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> dict:
    """Top-1 / top-5 accuracy (percent) of the exp(similarity / T)-weighted k-NN vote.

    Features must be L2-normalised (similarity is the dot product). Ties in the class scores go
    to the lower class index.
    """
    k = min(k, len(train_labels))
    train = tf.constant(train_features, tf.float32)
    train_labels = tf.constant(train_labels, tf.int64)
    top1 = top5 = 0
    for start in range(0, len(test_labels), chunk_size):
        queries = tf.constant(test_features[start : start + chunk_size], tf.float32)
        targets = tf.constant(test_labels[start : start + chunk_size], tf.int64)
        similarity = tf.matmul(queries, train, transpose_b=True)
        distances, indices = tf.math.top_k(similarity, k=k, sorted=True)
        neighbours = tf.one_hot(tf.gather(train_labels, indices), num_classes)  # [q, k, C]
        votes = tf.reduce_sum(neighbours * tf.exp(distances / temperature)[..., None], axis=1)
        _, predictions = tf.math.top_k(votes, k=min(5, num_classes))
        correct = tf.equal(tf.cast(predictions, tf.int64), targets[:, None])
        top1 += int(tf.reduce_sum(tf.cast(correct[:, 0], tf.int32)))
        top5 += int(
            tf.reduce_sum(tf.cast(tf.reduce_any(correct[:, : min(5, k)], axis=1), tf.int32))
        )
    total = len(test_labels)
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


@dataclasses.dataclass
class KnnEvaluator:
    """k-NN of a backbone's features: a labelled train (bank) and test dataset."""

    train_dataset: tf.data.Dataset
    test_dataset: tf.data.Dataset
    num_classes: int
    k: int = 20
    temperature: float = 0.07
    strategy: tf.distribute.Strategy | None = None  # features computed on all replicas
    _pixel_result: dict | None = dataclasses.field(default=None, init=False, repr=False)
    # (backbone, its embedding_function): one compiled function for every evaluation of a run.
    _embedding: tuple | None = dataclasses.field(default=None, init=False, repr=False)

    def pixel_baseline(self) -> dict:
        """The same k-NN on the evaluation images' own pixels (computed once)."""
        if self._pixel_result is None:
            self._pixel_result = self._knn(
                extract_pixels(self.train_dataset), extract_pixels(self.test_dataset)
            )
        return self._pixel_result

    def __call__(self, backbone) -> dict:
        if self._embedding is None or self._embedding[0] is not backbone:
            self._embedding = (backbone, embedding_function(backbone, self.strategy))
        embed = self._embedding[1]
        return self._knn(
            extract_features(backbone, self.train_dataset, self.strategy, embed),
            extract_features(backbone, self.test_dataset, self.strategy, embed),
        )

    def _knn(self, train, test) -> dict:
        """`weighted_knn` of (features, labels) pairs with this evaluator's settings."""
        return weighted_knn(
            *train, *test, k=self.k, temperature=self.temperature, num_classes=self.num_classes
        )
