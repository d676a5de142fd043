"""The one typed training configuration, its command-line flags and its validation.

Every flag of `scripts/train.py` is a field of `TrainConfig`; the reference's flag names are
kept for the same meaning. `define_flags` registers the fields as absl flags on the
`FlagValues` it is given and `config_from_flags` reads them back once: no other module reads
flags. `TrainConfig.from_dict` is the one way from values to a config, whatever their origin:
parsed flags, a flagfile (`config_from_flagfile`), a run's config.json or the converter's
explicit flags; it coerces them to the fields' types and refuses unknown keys by name.
The fields are grouped into sections (`SECTIONS`: model, crops, optimisation, teacher, data,
run, evaluation); a run's config.json holds them grouped (`TrainConfig.to_sections`), flags and
attributes stay flat. `TrainConfig.validate` checks everything that can be checked before any
work starts, section by section (`config_validation.py`), and names the offending flag.
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


# The sections of `TrainConfig`, in this order: each field belongs to exactly one, named in its
# metadata by the maker that defines it (`_model(...)` for a field of "model", ...). A run's
# config.json is grouped by them (`TrainConfig.to_sections`) and `TrainConfig.validate` checks
# them in turn; flags and attributes stay flat (`--arch`, `config.arch`).
SECTION_NAMES = ("model", "crops", "optimisation", "teacher", "data", "run", "evaluation")


def _section(section: str):
    """The field maker of `section`: (default, help text) -> a dataclass field."""

    def field(default, help_text: str):
        return dataclasses.field(default=default, metadata={"help": help_text, "section": section})

    return field


_model, _crops, _optim, _teacher, _data, _run, _eval = map(_section, SECTION_NAMES)


@dataclasses.dataclass
class TrainConfig:
    # Model.
    arch: str = _model("vit_small", f"Backbone: one of {', '.join(ARCHS)}.")
    patch_size: int = _model(
        16, "ViT patch size in pixels (8 or 16 on ImageNet, 4 on 28 px images)."
    )
    embed_dim: int = _model(0, "Custom ViT width; 0 keeps the width of --arch.")
    depth: int = _model(0, "Custom ViT depth; 0 keeps the depth of --arch.")
    num_heads: int = _model(0, "Custom ViT heads; 0 keeps the heads of --arch.")
    out_dim: int = _model(65536, "Dimension of the DINO head output (number of prototypes).")
    head_hidden_dim: int = _model(2048, "Hidden width of the DINO head MLP.")
    head_bottleneck_dim: int = _model(
        256, "Bottleneck width of the DINO head before the prototypes."
    )
    norm_last_layer: bool = _model(
        True, "Freeze the weight-norm gain of the head's last layer at 1."
    )
    use_bn_in_head: bool = _model(False, "BatchNorm in the head MLP.")
    drop_path_rate: float = _model(0.1, "Stochastic depth rate of the student (0 for the teacher).")
    # Teacher and loss.
    momentum_teacher: float = _teacher(0.996, "Base EMA momentum of the teacher, cosine to 1.")
    warmup_teacher_temp: float = _teacher(
        0.04, "Initial teacher temperature of the linear warm-up."
    )
    teacher_temp: float = _teacher(0.04, "Teacher temperature after the warm-up.")
    warmup_teacher_temp_epochs: int = _teacher(0, "Epochs of linear teacher-temperature warm-up.")
    centering: str = _teacher(
        "centering",
        "Teacher centering: 'centering' (the reference's EMA centre) or 'sinkhorn_knopp' "
        "(DINOv2's Sinkhorn-Knopp normalisation over the global batch, 3 iterations).",
    )
    koleo_loss_weight: float = _teacher(
        0.0,
        "Weight of DINOv2's KoLeo regulariser on the student's L2-normalised global-crop "
        "features (spreads them apart); 0 disables.",
    )
    # Optimisation.
    use_fp16: bool = _optim(
        False,
        "Mixed float16 with loss scaling (the reference's default is true on GPUs; here false "
        "because CPUs and TPUs have no fast float16: see --precision).",
    )
    precision: str = _optim("float32", f"Compute precision: one of {', '.join(PRECISIONS)}.")
    weight_decay: float = _optim(0.04, "Initial weight decay (cosine per step).")
    weight_decay_end: float = _optim(0.4, "Final weight decay.")
    clip_grad: float = _optim(3.0, "Per-tensor gradient norm clip; 0 disables.")
    batch_size_per_gpu: int = _optim(64, "Batch size per replica.")
    epochs: int = _optim(100, "Number of training epochs.")
    train_steps: int = _optim(
        0,
        "If > 0, the schedule's length in optimiser steps instead of --epochs: the run trains "
        "ceil(train_steps / steps per epoch) epochs, so that a small data set still gets "
        "enough steps (the other flags counted in epochs stay in epochs).",
    )
    freeze_last_layer: int = _optim(1, "Epochs during which the head's last layer is not updated.")
    lr: float = _optim(0.0005, "Peak learning rate at batch 256 (scaled by global batch / 256).")
    warmup_epochs: int = _optim(10, "Epochs of linear learning-rate warm-up.")
    min_lr: float = _optim(1e-6, "Final learning rate of the cosine schedule.")
    optimizer: str = _optim("adamw", f"Optimizer: one of {', '.join(OPTIMIZERS)}.")
    # Multi-crop.
    global_crops_scale: tuple = _crops((0.4, 1.0), "Area fraction range of the global crops.")
    local_crops_number: int = _crops(8, "Number of local crops; 0 disables multi-crop.")
    local_crops_scale: tuple = _crops((0.05, 0.4), "Area fraction range of the local crops.")
    global_crops_size: int = _crops(224, "Side of the global crops in pixels.")
    local_crops_size: int = _crops(96, "Side of the local crops in pixels.")
    blur_sigma: tuple = _crops(
        (0.1, 2.0),
        "Range 'min,max' of the gaussian-blur sigma in pixels of the crop (the reference's "
        "0.1-2.0 is sized for 224 px crops; at most 2.0).",
    )
    # Data.
    data_path: str = _data(
        "fashion_mnist",
        "Training images: an image folder, 'tfds:NAME[:split]', TFRecord files, a folder of "
        "idx files, or 'fashion_mnist' (the Debian package's idx files).",
    )
    tfds_data_dir: str = _data("", "TFDS data directory for 'tfds:' data paths.")
    limit_images: int = _data(0, "Use only the first N training images; 0 uses all.")
    num_workers: int = _data(
        0,
        "Loader processes making the multi-crop batches, one core each (the reference's "
        "DataLoader workers); the same batches as 0, which makes them in the training process.",
    )
    # Output and run control.
    output_dir: str = _run("runs/dino", "Checkpoints, logs, TensorBoard events and exports.")
    saveckp_freq: int = _run(20, "Keep a numbered checkpoint every N epochs.")
    seed: int = _run(0, "Random seed.")
    steps_per_execution: int = _run(1, "Training steps per compiled call.")
    jit_compile: bool = _run(True, "XLA-compile the training step.")
    strategy: str = _run(
        "default",
        "Distribution: 'default' (one device), 'mirrored' (all local GPUs, or --cpu_replicas "
        "logical CPU devices), 'multi_worker' (MultiWorkerMirroredStrategy; cluster from "
        "TF_CONFIG or SLURM's environment) or 'tpu' (TPUStrategy on --tpu).",
    )
    cpu_replicas: int = _run(
        0, "With --strategy=mirrored on a machine without GPUs: number of logical CPU replicas."
    )
    tpu: str = _run(
        "", "TPU name or grpc:// address for --strategy=tpu ('local' on a Cloud TPU VM)."
    )
    backup_every_steps: int = _run(
        500,
        "Write a preemption backup every N optimiser steps (rerunning the same command resumes "
        "from it mid-epoch); 0 disables.",
    )
    deterministic: bool = _run(
        False, "Deterministic ops and seeds: two runs of the same command give identical weights."
    )
    verbose: int = _run(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")
    stop_on_collapse: bool = _run(
        False,
        "Stop after an epoch whose collapse monitors say the run has collapsed (the warning is "
        "printed and logged either way); the checkpoints are kept.",
    )
    # Evaluation.
    eval_data_path: str = _eval(
        "",
        "Labelled images for k-NN evaluation (same forms as --data_path); empty: the test "
        "split of --data_path when it has one (Fashion-MNIST, TFDS, split folders).",
    )
    eval_every: int = _eval(
        1, "Evaluate k-NN every N epochs (and at epoch 0 and the end); 0: only at the ends."
    )
    nb_knn: int = _eval(20, "Neighbours of the weighted k-NN evaluation.")
    temperature: float = _eval(0.07, "Temperature of the weighted k-NN vote.")
    eval_batch_size: int = _eval(256, "Batch size of feature extraction for evaluation.")

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
    def flatten(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` as {flag name: value}: the flat form as it is, the grouped form of
        `to_sections` ({section: {flag name: value}}) merged. `values` is grouped if a key is a
        section or a value a mapping (no field holds one); then an unknown section, a setting
        outside its section or in another's raise `ConfigError` naming it. Unknown keys of the
        flat form are left to `coerce`."""
        if not any(key in SECTIONS or isinstance(value, Mapping) for key, value in values.items()):
            return dict(values)
        flat = {}
        for section, settings in values.items():
            if section not in SECTIONS:
                home = SECTION_OF.get(RENAMED_FIELDS.get(section, section))
                if home:
                    raise ConfigError(
                        f"--{section}: outside its section {home!r} in a grouped config"
                    )
                raise ConfigError(
                    f"unknown section {section!r} (the sections of {cls.__name__} are "
                    f"{', '.join(SECTIONS)})"
                )
            if not isinstance(settings, Mapping):
                raise ConfigError(f"section {section!r}: expected an object, got {settings!r}")
            for key, value in settings.items():
                home = SECTION_OF.get(RENAMED_FIELDS.get(key, key))
                if home is None:
                    raise ConfigError(
                        f"--{key}: unknown setting in section {section!r} (not a field of "
                        f"{cls.__name__})"
                    )
                if home != section:
                    raise ConfigError(f"--{key}: in section {section!r}, but belongs in {home!r}")
                flat[key] = value
        return flat

    @classmethod
    def coerce(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` (from flags, a run's config.json or explicit overrides; flat or grouped, see
        `flatten`) as field values: 'min,max' ranges as tuples of floats, numbers and booleans
        of the field's type. Raises `ConfigError` naming the key for an unknown key or a value
        of the wrong kind."""
        values = cls.flatten(values)
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
        """The config of `values`, flat or grouped by section (missing keys keep their
        defaults), coerced by `coerce` and validated: the one way from flags, config.json (a
        grouped one, or an older run's flat one) or overrides to a `TrainConfig`."""
        config = cls(**cls.coerce(values))
        if validate:
            config.validate()
        return config

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """{section: {flag name: value}}, the sections in the order of `SECTIONS`: what a run's
        config.json holds (`from_dict` reads it back)."""
        values = dataclasses.asdict(self)
        return {
            section: {name: values[name] for name in names} for section, names in SECTIONS.items()
        }

    def to_json(self) -> str:
        """`to_sections` as JSON text, as in a run's config.json."""
        return json.dumps(self.to_sections(), indent=2, sort_keys=True)

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
        """Raise `ConfigError` naming the flag for any invalid value or combination: one check
        per section, in the order of `SECTIONS` (dino_keras/config_validation.py)."""
        from dino_keras.config_validation import validate  # which imports this module

        validate(self)


def _sections_of(config_cls) -> dict[str, tuple[str, ...]]:
    """{section: names of its fields in definition order}; every field must have a section."""
    fields = dataclasses.fields(config_cls)
    for field in fields:
        if field.metadata.get("section") not in SECTION_NAMES:
            raise TypeError(
                f"{config_cls.__name__}.{field.name}: define it with the field maker of its "
                "section (_model, _crops, _optim, _teacher, _data, _run or _eval)"
            )
        if field.name in SECTION_NAMES:  # the flat and the grouped form would be ambiguous
            raise TypeError(f"{config_cls.__name__}.{field.name}: a field named like a section")
    return {
        section: tuple(field.name for field in fields if field.metadata["section"] == section)
        for section in SECTION_NAMES
    }


SECTIONS = _sections_of(TrainConfig)  # {section: its fields}
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


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
