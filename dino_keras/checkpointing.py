"""Training checkpoints: student, teacher, optimiser, centre and epoch in one TF checkpoint.

`latest-N` is rewritten every epoch (the previous one is deleted only after the new one and
the index file are written), `epoch-NNNN` is kept every `saveckp_freq` epochs. The resolved
configuration of the run is stored beside them (`config.json`); a rerun of a different
architecture into the same directory is refused before anything is written.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

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


class NetworkVariables(tf.Module):
    """Every variable of a Keras network, keyed by its path inside the network.

    Keras 3 keeps layers held in Python lists (transformer blocks, head layers) out of
    `tf.train.Checkpoint`'s object graph, so checkpoints address networks through this
    explicit, stable mapping instead of the layer objects. Random-generator states (drop path)
    are left out: Keras names them by a process-wide counter, so their paths are not stable.
    """

    def __init__(self, network):
        super().__init__()
        prefix = network.name + "/"
        self.by_path = {
            v.path[len(prefix) :] if v.path.startswith(prefix) else v.path: v
            for v in network.variables
            if not v.path.endswith("seed_generator_state")
        }


def network_checkpoint(**networks) -> tf.train.Checkpoint:
    """A checkpoint object for networks only, e.g. `network_checkpoint(teacher=teacher)`:
    restores the student/teacher of a training checkpoint without the optimiser."""
    return tf.train.Checkpoint(**{name: NetworkVariables(net) for name, net in networks.items()})


class TrainingCheckpoint:
    def __init__(self, directory: str, *, student, teacher, optimizer, center):
        self.directory = directory
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(
            student=NetworkVariables(student),
            teacher=NetworkVariables(teacher),
            optimizer=optimizer,
            center=center,
            epoch=self.epoch,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=1, checkpoint_name="latest"
        )

    @property
    def latest_path(self) -> str | None:
        return self.manager.latest_checkpoint

    def restore_latest(self) -> int:
        """Restores the latest checkpoint if there is one; returns its epoch (0 if none)."""
        path = self.manager.latest_checkpoint
        if path is None:
            return 0
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return int(self.epoch.numpy())

    def save(self, epoch: int, keep: bool = False) -> str:
        self.epoch.assign(epoch)
        path = self.manager.save(checkpoint_number=epoch)
        if keep:
            self.checkpoint.write(os.path.join(self.directory, f"epoch-{epoch:04d}"))
        return path


def check_or_write_run_config(config: TrainConfig) -> None:
    """Write `<output_dir>/config.json`; refuse a run whose architecture differs from the one
    of the checkpoints already in `output_dir` (naming the flag)."""
    path = os.path.join(config.output_dir, "config.json")
    if os.path.exists(path) and tf.train.latest_checkpoint(config.checkpoint_dir):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        for flag in ARCHITECTURE_FLAGS:
            current = getattr(config, flag)
            if flag in saved and saved[flag] != current:
                raise ConfigError(
                    f"--{flag}={current} differs from the checkpoints in {config.checkpoint_dir} "
                    f"(trained with --{flag}={saved[flag]}); use another --output_dir or the "
                    "same value. Nothing was overwritten."
                )
    os.makedirs(config.output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json())
    os.replace(tmp, path)
