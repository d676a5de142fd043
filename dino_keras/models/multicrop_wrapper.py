"""Backbone + head applied to a list of crops with one backbone call per crop resolution."""

from __future__ import annotations

import itertools

import keras
from keras import ops


class MultiCropWrapper(keras.Model):
    """Runs the backbone once per run of consecutive same-size crops, the head once on all.

    Input: a sequence of crops [B, S_i, S_i, 3]. Output: [n_crops * B, out_dim], crop-major
    (rows i*B..(i+1)*B-1 belong to crop i), as the reference's wrapper.
    """

    def __init__(self, backbone: keras.Model, head: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head

    def backbone_features(self, crops, training=False):
        features = []
        for _, group in itertools.groupby(crops, key=lambda crop: tuple(crop.shape[1:3])):
            group = list(group)
            batch = group[0] if len(group) == 1 else ops.concatenate(group, axis=0)
            features.append(self.backbone(batch, training=training))
        return features[0] if len(features) == 1 else ops.concatenate(features, axis=0)

    def call(self, crops, training=False):
        return self.features_and_outputs(crops, training=training)[1]

    def features_and_outputs(self, crops, training=False):
        """(backbone features [n_crops * B, D], head outputs [n_crops * B, out_dim])."""
        if not isinstance(crops, (list, tuple)):
            crops = [crops]
        features = self.backbone_features(crops, training=training)
        return features, self.head(features, training=training)
