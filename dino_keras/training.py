"""A whole DINO run from a `TrainConfig`: data, networks, trainer, callbacks, resume, summary.

Linear and always resumable: rerunning the same command continues from the latest checkpoint
in `output_dir` (or, when training is complete, only re-reports the summary).
"""

from __future__ import annotations

import logging
import time

import keras
import tensorflow as tf

from dino_keras import callbacks as cbs
from dino_keras import run_dir
from dino_keras.checkpointing import TrainingCheckpoint, check_or_write_run_config
from dino_keras.config import TrainConfig
from dino_keras.data.loader_processes import multicrop_dataset_from_processes
from dino_keras.data.multicrop import build_eval_dataset, build_multicrop_dataset, steps_per_epoch
from dino_keras.data.sources import ImageSource, resolve_source
from dino_keras.distribution import (
    WorkerRole,
    build_strategy,
    distribute_training_data,
    worker_role,
)
from dino_keras.evaluation.attention import AttentionImages
from dino_keras.evaluation.knn import KnnEvaluator
from dino_keras.loss import DinoLoss
from dino_keras.models.factory import build_student_and_teacher
from dino_keras.optim import DinoLossScaleOptimizer, DinoOptimizer
from dino_keras.schedules import CosineSchedule
from dino_keras.teacher_ema import momentum_schedule
from dino_keras.trainer import DinoTrainer

log = logging.getLogger(__name__)


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
        optimizer = DinoLossScaleOptimizer(optimizer)
    return optimizer


def build_trainer(config: TrainConfig, steps: int, global_batch: int, strategy=None):
    """Student, teacher, loss, optimiser and the compiled `DinoTrainer` (call in scope)."""
    strategy = strategy or tf.distribute.get_strategy()
    multi_device = strategy.num_replicas_in_sync > 1
    student, teacher = build_student_and_teacher(config, synchronized_bn=multi_device)
    dino_loss = DinoLoss(
        config.out_dim,
        num_student_crops=2 + config.local_crops_number,
        centering=config.centering,
        koleo_loss_weight=config.koleo_loss_weight,
    )
    trainer = DinoTrainer(
        student,
        teacher,
        dino_loss,
        momentum_schedule=momentum_schedule(config.momentum_teacher, config.epochs * steps),
        steps_per_epoch=steps,
        warmup_teacher_temp=config.warmup_teacher_temp,
        teacher_temp=config.teacher_temp,
        warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
    )
    optimizer = build_optimizer(config, global_batch, steps)
    trainer.compile(optimizer, jit_compile=config.jit_compile,
                    steps_per_execution=config.steps_per_execution)
    optimizer.build(student.trainable_variables)
    return trainer


def multicrop_dataset(config: TrainConfig, source: ImageSource, *, batch_size: int, **position):
    """The multi-crop pipeline with the crop flags of `config`, made in the training process or
    by `--num_workers` loader processes; `position`: start_epoch, skip_steps, num_shards,
    shard_index (see `build_multicrop_dataset`)."""
    pipeline = dict(
        global_crops_size=config.global_crops_size,
        local_crops_size=config.local_crops_size,
        global_crops_scale=tuple(config.global_crops_scale),
        local_crops_scale=tuple(config.local_crops_scale),
        local_crops_number=config.local_crops_number,
        blur_sigma=tuple(config.blur_sigma),
        batch_size=batch_size,
        seed=config.seed,
        **position,
    )
    if config.num_workers:
        return multicrop_dataset_from_processes(source, config.num_workers, **pipeline)
    return build_multicrop_dataset(source, **pipeline)


def run_training(config: TrainConfig, extra_callbacks: list | None = None, strategy=None) -> dict:
    """Train (or resume) as configured; returns the summary also written to summary.json.

    Rerunning resumes from the most advanced checkpoint or backup, mid-epoch if need be, with
    the same data order, optimiser state, centre and schedules. `extra_callbacks` run after
    the built-in ones. `strategy` overrides `--strategy` (tests).
    """
    config.validate()
    # First: logical CPU devices and cluster set-up must precede any other TensorFlow work.
    strategy = strategy or build_strategy(config)
    role = worker_role(strategy)
    try:
        return _run(config, strategy, role, extra_callbacks or [])
    finally:
        role.cleanup()


def _run(config: TrainConfig, strategy, role: WorkerRole, extra_callbacks: list) -> dict:
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        # keras-cv layers ask for the global generator, refused under determinism unless set.
        tf.random.set_global_generator(tf.random.Generator.from_seed(config.seed))
    train_source, eval_source = resolve_sources(config)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size_per_gpu * replicas
    steps = steps_per_epoch(train_source.num_examples, global_batch)
    config = config.with_epochs_for(steps)
    if role.is_chief:
        check_or_write_run_config(config)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.compute_precision)

    say = print if role.is_chief else (lambda *args, **kwargs: None)
    say(
        f"Training on {train_source.name}: {train_source.num_examples} images, "
        f"{steps} steps of {global_batch} ({replicas} replica(s) x {config.batch_size_per_gpu}) "
        f"per epoch, {config.epochs} epochs",
        flush=True,
    )

    with strategy.scope():
        trainer = build_trainer(config, steps, global_batch, strategy)
        checkpoint = TrainingCheckpoint(
            config.checkpoint_dir,
            student=trainer.student,
            teacher=trainer.teacher,
            optimizer=trainer.optimizer,
            center=trainer.center,
            write_directory=run_dir.join(
                role.output_dir(config.output_dir), run_dir.CHECKPOINTS_DIR
            ),
        )
        initial_step = checkpoint.restore().step
    initial_epoch, skip_steps = divmod(initial_step, steps)
    if initial_step:
        say(
            f"Resuming from {checkpoint.restored_path} at step {initial_step} "
            f"(epoch {initial_epoch + 1}, batch {skip_steps + 1} of {steps})",
            flush=True,
        )

    run_log = cbs.RunLog(role.output_dir(config.output_dir), enabled=role.is_chief)
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
            k=config.nb_knn,
            temperature=config.temperature,
            strategy=strategy if replicas > 1 else None,
        )
        knn = cbs.KnnEvaluation(
            evaluator,
            run_log,
            config.eval_every,
            config.epochs,
            config.nb_knn,
            evaluate_at_start=initial_step == 0,
            verbose=role.is_chief,
        )

    def training_data(start_epoch: int, skip: int):
        def make_dataset(batch_size, num_shards, shard_index):
            return multicrop_dataset(
                config,
                train_source,
                batch_size=batch_size,
                start_epoch=start_epoch,
                skip_steps=skip,
                num_shards=num_shards,
                shard_index=shard_index,
            )

        return distribute_training_data(strategy, global_batch, make_dataset)

    start = time.time()
    if initial_epoch < config.epochs:
        callbacks = [
            cbs.ReleaseFreeMemoryWhileCompiling(),
            cbs.StopOnNonFiniteLoss(steps, config.checkpoint_dir),
            *([cbs.SaveBackups(checkpoint, config.backup_every_steps, steps)]
              if config.backup_every_steps else []),
            *([knn] if knn else []),
            *(attention_images(config, eval_source or train_source) if role.is_chief else []),
            cbs.CollapseGuard(config.out_dim, stop=config.stop_on_collapse, verbose=role.is_chief),
            cbs.EpochLog(run_log),
            cbs.SaveCheckpoints(checkpoint, config.saveckp_freq),
            *extra_callbacks,
        ]
        fit_kwargs = dict(
            callbacks=callbacks,
            verbose=config.verbose if role.is_chief else 0,
            shuffle=False,  # the pipeline shuffles each epoch itself
        )
        if skip_steps:
            # The rest of the interrupted epoch, then the following epochs.
            trainer.fit(
                training_data(initial_epoch, skip_steps),
                epochs=initial_epoch + 1,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps - skip_steps,
                **fit_kwargs,
            )
            initial_epoch += 1
        if initial_epoch < config.epochs and not trainer.stop_training:
            trainer.fit(
                training_data(initial_epoch, 0),
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                **fit_kwargs,
            )
    else:
        say(f"Training already complete ({initial_epoch} epochs in {config.checkpoint_dir})")
    summary = summarize(config, run_log, checkpoint, time.time() - start)
    if role.is_chief:
        run_dir.write_summary(config.output_dir, summary)
    return summary


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
            run_dir.join(config.output_dir, run_dir.TENSORBOARD_DIR),
            every=max(config.eval_every, 1),
        )
    ]


def summarize(
    config: TrainConfig, run_log: cbs.RunLog, checkpoint: TrainingCheckpoint, seconds: float
) -> dict:
    records = run_log.records()
    knn_records = [r for r in records if "knn_top1" in r]
    trained = [r for r in records if "loss" in r]
    summary = {
        "epochs_completed": int(checkpoint.epoch.numpy()),
        "final_loss": trained[-1]["loss"] if trained else None,
        "nb_knn": config.nb_knn,
        "knn_top1_initial": knn_records[0]["knn_top1"]
        if knn_records and knn_records[0]["epoch"] == 0
        else None,
        "knn_top1_final": knn_records[-1]["knn_top1"] if knn_records else None,
        "knn_top5_final": knn_records[-1]["knn_top5"] if knn_records else None,
        "knn_top1_pixels": next(
            (r["knn_top1_pixels"] for r in knn_records if "knn_top1_pixels" in r), None
        ),
        "collapse": [
            {"epoch": r["epoch"], "state": r["collapse"]} for r in trained if "collapse" in r
        ],
        "training_seconds_this_run": round(seconds, 1),
        "checkpoint": checkpoint.latest_path,
        "log": run_log.path,
        "tensorboard": run_dir.join(config.output_dir, run_dir.TENSORBOARD_DIR),
    }
    return summary

