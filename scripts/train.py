"""DINO self-supervised pretraining.

    python scripts/train.py --flagfile=configs/demo.cfg [--output_dir=...]

Rerunning the same command resumes from the latest checkpoint in --output_dir.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from dino_keras.config import ConfigError, TrainConfig, config_from_flags, define_flags  # noqa: E402

define_flags(flags.FLAGS, TrainConfig)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags(flags.FLAGS)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    from dino_keras.callbacks import NonFiniteLossError
    from dino_keras.data.sources import DataSourceError
    from dino_keras.training import run_training

    try:
        summary = run_training(config)
    except (ConfigError, DataSourceError, NonFiniteLossError) as error:
        sys.exit(f"error: {error}")
    print("Summary:", {k: v for k, v in summary.items() if v is not None})


if __name__ == "__main__":
    app.run(main)
