"""Load the backbone of a training run for evaluation, export or visualisation.

A run is `<output_dir>/config.json` + `<output_dir>/checkpoints/{latest-N,epoch-NNNN}`
(`dino_keras.checkpointing`). `load_backbone` accepts the run directory, its checkpoints
directory or one checkpoint prefix, rebuilds the networks that `config.json` describes and
restores only the student and the teacher (never the optimiser) from the checkpoint.

Training checkpoints address each network's variables by their path inside the network
(`checkpointing.NetworkVariables`: `<network>/by_path/<path>`). Before restoring, those entries
are compared with the networks built from `config.json` (names and shapes), so a checkpoint of
another architecture, or one that lacks some variables, is refused with a message naming both
files instead of leaving some weights at their random initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from dino_keras.checkpointing import NetworkVariables, network_checkpoint
from dino_keras.config import ConfigError, TrainConfig, define_alias
from dino_keras.models.factory import build_student_and_teacher
from dino_keras.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    exists,
    is_dir,
    is_file,
    join,
    normalize,
    read_json,
)

log = logging.getLogger(__name__)

NETWORKS = ("teacher", "student")
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# What TensorFlow's checkpoint reader raises on damaged files (a truncated data file gives an
# IndexError, a bad index file a DataLossError or a ValueError).
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError, OSError)


class RunLoadingError(ValueError):
    """A run directory or checkpoint that cannot be loaded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LoadedBackbone:
    """A restored backbone and where it came from."""

    backbone: keras.Model
    config: TrainConfig
    checkpoint_path: str  # the checkpoint prefix that was restored
    run_dir: str  # the directory holding config.json
    which: str  # "teacher" or "student"

    @property
    def patch_size(self) -> int | None:
        return self.config.patch_size if self.config.is_vit else None


# --------------------------------------------------------------------------- #
# Finding the checkpoint and the configuration
# --------------------------------------------------------------------------- #


def _is_checkpoint_prefix(path: str) -> bool:
    return is_file(path + ".index")


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(run directory holding config.json, checkpoint prefix) for a run directory, its
    checkpoints directory or a checkpoint prefix (`.../checkpoints/latest-3`)."""
    path = normalize(path)
    if _is_checkpoint_prefix(path):
        prefix = path
        folder = os.path.dirname(prefix)
        candidates = [os.path.dirname(folder), folder]
    elif is_dir(path):
        checkpoints = join(path, CHECKPOINTS_DIR)
        if is_dir(checkpoints):
            folder, candidates = checkpoints, [path]
        else:
            folder, candidates = path, [os.path.dirname(path), path]
        prefix = tf.train.latest_checkpoint(folder)
        if prefix is None:
            raise RunLoadingError(
                f"no checkpoint in {folder} (expected a 'checkpoint' index file and "
                "latest-N.index / .data files written by training)"
            )
    elif exists(path + ".data-00000-of-00001") or path.endswith((".index", ".data")):
        raise RunLoadingError(
            f"{path}: pass the checkpoint prefix (e.g. .../checkpoints/latest-3), not one of its "
            "files, or its .index file is missing"
        )
    else:
        raise RunLoadingError(
            f"checkpoint {path} does not exist (pass a run directory, its "
            "checkpoints directory or a checkpoint prefix)"
        )
    for run_dir in candidates:
        if is_file(join(run_dir, CONFIG_FILE)):
            return run_dir, prefix
    raise RunLoadingError(
        f"no {CONFIG_FILE} found for checkpoint {prefix} (looked in "
        f"{' and '.join(join(d, CONFIG_FILE) for d in candidates)})"
    )


def read_run_config(run_dir: str) -> TrainConfig:
    """The `TrainConfig` stored in `<run_dir>/config.json`."""
    path = join(run_dir, CONFIG_FILE)
    try:
        saved = read_json(path)
    except (OSError, tf.errors.OpError) as error:
        raise RunLoadingError(f"cannot read {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise RunLoadingError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(saved, dict):
        raise RunLoadingError(f"{path} does not hold a JSON object")
    try:
        config = TrainConfig.from_dict(saved)
    except (ConfigError, TypeError, ValueError) as error:
        raise RunLoadingError(f"{path}: invalid configuration: {error}") from error
    return config


# --------------------------------------------------------------------------- #
# Checking and restoring
# --------------------------------------------------------------------------- #


def _checkpoint_entries(prefix: str, network_name: str) -> dict[str, tuple[int, ...]]:
    """{variable path inside the network: shape} of `<network_name>/by_path` in a checkpoint."""
    try:
        # Not `tf.train.load_checkpoint`, which takes a prefix for a directory on `ram://`.
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
        shapes = reader.get_variable_to_shape_map()
    except _READ_ERRORS as error:
        raise RunLoadingError(
            f"cannot read checkpoint {prefix} (corrupt or not a TensorFlow checkpoint): {error}"
        ) from error

    def child(node_id, name):
        return next(
            (c.node_id for c in graph.nodes[node_id].children if c.local_name == name), None
        )

    network_node = child(0, network_name)
    node_id = None if network_node is None else child(network_node, "by_path")
    if node_id is None:
        raise RunLoadingError(
            f"checkpoint {prefix} has no per-variable entries for the {network_name} "
            f"('{network_name}/by_path'): it is not a dino_keras training checkpoint, or it was "
            "written before they were added, when the teacher's transformer blocks and head MLP "
            "were not saved at all; it cannot be loaded faithfully"
        )
    entries = {}
    for child in graph.nodes[node_id].children:
        attributes = graph.nodes[child.node_id].attributes
        if attributes:
            entries[child.local_name] = tuple(shapes[attributes[0].checkpoint_key])
    return entries


def _is_rng_state(name: str) -> bool:
    # Drop-path random-generator states: named by a process-wide counter
    # ("seed_generator_3/seed_generator_state"), so their names differ between builds, and
    # irrelevant to inference.
    return name.rsplit("/", 1)[-1] == "seed_generator_state"


def check_checkpoint_matches(prefix: str, network_name: str, network, config_path: str) -> None:
    """Refuse a checkpoint whose variables differ (names or shapes) from `network`'s."""
    saved = {
        name: shape
        for name, shape in _checkpoint_entries(prefix, network_name).items()
        if not _is_rng_state(name)
    }
    expected = {
        name: tuple(variable.shape)
        for name, variable in NetworkVariables(network).by_path.items()
        if not _is_rng_state(name)
    }
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    mismatched = sorted(
        name for name in set(saved) & set(expected) if saved[name] != expected[name]
    )
    if not (missing or extra or mismatched):
        return
    details = []
    if mismatched:
        name = mismatched[0]
        details.append(
            f"{len(mismatched)} variables of another shape (e.g. {name}: "
            f"{list(saved[name])} in the checkpoint, {list(expected[name])} expected)"
        )
    if missing:
        details.append(f"{len(missing)} variables missing from the checkpoint (e.g. {missing[0]})")
    if extra:
        details.append(
            f"{len(extra)} variables the configuration has no place for (e.g. {extra[0]})"
        )
    raise RunLoadingError(
        f"checkpoint {prefix} does not match the architecture in {config_path}: the "
        f"{network_name} has {'; '.join(details)}. Was the checkpoint copied from another run?"
    )


def build_networks(config: TrainConfig):
    """Student and teacher for `config`, in float32 whatever the run's training precision."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return build_student_and_teacher(config)
    finally:
        keras.config.set_dtype_policy(previous)


def load_backbone(path: str, which: str = "teacher") -> LoadedBackbone:
    """The restored `which` ("teacher" or "student") backbone of the run at `path`.

    `path`: a run directory, its checkpoints directory or a checkpoint prefix. Raises
    `RunLoadingError` naming the file for a missing or corrupt checkpoint or config.json, and
    for a checkpoint whose architecture differs from config.json's.
    """
    if which not in NETWORKS:
        raise RunLoadingError(f"--which must be one of {', '.join(NETWORKS)}, got {which!r}")
    run_dir, prefix = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    student, teacher = build_networks(config)
    config_path = join(run_dir, CONFIG_FILE)
    for name, network in (("student", student), ("teacher", teacher)):
        check_checkpoint_matches(prefix, name, network, config_path)
    checkpoint = network_checkpoint(student=student, teacher=teacher)
    try:
        checkpoint.restore(prefix).expect_partial()
    except (*_READ_ERRORS, AssertionError) as error:
        raise RunLoadingError(
            f"cannot restore checkpoint {prefix} into the networks of {config_path}: {error}"
        ) from error
    network = teacher if which == "teacher" else student
    return LoadedBackbone(
        backbone=network.backbone,
        config=config,
        checkpoint_path=prefix,
        run_dir=run_dir,
        which=which,
    )


# --------------------------------------------------------------------------- #
# Labelled data for evaluating a run
# --------------------------------------------------------------------------- #


def define_eval_data_flags(flag_values, data_path_help: str) -> None:
    """The evaluation scripts' data flags, read back by `resolve_eval_sources`."""
    from absl import flags

    flags.DEFINE_string("data_path", "fashion_mnist", data_path_help, flag_values=flag_values)
    flags.DEFINE_string(
        "eval_data_path",
        "",
        "Test images; empty: the test split of --data_path.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "tfds_data_dir", "", "TFDS data directory for 'tfds:' data paths.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "limit_images",
        0,
        "Use only the first N training images; 0 uses all.",
        flag_values=flag_values,
    )
    define_alias(flag_values, "limit_train", "limit_images")
    flags.DEFINE_integer(
        "limit_test", 0, "Use only the first N test images; 0 uses all.", flag_values=flag_values
    )


def resolve_eval_sources(
    data_path: str,
    eval_data_path: str = "",
    *,
    tfds_data_dir: str = "",
    limit_images: int = 0,
    limit_test: int = 0,
):
    """(train source, test source) for k-NN / linear evaluation: the train split of
    `data_path` and the test split of `eval_data_path` (default: `data_path`). Raises
    `DataSourceError` naming the flag when either is unlabelled or there is no separate test
    split."""
    from dino_keras.data.sources import DataSourceError, resolve_source

    train = resolve_source(
        data_path,
        "train",
        tfds_data_dir=tfds_data_dir or None,
        limit_images=limit_images or None,
        flag_name="--data_path",
    )
    flag = "--eval_data_path" if eval_data_path else "--data_path"
    test = resolve_source(
        eval_data_path or data_path,
        "test",
        tfds_data_dir=tfds_data_dir or None,
        limit_images=limit_test or None,
        flag_name=flag,
    )
    if not train.num_classes:
        raise DataSourceError(f"--data_path: {train.name} has no labels")
    if not test.num_classes:
        raise DataSourceError(f"{flag}: {test.name} has no labels")
    if test.name == train.name:
        raise DataSourceError(
            f"{flag}: {data_path} has no separate test split; pass --eval_data_path"
        )
    return train, test
