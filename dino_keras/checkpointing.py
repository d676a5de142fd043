"""Training checkpoints: student, teacher, optimiser, centre, epoch and step in one checkpoint.

`latest-N` is rewritten every epoch, `epoch-NNNN` is kept every `saveckp_freq` epochs and
`backup/step-S` is the preemption backup written every `backup_every_steps` steps. A restart
restores whichever of `latest` and `backup` is further along. Every write is atomic for a
reader: TensorFlow writes a checkpoint's files completely before the index file
(`checkpoint`) is atomically replaced to name it, and the previous checkpoint is deleted only
after that, so a process killed at any moment leaves the previous checkpoint loadable.

The resolved configuration of the run is stored beside them (`config.json`, grouped by section:
`TrainConfig.to_sections`); a rerun of a different architecture into the same directory is
refused before anything is written.

All of it goes through TensorFlow's file system layer (`tf.train.CheckpointManager` writes,
renames and deletes with `tf.io.gfile`), so the directory may be remote (`gs://...`).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from dino_keras import run_dir
from dino_keras.config import ConfigError, TrainConfig

# Changing one of these makes an existing checkpoint unusable for the run.
ARCHITECTURE_FLAGS = (
    "arch",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "out_dim",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "norm_last_layer",
    "use_bn_in_head",
    "optimizer",
    "global_crops_size",
)

RNG_STATE = "seed_generator_state"


class NetworkVariables(tf.Module):
    """Every variable of a Keras network, keyed by its path inside the network.

    Keras 3 keeps layers held in Python lists (transformer blocks, head layers) out of
    `tf.train.Checkpoint`'s object graph, so checkpoints address networks through this
    explicit, stable mapping instead of the layer objects. Random-generator states (drop path)
    are named by a process-wide counter in Keras, so they are keyed by their order in the
    network instead (`rng/<i>/seed_generator_state`): a resumed run continues their streams.
    """

    def __init__(self, network):
        super().__init__()
        prefix = network.name + "/"
        self.by_path = {}
        rng_states = 0
        for v in network.variables:
            if v.path.endswith(RNG_STATE):
                key = f"rng/{rng_states}/{RNG_STATE}"
                rng_states += 1
            else:
                key = v.path[len(prefix) :] if v.path.startswith(prefix) else v.path
            self.by_path[key] = v


def network_checkpoint(**networks) -> tf.train.Checkpoint:
    """A checkpoint object for networks only, e.g. `network_checkpoint(teacher=teacher)`:
    restores the student/teacher of a training checkpoint without the optimiser."""
    return tf.train.Checkpoint(**{name: NetworkVariables(net) for name, net in networks.items()})


_STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"


def _saved_step(path: str) -> int:
    """The step stored in a checkpoint (-1 for checkpoints written before steps were)."""
    try:
        # The reader itself, not `tf.train.load_variable`: on `ram://` a checkpoint prefix also
        # counts as a directory, and `load_variable` would look for an index file inside it.
        return int(tf.compat.v1.train.NewCheckpointReader(path).get_tensor(_STEP_KEY))
    except (tf.errors.NotFoundError, ValueError):
        return -1


class Restored(NamedTuple):
    """What `TrainingCheckpoint.restore` restored."""

    epoch: int  # completed epochs of the checkpoint (a backup: those before its epoch)
    step: int  # optimiser steps taken
    path: str | None  # the checkpoint prefix; None: no checkpoint, a fresh run


class TrainingCheckpoint:
    """Epoch checkpoints and step backups of a run.

    Args:
        directory: where the run's checkpoints are read from (and written to by default).
        write_directory: where this process writes (a non-chief worker's scratch directory).
    """

    def __init__(
        self, directory: str, *, student, teacher, optimizer, center, write_directory=None
    ):
        self.directory = directory
        self.write_directory = write_directory or directory
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.optimizer = optimizer
        self.checkpoint = tf.train.Checkpoint(
            student=NetworkVariables(student),
            teacher=NetworkVariables(teacher),
            optimizer=optimizer,
            center=center,
            epoch=self.epoch,
            step=self.step,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.write_directory, max_to_keep=1, checkpoint_name="latest"
        )
        self.backups = tf.train.CheckpointManager(
            self.checkpoint,
            run_dir.join(self.write_directory, "backup"),
            max_to_keep=1,
            checkpoint_name="step",
        )
        self.restored_path: str | None = None

    @property
    def latest_path(self) -> str | None:
        return self.manager.latest_checkpoint or self.restored_path

    def candidates(self) -> list[str]:
        """Restorable checkpoints of the run: the latest epoch checkpoint and backup."""
        paths = [
            tf.train.latest_checkpoint(self.directory),
            tf.train.latest_checkpoint(run_dir.join(self.directory, "backup")),
        ]
        return [path for path in paths if path]

    def restore(self) -> Restored:
        """Restores the most advanced checkpoint of the run (the latest epoch checkpoint or
        the backup); returns where it stands (`Restored(0, 0, None)` if there is none)."""
        candidates = self.candidates()
        if not candidates:
            return Restored(epoch=0, step=0, path=None)
        path = max(candidates, key=_saved_step)  # ties: the epoch checkpoint (listed first)
        self.checkpoint.restore(path).assert_existing_objects_matched()
        self.restored_path = path
        return Restored(
            epoch=int(self.epoch.numpy()),
            step=int(self.optimizer.iterations.numpy()),
            path=path,
        )

    def save(self, epoch: int, keep: bool = False) -> str:
        self.epoch.assign(epoch)
        self.step.assign(self.optimizer.iterations)
        path = self.manager.save(checkpoint_number=epoch)
        if keep:
            self.checkpoint.write(run_dir.join(self.write_directory, f"epoch-{epoch:04d}"))
        return path

    def save_backup(self, epoch: int) -> str:
        """A mid-epoch backup; `epoch` is the number of completed epochs."""
        self.epoch.assign(epoch)
        step = int(self.optimizer.iterations.numpy())
        self.step.assign(step)
        return self.backups.save(checkpoint_number=step)


def check_or_write_run_config(config: TrainConfig) -> None:
    """Write `<output_dir>/config.json` (grouped by section); refuse a run whose architecture
    differs from the one of the checkpoints already in `output_dir` (naming the flag), whose
    config.json may be grouped or, from an older run, flat."""
    saved = (
        run_dir.read_config(config.output_dir)
        if tf.train.latest_checkpoint(config.checkpoint_dir)
        else None
    )
    saved = TrainConfig.flatten(saved) if saved else None
    for flag in ARCHITECTURE_FLAGS:
        current = getattr(config, flag)
        if saved and flag in saved and saved[flag] != current:
            raise ConfigError(
                f"--{flag}={current} differs from the checkpoints in {config.checkpoint_dir} "
                f"(trained with --{flag}={saved[flag]}); use another --output_dir or the "
                "same value. Nothing was overwritten."
            )
    run_dir.write_config(config.output_dir, config.to_sections())
