"""The one typed training configuration, its command-line flags and its validation.

Every flag of `scripts/train.py` is a field of `TrainConfig`; the reference's flag names are
kept for the same meaning. `define_flags` registers the fields as absl flags on the
`FlagValues` it is given and `config_from_flags` reads them back once: no other module reads
flags. `TrainConfig.from_dict` is the one way from values to a config, whatever their origin:
parsed flags, a flagfile (`config_from_flagfile`), a run's config.json or the converter's
explicit flags; it coerces them to the fields' types and refuses unknown keys by name.
`TrainConfig.validate` checks everything that can be checked before any work starts and names
the offending flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

VIT_ARCHS = {
    # name: (embed_dim, depth, num_heads)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
CONVNET_ARCHS = ("resnet50",)
ARCHS = tuple(VIT_ARCHS) + CONVNET_ARCHS
OPTIMIZERS = ("adamw", "sgd", "lars")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
CENTERINGS = ("centering", "sinkhorn_knopp")


# Former names of fields, still accepted: as deprecated flags (a one-line warning) and as keys
# of the config.json of older runs. The reference's eval_knn.py names them --nb_knn and
# --temperature, as scripts/eval_knn.py does.
RENAMED_FIELDS = {"knn_k": "nb_knn", "knn_temperature": "temperature"}


class ConfigError(ValueError):
    """An invalid flag value or combination; the message names the flag."""


def _field(default, help_text: str, **kwargs):
    return dataclasses.field(default=default, metadata={"help": help_text, **kwargs})


@dataclasses.dataclass
class TrainConfig:
    # Model.
    arch: str = _field("vit_small", f"Backbone: one of {', '.join(ARCHS)}.")
    patch_size: int = _field(
        16, "ViT patch size in pixels (8 or 16 on ImageNet, 4 on 28 px images)."
    )
    embed_dim: int = _field(0, "Custom ViT width; 0 keeps the width of --arch.")
    depth: int = _field(0, "Custom ViT depth; 0 keeps the depth of --arch.")
    num_heads: int = _field(0, "Custom ViT heads; 0 keeps the heads of --arch.")
    out_dim: int = _field(65536, "Dimension of the DINO head output (number of prototypes).")
    head_hidden_dim: int = _field(2048, "Hidden width of the DINO head MLP.")
    head_bottleneck_dim: int = _field(
        256, "Bottleneck width of the DINO head before the prototypes."
    )
    norm_last_layer: bool = _field(
        True, "Freeze the weight-norm gain of the head's last layer at 1."
    )
    use_bn_in_head: bool = _field(False, "BatchNorm in the head MLP.")
    drop_path_rate: float = _field(0.1, "Stochastic depth rate of the student (0 for the teacher).")
    # Teacher and loss.
    momentum_teacher: float = _field(0.996, "Base EMA momentum of the teacher, cosine to 1.")
    warmup_teacher_temp: float = _field(0.04, "Initial teacher temperature of the linear warm-up.")
    teacher_temp: float = _field(0.04, "Teacher temperature after the warm-up.")
    warmup_teacher_temp_epochs: int = _field(0, "Epochs of linear teacher-temperature warm-up.")
    centering: str = _field(
        "centering",
        "Teacher centering: 'centering' (the reference's EMA centre) or 'sinkhorn_knopp' "
        "(DINOv2's Sinkhorn-Knopp normalisation over the global batch, 3 iterations).",
    )
    koleo_loss_weight: float = _field(
        0.0,
        "Weight of DINOv2's KoLeo regulariser on the student's L2-normalised global-crop "
        "features (spreads them apart); 0 disables.",
    )
    # Optimisation.
    use_fp16: bool = _field(
        False,
        "Mixed float16 with loss scaling (the reference's default is true on GPUs; here false "
        "because CPUs and TPUs have no fast float16: see --precision).",
    )
    precision: str = _field("float32", f"Compute precision: one of {', '.join(PRECISIONS)}.")
    weight_decay: float = _field(0.04, "Initial weight decay (cosine per step).")
    weight_decay_end: float = _field(0.4, "Final weight decay.")
    clip_grad: float = _field(3.0, "Per-tensor gradient norm clip; 0 disables.")
    batch_size_per_gpu: int = _field(64, "Batch size per replica.")
    epochs: int = _field(100, "Number of training epochs.")
    train_steps: int = _field(
        0,
        "If > 0, the schedule's length in optimiser steps instead of --epochs: the run trains "
        "ceil(train_steps / steps per epoch) epochs, so that a small data set still gets "
        "enough steps (the other flags counted in epochs stay in epochs).",
    )
    freeze_last_layer: int = _field(1, "Epochs during which the head's last layer is not updated.")
    lr: float = _field(0.0005, "Peak learning rate at batch 256 (scaled by global batch / 256).")
    warmup_epochs: int = _field(10, "Epochs of linear learning-rate warm-up.")
    min_lr: float = _field(1e-6, "Final learning rate of the cosine schedule.")
    optimizer: str = _field("adamw", f"Optimizer: one of {', '.join(OPTIMIZERS)}.")
    # Multi-crop.
    global_crops_scale: tuple = _field((0.4, 1.0), "Area fraction range of the global crops.")
    local_crops_number: int = _field(8, "Number of local crops; 0 disables multi-crop.")
    local_crops_scale: tuple = _field((0.05, 0.4), "Area fraction range of the local crops.")
    global_crops_size: int = _field(224, "Side of the global crops in pixels.")
    local_crops_size: int = _field(96, "Side of the local crops in pixels.")
    blur_sigma: tuple = _field(
        (0.1, 2.0),
        "Range 'min,max' of the gaussian-blur sigma in pixels of the crop (the reference's "
        "0.1-2.0 is sized for 224 px crops; at most 2.0).",
    )
    # Data.
    data_path: str = _field(
        "fashion_mnist",
        "Training images: an image folder, 'tfds:NAME[:split]', TFRecord files, a folder of "
        "idx files, or 'fashion_mnist' (the Debian package's idx files).",
    )
    tfds_data_dir: str = _field("", "TFDS data directory for 'tfds:' data paths.")
    limit_images: int = _field(0, "Use only the first N training images; 0 uses all.")
    num_workers: int = _field(
        0,
        "Loader processes making the multi-crop batches, one core each (the reference's "
        "DataLoader workers); the same batches as 0, which makes them in the training process.",
    )
    # Output and run control.
    output_dir: str = _field("runs/dino", "Checkpoints, logs, TensorBoard events and exports.")
    saveckp_freq: int = _field(20, "Keep a numbered checkpoint every N epochs.")
    seed: int = _field(0, "Random seed.")
    steps_per_execution: int = _field(1, "Training steps per compiled call.")
    jit_compile: bool = _field(True, "XLA-compile the training step.")
    strategy: str = _field(
        "default",
        "Distribution: 'default' (one device), 'mirrored' (all local GPUs, or --cpu_replicas "
        "logical CPU devices), 'multi_worker' (MultiWorkerMirroredStrategy; cluster from "
        "TF_CONFIG or SLURM's environment) or 'tpu' (TPUStrategy on --tpu).",
    )
    cpu_replicas: int = _field(
        0, "With --strategy=mirrored on a machine without GPUs: number of logical CPU replicas."
    )
    tpu: str = _field(
        "", "TPU name or grpc:// address for --strategy=tpu ('local' on a Cloud TPU VM)."
    )
    backup_every_steps: int = _field(
        500,
        "Write a preemption backup every N optimiser steps (rerunning the same command resumes "
        "from it mid-epoch); 0 disables.",
    )
    deterministic: bool = _field(
        False, "Deterministic ops and seeds: two runs of the same command give identical weights."
    )
    verbose: int = _field(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")
    stop_on_collapse: bool = _field(
        False,
        "Stop after an epoch whose collapse monitors say the run has collapsed (the warning is "
        "printed and logged either way); the checkpoints are kept.",
    )
    # Evaluation.
    eval_data_path: str = _field(
        "",
        "Labelled images for k-NN evaluation (same forms as --data_path); empty: the test "
        "split of --data_path when it has one (Fashion-MNIST, TFDS, split folders).",
    )
    eval_every: int = _field(
        1, "Evaluate k-NN every N epochs (and at epoch 0 and the end); 0: only at the ends."
    )
    nb_knn: int = _field(20, "Neighbours of the weighted k-NN evaluation.")
    temperature: float = _field(0.07, "Temperature of the weighted k-NN vote.")
    eval_batch_size: int = _field(256, "Batch size of feature extraction for evaluation.")

    # ---------------------------------------------------------------- derived values
    @property
    def is_vit(self) -> bool:
        return self.arch in VIT_ARCHS

    @property
    def vit_dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) after applying the custom overrides."""
        width, depth, heads = VIT_ARCHS[self.arch]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)

    @property
    def compute_precision(self) -> str:
        return "mixed_float16" if self.use_fp16 else self.precision

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    @classmethod
    def coerce(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` (from flags, a run's config.json or explicit overrides) as field values:
        'min,max' ranges as tuples of floats, numbers and booleans of the field's type. Raises
        `ConfigError` naming the key for an unknown key or a value of the wrong kind."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        coerced = {}
        for key, value in values.items():
            name = RENAMED_FIELDS.get(key, key) if key not in fields else key
            if name not in fields:
                raise ConfigError(f"--{key}: unknown setting (not a field of {cls.__name__})")
            value = _coerce_value(name, fields[name].default, value)
            if name in coerced and coerced[name] != value:
                raise ConfigError(
                    f"--{key}={values[key]!r} conflicts with --{name}={coerced[name]!r}: "
                    f"--{key} is the former name of --{name}; give only --{name}"
                )
            coerced[name] = value
        return coerced

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, validate: bool = True):
        """The config of `values` (missing keys keep their defaults), coerced by `coerce` and
        validated: the one way from flags, config.json or overrides to a `TrainConfig`."""
        config = cls(**cls.coerce(values))
        if validate:
            config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def with_epochs_for(self, steps_per_epoch: int) -> TrainConfig:
        """This config with `epochs` resolved from `train_steps` (if set) and validated again."""
        if not self.train_steps:
            return self
        epochs = -(-self.train_steps // steps_per_epoch)
        resolved = dataclasses.replace(self, epochs=epochs)
        try:
            resolved.validate()
        except ConfigError as error:
            raise ConfigError(
                f"{error} (--epochs={epochs} from --train_steps={self.train_steps} at "
                f"{steps_per_epoch} steps per epoch)"
            ) from None
        return resolved

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the flag for any invalid value or combination."""

        def fail(flag: str, message: str):
            raise ConfigError(f"--{flag}: {message}")

        if self.arch not in ARCHS:
            fail("arch", f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.optimizer not in OPTIMIZERS:
            fail(
                "optimizer",
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}",
            )
        if self.precision not in PRECISIONS:
            fail(
                "precision",
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
            )
        if self.use_fp16 and self.precision != "float32":
            fail("use_fp16", f"conflicts with --precision={self.precision}; set only one")
        if self.strategy not in STRATEGIES:
            fail(
                "strategy",
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}",
            )
        if self.centering not in CENTERINGS:
            fail(
                "centering",
                f"unknown centering {self.centering!r}; choose one of {', '.join(CENTERINGS)}",
            )
        if self.cpu_replicas and self.strategy != "mirrored":
            fail("cpu_replicas", f"only applies to --strategy=mirrored, not {self.strategy!r}")
        if self.tpu and self.strategy != "tpu":
            fail("tpu", f"only applies to --strategy=tpu, not {self.strategy!r}")
        for name in (
            "out_dim",
            "head_hidden_dim",
            "head_bottleneck_dim",
            "batch_size_per_gpu",
            "epochs",
            "global_crops_size",
            "patch_size",
            "saveckp_freq",
            "steps_per_execution",
            "nb_knn",
            "eval_batch_size",
        ):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in (
            "local_crops_number",
            "limit_images",
            "eval_every",
            "freeze_last_layer",
            "warmup_epochs",
            "warmup_teacher_temp_epochs",
            "embed_dim",
            "depth",
            "num_heads",
            "lr",
            "min_lr",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "drop_path_rate",
            "cpu_replicas",
            "backup_every_steps",
            "num_workers",
            "koleo_loss_weight",
            "train_steps",
        ):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.local_crops_number > 0 and self.local_crops_size <= 0:
            fail("local_crops_size", f"must be positive, got {self.local_crops_size}")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            fail("momentum_teacher", f"must be in [0, 1], got {self.momentum_teacher}")
        if not self.drop_path_rate < 1.0:
            fail("drop_path_rate", f"must be < 1, got {self.drop_path_rate}")
        for name in ("teacher_temp", "warmup_teacher_temp", "temperature"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"({self.warmup_epochs}) exceeds --epochs ({self.epochs})")
        if self.warmup_teacher_temp_epochs > self.epochs:
            fail(
                "warmup_teacher_temp_epochs",
                f"({self.warmup_teacher_temp_epochs}) exceeds --epochs ({self.epochs})",
            )
        for name in ("global_crops_scale", "local_crops_scale"):
            scale = getattr(self, name)
            if len(scale) != 2:
                fail(name, f"needs two numbers 'min,max', got {scale!r}")
            low, high = scale
            if not (0.0 < low <= high <= 1.0):
                fail(name, f"needs 0 < min <= max <= 1, got {low},{high}")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1] <= 2.0:
            fail("blur_sigma", f"needs two numbers 0 < min <= max <= 2, got {self.blur_sigma!r}")
        if self.local_crops_number > 0 and self.local_crops_scale[1] > self.global_crops_scale[0]:
            fail(
                "local_crops_scale",
                f"max ({self.local_crops_scale[1]}) must not exceed the global crops' min "
                f"scale --global_crops_scale ({self.global_crops_scale[0]})",
            )
        if self.is_vit:
            width, depth, heads = self.vit_dims
            if width % heads:
                fail("num_heads", f"width {width} is not divisible by {heads} heads")
            if self.global_crops_size % self.patch_size:
                fail(
                    "global_crops_size",
                    f"{self.global_crops_size} is not divisible by --patch_size={self.patch_size}",
                )
            if self.local_crops_number > 0 and self.local_crops_size % self.patch_size:
                fail(
                    "local_crops_size",
                    f"{self.local_crops_size} is not divisible by --patch_size={self.patch_size}",
                )
        elif self.local_crops_number > 0 and self.local_crops_size < 32:
            fail(
                "local_crops_size",
                f"resnet50 needs crops of at least 32 px, got {self.local_crops_size}",
            )
        if not self.data_path:
            fail("data_path", "is empty")
        if not self.output_dir:
            fail("output_dir", "is empty")


def _coerce_value(name: str, default, value):
    """`value` as the type of the field `name` whose default is `default`."""
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = value.split(",")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected numbers 'min,max', got {value!r}") from None
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"--{name}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"--{name}: expected an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected an integer, got {value!r}") from None
        if number != value and not isinstance(value, str):
            raise ConfigError(f"--{name}: expected an integer, got {value!r}")
        return number
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"--{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected a number, got {value!r}") from None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"--{name}: expected a string, got {value!r}")
    return value


def _flag_definer(flags_module, field: dataclasses.Field):
    """The absl DEFINE_* function and default suited to one config field."""
    default = field.default
    if isinstance(default, bool):
        return flags_module.DEFINE_bool, default
    if isinstance(default, int):
        return flags_module.DEFINE_integer, default
    if isinstance(default, float):
        return flags_module.DEFINE_float, default
    if isinstance(default, tuple):
        return flags_module.DEFINE_list, [str(v) for v in default]
    return flags_module.DEFINE_string, default


def define_flags(flag_values, config_cls=TrainConfig) -> None:
    """Register one absl flag per field of `config_cls` on `flag_values`."""
    from absl import flags

    for field in dataclasses.fields(config_cls):
        define, default = _flag_definer(flags, field)
        define(field.name, default, field.metadata["help"], flag_values=flag_values)
    for old, new in RENAMED_FIELDS.items():
        if new in flag_values:
            define_alias(flag_values, old, new)


def define_alias(flag_values, old: str, new: str) -> None:
    """`--old` as a deprecated alias of the defined flag `--new`: it sets `--new` (refused if
    `--new` is given another value) and prints a one-line deprecation warning."""
    from absl import flags

    target = flag_values[new]
    flags.DEFINE(
        target.parser,
        old,
        None,
        f"Deprecated alias of --{new}.",
        flag_values=flag_values,
        serializer=target.serializer,
    )

    def forward(value) -> bool:
        if value is None:
            return True
        if target.present and target.value != value:
            raise flags.ValidationError(
                f"--{old} (deprecated) and --{new} disagree; give only --{new}"
            )
        if not target.present:
            print(f"WARNING: --{old} is deprecated; use --{new}.", file=sys.stderr, flush=True)
        target.value = value
        target.present = 1
        return True

    flags.register_validator(old, forward, flag_values=flag_values)


def config_from_flags(flag_values, config_cls=TrainConfig):
    """Read the parsed flags once into a validated `config_cls` instance."""
    return config_cls.from_dict(
        {field.name: flag_values[field.name].value for field in dataclasses.fields(config_cls)}
    )


def flagfile_values(path: str, config_cls=TrainConfig) -> dict[str, Any]:
    """{field: value} of the flags that the flagfile at `path` sets (nested `--flagfile`s
    included), read by the same flag machinery as `scripts/train.py --flagfile=path`."""
    from absl import flags

    flag_values = flags.FlagValues()
    define_flags(flag_values, config_cls)
    try:
        flag_values(["flagfile", f"--flagfile={path}"])
    except flags.Error as error:
        raise ConfigError(f"{path}: {error}") from None
    return config_cls.coerce(
        {
            field.name: flag_values[field.name].value
            for field in dataclasses.fields(config_cls)
            if flag_values[field.name].present
        }
    )


def config_from_flagfile(path: str, config_cls=TrainConfig, **overrides):
    """The validated `config_cls` of a flagfile (e.g. `configs/tiny.cfg`): its defaults, then
    the file's flags, then `overrides` (field values)."""
    return config_cls.from_dict({**flagfile_values(path, config_cls), **overrides})
