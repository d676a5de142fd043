"""A run's backbone as a `.keras` file, for fine-tuning in Keras.

`scripts/export.py --format=keras` writes `<export_dir>/backbone-<version>.keras`: a functional
Keras model, images float32 [batch, height, width, 3], RGB in 0..255 (as the SavedModel's
`serving_default`) -> `embedding` [batch, D] (the CLS feature after the final norm; ResNet: the
pooled feature). ImageNet mean/std normalisation is its first layer. Unlike the SavedModel it
does not resize: a ViT's sides must be multiples of its patch size (other multiples than the
training size interpolate the position embedding).

Loading it needs dino_keras' layers registered with Keras: importing this module registers
them, then `keras.saving.load_model(path)` restores the model.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dino_keras import run_dir

# Imported for their registration with Keras (`register_keras_serializable`), which loading needs.
from dino_keras.models import batch_norm, vit  # noqa: F401

KERAS_SUFFIX = ".keras"


class KerasExportError(ValueError):
    """A `.keras` export that cannot be written."""


@keras.saving.register_keras_serializable("dino_keras")
class PixelNormalization(keras.layers.Layer):
    """RGB in 0..255 -> (x / 255 - mean) / std, per channel."""

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        return (images / 255.0 - keras.ops.array(self.mean)) / keras.ops.array(self.std)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def keras_backbone(backbone: keras.Model) -> keras.Model:
    """The model the `.keras` file holds: 0..255 images -> the backbone's embedding."""
    from dino_keras.data.augment import IMAGENET_MEAN, IMAGENET_STD

    images = keras.Input((None, None, 3), name="images")
    normalized = PixelNormalization(IMAGENET_MEAN, IMAGENET_STD, name="normalize")(images)
    embedding = backbone(normalized)
    return keras.Model(images, embedding, name="dino_backbone")


def keras_export_path(export_dir: str, version: int) -> str:
    return run_dir.join(export_dir, f"backbone-{version}{KERAS_SUFFIX}")


def save_keras_backbone(
    backbone: keras.Model, export_dir: str, *, version: int = 1, overwrite: bool = False
) -> str:
    """Writes `<export_dir>/backbone-<version>.keras`; returns its path. An existing file is
    refused unless `overwrite`. The file is written under a temporary name beside it and
    renamed into place when complete (Keras saves to a local file; `tf.io.gfile` takes it to any
    file system TensorFlow reaches)."""
    if version <= 0:
        raise KerasExportError(f"--version must be a positive integer, got {version}")
    target = keras_export_path(export_dir, version)
    if run_dir.exists(target) and not overwrite:
        raise KerasExportError(
            f"{target} already exists; choose another --version, remove it or pass "
            "--overwrite_version. Nothing was written."
        )
    model = keras_backbone(backbone)
    try:
        return run_dir.write_file_atomically(target, model.save, overwrite=overwrite)
    except tf.errors.AlreadyExistsError as error:
        raise KerasExportError(f"{target} appeared while exporting; not overwritten") from error


def export_keras_run(
    checkpoint: str,
    export_dir: str,
    *,
    version: int = 1,
    which: str = "teacher",
    overwrite: bool = False,
) -> str:
    """The `which` backbone of a run (directory, checkpoints dir or prefix) as a `.keras` file."""
    from dino_keras.run_loading import load_backbone

    backbone = load_backbone(checkpoint, which=which).backbone
    backbone.trainable = True  # the teacher is frozen in training; the file is for fine-tuning
    return save_keras_backbone(backbone, export_dir, version=version, overwrite=overwrite)
