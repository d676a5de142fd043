"""Converts a reference (PyTorch) DINO checkpoint into a dino_keras run directory.

    python scripts/convert_checkpoint.py --checkpoint=dino_deitsmall16_pretrain.pth \
        --output_dir=runs/vits16_converted [--out_dim=65536 ...]

Accepts backbone state dicts (the released `*_pretrain.pth` files) and full training
checkpoints (`student`, `teacher`, `dino_loss`, `epoch`). The architecture is inferred from the
shapes; any TrainConfig flag given explicitly must agree with them. Prints a report of every
checkpoint key not used and every Keras weight not filled. Then resume or fine-tune with

    python scripts/train.py --flagfile=<output_dir>/train_flags.cfg --data_path=...

Needs torch: pip install -r requirements-parity.txt. See docs/converting.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from dino_keras.config import TrainConfig, define_flags  # noqa: E402

define_flags(flags.FLAGS, TrainConfig)
flags.DEFINE_string("checkpoint", None, "The PyTorch checkpoint (.pth) to convert.")
flags.DEFINE_string(
    "checkpoint_key",
    "",
    "Use only this entry of a dict checkpoint (e.g. 'teacher') for both the "
    "student and the teacher.",
)
flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Load files holding arbitrary pickled objects (torch.load weights_only=False); "
    "only for files you trust.",
)
flags.DEFINE_bool(
    "allow_missing",
    False,
    "Write the run even if weights are missing from the checkpoint (they keep "
    "their fresh initialisation).",
)
flags.DEFINE_integer(
    "steps_per_epoch",
    0,
    "Full checkpoints: optimiser steps per epoch of the resuming run; the step "
    "counter (which drives every schedule) is set to epoch * steps_per_epoch.",
)
flags.DEFINE_bool(
    "restart",
    False,
    "Full checkpoints: save at epoch 0 (new schedules from the converted weights) "
    "instead of the checkpoint's epoch.",
)
flags.mark_flag_as_required("checkpoint")


def explicit_overrides(flag_values) -> dict:
    """The TrainConfig fields given on the command line (or in a flagfile)."""
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        flag = flag_values[field.name]
        if not flag.present or field.name == "output_dir":
            continue
        overrides[field.name] = flag.value  # coerced by TrainConfig.from_dict
    return overrides


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["output_dir"].present:
        sys.exit("error: --output_dir is required (a new directory for the converted run)")
    from dino_keras.convert import ConversionError, convert

    try:
        report = convert(
            flags.FLAGS.checkpoint,
            flags.FLAGS.output_dir,
            overrides=explicit_overrides(flags.FLAGS),
            checkpoint_key=flags.FLAGS.checkpoint_key,
            allow_pickle=flags.FLAGS.allow_pickle,
            allow_missing=flags.FLAGS.allow_missing,
            steps_per_epoch=flags.FLAGS.steps_per_epoch,
            restart=flags.FLAGS.restart,
        )
    except (ConversionError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(report.format())


if __name__ == "__main__":
    app.run(main)
