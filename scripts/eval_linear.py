"""Linear evaluation of a run's frozen backbone (the reference's eval_linear protocol).

    python scripts/eval_linear.py --checkpoint=runs/dino --output_dir=runs/dino/linear
        [--data_path=fashion_mnist] [--n_last_blocks=4] [--avgpool_patchtokens]
        [--lr=0.001] [--batch_size=128] [--epochs=100]

Rerunning the same command resumes from the last completed epoch. Results: printed per epoch,
<output_dir>/log.jsonl, <output_dir>/tensorboard and <output_dir>/summary.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    from dino_keras.run_loading import define_eval_data_flags

    def string(name, default, help_text):
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)

    def integer(name, default, help_text):
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)

    string("checkpoint", None, "Run directory, its checkpoints directory or a checkpoint prefix.")
    flags.DEFINE_enum(
        "which", "teacher", ["teacher", "student"], "Network to evaluate.", flag_values=flag_values
    )
    string("output_dir", None, "Checkpoints, logs and the summary of this evaluation.")
    define_eval_data_flags(
        flag_values,
        "Labelled images with a train and a test split (same "
        "forms as scripts/train.py's --data_path).",
    )
    integer("n_last_blocks", 4, "Concatenate the CLS outputs of this many last blocks.")
    flags.DEFINE_bool(
        "avgpool_patchtokens",
        False,
        "Also concatenate the average-pooled patch tokens of the last block.",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "lr",
        0.001,
        "Learning rate at batch 256 (scaled by --batch_size / 256).",
        flag_values=flag_values,
    )
    integer("batch_size", 128, "Training batch size.")
    integer("epochs", 100, "Training epochs.")
    integer("image_size", 0, "Crop size; 0: the run's --global_crops_size.")
    integer("eval_batch_size", 256, "Batch size of the test pass.")
    integer("seed", 0, "Seed of the classifier initialisation and the augmentation.")
    flags.mark_flags_as_required(["checkpoint", "output_dir"], flag_values=flag_values)


def run(flag_values) -> dict:
    from dino_keras import run_dir
    from dino_keras.evaluation.linear import LinearSettings, run_linear_evaluation
    from dino_keras.run_loading import load_backbone, resolve_eval_sources

    loaded = load_backbone(flag_values.checkpoint, which=flag_values.which)
    train, test = resolve_eval_sources(
        flag_values.data_path,
        flag_values.eval_data_path,
        tfds_data_dir=flag_values.tfds_data_dir,
        limit_images=flag_values.limit_images,
        limit_test=flag_values.limit_test,
    )
    settings = LinearSettings(
        output_dir=flag_values.output_dir,
        n_last_blocks=flag_values.n_last_blocks,
        avgpool_patchtokens=flag_values.avgpool_patchtokens,
        lr=flag_values.lr,
        batch_size=flag_values.batch_size,
        epochs=flag_values.epochs,
        image_size=flag_values.image_size or loaded.config.global_crops_size,
        seed=flag_values.seed,
        eval_batch_size=flag_values.eval_batch_size,
    )
    description = f"{loaded.which} of {run_dir.absolute(loaded.checkpoint_path)}"
    return run_linear_evaluation(
        loaded.backbone, train, test, settings, backbone_description=description
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.data.sources import DataSourceError
    from dino_keras.evaluation.linear import LinearEvalError
    from dino_keras.run_loading import RunLoadingError

    try:
        run(flags.FLAGS)
    except (DataSourceError, LinearEvalError, RunLoadingError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
