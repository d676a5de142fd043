"""Helpers for the tests of run loading, export, evaluation and the scripts.

`make_tiny_run` writes a tiny training-run directory (config.json + checkpoints/latest-1). No
training: the networks are built as training builds them, the teacher is moved away from the
student (as an EMA would) and saved. `write_idx_dataset` writes a small labelled idx data set;
`load_script` / `run_script` run a scripts/*.py absl app in-process on fresh flags.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import subprocess
import sys

import numpy as np
from absl import flags

from dino_keras.checkpointing import TrainingCheckpoint, check_or_write_run_config
from dino_keras.training import build_trainer
from tests.helpers import tiny_config


def make_tiny_run(output_dir, *, teacher_offset_seed: int = 1, **overrides):
    """Writes a run to `output_dir`; returns (config, student, teacher)."""
    values = dict(
        output_dir=str(output_dir),
        head_hidden_dim=64,
        head_bottleneck_dim=32,
        local_crops_number=0,
        drop_path_rate=0.1,
        epochs=1,
        warmup_epochs=0,
    )
    values.update(overrides)
    config = tiny_config(**values)
    trainer = build_trainer(config, steps=1, global_batch=config.batch_size_per_gpu)
    rng = np.random.default_rng(teacher_offset_seed)
    for variable in trainer.teacher.variables:
        if variable.dtype == "float32":
            noise = rng.standard_normal(variable.shape).astype(np.float32)
            variable.assign(variable + 0.05 * noise)
    check_or_write_run_config(config)
    TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    ).save(1)
    return config, trainer.student, trainer.teacher


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx_dataset(folder, *, train: int = 60, test: int = 20, classes: int = 3, seed: int = 0):
    """MNIST-style idx files of 28x28 images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % classes
        rows = np.arange(28)[None, :, None]
        images = (
            rng.integers(0, 60, (count, 28, 28)) + 180 * ((rows // 10) == labels[:, None, None])
        ).astype(np.uint8)
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes())
    return str(folder)


def load_script(name: str):
    """scripts/<name>.py as a module (its flags are not defined until `define_flags`)."""
    spec = importlib.util.spec_from_file_location(
        f"script_{name}", os.path.join(REPO_ROOT, "scripts", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str):
    """`run(flags)` of scripts/<name>.py with `args` parsed on a fresh FlagValues."""
    module = load_script(name)
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values([name, *args])
    return module.run(flag_values)


def run_script_process(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """scripts/<name>.py as a command, the way a user runs it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )
