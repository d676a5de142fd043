"""The collapse guard: each kind of collapse warned, logged, summarised; --stop_on_collapse."""

import json
import math
import os

import numpy as np

from dino_keras.callbacks import CollapseGuard, collapse_state
from dino_keras.training import run_training
from tests.helpers import tiny_config, write_idx

K = 1024


def healthy_logs():
    return {"teacher_entropy": 4.1, "teacher_batch_entropy": 6.5, "kl_teacher_student": 0.8}


def test_healthy_monitors_are_not_a_collapse():
    assert collapse_state(healthy_logs(), K) is None
    # Near-uniform teachers that the student does not match yet are not a collapse either.
    assert collapse_state({**healthy_logs(), "teacher_entropy": math.log(K)}, K) is None


def test_uniform_collapse_is_named_with_its_figures():
    logs = {**healthy_logs(), "teacher_entropy": 6.9, "kl_teacher_student": 1e-4}
    state, figures = collapse_state(logs, K)
    assert state == "uniform"
    assert "6.900" in figures and "ln(1024)" in figures and "0.0001" in figures


def test_one_hot_collapse_is_named_with_its_figures():
    logs = {**healthy_logs(), "teacher_entropy": 0.01, "teacher_batch_entropy": 0.02}
    state, figures = collapse_state(logs, K)
    assert state == "one-hot"
    assert "0.020" in figures


class FakeModel:
    stop_training = False


def test_guard_warns_logs_and_stops_only_when_asked(capsys):
    for stop in (False, True):
        guard = CollapseGuard(K, stop=stop)
        guard.set_model(FakeModel())
        logs = {**healthy_logs(), "teacher_entropy": math.log(K), "kl_teacher_student": 0.0}
        guard.on_epoch_end(4, logs)
        line = capsys.readouterr().out.strip()
        assert logs["collapse"] == "uniform"
        assert line.startswith("WARNING: DINO has collapsed (uniform) after epoch 5")
        assert "--koleo_loss_weight" in line and "\n" not in line
        assert guard.model.stop_training is stop
        healthy = healthy_logs()
        guard.on_epoch_end(5, healthy)
        assert "collapse" not in healthy and capsys.readouterr().out == ""


def constant_images(folder):
    """idx files of identical black images: the teacher gives every image the same output."""
    for prefix, count in (("train", 64), ("t10k", 16)):
        write_idx(folder, prefix, np.zeros((count, 28, 28), np.uint8), np.arange(count) % 3)
    return str(folder)


def test_forced_one_hot_collapse_stops_the_run_with_its_checkpoint(tmp_path, capsys):
    # Identical images and a near-zero teacher temperature: every teacher distribution is the
    # same one-hot, so the batch-mean distribution is one-hot too.
    config = tiny_config(
        data_path=constant_images(tmp_path / "data"),
        batch_size_per_gpu=16,
        epochs=3,
        eval_every=0,
        teacher_temp=1e-4,
        warmup_teacher_temp=1e-4,
        stop_on_collapse=True,
        output_dir=str(tmp_path / "run"),
    )
    summary = run_training(config)
    out = capsys.readouterr().out
    assert "WARNING: DINO has collapsed (one-hot) after epoch 1" in out
    assert summary["epochs_completed"] == 1
    assert summary["collapse"] == [{"epoch": 1, "state": "one-hot"}]
    with open(os.path.join(config.output_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["collapse"] == summary["collapse"]
    with open(os.path.join(config.output_dir, "log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r.get("collapse") for r in records if "loss" in r] == ["one-hot"]
    assert os.path.exists(os.path.join(config.output_dir, "checkpoints", "checkpoint"))
