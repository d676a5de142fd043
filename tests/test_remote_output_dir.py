"""A whole run with --output_dir on TensorFlow's in-memory file system (`ram://`, one process):
its data (counted TFRecord files, streamed) is read from there and every output goes through
tf.io.gfile, an interrupted run resumes mid-epoch from its backup there, the run loads back for
evaluation, and its SavedModel and .keras exports are written to ram:// and load back from there
with the features of the run's backbone."""

import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras import run_dir
from dino_keras.checkpointing import TrainingCheckpoint
from dino_keras.export import export_backbone, load_export, normalize_0_255
from dino_keras.keras_export import save_keras_backbone
from dino_keras.run_loading import RunLoadingError, load_backbone
from dino_keras.training import run_training
from tests.helpers import tiny_config, write_record_dataset


def all_files(directory):
    return sorted(
        run_dir.join(folder, name)
        for folder, _, names in tf.io.gfile.walk(directory)
        for name in names
    )


def test_run_on_ram_filesystem_writes_everything_and_resumes_from_its_backup(
    monkeypatch, capsys
):
    train_data, test_data = write_record_dataset(  # 4 steps of 8 per epoch
        f"ram://dino_data/{uuid.uuid4().hex}", train=32, test=8
    )
    output_dir = f"ram://dino_runs/{uuid.uuid4().hex}"
    config = tiny_config(
        data_path=train_data,
        eval_data_path=test_data,
        output_dir=output_dir,
        epochs=2,
        warmup_epochs=0,
        eval_every=0,
        nb_knn=5,
        backup_every_steps=2,
        saveckp_freq=1,
        local_crops_number=0,
        jit_compile=False,  # what is under test is the file system, not the compiled step
    )

    # Interrupted right after the backup of step 6 (epoch 2, batch 2).
    original_backup = TrainingCheckpoint.save_backup

    def backup_then_die(self, epoch):
        path = original_backup(self, epoch)
        if int(self.step.numpy()) == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(TrainingCheckpoint, "save_backup", backup_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    monkeypatch.setattr(TrainingCheckpoint, "save_backup", original_backup)
    checkpoints = run_dir.join(output_dir, "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints) == run_dir.join(checkpoints, "latest-1")
    backup = run_dir.join(checkpoints, "backup", "step-6")
    assert tf.train.latest_checkpoint(run_dir.join(checkpoints, "backup")) == backup
    assert f"Training on TFRecord files {train_data}: 32 images" in capsys.readouterr().out

    summary = run_training(config)
    # The backup is further along than latest-1 (step 4): the rerun continues from it.
    assert f"Resuming from {backup} at step 6 (epoch 2, batch 3 of 4)" in capsys.readouterr().out
    assert summary["epochs_completed"] == 2
    assert summary["checkpoint"] == run_dir.join(checkpoints, "latest-2")
    assert run_dir.read_json(run_dir.join(output_dir, "summary.json")) == summary
    assert run_dir.read_config(output_dir)["run"]["output_dir"] == output_dir
    records = run_dir.read_jsonl(run_dir.join(output_dir, "log.jsonl"))
    assert sorted({r["epoch"] for r in records if "loss" in r}) == [1, 2]
    assert records[0]["epoch"] == 0 and "knn_top1" in records[0]  # k-NN before training

    files = all_files(output_dir)
    for name in ("latest-2.index", "epoch-0001.index", "epoch-0002.index", "checkpoint"):
        assert run_dir.join(checkpoints, name) in files, name
    assert not any(name.startswith(run_dir.join(checkpoints, "latest-1")) for name in files)
    assert any("/tensorboard/events.out.tfevents" in name for name in files)
    assert not any(".tmp" in name for name in files), files

    loaded = load_backbone(output_dir)
    assert loaded.run_dir == output_dir
    assert loaded.checkpoint_path == run_dir.join(checkpoints, "latest-2")
    with pytest.raises(RunLoadingError, match="does not exist"):
        load_backbone(f"ram://dino_runs/{uuid.uuid4().hex}/missing")

    # Both exports of the run's backbone, written to and loaded back from ram://; their features
    # are the backbone's own (what a local export gives: tests/test_export.py).
    export_dir = run_dir.join(output_dir, "export")
    size = config.global_crops_size
    saved_model = export_backbone(loaded.backbone, export_dir, image_size=size)
    assert saved_model == run_dir.join(export_dir, "1")
    keras_file = save_keras_backbone(loaded.backbone, export_dir)
    assert keras_file == run_dir.join(export_dir, "backbone-1.keras")
    model, metadata, directory = load_export(export_dir)
    assert directory == saved_model and metadata["image_size"] == size
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    expected = loaded.backbone(normalize_0_255(tf.constant(pixels))).numpy()
    served = model.signatures["serving_default"](images=tf.constant(pixels))["embedding"]
    np.testing.assert_allclose(served.numpy(), expected, rtol=0, atol=1e-5)
    restored = keras.saving.load_model(keras_file)
    np.testing.assert_allclose(restored(pixels).numpy(), expected, rtol=0, atol=1e-5)
    assert not any(".tmp-" in name or ".old-" in name for name in all_files(export_dir))
