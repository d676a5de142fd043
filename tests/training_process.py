"""A training process for the tests that need a fresh process (strategies, workers, kills).

    python tests/training_process.py [--dump=weights.npz] [--kill_in_save=N] <train.py flags>

Runs `run_training` exactly as scripts/train.py does, and optionally
* `--dump`: writes every student/teacher variable, the centre, the optimiser step and the
  last logged loss to an .npz file when training ends (also on non-chief workers, whose
  output directory is temporary);
* `--kill_in_save=N`: SIGKILLs itself inside the N-th checkpoint save (epoch checkpoint or
  backup), after the new files are written and before the index names them: the worst
  moment for a checkpoint writer.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dino_keras.config import TrainConfig, config_from_flags, define_flags  # noqa: E402

define_flags(flags.FLAGS, TrainConfig)
flags.DEFINE_string("dump", "", "Write the final weights to this .npz file.")
flags.DEFINE_integer("kill_in_save", 0, "SIGKILL this process inside the N-th checkpoint save.")
FLAGS = flags.FLAGS


class DumpWeights(keras.callbacks.Callback):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.last_loss = float("nan")

    def on_train_batch_end(self, batch, logs=None):
        self.last_loss = float(logs["loss"])

    def on_train_end(self, logs=None):
        arrays = {f"student/{v.path}": v.numpy() for v in self.model.student.variables}
        arrays.update({f"teacher/{v.path}": v.numpy() for v in self.model.teacher.variables})
        arrays["center"] = self.model.center.numpy()
        arrays["step"] = np.array(int(self.model.optimizer.iterations.numpy()))
        arrays["loss"] = np.array(self.last_loss)
        np.savez(self.path, **arrays)


def kill_inside_save(n: int) -> None:
    manager = tf.train.CheckpointManager
    original = manager._record_state
    saves = {"count": 0, "recording": False}

    def record_state(self):
        # _record_state runs twice per save (before and after old files are swept).
        saves["recording"] = not saves["recording"]
        if saves["recording"]:
            saves["count"] += 1
            if saves["count"] == n:
                print(f"killing the process inside save {n}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    manager._record_state = record_state


def main(argv):
    del argv
    config = config_from_flags(FLAGS)
    if FLAGS.kill_in_save:
        kill_inside_save(FLAGS.kill_in_save)
    from dino_keras.training import run_training

    extra = [DumpWeights(FLAGS.dump)] if FLAGS.dump else []
    summary = run_training(config, extra_callbacks=extra)
    print("Summary:", summary, flush=True)


if __name__ == "__main__":
    app.run(main)
