"""The one test helper module: the tiny configuration, tiny runs, data, scripts, layer test.

* `tiny_config` is `configs/tiny.cfg` (a 2-block, 32-wide ViT; shared with
  `benchmarks/benchmark.py --short`) with per-test overrides; `TINY` holds the file's values.
* `make_tiny_run` writes a tiny training-run directory (config.json + checkpoints/latest-1).
  No training: the networks are built as training builds them, the teacher is moved away from
  the student (as an EMA would) and saved.
* `write_idx` writes MNIST-style idx files, `write_idx_dataset` a small labelled idx data set,
  `write_record_dataset` the same images as counted TFRecord files (`write_tfrecord`,
  `count_records`); all of them at any path `tf.io.gfile` writes.
* `load_script` / `run_script` run a scripts/*.py absl app in-process on fresh flags,
  `run_script_process` as a command.
* `run_layer_test` is keras-hub's layer test for a dino_keras layer.
* `readme_commands` are the commands of a README section's shell block, as a shell splits them.
* `once_across_workers` makes a directory once per test session, for every `pytest -n` worker.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import importlib.util
import io
import os
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from dino_keras.config import TrainConfig, flagfile_values

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGFILE = os.path.join(REPO_ROOT, "configs", "tiny.cfg")
# {field: value} of configs/tiny.cfg.
TINY = flagfile_values(TINY_FLAGFILE)


def tiny_config(**overrides) -> TrainConfig:
    """configs/tiny.cfg with `overrides`, validated (the file is read once, into `TINY`)."""
    return TrainConfig.from_dict({**TINY, **overrides})


def tiny_values(*names: str) -> dict:
    """{name: value} of configs/tiny.cfg for `names`."""
    return {name: TINY[name] for name in names}


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
    from dino_keras.checkpointing import TrainingCheckpoint, check_or_write_run_config
    from dino_keras.training import build_trainer

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


def write_idx(
    folder, prefix: str, images: np.ndarray, labels: np.ndarray, *, gzipped: bool = True
) -> str:
    """MNIST-style idx files {prefix}-images-idx3-ubyte[.gz] and -labels-idx1-ubyte[.gz] (a
    data source of scripts/train.py) in `folder`, any path `tf.io.gfile` writes (`ram://`
    too); returns `folder`."""
    import tensorflow as tf

    folder = str(folder)
    images = np.asarray(images).astype(np.uint8)
    labels = np.asarray(labels).astype(np.uint8)
    tf.io.gfile.makedirs(folder)
    suffix = ".gz" if gzipped else ""
    image_data = struct.pack(">IIII", 2051, *images.shape) + images.tobytes()
    label_data = struct.pack(">II", 2049, len(labels)) + labels.tobytes()
    for name, data in (
        (f"{prefix}-images-idx3-ubyte", image_data),
        (f"{prefix}-labels-idx1-ubyte", label_data),
    ):
        with tf.io.gfile.GFile(f"{folder}/{name}{suffix}", "wb") as f:
            f.write(gzip.compress(data) if gzipped else data)
    return folder


def class_pattern_images(count: int, classes: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """`count` 28x28 uint8 images whose bright band of rows is their class, and the labels."""
    labels = np.arange(count) % classes
    rows = np.arange(28)[None, :, None]
    images = rng.integers(0, 60, (count, 28, 28)) + 180 * ((rows // 10) == labels[:, None, None])
    return images.astype(np.uint8), labels


def write_idx_dataset(folder, *, train: int = 60, test: int = 20, classes: int = 3, seed: int = 0):
    """MNIST-style idx files of `class_pattern_images`."""
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder, prefix, *class_pattern_images(count, classes, rng))
    return str(folder)


def encode_image(array: np.ndarray, image_format: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format)
    return buffer.getvalue()


def write_tfrecord(path, encoded_images: list[bytes], labels: list[int] | None) -> str:
    """A TFRecord file of `image/encoded` (+ `image/class/label`) examples, at any path
    `tf.io.gfile` writes."""
    import tensorflow as tf

    from dino_keras.data.sources import image_example

    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, encoded in enumerate(encoded_images):
            writer.write(image_example(encoded, None if labels is None else labels[i]))
    return str(path)


def count_records(*paths) -> None:
    """What `scripts/count_records.py` does for `paths`: their count files."""
    from dino_keras.data import record_counts
    from dino_keras.data.sources import TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY

    record_counts.write_counts([str(path) for path in paths], TFRECORD_IMAGE_KEY,
                               TFRECORD_LABEL_KEY)


def write_record_dataset(folder, *, train: int = 32, test: int = 8, classes: int = 3,
                         train_files: int = 2, seed: int = 0) -> tuple[str, str]:
    """`class_pattern_images` as counted TFRecord files of PNGs, at any path `tf.io.gfile`
    writes: FOLDER/train/part-N.tfrecord (`train_files` files) and FOLDER/test/part-0.tfrecord.
    Returns the train and test folders (--data_path, --eval_data_path)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    folders = []
    for split, count, files in (("train", train, train_files), ("test", test, 1)):
        split_folder = f"{folder}/{split}"
        tf.io.gfile.makedirs(split_folder)
        images, labels = class_pattern_images(count, classes, rng)
        paths = [
            write_tfrecord(f"{split_folder}/part-{index}.tfrecord",
                           [encode_image(image) for image in images[part]], labels[part])
            for index, part in enumerate(np.array_split(np.arange(count), files))
        ]
        count_records(*paths)
        folders.append(split_folder)
    return folders[0], folders[1]


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
    from absl import flags

    module = load_script(name)
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values([name, *args])
    return module.run(flag_values)


@dataclasses.dataclass(frozen=True)
class ReadmeCommand:
    env: dict[str, str]  # the NAME=VALUE assignments before the command
    launcher: list[str]  # what runs the script: ["python"], ["srun", "--nodes=2", ..., "python"]
    args: list[str]  # the script's arguments


def readme_commands(heading: str, script: str = "scripts/train.py") -> list[ReadmeCommand]:
    """The `script` commands of the first ```sh block under the README heading `heading`, split
    as a shell splits them: continued lines joined, comments dropped, quotes removed."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(f"# {heading}\n"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    logical_lines, pending = [], ""
    for line in block.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending = f"{pending}\n{line}" if pending else line
        if pending.count("'") % 2 == 0:  # a quoted value may go on over lines (TF_CONFIG)
            logical_lines.append(pending)
            pending = ""
    commands = []
    for line in logical_lines:
        words = shlex.split(line, comments=True)
        if script not in words:
            continue
        at = words.index(script)
        env_count = next((i for i, word in enumerate(words) if "=" not in word), at)
        env = dict(word.split("=", 1) for word in words[:env_count])
        commands.append(ReadmeCommand(env, words[env_count:at], words[at + 1:]))
    return commands


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


def once_across_workers(tmp_path_factory, name: str, make) -> Path:
    """The directory `name`, filled by `make(directory)` once per test session: the first
    `pytest -n` worker to ask makes it while the others wait on a lock, then all read it. (A
    module fixture would run once per worker that takes one of the module's tests.)"""
    root = Path(tmp_path_factory.getbasetemp())
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above the workers' own
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            directory.mkdir(exist_ok=True)
            make(directory)
            done.touch()
    return directory


def run_layer_test(layer_class, init_kwargs: dict, input_shape: tuple, save_dir,
                   *, bfloat16_atol: float = 0.1):
    """keras-hub's run_layer_test, for a dino_keras layer (or backbone model).

    Checks: build and call; every constructor argument echoed by `get_config`, and
    `from_config` rebuilding a layer whose config and outputs (same weights) equal the original's;
    traced and XLA-compiled calls equal to the eager one; a `.keras` save and load of a model
    holding the layer, with equal outputs; and a build under the `mixed_bfloat16` global policy
    whose outputs are bfloat16 and close to float32's with the same weights.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    inputs = np.random.default_rng(0).normal(size=input_shape).astype(np.float32)
    layer = layer_class(**init_kwargs)
    outputs = np.asarray(layer(inputs))
    assert np.isfinite(outputs).all()

    config = layer.get_config()
    for name, value in init_kwargs.items():
        assert config[name] == value, f"{layer_class.__name__}.get_config()[{name!r}]"
    clone = layer_class.from_config(config)
    assert clone.get_config() == config
    clone(inputs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(inputs)), outputs, rtol=1e-5, atol=1e-6)

    for jit_compile in (False, True):
        traced = tf.function(lambda x: layer(x), jit_compile=jit_compile)  # noqa: B023
        np.testing.assert_allclose(traced(inputs).numpy(), outputs, rtol=1e-4, atol=1e-5)

    model = keras.Sequential([keras.Input(input_shape[1:]), layer])
    path = str(save_dir / f"{layer_class.__name__}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(inputs)), outputs, rtol=1e-5, atol=1e-6)

    # Mixed precision as training sets it: the global policy, which sub-layers follow too.
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        low = layer_class.from_config({key: value for key, value in config.items()
                                       if key != "dtype"})
        low(inputs)
        low.set_weights(layer.get_weights())
        low_outputs = low(inputs)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    assert low_outputs.dtype == "bfloat16", low_outputs.dtype
    np.testing.assert_allclose(np.asarray(ops_to_float(low_outputs)), outputs, atol=bfloat16_atol)
    return layer


def ops_to_float(x):
    import keras

    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
