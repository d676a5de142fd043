"""A whole DINO run from a `TrainConfig`: data, networks, trainer, callbacks, resume, summary.

Linear and always resumable: rerunning the same command continues from the latest checkpoint
in `output_dir` (or, when training is complete, only re-reports the summary).
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import tensorflow as tf

from dino_keras import callbacks as cbs
from dino_keras.checkpointing import TrainingCheckpoint, check_or_write_run_config
from dino_keras.config import TrainConfig
from dino_keras.data.multicrop import build_eval_dataset, build_multicrop_dataset, steps_per_epoch
from dino_keras.data.sources import ImageSource, resolve_source
from dino_keras.evaluation.attention import AttentionImages
from dino_keras.evaluation.knn import KnnEvaluator
from dino_keras.loss import DinoLoss
from dino_keras.models.factory import build_student_and_teacher
from dino_keras.optim import DinoOptimizer
from dino_keras.schedules import CosineSchedule
from dino_keras.trainer import DinoTrainer

log = logging.getLogger(__name__)


def build_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The strategy named by --strategy (validated: only "default", one device, for now)."""
    return tf.distribute.get_strategy()


def resolve_sources(config: TrainConfig) -> tuple[ImageSource, ImageSource | None]:
    """Training source and the labelled evaluation source (None: no k-NN possible)."""
    train = resolve_source(
        config.data_path,
        "train",
        tfds_data_dir=config.tfds_data_dir or None,
        limit_images=config.limit_images or None,
    )
    eval_path = config.eval_data_path or config.data_path
    flag = "--eval_data_path" if config.eval_data_path else "--data_path"
    evaluation = resolve_source(
        eval_path, "test", tfds_data_dir=config.tfds_data_dir or None, flag_name=flag
    )
    if not train.num_classes or not evaluation.num_classes:
        log.warning(
            "k-NN evaluation disabled: %s has no labels",
            train.name if not train.num_classes else evaluation.name,
        )
        return train, None
    if evaluation.name == train.name:
        log.warning(
            "k-NN evaluation disabled: %s has no separate test split; pass --eval_data_path",
            config.data_path,
        )
        return train, None
    return train, evaluation


def build_lr_schedule(config: TrainConfig, global_batch: int, steps: int) -> CosineSchedule:
    return CosineSchedule(
        config.lr * global_batch / 256.0,
        config.min_lr,
        config.epochs * steps,
        warmup_steps=config.warmup_epochs * steps,
    )


def build_optimizer(config: TrainConfig, global_batch: int, steps: int):
    optimizer = DinoOptimizer(
        kind=config.optimizer,
        learning_rate=build_lr_schedule(config, global_batch, steps),
        weight_decay_schedule=CosineSchedule(
            config.weight_decay, config.weight_decay_end, config.epochs * steps
        ),
        clip_grad=config.clip_grad,
        freeze_last_layer_steps=config.freeze_last_layer * steps,
    )
    if config.compute_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_trainer(config: TrainConfig, steps: int, global_batch: int, synchronized_bn=False):
    """Student, teacher, loss, optimiser and the compiled `DinoTrainer` (call in scope)."""
    student, teacher = build_student_and_teacher(config, synchronized_bn=synchronized_bn)
    dino_loss = DinoLoss(config.out_dim, num_student_crops=2 + config.local_crops_number)
    trainer = DinoTrainer(
        student,
        teacher,
        dino_loss,
        steps_per_epoch=steps,
        warmup_teacher_temp=config.warmup_teacher_temp,
        teacher_temp=config.teacher_temp,
        warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
    )
    optimizer = build_optimizer(config, global_batch, steps)
    trainer.compile(
        optimizer=optimizer,
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    optimizer.build(student.trainable_variables)
    return trainer


def run_training(config: TrainConfig, extra_callbacks: list | None = None) -> dict:
    """Train (or resume) as configured; returns the summary also written to summary.json.

    `extra_callbacks` run after the built-in ones (e.g. to stop early or log elsewhere).
    """
    config.validate()
    train_source, eval_source = resolve_sources(config)
    check_or_write_run_config(config)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.compute_precision)

    strategy = build_strategy(config)
    global_batch = config.batch_size_per_gpu * strategy.num_replicas_in_sync
    steps = steps_per_epoch(train_source.num_examples, global_batch)
    print(
        f"Training on {train_source.name}: {train_source.num_examples} images, "
        f"{steps} steps of {global_batch} per epoch, {config.epochs} epochs",
        flush=True,
    )

    with strategy.scope():
        trainer = build_trainer(
            config, steps, global_batch, synchronized_bn=strategy.num_replicas_in_sync > 1
        )
        checkpoint = TrainingCheckpoint(
            config.checkpoint_dir,
            student=trainer.student,
            teacher=trainer.teacher,
            optimizer=trainer.optimizer,
            center=trainer.center,
        )
        initial_epoch = checkpoint.restore_latest()
    if initial_epoch:
        print(f"Resuming from {checkpoint.latest_path} (epoch {initial_epoch})", flush=True)

    run_log = cbs.RunLog(config.output_dir)
    knn = None
    if eval_source is not None:
        evaluator = KnnEvaluator(
            build_eval_dataset(
                train_source, image_size=config.global_crops_size, batch_size=config.eval_batch_size
            ),
            build_eval_dataset(
                eval_source, image_size=config.global_crops_size, batch_size=config.eval_batch_size
            ),
            num_classes=max(train_source.num_classes, eval_source.num_classes),
            k=config.knn_k,
            temperature=config.knn_temperature,
        )
        knn = cbs.KnnEvaluation(
            evaluator,
            run_log,
            config.eval_every,
            config.epochs,
            config.knn_k,
            initial_epoch=initial_epoch,
        )

    start = time.time()
    if initial_epoch < config.epochs:
        dataset = build_multicrop_dataset(
            train_source,
            global_crops_size=config.global_crops_size,
            local_crops_size=config.local_crops_size,
            global_crops_scale=config.global_crops_scale,
            local_crops_scale=config.local_crops_scale,
            local_crops_number=config.local_crops_number,
            batch_size=global_batch,
            seed=config.seed,
            start_epoch=initial_epoch,
        )
        callbacks = [
            cbs.TeacherMomentum(config.momentum_teacher, config.epochs * steps),
            cbs.StopOnNonFiniteLoss(steps, config.checkpoint_dir),
            *([knn] if knn else []),
            *attention_images(config, eval_source or train_source),
            cbs.EpochLog(run_log),
            cbs.SaveCheckpoints(checkpoint, config.saveckp_freq),
            *(extra_callbacks or []),
        ]
        trainer.fit(
            dataset,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=config.verbose,
            shuffle=False,  # the dataset is shuffled per epoch by the pipeline
        )
    else:
        print(f"Training already complete ({initial_epoch} epochs in {config.checkpoint_dir})")
    return write_summary(config, run_log, checkpoint, time.time() - start)


def attention_images(config: TrainConfig, source: ImageSource, count: int = 4) -> list:
    """TensorBoard attention maps of the first `count` evaluation images (ViTs only)."""
    if not config.is_vit:
        return []
    images, _ = next(
        iter(build_eval_dataset(source, image_size=config.global_crops_size, batch_size=count))
    )
    return [
        AttentionImages(
            images.numpy(),
            os.path.join(config.output_dir, "tensorboard"),
            every=max(config.eval_every, 1),
        )
    ]


def write_summary(
    config: TrainConfig, run_log: cbs.RunLog, checkpoint: TrainingCheckpoint, seconds: float
) -> dict:
    records = run_log.records()
    knn_records = [r for r in records if "knn_top1" in r]
    trained = [r for r in records if "loss" in r]
    summary = {
        "epochs_completed": int(checkpoint.epoch.numpy()),
        "final_loss": trained[-1]["loss"] if trained else None,
        "knn_k": config.knn_k,
        "knn_top1_initial": knn_records[0]["knn_top1"]
        if knn_records and knn_records[0]["epoch"] == 0
        else None,
        "knn_top1_final": knn_records[-1]["knn_top1"] if knn_records else None,
        "knn_top5_final": knn_records[-1]["knn_top5"] if knn_records else None,
        "training_seconds_this_run": round(seconds, 1),
        "checkpoint": checkpoint.latest_path,
        "log": run_log.path,
        "tensorboard": os.path.join(config.output_dir, "tensorboard"),
    }
    path = os.path.join(config.output_dir, "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary
