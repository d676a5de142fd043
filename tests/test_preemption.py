"""Preemption: a run killed with SIGKILL (mid-epoch, or inside a checkpoint write) and rerun
with the same command ends exactly where an uninterrupted run ends, losing nothing; a
non-finite loss stops the run naming the step and leaves the last checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.callbacks import NonFiniteLossError
from dino_keras.checkpointing import TrainingCheckpoint
from dino_keras.training import build_trainer, run_training
from tests.helpers import tiny_config, write_idx_dataset
from tests.test_distribution import TINY_FLAGS, training_process

# 7 steps per epoch (60 images, batch 8), 3 epochs, a backup every 2 steps; drop path on, so
# the random-generator state must survive the restart too.
EPOCHS, STEPS_PER_EPOCH = 3, 7


def run_flags(data, output_dir, dump):
    return [
        *TINY_FLAGS,
        "--drop_path_rate=0.2",
        f"--data_path={data}",
        f"--epochs={EPOCHS}",
        "--batch_size_per_gpu=8",
        "--backup_every_steps=2",
        "--saveckp_freq=1",
        "--deterministic",
        f"--output_dir={output_dir}",
        f"--dump={dump}",
    ]


def assert_weights_equal(first, second, atol):
    a, b = np.load(first), np.load(second)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        if name == "loss":  # the last logged loss: an epoch mean, partial after a restart
            continue
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def assert_nothing_lost(output_dir):
    records = [json.loads(line) for line in open(os.path.join(output_dir, "log.jsonl"))]
    trained_epochs = sorted({r["epoch"] for r in records if "loss" in r})
    assert trained_epochs == list(range(1, EPOCHS + 1))
    checkpoints = os.listdir(os.path.join(output_dir, "checkpoints"))
    for epoch in range(1, EPOCHS + 1):
        assert f"epoch-{epoch:04d}.index" in checkpoints
    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["epochs_completed"] == EPOCHS
    assert os.path.exists(os.path.join(output_dir, "config.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    data = write_idx_dataset(root / "data", train=60, test=12)
    dump = root / "uninterrupted.npz"
    training_process(*run_flags(data, root / "uninterrupted", dump))
    assert int(np.load(dump)["step"]) == EPOCHS * STEPS_PER_EPOCH
    return data, dump


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    data, reference = uninterrupted
    output_dir, dump = tmp_path / "run", tmp_path / "resumed.npz"
    flags = run_flags(data, output_dir, dump)
    process = training_process(*flags, wait=False)
    backups = output_dir / "checkpoints" / "backup"
    # Kill once a backup inside the second epoch is committed (step 8 or 10): named by the
    # backup directory's `checkpoint` file, which is written after the backup's own files. (An
    # index file alone can be there before it; killed then, the run rightly resumes from the
    # epoch checkpoint at step 7.)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        committed = tf.train.latest_checkpoint(backups) if backups.exists() else None
        if committed and committed.endswith(("step-8", "step-10")):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = tf.train.latest_checkpoint(backups)
    assert killed_at is not None

    result = training_process(*flags)
    assert "Resuming from" in result.stdout and "backup/step-" in result.stdout, result.stdout
    assert_weights_equal(reference, dump, atol=1e-6)
    assert_nothing_lost(output_dir)


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_then_rerun_matches(uninterrupted, tmp_path):
    data, reference = uninterrupted
    output_dir, dump = tmp_path / "run", tmp_path / "resumed.npz"
    flags = run_flags(data, output_dir, dump)
    # Saves: backups at steps 2, 4, 6, the epoch-1 checkpoint (step 7), backup 8: the 4th is
    # the epoch checkpoint; killed after its files are written, before the index names them.
    killed = training_process(*flags, "--kill_in_save=4", wait=False)
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    assert "killing the process inside save 4" in output
    latest = tf.train.latest_checkpoint(output_dir / "checkpoints")
    assert latest is None  # the first epoch checkpoint was never recorded
    # The previous backup is intact and loadable.
    backup = tf.train.latest_checkpoint(output_dir / "checkpoints" / "backup")
    assert backup.endswith("step-6")
    assert int(tf.train.load_variable(backup, "step/.ATTRIBUTES/VARIABLE_VALUE")) == 6

    result = training_process(*flags)
    assert "at step 6 (epoch 1, batch 7 of 7)" in result.stdout, result.stdout
    assert_weights_equal(reference, dump, atol=1e-6)
    assert_nothing_lost(output_dir)


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    data = write_idx_dataset(tmp_path / "data", train=32, test=8)
    common = dict(data_path=data, output_dir=str(tmp_path / "run"), warmup_epochs=0,
                  eval_every=0, backup_every_steps=2, saveckp_freq=1)
    run_training(tiny_config(epochs=1, **common))
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    good = tf.train.latest_checkpoint(checkpoint_dir)
    assert good.endswith("latest-1")

    # Resumed with an absurd learning rate, the weights overflow within the second epoch.
    diverging = tiny_config(epochs=2, lr=1e38, **common)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (5|6|7|8) \(epoch 2"):
        run_training(diverging)
    assert tf.train.latest_checkpoint(checkpoint_dir) == good
    # No backup of the diverged state: the only backup is epoch 1's step 2.
    assert tf.train.latest_checkpoint(checkpoint_dir / "backup").endswith("step-2")
    trainer = build_trainer(diverging, steps=4, global_batch=8)
    restored = TrainingCheckpoint(
        str(checkpoint_dir), student=trainer.student, teacher=trainer.teacher,
        optimizer=trainer.optimizer, center=trainer.center,
    )
    assert restored.restore().step == 4
    for variable in trainer.student.variables + trainer.teacher.variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path


class _FakeCheckpoint:
    def __init__(self):
        self.backups = []

    def save_backup(self, epoch):
        self.backups.append(epoch)


class _FakeModel:
    def __init__(self):
        self.optimizer = type("Optimizer", (), {})()
        self.optimizer.iterations = tf.Variable(0, dtype=tf.int64)


def test_backups_follow_the_step_across_steps_per_execution():
    from dino_keras.callbacks import SaveBackups

    checkpoint, model = _FakeCheckpoint(), _FakeModel()
    callback = SaveBackups(checkpoint, every=5, steps_per_epoch=12)
    callback.set_model(model)
    callback.on_train_begin()
    saved_at = []
    for step in (3, 6, 9, 12, 15, 18, 21, 24):  # 3 steps per execution
        model.optimizer.iterations.assign(step)
        before = len(checkpoint.backups)
        callback.on_train_batch_end(0)
        if len(checkpoint.backups) > before:
            saved_at.append(step)
    # Crossing 5, 10, 15, 20 -> backups at steps 6, 12 (skipped: an epoch end), 15, 21.
    assert saved_at == [6, 15, 21]
    assert checkpoint.backups == [0, 1, 1]
