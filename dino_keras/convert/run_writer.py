"""Writes a dino_keras run directory from a parsed PyTorch checkpoint.

The output is a normal run directory: `<output_dir>/config.json`, `<output_dir>/checkpoints/
latest-N` and `<output_dir>/train_flags.cfg`, written with training's own writers
(`check_or_write_run_config`, `TrainingCheckpoint`), so `scripts/train.py --output_dir=...`
resumes from it and evaluation/export load it the usual way. A backbone-only source sets both
backbones and leaves the heads freshly initialised (the teacher head an exact copy of the student
head); a full training checkpoint restores backbones, heads and the loss centre. The optimizer
state is NOT converted: moments start at zero.

The networks, the loss centre and the optimiser are built here from the `TrainConfig`, not
through training's orchestration (`dino_keras.training`): the checkpoint must hold exactly the
variables a resumed run restores (`tests/parity/test_convert.py` resumes one).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from dino_keras.checkpointing import (
    ARCHITECTURE_FLAGS,
    TrainingCheckpoint,
    check_or_write_run_config,
)
from dino_keras.config import TrainConfig
from dino_keras.convert.architecture import resolve_config
from dino_keras.convert.torch_reading import (
    ConversionError,
    load_torch_checkpoint,
    parse_checkpoint,
    tensor_shape,
)
from dino_keras.convert.weight_mapping import FillResult, fill_network
from dino_keras.loss import DinoLoss
from dino_keras.models.factory import build_student_and_teacher
from dino_keras.optim import DinoLossScaleOptimizer, DinoOptimizer
from dino_keras.run_dir import write_atomically
from dino_keras.schedules import CosineSchedule


@dataclasses.dataclass
class TrainingState:
    """What a training checkpoint holds: the networks, the loss centre and the optimiser."""

    student: Any
    teacher: Any
    center: Any
    optimizer: Any


def build_training_state(config: TrainConfig) -> TrainingState:
    """The variables `training.build_trainer` creates for `config` (and `TrainingCheckpoint`
    saves): student, teacher, the centre, and the optimiser built on the student's trainable
    variables, wrapped in the loss-scale optimiser for mixed_float16."""
    student, teacher = build_student_and_teacher(config)
    center = DinoLoss(config.out_dim, num_student_crops=2 + config.local_crops_number).center
    # Schedules are not saved (a resumed run rebuilds them from its flags): any will do here.
    optimizer = DinoOptimizer(kind=config.optimizer, learning_rate=CosineSchedule(0.0, 0.0, 1))
    if config.compute_precision == "mixed_float16":
        optimizer = DinoLossScaleOptimizer(optimizer)
    optimizer.build(student.trainable_variables)
    return TrainingState(student, teacher, center, optimizer)


@dataclasses.dataclass
class ConversionReport:
    source: str
    kind: str
    config: TrainConfig
    notes: list[str]
    used_keys: int
    unused: dict[str, str]
    unfilled: dict[str, str]  # Keras variable path -> reason
    center_restored: bool
    epoch: int
    optimizer_steps: int
    checkpoint_path: str

    def format(self) -> str:
        kind = "full training checkpoint" if self.kind == "full" else "one network"
        lines = [f"Converted {self.source} ({kind})", "Architecture and notes:"]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"Checkpoint tensors used: {self.used_keys}")
        lines.append(f"Checkpoint keys NOT used: {len(self.unused)}")
        lines += [f"  {key}: {reason}" for key, reason in sorted(self.unused.items())]
        lines.append(f"Keras weights NOT filled from the checkpoint: {len(self.unfilled)}")
        by_reason: dict[str, list[str]] = {}
        for path, reason in sorted(self.unfilled.items()):
            by_reason.setdefault(reason, []).append(path)
        for reason, paths in by_reason.items():
            lines.append(f"  {reason}:")
            lines += [f"    {path}" for path in paths]
        lines.append(
            "Loss centre: " + ("restored" if self.center_restored else "zeros (not in the source)")
        )
        lines.append(
            "Optimizer state: not converted (AdamW/SGD/LARS moments start from zero); "
            f"step counter set to {self.optimizer_steps}"
        )
        lines.append(
            f"Wrote {self.config.output_dir}/config.json and {self.checkpoint_path} "
            f"(epoch {self.epoch})"
        )
        lines.append(
            "Resume or fine-tune with: python scripts/train.py "
            f"--flagfile={os.path.join(self.config.output_dir, 'train_flags.cfg')} "
            "[--data_path=... --epochs=...]"
        )
        return "\n".join(lines)


def convert(
    source,
    output_dir: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    checkpoint_key: str = "",
    allow_pickle: bool = False,
    allow_missing: bool = False,
    steps_per_epoch: int = 0,
    restart: bool = False,
) -> ConversionReport:
    """Converts `source` (a `.pth` path or an already loaded checkpoint object) into the run
    directory `output_dir`.

    Args:
        overrides: explicitly given TrainConfig values (flags); each architecture value must
            agree with the checkpoint.
        checkpoint_key: use this entry of a dict checkpoint (e.g. "teacher") for both networks.
        allow_pickle: allow `torch.load(weights_only=False)` for files with arbitrary objects.
        allow_missing: write the run even if backbone (or, for full checkpoints, head) weights
            are missing from the checkpoint (they keep their fresh initialisation).
        steps_per_epoch: for a full checkpoint, the optimiser steps per epoch of the run that will
            resume it: the step counter, which drives every schedule, is set to
            epoch * steps_per_epoch. 0 leaves it at 0 (the schedules restart).
        restart: save at epoch 0 with a zero step counter even for a full checkpoint.
    """
    name = source if isinstance(source, str) else "<in-memory checkpoint>"
    checkpoint = load_torch_checkpoint(source, allow_pickle) if isinstance(source, str) else source
    contents = parse_checkpoint(checkpoint, checkpoint_key)
    config, notes = resolve_config(contents, overrides or {}, output_dir)
    if tf.io.gfile.isdir(config.checkpoint_dir) and tf.io.gfile.listdir(config.checkpoint_dir):
        raise ConversionError(
            f"{config.checkpoint_dir} already holds checkpoints; convert into a new --output_dir"
        )

    state = build_training_state(config)
    with_head = bool(contents.teacher.head)
    result = FillResult()
    writes = []
    for network, weights in (
        (state.student, contents.student),
        (state.teacher, contents.teacher),
    ):
        network_writes, network_result = fill_network(network, weights)
        writes += network_writes
        result.merge(network_result)
    result.used = list(dict.fromkeys(result.used))  # one network may fill both
    center_restored = contents.center is not None
    if center_restored:
        if tensor_shape(contents.center) != tuple(state.center.shape):
            result.mismatches.append(
                f"dino_loss/center: expected shape {list(state.center.shape)}, found "
                f"{list(tensor_shape(contents.center))}"
            )
        else:
            writes.append((state.center, contents.center))
    if result.mismatches:
        result.mismatches = list(dict.fromkeys(result.mismatches))  # one network, both roles
        raise ConversionError(
            "the checkpoint's shapes do not match the architecture "
            f"({_describe(config)}):\n  " + "\n  ".join(result.mismatches)
        )

    unfilled = {}
    missing = []
    for network in (state.student, state.teacher):
        for variable in network.weights:
            if id(variable) in result.filled:
                continue
            if "/head/" in variable.path and not with_head:
                unfilled[variable.path] = (
                    "fresh initialisation (backbone-only source; the "
                    "teacher head is a copy of the student head)"
                )
            else:
                unfilled[variable.path] = "MISSING from the checkpoint: fresh initialisation"
                missing.append(variable.path)
    if not center_restored:
        unfilled["dino_loss/center"] = "zeros, the reference's initial centre (not in the source)"
    if missing and not allow_missing:
        raise ConversionError(
            f"{len(missing)} Keras weights have no tensor in the checkpoint (first: "
            f"{', '.join(missing[:5])}); pass --allow_missing to keep their fresh "
            "initialisation"
        )

    for variable, value in writes:
        variable.assign(value)
    if not with_head:
        # The teacher starts as an exact copy of the student.
        for teacher_var, student_var in zip(
            state.teacher.head.weights, state.student.head.weights, strict=True
        ):
            teacher_var.assign(student_var)

    epoch = 0 if restart else contents.epoch
    optimizer_steps = epoch * steps_per_epoch
    if epoch and not steps_per_epoch:
        notes.append(
            f"epoch {epoch} without --steps_per_epoch: the optimiser step counter is 0, "
            "so the lr, weight-decay, momentum and temperature schedules and the "
            "last-layer freeze restart from their beginning"
        )
    state.optimizer.iterations.assign(optimizer_steps)
    check_or_write_run_config(config)
    _write_flagfile(config, extra=overrides or {})
    saver = TrainingCheckpoint(
        config.checkpoint_dir,
        student=state.student,
        teacher=state.teacher,
        optimizer=state.optimizer,
        center=state.center,
    )
    path = saver.save(epoch)
    return ConversionReport(
        name,
        contents.kind,
        config,
        notes,
        len(result.used),
        {**contents.unused, **result.unused},
        unfilled,
        center_restored,
        epoch,
        optimizer_steps,
        path,
    )


def _describe(config: TrainConfig) -> str:
    if not config.is_vit:
        return f"{config.arch}, out_dim {config.out_dim}"
    width, depth, heads = config.vit_dims
    return (
        f"{config.arch} width {width} depth {depth} heads {heads} patch {config.patch_size} "
        f"at {config.global_crops_size} px, out_dim {config.out_dim}"
    )


# Flags a resumed run must repeat: the architecture flags and the output directory.
FLAGFILE_FIELDS = (*ARCHITECTURE_FLAGS, "output_dir")


def _write_flagfile(config: TrainConfig, extra: Mapping[str, Any]) -> str:
    """`<output_dir>/train_flags.cfg`: the flags `scripts/train.py` needs to resume the run (the
    architecture and every flag given explicitly to the conversion)."""
    path = os.path.join(config.output_dir, "train_flags.cfg")
    lines = ["# Written by scripts/convert_checkpoint.py: the flags of the converted run."]
    fields = list(FLAGFILE_FIELDS) + [f for f in extra if f not in FLAGFILE_FIELDS]
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        lines.append(f"--{field}={value}")
    return write_atomically(path, "\n".join(lines) + "\n")
