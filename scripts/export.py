"""Export a run's backbone as a SavedModel for TensorFlow Serving, or as a .keras file.

    python scripts/export.py --checkpoint=runs/dino --export_dir=exports/dino [--version=1]
        [--format=saved_model|keras] [--which=teacher|student] [--image_size=N]
        [--overwrite_version]

--checkpoint: a run directory, its checkpoints directory or a checkpoint prefix. Writes
<export_dir>/<version>/ (saved_model.pb, variables/, assets.extra/dino_export.json); an existing
version directory is refused unless --overwrite_version. Signatures: serving_default (float32
images 0..255 of any size) and serve_image_bytes (encoded JPEG/PNG strings); see
dino_keras/export.py. --format=keras writes <export_dir>/backbone-<version>.keras instead (0..255
images -> embedding, for fine-tuning; see dino_keras/keras_export.py).
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Run directory, its checkpoints directory or a checkpoint prefix.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "export_dir",
        None,
        "Base export directory (TF Serving's model base "
        "path); the model goes to <export_dir>/<version>.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "version", 1, "Version subdirectory (a positive integer).", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "format",
        "saved_model",
        ["saved_model", "keras"],
        "saved_model: TF Serving's layout, loads without dino_keras; keras: one .keras file "
        "that keras.saving.load_model restores where dino_keras is installed.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "which", "teacher", ["teacher", "student"], "Network to export.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "image_size",
        0,
        "Crop size of serve_image_bytes (--format=saved_model); 0: the run's --global_crops_size.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite_version",
        False,
        "Replace an existing <export_dir>/<version> (by default it is refused).",
        flag_values=flag_values,
    )
    flags.mark_flags_as_required(["checkpoint", "export_dir"], flag_values=flag_values)


def run(flag_values) -> str:
    if flag_values.format == "keras":
        from dino_keras.keras_export import export_keras_run

        path = export_keras_run(
            flag_values.checkpoint,
            flag_values.export_dir,
            version=flag_values.version,
            which=flag_values.which,
            overwrite=flag_values.overwrite_version,
        )
        print(f"Exported the {flag_values.which} backbone of {flag_values.checkpoint} to {path}")
        return path
    from dino_keras.export import export_run

    path = export_run(
        flag_values.checkpoint,
        flag_values.export_dir,
        version=flag_values.version,
        which=flag_values.which,
        image_size=flag_values.image_size or None,
        command=shlex.join([sys.executable, *sys.argv]),
        overwrite=flag_values.overwrite_version,
    )
    print(f"Exported the {flag_values.which} backbone of {flag_values.checkpoint} to {path}")
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.export import ExportError
    from dino_keras.keras_export import KerasExportError
    from dino_keras.run_loading import RunLoadingError

    try:
        run(flags.FLAGS)
    except (ExportError, KerasExportError, RunLoadingError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
