"""Loading a run's backbone: path forms, teacher/student, and clear errors for bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.run_loading import RunLoadingError, load_backbone, resolve_checkpoint
from tests.helpers import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    config, student, teacher = make_tiny_run(directory)
    return directory, config, student, teacher


def assert_same_weights(a, b):
    assert len(a.variables) == len(b.variables)
    for x, y in zip(a.variables, b.variables, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


def test_path_forms_and_networks(run):
    directory, config, student, teacher = run
    prefix = str(directory / "checkpoints" / "latest-1")
    for path in (directory, directory / "checkpoints", prefix):
        assert resolve_checkpoint(str(path)) == (str(directory), prefix)
    loaded = load_backbone(str(directory))
    assert loaded.which == "teacher" and loaded.checkpoint_path == prefix
    assert loaded.config == config and loaded.patch_size == 4
    assert_same_weights(loaded.backbone, teacher.backbone)  # every block, not only the embeddings
    loaded_student = load_backbone(prefix, which="student")
    assert_same_weights(loaded_student.backbone, student.backbone)
    with pytest.raises(RunLoadingError, match="--which"):
        load_backbone(str(directory), which="both")


def test_checkpoint_of_another_architecture_is_refused(run, tmp_path):
    directory = run[0]
    for name, overrides, message in [
        ("wider", dict(embed_dim=48), "another shape"),
        ("deeper", dict(depth=3), "has no place for"),
    ]:
        other = tmp_path / name
        make_tiny_run(other, **overrides)
        # A run directory whose config.json is the tiny run's but whose checkpoint is not.
        mixed = tmp_path / f"mixed_{name}"
        shutil.copytree(other / "checkpoints", mixed / "checkpoints")
        shutil.copy(directory / "config.json", mixed / "config.json")
        with pytest.raises(RunLoadingError, match=message) as error:
            load_backbone(str(mixed))
        assert str(mixed / "checkpoints" / "latest-1") in str(error.value)
        assert str(mixed / "config.json") in str(error.value)
    # A config with fewer blocks than the checkpoint: variables missing from the checkpoint.
    shallow = tmp_path / "shallow"
    shutil.copytree(directory / "checkpoints", shallow / "checkpoints")
    with open(directory / "config.json") as f:
        config = json.load(f)
    with open(shallow / "config.json", "w") as f:
        json.dump({**config, "model": {**config["model"], "depth": 3}}, f)
    with pytest.raises(RunLoadingError, match="missing from the checkpoint"):
        load_backbone(str(shallow))
    # An older run's config.json, flat and with the former names of the k-NN settings: still
    # loads.
    renamed = tmp_path / "renamed"
    shutil.copytree(directory, renamed)
    flat = {k: v for section in config.values() for k, v in section.items()}
    old_keys = {k: v for k, v in flat.items() if k not in ("nb_knn", "temperature")}
    with open(renamed / "config.json", "w") as f:
        json.dump({**old_keys, "knn_k": 9, "knn_temperature": 0.1}, f)
    assert load_backbone(str(renamed)).config.nb_knn == 9
    # A config.json with a setting or a section TrainConfig does not have: refused, naming it.
    with open(shallow / "config.json", "w") as f:
        json.dump({**config, "model": {**config["model"], "no_such_setting": 1}}, f)
    with pytest.raises(RunLoadingError, match="--no_such_setting: unknown setting") as error:
        load_backbone(str(shallow))
    assert str(shallow / "config.json") in str(error.value)
    with open(shallow / "config.json", "w") as f:
        json.dump({**config, "no_such_section": {}}, f)
    with pytest.raises(RunLoadingError, match="unknown section 'no_such_section'") as error:
        load_backbone(str(shallow))
    assert str(shallow / "config.json") in str(error.value)


def test_missing_and_corrupt_checkpoints_and_configs(run, tmp_path):
    directory = run[0]
    with pytest.raises(RunLoadingError, match="does not exist") as error:
        load_backbone(str(tmp_path / "nowhere"))
    assert "nowhere" in str(error.value)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunLoadingError, match="no checkpoint in"):
        load_backbone(str(tmp_path / "empty"))

    no_config = tmp_path / "no_config"
    shutil.copytree(directory / "checkpoints", no_config / "checkpoints")
    with pytest.raises(RunLoadingError, match="no config.json"):
        load_backbone(str(no_config))
    (no_config / "config.json").write_text("{not json")
    with pytest.raises(RunLoadingError, match="not valid JSON") as error:
        load_backbone(str(no_config))
    assert str(no_config / "config.json") in str(error.value)

    for damaged_file in ("latest-1.index", "latest-1.data-00000-of-00001"):
        corrupt = tmp_path / f"corrupt_{damaged_file}"
        shutil.copytree(directory, corrupt)
        path = corrupt / "checkpoints" / damaged_file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated
        with pytest.raises(RunLoadingError, match="checkpoint") as error:
            load_backbone(str(corrupt))
        assert str(corrupt / "checkpoints" / "latest-1") in str(error.value)


def test_checkpoint_without_per_variable_entries_is_refused(run, tmp_path):
    """tf.train.Checkpoint(student=..., teacher=...) of the Keras networks misses the layers
    held in lists (ViT blocks, head MLP): such a checkpoint must not load silently."""
    directory, config, student, teacher = run
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    shutil.copy(directory / "config.json", legacy / "config.json")
    tf.train.Checkpoint(student=student, teacher=teacher).write(
        str(legacy / "checkpoints" / "latest-1")
    )
    with pytest.raises(RunLoadingError, match="per-variable entries"):
        load_backbone(str(legacy / "checkpoints" / "latest-1"))
    assert os.path.exists(legacy / "checkpoints" / "latest-1.index")
