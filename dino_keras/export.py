"""SavedModel export of a DINO backbone for TensorFlow Serving.

The export is a plain `tf.Module` saved with `tf.saved_model.save`: two `tf.function`s with
fixed input signatures that capture the backbone's variables, so loading it needs TensorFlow
only (neither Keras nor dino_keras). Layout, as TF Serving expects it:

    <export_dir>/<version>/saved_model.pb
    <export_dir>/<version>/variables/...
    <export_dir>/<version>/assets.extra/dino_export.json   (what this is and how it was made)

Signatures:

* ``serving_default``: ``images`` float32 [batch, height, width, 3], RGB in 0..255, any height
  and width. For a ViT both sides are resized (bicubic, antialiased) to the nearest multiple of
  the patch size (at least one patch) unless they already are; the position embedding is
  interpolated in the graph for the run-time patch grid. ImageNet mean/std normalisation is
  done in the graph.
* ``serve_image_bytes``: ``image_bytes`` string [batch] of encoded JPEG/PNG (what TF Serving's
  REST API passes for ``{"b64": ...}`` values), each decoded to RGB, its shorter side resized to
  round(image_size * 256 / 224) (bicubic) and centre-cropped to image_size: the reference's
  evaluation transform, the one k-NN evaluation uses.

Outputs of both: ``embedding`` [batch, D] (the CLS feature after the final norm; ResNet: the
pooled feature), ``patch_tokens`` [batch, h0 * w0, D] (ResNet: the last feature map,
[batch, h * w, 2048]) and, for ViTs, ``attention`` [batch, heads, h0 * w0] (last block, CLS
query to the patches, per head).
"""

from __future__ import annotations

import datetime
import re
import uuid

import keras
import tensorflow as tf

from dino_keras import run_dir
from dino_keras.data import augment
from dino_keras.data.multicrop import _eval_transform

METADATA_FILE = "dino_export.json"
SAVED_MODEL_FILE = "saved_model.pb"
METADATA_DIR = "assets.extra"
IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_image_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """An export that cannot be written or a SavedModel that cannot be loaded."""


# --------------------------------------------------------------------------- #
# The serving graph
# --------------------------------------------------------------------------- #


def normalize_0_255(images: tf.Tensor) -> tf.Tensor:
    """RGB in 0..255 -> the network input (ImageNet mean/std on the 0..1 scale)."""
    return augment.normalize(images / 255.0)


def resize_to_patch_multiple(images: tf.Tensor, patch_size: int) -> tf.Tensor:
    """Resize [B, H, W, 3] (bicubic, antialiased, clipped to 0..255) so that both sides are the
    nearest multiple of `patch_size` (halves rounded up, at least one patch); unchanged when
    they already are."""
    shape = tf.shape(images)
    height, width = shape[1], shape[2]

    def nearest_multiple(side):
        patches = tf.math.floordiv(side + patch_size // 2, patch_size)
        return tf.maximum(patches, 1) * patch_size

    target_height, target_width = nearest_multiple(height), nearest_multiple(width)

    def resized():
        result = tf.image.resize(
            images, tf.stack([target_height, target_width]), method="bicubic", antialias=True
        )
        return tf.clip_by_value(result, 0.0, 255.0)

    same = tf.logical_and(tf.equal(height, target_height), tf.equal(width, target_width))
    return tf.cond(same, lambda: images, resized)


def decode_and_center_crop(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG strings [B] -> normalised float32 [B, image_size, image_size, 3] with
    the reference's evaluation transform (shorter side to round(image_size * 256 / 224),
    bicubic, centre crop)."""

    def one(encoded):
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])
        return tf.ensure_shape(_eval_transform(image, image_size), [image_size, image_size, 3])

    return tf.map_fn(
        one, image_bytes, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32)
    )


class BackboneOutputs:
    """The serving outputs of a backbone on normalised images (traced into the graph)."""

    def __init__(self, backbone: keras.Model):
        self.backbone = backbone
        self.is_vit = hasattr(backbone, "blocks")
        if not self.is_vit:
            pools = [
                layer
                for layer in backbone.layers
                if isinstance(layer, keras.layers.GlobalAveragePooling2D)
            ]
            if not pools:
                raise ExportError(
                    f"cannot find the feature map of backbone {backbone.name}: "
                    "neither a ViT nor a network ending in global average pooling"
                )
            self.feature_map = keras.Model(backbone.inputs, pools[-1].input)

    def __call__(self, images: tf.Tensor) -> dict:
        if self.is_vit:
            vit = self.backbone
            x = vit.prepare_tokens(images)
            for block in vit.blocks[:-1]:
                x = block(x, training=False)
            x, attention = vit.blocks[-1](x, training=False, return_attention=True)
            tokens = vit.norm(x)
            return {
                "embedding": tokens[:, 0],
                "patch_tokens": tokens[:, 1:],
                "attention": attention[:, :, 0, 1:],
            }
        feature_map = self.feature_map(images, training=False)
        shape = tf.shape(feature_map)
        return {
            "embedding": tf.reduce_mean(feature_map, axis=[1, 2]),
            "patch_tokens": tf.reshape(
                feature_map, [shape[0], shape[1] * shape[2], feature_map.shape[-1]]
            ),
        }


class ServingModule(tf.Module):
    """The exported object: the backbone's variables and the two serving functions.

    The Keras model itself is not tracked (only its variables are): the SavedModel then holds
    nothing Keras- or dino_keras-specific.
    """

    def __init__(self, backbone: keras.Model, *, image_size: int, patch_size: int | None):
        super().__init__(name="dino_backbone")
        outputs = BackboneOutputs(backbone)
        self.is_vit = outputs.is_vit
        self.image_size = image_size
        self.patch_size = patch_size
        self.model_variables = list(backbone.variables)

        def serve_images(images):
            images = tf.cast(images, tf.float32)
            if patch_size:
                images = resize_to_patch_multiple(images, patch_size)
            return outputs(normalize_0_255(images))

        def serve_image_bytes(image_bytes):
            return outputs(decode_and_center_crop(image_bytes, image_size))

        self.serve_images = tf.function(
            serve_images,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=IMAGES_INPUT)],
        )
        self.serve_image_bytes = tf.function(
            serve_image_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]
        )

    def signatures(self) -> dict:
        return {
            IMAGES_SIGNATURE: self.serve_images.get_concrete_function(),
            BYTES_SIGNATURE: self.serve_image_bytes.get_concrete_function(),
        }


# --------------------------------------------------------------------------- #
# Writing and reading exports
# --------------------------------------------------------------------------- #


def describe_backbone(backbone: keras.Model, config=None) -> dict:
    """Architecture facts for the metadata file."""
    is_vit = hasattr(backbone, "blocks")
    info = {"is_vit": is_vit, "num_features": int(getattr(backbone, "num_features", 0))}
    if config is not None:
        info["arch"] = config.arch
    if is_vit:
        info.update(
            patch_size=backbone.patch_size,
            embed_dim=backbone.embed_dim,
            depth=backbone.depth,
            num_heads=backbone.num_heads,
            native_image_size=backbone.image_size,
        )
    return info


def export_metadata(
    backbone,
    *,
    image_size: int,
    config=None,
    which: str | None = None,
    source_checkpoint: str | None = None,
    command: str | None = None,
) -> dict:
    from dino_keras import __version__

    architecture = describe_backbone(backbone, config)
    patch_size = architecture.get("patch_size")
    outputs = {
        "embedding": "float32 [batch, D]: CLS token after the final norm (ResNet: pooled feature)",
        "patch_tokens": "float32 [batch, patches, D] (ResNet: last feature map, row-major)",
    }
    if architecture["is_vit"]:
        outputs["attention"] = (
            "float32 [batch, heads, patches]: last block, CLS query to the "
            "patches, per head (patch grid row-major)"
        )
    resize = (
        f"both sides resized (bicubic, antialiased) to the nearest multiple of "
        f"{patch_size} (at least {patch_size}) when they are not multiples"
        if patch_size
        else "none"
    )
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "which": which,
        "image_size": image_size,
        "signatures": {
            IMAGES_SIGNATURE: {
                "inputs": {IMAGES_INPUT: "float32 [batch, height, width, 3], RGB 0..255"},
                "preprocessing": {"resize": resize, "normalize": "x / 255, ImageNet mean/std"},
                "outputs": outputs,
            },
            BYTES_SIGNATURE: {
                "inputs": {BYTES_INPUT: "string [batch]: encoded JPEG or PNG images"},
                "preprocessing": {
                    "decode": "RGB",
                    "resize": (
                        f"shorter side to round({image_size} * 256 / 224) = "
                        f"{round(image_size * 256 / 224)}, bicubic, antialiased"
                    ),
                    "crop": f"centre {image_size} x {image_size}",
                    "normalize": "x / 255, ImageNet mean/std",
                },
                "outputs": outputs,
            },
        },
        "normalization": {"mean": list(augment.IMAGENET_MEAN), "std": list(augment.IMAGENET_STD)},
        "source_checkpoint": source_checkpoint,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "dino_keras": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }


def export_backbone(
    backbone: keras.Model,
    export_dir: str,
    *,
    version: int = 1,
    image_size: int,
    config=None,
    which: str | None = None,
    source_checkpoint: str | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write the SavedModel of `backbone` to `<export_dir>/<version>/`; returns that path.

    Refuses an existing version directory unless `overwrite`. The model is written to a
    temporary (non-numeric, so TF Serving ignores it) directory beside it and renamed into place
    when complete; an overwritten version is replaced only then.
    """
    if version <= 0:
        raise ExportError(f"--version must be a positive integer, got {version}")
    patch_size = getattr(backbone, "patch_size", None) if hasattr(backbone, "blocks") else None
    if patch_size and image_size % patch_size:
        raise ExportError(
            f"--image_size={image_size} is not a multiple of the patch size {patch_size}"
        )
    target = run_dir.join(export_dir, str(version))
    if run_dir.exists(target) and not overwrite:
        raise ExportError(
            f"{target} already exists; choose another --version (TF Serving "
            "serves the highest), remove it or pass --overwrite_version. Nothing "
            "was written."
        )
    run_dir.makedirs(export_dir)
    staging = run_dir.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
    replaced = run_dir.join(export_dir, f".old-{version}-{uuid.uuid4().hex[:12]}")
    try:
        module = ServingModule(backbone, image_size=image_size, patch_size=patch_size)
        tf.saved_model.save(module, staging, signatures=module.signatures())
        metadata = export_metadata(
            backbone,
            image_size=image_size,
            config=config,
            which=which,
            source_checkpoint=source_checkpoint,
            command=command,
        )
        run_dir.write_json(run_dir.join(staging, METADATA_DIR, METADATA_FILE), metadata)
        if run_dir.exists(target):
            if not overwrite:
                raise ExportError(f"{target} appeared while exporting; not overwritten")
            run_dir.move_tree(target, replaced)
        # saved_model.pb last: off the local disk the move goes file by file, and a reader
        # (TF Serving, `resolve_saved_model_dir`) takes a version only once it has one.
        run_dir.move_tree(staging, target, last=SAVED_MODEL_FILE)
    finally:
        run_dir.remove(staging)
        run_dir.remove(replaced)
    return target


def export_run(
    checkpoint: str,
    export_dir: str,
    *,
    version: int = 1,
    which: str = "teacher",
    image_size: int | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> str:
    """Export the `which` backbone of a run (directory, checkpoints dir or checkpoint prefix)."""
    from dino_keras.run_loading import load_backbone

    loaded = load_backbone(checkpoint, which=which)
    return export_backbone(
        loaded.backbone,
        export_dir,
        version=version,
        image_size=image_size or loaded.config.global_crops_size,
        config=loaded.config,
        which=which,
        source_checkpoint=run_dir.absolute(loaded.checkpoint_path),
        command=command,
        overwrite=overwrite,
    )


def resolve_saved_model_dir(path: str) -> str:
    """The SavedModel directory for `path`: a version directory, or an export base directory
    (its highest numeric version, as TF Serving picks it)."""
    if not run_dir.is_dir(path):
        raise ExportError(f"SavedModel directory {path} does not exist")
    if run_dir.is_file(run_dir.join(path, SAVED_MODEL_FILE)):
        return path
    versions = [
        name.rstrip("/")
        for name in tf.io.gfile.listdir(path)
        if re.fullmatch(r"\d+/?", name)
        and run_dir.is_file(run_dir.join(path, name.rstrip("/"), SAVED_MODEL_FILE))
    ]
    if not versions:
        raise ExportError(
            f"{path} holds no saved_model.pb, neither directly nor in a numeric "
            "version subdirectory (<export_dir>/<version>/saved_model.pb)"
        )
    return run_dir.join(path, max(versions, key=int))


def read_metadata(saved_model_dir: str) -> dict:
    """The `dino_export.json` of an export ({} if it has none)."""
    path = run_dir.join(saved_model_dir, METADATA_DIR, METADATA_FILE)
    if not run_dir.is_file(path):
        return {}
    return run_dir.read_json(path)


def load_export(path: str):
    """(loaded SavedModel, metadata dict, resolved directory) of an export."""
    directory = resolve_saved_model_dir(path)
    try:
        loaded = tf.saved_model.load(directory)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise ExportError(f"cannot load the SavedModel in {directory}: {error}") from error
    missing = [
        name for name in (IMAGES_SIGNATURE, BYTES_SIGNATURE) if name not in loaded.signatures
    ]
    if missing:
        raise ExportError(
            f"{directory} is not a dino_keras export: it lacks the signatures {', '.join(missing)}"
        )
    return loaded, read_metadata(directory), directory


class ExportedBackbone:
    """A loaded export used like a backbone: normalised images (as `build_eval_dataset` yields
    them) -> `embedding`, through the `serving_default` signature."""

    def __init__(self, loaded):
        self.signature = loaded.signatures[IMAGES_SIGNATURE]
        self.mean = tf.constant(augment.IMAGENET_MEAN, tf.float32)
        self.std = tf.constant(augment.IMAGENET_STD, tf.float32)

    def __call__(self, images, training=False):
        pixels = (tf.cast(images, tf.float32) * self.std + self.mean) * 255.0
        return self.signature(**{IMAGES_INPUT: pixels})["embedding"]


def exported_features(loaded, dataset):
    """L2-normalised embeddings and labels of every (normalised images, labels) batch."""
    import numpy as np

    backbone = ExportedBackbone(loaded)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(tf.math.l2_normalize(backbone(images), axis=-1).numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise ExportError("the evaluation dataset is empty")
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)
