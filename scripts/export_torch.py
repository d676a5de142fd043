"""Export a dino_keras run as the reference's (PyTorch) checkpoint files.

    python scripts/export_torch.py --checkpoint=runs/dino --output_dir=exports/dino_torch
        [--which=teacher|student] [--overwrite]

Writes <output_dir>/checkpoint.pth (main_dino.py's checkpoint: student, teacher, dino_loss,
epoch, args; no optimizer state) and <output_dir>/backbone_pretrain.pth (the --which backbone in
the layout of the released *_pretrain.pth files: eval_knn.py / eval_linear.py
--pretrained_weights, timm, torchvision). Needs torch: pip install -r requirements-parity.txt.
See docs/converting.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The PyPI torch wheel's triton crashes a process that has loaded TensorFlow; this tool only
# calls torch.save (see docs/converting.md, "torch and TensorFlow in one process").
sys.modules.setdefault("triton", None)

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Run directory, its checkpoints directory or a checkpoint prefix.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Directory for checkpoint.pth and backbone_pretrain.pth.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "which",
        "teacher",
        ["teacher", "student"],
        "Backbone of backbone_pretrain.pth.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace existing files (by default they are refused).",
        flag_values=flag_values,
    )
    flags.mark_flags_as_required(["checkpoint", "output_dir"], flag_values=flag_values)


def run(flag_values):
    from dino_keras.convert.torch_export import export_torch_run

    exported = export_torch_run(
        flag_values.checkpoint,
        flag_values.output_dir,
        which=flag_values.which,
        overwrite=flag_values.overwrite,
    )
    print(exported.format())
    return exported


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.convert import ConversionError
    from dino_keras.run_loading import RunLoadingError

    try:
        run(flags.FLAGS)
    except (ConversionError, RunLoadingError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
