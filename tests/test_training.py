"""Whole runs: outputs, resume after an interruption, and bad input before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dino_keras.callbacks import SaveCheckpoints
from dino_keras.config import ConfigError
from dino_keras.data.sources import DataSourceError
from dino_keras.training import run_training
from tests.helpers import tiny_config, write_idx_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """A small labelled idx data set (train and test split) for the runs of this module: the
    k-NN evaluations at both ends of each run read 200 test images, not Fashion-MNIST's 10k."""
    return write_idx_dataset(tmp_path_factory.mktemp("idx"), train=96, test=200, classes=4)


def run_config(tmp_path, data_path, **overrides):
    values = dict(
        data_path=data_path,
        limit_images=64,
        batch_size_per_gpu=16,
        epochs=2,
        eval_every=0,
        output_dir=str(tmp_path / "run"),
        eval_batch_size=512,
    )
    values.update(overrides)
    return tiny_config(**values)


def final_weights(output_dir):
    """Every tensor of the latest checkpoint: networks, optimiser state, centre, epoch."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(output_dir, "checkpoints"))
    names = sorted(
        n
        for n in reader.get_variable_to_shape_map()
        if n not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    )
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow
def test_run_writes_log_summary_checkpoints_and_resumes_identically(tmp_path, monkeypatch,
                                                                     idx_data):
    uninterrupted = run_config(tmp_path / "a", idx_data, saveckp_freq=1)
    summary = run_training(uninterrupted)
    out = uninterrupted.output_dir
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert "knn_top1" in records[0] and "knn_top1" in records[-1]
    for key in (
        "loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "teacher_batch_entropy",
        "kl_teacher_student",
        "center_norm",
    ):
        assert key in records[1], key
    assert summary["epochs_completed"] == 2 and summary["knn_top1_initial"] is not None
    assert json.load(open(os.path.join(out, "summary.json")))["epochs_completed"] == 2
    assert json.load(open(os.path.join(out, "config.json")))["model"]["embed_dim"] == 32
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["tensors"])
    for tag in (
        "loss",
        "knn_top1",
        "teacher_entropy",
        "teacher_batch_entropy",
        "kl_teacher_student",
        "center_norm",
        "lr",
        "momentum",
        "attention/image_0",
    ):
        assert tag in tags, tag
    kept = sorted(f for f in os.listdir(os.path.join(out, "checkpoints")) if f.startswith("epoch-"))
    assert kept and kept[0].startswith("epoch-0001")

    # Same command, killed after the first epoch's checkpoint, then rerun.
    interrupted = run_config(tmp_path / "b", idx_data, saveckp_freq=1)
    original_save = SaveCheckpoints.on_epoch_end

    def save_then_die(self, epoch, logs=None):
        original_save(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(SaveCheckpoints, "on_epoch_end", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted)
    monkeypatch.setattr(SaveCheckpoints, "on_epoch_end", original_save)
    assert final_weights(interrupted.output_dir)  # epoch 1 saved
    resumed = run_training(interrupted)
    assert resumed["epochs_completed"] == 2
    expected, actual = final_weights(out), final_weights(interrupted.output_dir)
    assert expected.keys() == actual.keys() and len(expected) > 100
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # A complete run rerun does not train again and keeps its checkpoint.
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert run_training(uninterrupted)["epochs_completed"] == 2
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_missing_and_empty_data_paths_fail_before_work(tmp_path):
    with pytest.raises(DataSourceError, match="--data_path"):
        run_training(run_config(tmp_path, str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="--data_path"):
        run_training(run_config(tmp_path, str(tmp_path / "empty")))
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_architecture_change_refused_without_touching_checkpoints(tmp_path, idx_data):
    config = run_config(tmp_path, idx_data, epochs=1)
    run_training(config)
    checkpoint_files = sorted(os.listdir(config.checkpoint_dir))
    with pytest.raises(ConfigError, match="--embed_dim"):
        run_training(run_config(tmp_path, idx_data, epochs=1, embed_dim=64, num_heads=2))
    assert sorted(os.listdir(config.checkpoint_dir)) == checkpoint_files


def test_image_folder_with_non_image_and_corrupt_files_trains(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                folder / label / f"{i}.png"
            )
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    config = run_config(tmp_path, str(folder), limit_images=0, batch_size_per_gpu=8, epochs=1)
    summary = run_training(config)
    assert summary["epochs_completed"] == 1
    assert summary["knn_top1_final"] is None  # no separate test split: k-NN disabled


@pytest.mark.slow
def test_loader_processes_train_the_same_weights(tmp_path, idx_data):
    for num_workers in (0, 2):
        run_training(
            run_config(tmp_path / str(num_workers), idx_data, epochs=1, num_workers=num_workers)
        )
    in_process, from_processes = final_weights(tmp_path / "0" / "run"), final_weights(
        tmp_path / "2" / "run")
    assert in_process.keys() == from_processes.keys() and len(in_process) > 100
    for name in in_process:
        np.testing.assert_allclose(from_processes[name], in_process[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)


def test_script_reports_bad_flag_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "train.py"),
            "--arch=vit_huge",
            f"--output_dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--arch" in result.stderr and "vit_huge" in result.stderr
    assert not os.path.exists(tmp_path / "run")
