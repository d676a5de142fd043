"""Linear evaluation of a frozen backbone: the reference's `eval_linear` protocol.

Features (the backbone is frozen and runs in inference mode): for a ViT the CLS outputs (after
the final norm) of the last `n_last_blocks` blocks, concatenated, plus with
`avgpool_patchtokens` the average of the last block's patch tokens; for a ResNet its pooled
feature. On them one linear layer (weights N(0, 0.01), zero bias) is trained with SGD, momentum
0.9 (PyTorch's rule), no weight decay, learning rate `lr * batch_size / 256` on a per-epoch
cosine to 0, on random-resized crops (scale 0.08-1, bicubic) with horizontal flips; it is
evaluated on the centre-cropped test split after every epoch.

Everything lives in `output_dir`: `linear_config.json` (the settings; a rerun with different
ones is refused), `checkpoints/` (classifier and optimiser, written every epoch: a rerun of
the same command resumes), `log.jsonl` (one record per epoch), `tensorboard/` and
`summary.json` (final and best accuracies).
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import tensorflow as tf

from dino_keras import run_dir
from dino_keras.data import augment
from dino_keras.data.multicrop import build_eval_dataset
from dino_keras.data.record_stream import epoch_images
from dino_keras.data.sources import ImageSource, decode_image
from dino_keras.optim import DinoOptimizer
from dino_keras.schedules import EpochCosineSchedule, epoch_cosine

CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default
INIT_STDDEV = 0.01
SETTINGS_FILE = "linear_config.json"
# A rerun must agree on these to resume (the others may change, e.g. more epochs).
_RESUME_KEYS = (
    "backbone",
    "n_last_blocks",
    "avgpool_patchtokens",
    "num_classes",
    "image_size",
    "feature_dim",
)


class LinearEvalError(ValueError):
    """Invalid settings or a resume that does not match the run in the output directory."""


@dataclasses.dataclass
class LinearSettings:
    output_dir: str
    n_last_blocks: int = 4
    avgpool_patchtokens: bool = False
    lr: float = 0.001
    batch_size: int = 128
    epochs: int = 100
    image_size: int = 224
    seed: int = 0
    eval_batch_size: int = 256

    def validate(self) -> None:
        for name in ("n_last_blocks", "batch_size", "epochs", "image_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise LinearEvalError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LinearEvalError(f"--lr must be positive, got {self.lr}")
        if not self.output_dir:
            raise LinearEvalError("--output_dir is empty")

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256.0


# --------------------------------------------------------------------------- #
# Features, classifier
# --------------------------------------------------------------------------- #


class FrozenFeatures:
    """backbone -> the linear protocol's features of normalised images (no gradient)."""

    def __init__(
        self, backbone: keras.Model, n_last_blocks: int = 4, avgpool_patchtokens: bool = False
    ):
        self.backbone = backbone
        self.is_vit = hasattr(backbone, "get_intermediate_layers")
        if self.is_vit and n_last_blocks > len(backbone.blocks):
            raise LinearEvalError(
                f"--n_last_blocks={n_last_blocks} exceeds the backbone's "
                f"depth {len(backbone.blocks)}"
            )
        self.n_last_blocks = n_last_blocks
        self.avgpool_patchtokens = avgpool_patchtokens
        width = int(backbone.num_features)
        self.feature_dim = (
            width * (n_last_blocks + int(avgpool_patchtokens)) if self.is_vit else width
        )

    def __call__(self, images):
        if not self.is_vit:
            features = self.backbone(images, training=False)
        else:
            outputs = self.backbone.get_intermediate_layers(images, self.n_last_blocks)
            parts = [tokens[:, 0] for tokens in outputs]
            if self.avgpool_patchtokens:
                parts.append(tf.reduce_mean(outputs[-1][:, 1:], axis=1))
            features = tf.concat(parts, axis=-1)
        return tf.stop_gradient(tf.cast(features, tf.float32))


def build_classifier(feature_dim: int, num_classes: int, seed: int = 0) -> keras.layers.Dense:
    classifier = keras.layers.Dense(
        num_classes,
        name="linear",
        kernel_initializer=keras.initializers.RandomNormal(stddev=INIT_STDDEV, seed=seed),
        bias_initializer="zeros",
    )
    classifier.build((None, feature_dim))
    return classifier


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def _epoch_seed(seed: int, epoch: int):
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), epoch)


def build_train_dataset(
    source: ImageSource, *, image_size: int, batch_size: int, seed: int, epoch: int
) -> tf.data.Dataset:
    """One epoch of (normalised random-resized crop + flip [B, S, S, 3], int64 label [B]).

    The order and every crop depend on (seed, epoch) only; the last batch keeps the remainder.
    Record files are streamed as in training (files in a seeded order, a shuffle buffer), other
    sources read in a seeded permutation.
    """
    epoch_seed = _epoch_seed(seed, epoch)
    order_seed, batch_seed = tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))
    if source.records is not None:
        return _streamed_train_dataset(source, order_seed, batch_seed, image_size, batch_size)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(source.num_examples, dtype=tf.int64), order_seed
    )
    positions = tf.data.Dataset.from_tensor_slices(
        (tf.range(source.num_examples, dtype=tf.int64), order)
    )

    if augment.crops_whole_batches(source.image_shape):
        height, width = source.image_shape

        def crop_batch(batch_positions, indices):
            seed_tensor = tf.random.experimental.stateless_fold_in(batch_seed, batch_positions[0])
            box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed_tensor, 2))
            images, labels = source.read_example(indices)
            images = tf.cast(images, tf.float32) / 255.0
            # Boxes for a full batch (static shape), cut to this batch's size.
            count = tf.shape(indices)[0]
            boxes = augment.sample_crop_boxes(box_seed, height, width, CROP_SCALE, [1, batch_size])
            boxes = augment.CropBoxes(*(field[:, :count] for field in boxes))
            crops = augment.crop_and_resize_batch(images, boxes, image_size)[0]
            crops = tf.ensure_shape(crops, [None, image_size, image_size, 3])
            return _flip_and_normalize(crops, flip_seed), labels

        batches = positions.batch(batch_size).map(crop_batch, num_parallel_calls=tf.data.AUTOTUNE)
    else:

        def crop_one(position, index):
            image, label = source.read_example(index)
            return _crop(image, label, position, batch_seed, image_size)

        batches = _flipped_batches(
            positions.map(crop_one, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors(log_warning=True), batch_seed, batch_size)
    return batches.prefetch(tf.data.AUTOTUNE)


def _flip_and_normalize(crops, seed_tensor):
    flips = tf.random.stateless_uniform(tf.shape(crops)[:1], seed_tensor) < 0.5
    return augment.normalize(augment.flip_horizontally(crops, flips))


def _crop(image, label, position, batch_seed, image_size: int):
    """One image's random-resized crop, seeded by its position in the epoch."""
    seed_tensor = tf.random.experimental.stateless_fold_in(batch_seed, position)
    image = tf.cast(image, tf.float32) / 255.0
    box = augment.sample_crop_boxes(
        seed_tensor, tf.shape(image)[0], tf.shape(image)[1], CROP_SCALE, []
    )
    crop = augment.crop_and_resize(image, box, image_size)
    return tf.ensure_shape(crop, [image_size, image_size, 3]), label, position


def _flipped_batches(crops: tf.data.Dataset, batch_seed, batch_size: int) -> tf.data.Dataset:
    def flip_batch(crops, labels, batch_positions):
        seed_tensor = tf.random.experimental.stateless_fold_in(batch_seed, batch_positions[0])
        return _flip_and_normalize(crops, seed_tensor), labels

    return crops.batch(batch_size).map(flip_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _streamed_train_dataset(source: ImageSource, order_seed, batch_seed, image_size: int,
                            batch_size: int) -> tf.data.Dataset:
    file_order_seed, shuffle_seed = tf.unstack(tf.random.experimental.stateless_split(order_seed))
    images = tf.data.Dataset.from_tensors(0).flat_map(
        lambda _: epoch_images(source.records, file_order_seed=file_order_seed,
                               shuffle_seed=shuffle_seed))
    crops = images.enumerate().map(
        lambda position, image: _crop(decode_image(image[0]), image[1], position, batch_seed,
                                      image_size),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return _flipped_batches(crops, batch_seed, batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- #
# Training and evaluation
# --------------------------------------------------------------------------- #


def accuracy_counts(logits, labels) -> tuple[tf.Tensor, tf.Tensor]:
    """Number of top-1 and top-5 hits in a batch."""
    k = min(5, logits.shape[-1])
    _, top = tf.math.top_k(logits, k=k)
    hits = tf.equal(tf.cast(top, tf.int64), tf.cast(labels, tf.int64)[:, None])
    top1 = tf.reduce_sum(tf.cast(hits[:, 0], tf.int64))
    top5 = tf.reduce_sum(tf.cast(tf.reduce_any(hits, axis=1), tf.int64))
    return top1, top5


class LinearEvaluation:
    """The classifier, optimiser, steps and checkpoint of one linear evaluation."""

    def __init__(
        self,
        features: FrozenFeatures,
        num_classes: int,
        settings: LinearSettings,
        steps_per_epoch: int,
    ):
        self.features = features
        self.settings = settings
        self.num_classes = num_classes
        self.classifier = build_classifier(features.feature_dim, num_classes, settings.seed)
        self.optimizer = DinoOptimizer(
            kind="sgd",
            learning_rate=EpochCosineSchedule(settings.peak_lr, settings.epochs, steps_per_epoch),
            weight_decay_schedule=0.0,
            clip_grad=0.0,
            name="linear_sgd",
        )
        self.optimizer.build(self.classifier.trainable_variables)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(
            classifier_kernel=self.classifier.kernel,
            classifier_bias=self.classifier.bias,
            optimizer=self.optimizer,
            epoch=self.epoch,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            run_dir.join(settings.output_dir, run_dir.CHECKPOINTS_DIR),
            max_to_keep=1,
            checkpoint_name="latest",
        )
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._train_step = tf.function(self._train_step_fn, reduce_retracing=True)
        self._eval_step = tf.function(self._eval_step_fn, reduce_retracing=True)

    def _train_step_fn(self, images, labels):
        features = self.features(images)
        variables = self.classifier.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.loss_fn(labels, self.classifier(features))
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    def _eval_step_fn(self, images, labels):
        logits = self.classifier(self.features(images))
        loss = self.loss_fn(labels, logits) * tf.cast(tf.shape(labels)[0], tf.float32)
        return (loss,) + accuracy_counts(logits, labels)

    def restore(self) -> int:
        """Restore the latest checkpoint in output_dir; returns the epochs already done."""
        path = self.manager.latest_checkpoint
        if path is None:
            return 0
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return int(self.epoch.numpy())

    def train_epoch(self, dataset) -> float:
        total, batches = 0.0, 0
        for images, labels in dataset:
            total += float(self._train_step(images, labels))
            batches += 1
        return total / max(batches, 1)

    def evaluate(self, dataset) -> dict:
        loss = top1 = top5 = count = 0
        for images, labels in dataset:
            batch_loss, batch_top1, batch_top5 = self._eval_step(images, labels)
            loss += float(batch_loss)
            top1 += int(batch_top1)
            top5 += int(batch_top5)
            count += int(labels.shape[0])
        if count == 0:
            raise LinearEvalError("the test split is empty")
        return {
            "test_loss": loss / count,
            "top1": 100.0 * top1 / count,
            "top5": 100.0 * top5 / count,
        }

    def save(self, epoch: int) -> str:
        self.epoch.assign(epoch)
        return self.manager.save(checkpoint_number=epoch)


def _check_or_write_settings(settings: LinearSettings, record: dict) -> None:
    checkpoints = run_dir.join(settings.output_dir, run_dir.CHECKPOINTS_DIR)
    saved = (
        run_dir.read_config(settings.output_dir, SETTINGS_FILE)
        if tf.train.latest_checkpoint(checkpoints)
        else None
    )
    for key in _RESUME_KEYS:
        if saved and key in saved and saved[key] != record[key]:
            raise LinearEvalError(
                f"{key}={record[key]!r} differs from the linear evaluation in "
                f"{settings.output_dir} ({key}={saved[key]!r}); use another --output_dir. "
                "Nothing was overwritten."
            )
    run_dir.write_config(settings.output_dir, record, SETTINGS_FILE)


def _read_log(path: str) -> list[dict]:
    records: dict[int, dict] = {}
    for record in run_dir.read_jsonl(path):
        records[record["epoch"]] = record  # a repeated epoch (crash, rerun): keep last
    return [records[epoch] for epoch in sorted(records)]


def run_linear_evaluation(
    backbone: keras.Model,
    train_source: ImageSource,
    test_source: ImageSource,
    settings: LinearSettings,
    *,
    backbone_description: str = "",
    verbose: bool = True,
) -> dict:
    """Train (or resume) and evaluate the linear classifier; returns the summary also written
    to `<output_dir>/summary.json`."""
    settings.validate()
    num_classes = max(train_source.num_classes or 0, test_source.num_classes or 0)
    if num_classes < 2:
        raise LinearEvalError(
            f"linear evaluation needs labelled images of at least two classes; "
            f"{train_source.name} has {train_source.num_classes} classes"
        )
    features = FrozenFeatures(backbone, settings.n_last_blocks, settings.avgpool_patchtokens)
    record = {
        **dataclasses.asdict(settings),
        "backbone": backbone_description,
        "num_classes": num_classes,
        "feature_dim": features.feature_dim,
        "train_data": train_source.name,
        "test_data": test_source.name,
    }
    _check_or_write_settings(settings, record)
    steps = math.ceil(train_source.num_examples / settings.batch_size)
    evaluation = LinearEvaluation(features, num_classes, settings, steps)
    start_epoch = evaluation.restore()
    log_path = run_dir.join(settings.output_dir, run_dir.LOG_FILE)
    tensorboard = run_dir.join(settings.output_dir, run_dir.TENSORBOARD_DIR)
    writer = tf.summary.create_file_writer(tensorboard)
    say = print if verbose else (lambda *args, **kwargs: None)
    if start_epoch:
        say(
            f"Resuming the linear evaluation in {settings.output_dir} after epoch {start_epoch}",
            flush=True,
        )
    say(
        f"Linear evaluation: {features.feature_dim} features -> {num_classes} classes, "
        f"{train_source.num_examples} training images, {steps} steps of {settings.batch_size}, "
        f"peak lr {settings.peak_lr:g}",
        flush=True,
    )
    test_dataset = build_eval_dataset(
        test_source, image_size=settings.image_size, batch_size=settings.eval_batch_size
    )
    start = time.time()
    for epoch in range(start_epoch, settings.epochs):
        epoch_start = time.time()
        lr = epoch_cosine(settings.peak_lr, epoch, settings.epochs)
        train_loss = evaluation.train_epoch(
            build_train_dataset(
                train_source,
                image_size=settings.image_size,
                batch_size=settings.batch_size,
                seed=settings.seed,
                epoch=epoch,
            )
        )
        result = evaluation.evaluate(test_dataset)
        entry = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": lr,
            **result,
            "epoch_seconds": round(time.time() - epoch_start, 2),
        }
        best = max([*_read_log(log_path), entry], key=lambda r: r["top1"])
        say(
            f"Epoch {epoch + 1}/{settings.epochs}: train loss {train_loss:.4f}, lr {lr:.3g}, "
            f"test top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% "
            f"(best top-1 {best['top1']:.2f}% after epoch {best['epoch']})",
            flush=True,
        )
        run_dir.append_jsonl(log_path, entry)
        with writer.as_default(step=epoch + 1):
            for name in ("train_loss", "lr", "test_loss", "top1", "top5"):
                tf.summary.scalar(f"linear/{name}", entry[name])
        writer.flush()
        evaluation.save(epoch + 1)
    writer.close()
    records = _read_log(log_path)
    if not records:
        raise LinearEvalError(f"no epoch was evaluated (--epochs={settings.epochs})")
    best = max(records, key=lambda r: r["top1"])
    final = records[-1]
    summary = {
        "epochs_completed": int(evaluation.epoch.numpy()),
        "final_top1": final["top1"],
        "final_top5": final["top5"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "best_epoch": best["epoch"],
        "num_classes": num_classes,
        "feature_dim": features.feature_dim,
        "backbone": backbone_description,
        "train_data": train_source.name,
        "test_data": test_source.name,
        "seconds_this_run": round(time.time() - start, 1),
        "log": log_path,
        "tensorboard": tensorboard,
    }
    run_dir.write_summary(settings.output_dir, summary)
    say(
        f"Linear evaluation: best top-1 {best['top1']:.2f}% (top-5 {best['top5']:.2f}%) after "
        f"epoch {best['epoch']}; final top-1 {final['top1']:.2f}%",
        flush=True,
    )
    return summary
