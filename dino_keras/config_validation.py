"""`TrainConfig.validate`: one check per section of the config, in the order of `SECTIONS`.

Each check raises `ConfigError` naming the flag for the first invalid value or combination it
finds. A check may read fields of an earlier section, which has then passed its own check
(the crops' sizes are checked against the model's --patch_size, the teacher's warm-up against
the optimisation's --epochs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dino_keras.config import (
    ARCHS,
    CENTERINGS,
    OPTIMIZERS,
    PRECISIONS,
    SECTION_NAMES,
    STRATEGIES,
    ConfigError,
)

if TYPE_CHECKING:
    from dino_keras.config import TrainConfig


def validate(config: TrainConfig) -> None:
    """Raise `ConfigError` naming the flag for any invalid value or combination."""
    for section in SECTION_NAMES:
        _CHECKS[section](config)


def _fail(flag: str, message: str):
    raise ConfigError(f"--{flag}: {message}")


def _choice(config: TrainConfig, flag: str, kind: str, choices) -> None:
    value = getattr(config, flag)
    if value not in choices:
        _fail(flag, f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def _positive(config: TrainConfig, *flags: str) -> None:
    for flag in flags:
        if getattr(config, flag) <= 0:
            _fail(flag, f"must be positive, got {getattr(config, flag)}")


def _non_negative(config: TrainConfig, *flags: str) -> None:
    for flag in flags:
        if getattr(config, flag) < 0:
            _fail(flag, f"must be >= 0, got {getattr(config, flag)}")


def _check_model(config: TrainConfig) -> None:
    _choice(config, "arch", "architecture", ARCHS)
    _positive(config, "out_dim", "head_hidden_dim", "head_bottleneck_dim", "patch_size")
    _non_negative(config, "embed_dim", "depth", "num_heads", "drop_path_rate")
    if not config.drop_path_rate < 1.0:
        _fail("drop_path_rate", f"must be < 1, got {config.drop_path_rate}")
    if config.is_vit:
        width, _, heads = config.vit_dims
        if width % heads:
            _fail("num_heads", f"width {width} is not divisible by {heads} heads")


def _check_crops(config: TrainConfig) -> None:
    _positive(config, "global_crops_size")
    _non_negative(config, "local_crops_number")
    local = config.local_crops_number > 0
    if local and config.local_crops_size <= 0:
        _fail("local_crops_size", f"must be positive, got {config.local_crops_size}")
    for flag in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(config, flag)
        if len(scale) != 2:
            _fail(flag, f"needs two numbers 'min,max', got {scale!r}")
        low, high = scale
        if not (0.0 < low <= high <= 1.0):
            _fail(flag, f"needs 0 < min <= max <= 1, got {low},{high}")
    sigma = config.blur_sigma
    if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1] <= 2.0:
        _fail("blur_sigma", f"needs two numbers 0 < min <= max <= 2, got {sigma!r}")
    if local and config.local_crops_scale[1] > config.global_crops_scale[0]:
        _fail(
            "local_crops_scale",
            f"max ({config.local_crops_scale[1]}) must not exceed the global crops' min "
            f"scale --global_crops_scale ({config.global_crops_scale[0]})",
        )
    if config.is_vit:
        patch = config.patch_size
        if config.global_crops_size % patch:
            _fail(
                "global_crops_size",
                f"{config.global_crops_size} is not divisible by --patch_size={patch}",
            )
        if local and config.local_crops_size % patch:
            _fail(
                "local_crops_size",
                f"{config.local_crops_size} is not divisible by --patch_size={patch}",
            )
    elif local and config.local_crops_size < 32:
        _fail(
            "local_crops_size",
            f"resnet50 needs crops of at least 32 px, got {config.local_crops_size}",
        )


def _check_optimisation(config: TrainConfig) -> None:
    _choice(config, "optimizer", "optimizer", OPTIMIZERS)
    _choice(config, "precision", "precision", PRECISIONS)
    if config.use_fp16 and config.precision != "float32":
        _fail("use_fp16", f"conflicts with --precision={config.precision}; set only one")
    _positive(config, "batch_size_per_gpu", "epochs")
    _non_negative(
        config,
        "freeze_last_layer",
        "warmup_epochs",
        "lr",
        "min_lr",
        "weight_decay",
        "weight_decay_end",
        "clip_grad",
        "train_steps",
    )
    if config.warmup_epochs > config.epochs:
        _fail("warmup_epochs", f"({config.warmup_epochs}) exceeds --epochs ({config.epochs})")


def _check_teacher(config: TrainConfig) -> None:
    _choice(config, "centering", "centering", CENTERINGS)
    _non_negative(config, "warmup_teacher_temp_epochs", "koleo_loss_weight")
    if not 0.0 <= config.momentum_teacher <= 1.0:
        _fail("momentum_teacher", f"must be in [0, 1], got {config.momentum_teacher}")
    _positive(config, "teacher_temp", "warmup_teacher_temp")
    if config.warmup_teacher_temp_epochs > config.epochs:
        _fail(
            "warmup_teacher_temp_epochs",
            f"({config.warmup_teacher_temp_epochs}) exceeds --epochs ({config.epochs})",
        )


def _check_data(config: TrainConfig) -> None:
    _non_negative(config, "limit_images", "num_workers")
    if not config.data_path:
        _fail("data_path", "is empty")


def _check_run(config: TrainConfig) -> None:
    _choice(config, "strategy", "strategy", STRATEGIES)
    if config.cpu_replicas and config.strategy != "mirrored":
        _fail("cpu_replicas", f"only applies to --strategy=mirrored, not {config.strategy!r}")
    if config.tpu and config.strategy != "tpu":
        _fail("tpu", f"only applies to --strategy=tpu, not {config.strategy!r}")
    _positive(config, "saveckp_freq", "steps_per_execution")
    _non_negative(config, "cpu_replicas", "backup_every_steps")
    if not config.output_dir:
        _fail("output_dir", "is empty")


def _check_evaluation(config: TrainConfig) -> None:
    _positive(config, "nb_knn", "eval_batch_size", "temperature")
    _non_negative(config, "eval_every")


_CHECKS = {
    "model": _check_model,
    "crops": _check_crops,
    "optimisation": _check_optimisation,
    "teacher": _check_teacher,
    "data": _check_data,
    "run": _check_run,
    "evaluation": _check_evaluation,
}
