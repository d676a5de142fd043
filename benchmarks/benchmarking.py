"""Throughput, compile time, memory and MFU of DINO training, case by case.

`run_benchmark` (what `benchmarks/benchmark.py` calls) runs each case in its own Python process,
so every case has its own peak resident memory, and prints one JSON object per case and then
a table. The cases, run in this order:

* `matmul_peak`: this machine's matmul FLOP/s (float32, and bfloat16 for mixed_bfloat16 runs)
  with a large `tf.linalg.matmul`, as a TF graph kernel (oneDNN) and XLA-compiled; the faster
  one is the peak that MFU is relative to.
* `step`: the compiled training step alone on crops already in memory: the trainer, optimiser
  and teacher EMA built by `dino_keras.training.build_trainer`, as training builds them.
* `pipeline`: the multi-crop pipeline alone, reading a folder of generated 500x375 JPEGs:
  made by `--num_workers` loader processes, or by `tf.data` in the case's process with 0.
* `fit`: `trainer.fit` on the multi-crop pipeline: both together, reading the recipe's own
  data (`--fit_data_path`; demo: Fashion-MNIST, as `make demo`; paper: the generated JPEGs,
  standing in for ImageNet).
* `reference_step`, `reference_pipeline`: the reference's training step and its multi-crop
  DataLoader in PyTorch at the same sizes, on the same JPEGs, with as many worker processes
  (`benchmarks/reference_cases.py`); each runs right after its dino_keras counterpart, and its
  record holds the ratio dino_keras images/s / reference images/s of the same run. Skipped,
  with the reason, when torch, torchvision or timm is not installed.

The parent process never imports TensorFlow nor PyTorch: it only starts the cases
(`python -m benchmarks.benchmarking CASE SETTINGS_JSON RESULT_PATH`) and reads their results.
FLOPs are counted analytically (`dino_flops_per_image`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from dino_keras.config import ConfigError, TrainConfig, config_from_flagfile, flagfile_values
from dino_keras.hide_torch import hide_torch

CASES = ("matmul_peak", "step", "reference_step", "pipeline", "reference_pipeline", "fit")
# Each reference case and the dino_keras case it is compared with.
REFERENCE_CASES = {"reference_step": "step", "reference_pipeline": "pipeline"}
REFERENCE_MODULES = ("torch", "torchvision", "timm")
# Cases that read the generated JPEGs (fit too when its --fit_data_path is empty).
IMAGE_CASES = ("pipeline", "reference_pipeline", "fit")
RECIPES = ("paper", "demo")
PRECISIONS = ("float32", "mixed_bfloat16")
# Cases whose figures depend on the compute precision (the pipeline's do not).
PRECISION_CASES = ("step", "fit")
FLOP_CASES = ("step", "fit")

IMAGE_HEIGHT, IMAGE_WIDTH = 375, 500
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FLAGFILE = os.path.join(REPO_ROOT, "configs", "demo.cfg")
# --short: the model and crops of the tests' tiny run with a smaller head, at batch 8.
TINY_FLAGFILE = os.path.join(REPO_ROOT, "configs", "tiny.cfg")
SHORT_FIELDS = (
    "arch",
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "global_crops_size",
    "local_crops_size",
    "out_dim",
    "batch_size_per_gpu",
)

# Defaults of the full run and of --short (steps, warmup, pipeline_batches, pipeline_warmup,
# num_images, matmul_size, matmul_seconds).
_FULL_DEFAULTS = dict(
    steps=5,
    warmup=1,
    pipeline_batches=150,
    pipeline_warmup=5,
    num_images=128,
    matmul_size=4096,
    matmul_seconds=3.0,
)
_SHORT_DEFAULTS = dict(
    steps=3,
    warmup=2,
    pipeline_batches=3,
    pipeline_warmup=2,
    num_images=16,
    matmul_size=512,
    matmul_seconds=0.2,
)
_MATMUL_WARMUP_CALLS = 2
_MATMUL_MIN_CALLS = 3


class BenchmarkError(ValueError):
    """An invalid benchmark flag or a case that cannot run; the message names the flag."""


@dataclasses.dataclass
class BenchmarkConfig:
    """What to measure. `None` figures take the defaults of the full run or of `short`."""

    recipe: str = "paper"
    precision: str = "float32"
    cases: tuple[str, ...] = CASES
    short: bool = False
    steps: int | None = None
    warmup: int | None = None
    pipeline_batches: int | None = None
    pipeline_warmup: int | None = None
    num_images: int | None = None
    matmul_size: int | None = None
    matmul_seconds: float | None = None
    jit_compile: bool | None = None
    # Loader processes of the pipeline and fit cases (training's --num_workers); None: the
    # recipe's (paper: 2, as the reference's 2 DataLoader workers; demo: configs/demo.cfg's),
    # 1 with `short`.
    num_workers: int | None = None
    # Times each compared pair (step and reference_step, pipeline and reference_pipeline) runs,
    # alternating: the ratios' median and range show the machine's run-to-run noise.
    repeats: int = 1
    # Intra-op threads of every case's process, TensorFlow's and PyTorch's alike; 0: each
    # library's default (one per schedulable core). Loader processes and DataLoader workers
    # keep their one thread.
    intra_op_threads: int = 0
    image_dir: str = ""
    # What `fit` trains on: a scripts/train.py --data_path, "" for the generated JPEGs, None for
    # the recipe's own (demo: configs/demo.cfg's --data_path and --limit_images; paper and
    # `short`: the JPEGs).
    fit_data_path: str | None = None
    output: str = ""
    seed: int = 0

    def resolved(self) -> BenchmarkConfig:
        """A validated copy with every default filled in and the cases in running order."""
        self.validate()
        defaults = dict(_SHORT_DEFAULTS if self.short else _FULL_DEFAULTS)
        defaults["num_images"] = max(
            defaults["num_images"], 2 * self.train_config().batch_size_per_gpu
        )
        values = {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in defaults.items()
        }
        if self.fit_data_path is None:
            recipe_reads_its_data = self.recipe == "demo" and not self.short
            values["fit_data_path"] = self.train_config().data_path if recipe_reads_its_data else ""
        cases = [case for case in CASES if case in self.cases]
        if any(case in FLOP_CASES for case in cases) and "matmul_peak" not in cases:
            cases.insert(0, "matmul_peak")  # MFU needs the peak of this run
        return dataclasses.replace(self, cases=tuple(cases), **values)

    def validate(self) -> None:
        def fail(flag: str, message: str):
            raise BenchmarkError(f"--{flag}: {message}")

        if self.recipe not in RECIPES:
            fail("recipe", f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.precision not in PRECISIONS:
            fail(
                "precision",
                f"{self.precision!r} is not benchmarked; choose one of {', '.join(PRECISIONS)}",
            )
        if not self.cases:
            fail("cases", f"is empty; choose from {', '.join(CASES)}")
        unknown = [case for case in self.cases if case not in CASES]
        if unknown:
            fail("cases", f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        if len(set(self.cases)) != len(self.cases):
            fail("cases", f"lists a case twice: {','.join(self.cases)}")
        for name in ("steps", "warmup", "pipeline_batches", "pipeline_warmup", "num_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(name, f"must be >= 1, got {value}")
        if self.repeats < 1:
            fail("repeats", f"must be >= 1, got {self.repeats}")
        if self.intra_op_threads < 0:
            fail("intra_op_threads", f"must be >= 0, got {self.intra_op_threads}")
        if self.num_workers is not None and self.num_workers < 0:
            fail("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.matmul_size is not None and self.matmul_size < 16:
            fail("matmul_size", f"must be >= 16, got {self.matmul_size}")
        if self.matmul_seconds is not None and not self.matmul_seconds > 0:
            fail("matmul_seconds", f"must be positive, got {self.matmul_seconds}")
        batch = self.train_config().batch_size_per_gpu
        if self.num_images is not None and self.num_images < batch:
            fail("num_images", f"({self.num_images}) makes no full batch of {batch}")
        if self.image_dir and os.path.exists(self.image_dir) and not os.path.isdir(self.image_dir):
            fail("image_dir", f"{self.image_dir} exists and is not a directory")
        if self.output and os.path.isdir(self.output):
            fail("output", f"{self.output} is a directory; pass a file path (.jsonl)")

    def train_config(self) -> TrainConfig:
        """The training configuration of the recipe (tiny model with `short`), validated."""
        if self.recipe == "demo":
            config = _demo_config()
        else:
            # The reference's ViT-S/16 recipe (TrainConfig's defaults) at batch 8, its batches
            # made by 2 loader processes (the reference's measurement: 2 DataLoader workers).
            config = TrainConfig(batch_size_per_gpu=8, num_workers=2)
        overrides = dict(
            precision=self.precision,
            seed=self.seed,
            verbose=0,
            # Measure the step of every epoch after the first, where the head's last layer
            # is updated too (it is frozen during the first --freeze_last_layer epochs).
            freeze_last_layer=0,
        )
        if self.jit_compile is not None:
            overrides["jit_compile"] = self.jit_compile
        if self.num_workers is not None:
            overrides["num_workers"] = self.num_workers
        elif self.short:
            overrides["num_workers"] = 1
        if self.short:
            overrides.update(_tiny_model(), head_hidden_dim=64, head_bottleneck_dim=32)
        config = dataclasses.replace(config, **overrides)
        try:
            config.validate()
        except ConfigError as error:
            raise BenchmarkError(f"recipe {self.recipe}: {error}") from error
        return config


def _demo_config() -> TrainConfig:
    """configs/demo.cfg read by the same flag machinery as scripts/train.py."""
    if not os.path.isfile(DEMO_FLAGFILE):
        raise BenchmarkError(f"--recipe=demo: {DEMO_FLAGFILE} does not exist")
    return config_from_flagfile(DEMO_FLAGFILE)


def _tiny_model() -> dict:
    """{field: value} of configs/tiny.cfg's `SHORT_FIELDS`."""
    if not os.path.isfile(TINY_FLAGFILE):
        raise BenchmarkError(f"--short: {TINY_FLAGFILE} does not exist")
    tiny = flagfile_values(TINY_FLAGFILE)
    return {name: tiny[name] for name in SHORT_FIELDS}


# --------------------------------------------------------------------------- #
# Analytic FLOPs
# --------------------------------------------------------------------------- #


def vit_forward_flops(
    image_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0
) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions of a ViT forward on one image.

    Counted, with T = (image_size // patch_size)^2 + 1 tokens and D = embed_dim:
    the patch embedding (a stride-p p x p convolution: (T - 1) * p * p * 3 * D multiply-adds),
    and per block the qkv projection (T * D * 3D), the attention scores q k^T (T * T * D, all
    heads together), the attention-weighted sum of v (T * T * D), the output projection
    (T * D * D) and the MLP (2 * T * D * mlp_ratio * D). Elementwise work (LayerNorm, GELU,
    softmax, residuals, biases, position embeddings) is not counted, nor is the small resize of
    the position embedding, done once per call and not per image.
    """
    tokens = (image_size // patch_size) ** 2 + 1
    hidden = int(embed_dim * mlp_ratio)
    patch_embedding = (tokens - 1) * patch_size * patch_size * 3 * embed_dim
    per_block = (
        tokens * embed_dim * 3 * embed_dim  # qkv
        + 2 * tokens * tokens * embed_dim  # q k^T and attention @ v
        + tokens * embed_dim * embed_dim  # output projection
        + 2 * tokens * embed_dim * hidden  # fc1, fc2
    )
    return 2 * (patch_embedding + depth * per_block)


def head_forward_flops(
    in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, nlayers: int = 3
) -> int:
    """FLOPs of the DINO head on one feature vector: its MLP and the weight-normed last layer.

    The MLP is in_dim -> hidden_dim, (nlayers - 2) x hidden_dim -> hidden_dim, -> bottleneck_dim
    (in_dim -> bottleneck_dim when nlayers is 1); the last layer bottleneck_dim -> out_dim. The
    weight normalisation of the last layer's kernel is elementwise and once per call: not counted.
    """
    widths = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim, out_dim]
    return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def dino_flops_per_image(config: TrainConfig) -> dict[str, int]:
    """FLOPs of one DINO training step per image (one image = all its crops).

    Teacher forward on the 2 global crops, student forward on the 2 global and the local crops,
    backward = 2 x the student forward. Returns those parts and their `total`. ViTs only.
    """
    if not config.is_vit:
        raise BenchmarkError(
            f"--arch={config.arch}: the analytic FLOP count is implemented for ViTs only"
        )
    width, depth, _ = config.vit_dims
    head = head_forward_flops(
        width, config.head_hidden_dim, config.head_bottleneck_dim, config.out_dim
    )
    global_crop = vit_forward_flops(config.global_crops_size, config.patch_size, width, depth)
    global_crop += head
    local_crop = 0
    if config.local_crops_number:
        local_crop = head + vit_forward_flops(
            config.local_crops_size, config.patch_size, width, depth
        )
    teacher = 2 * global_crop
    student = 2 * global_crop + config.local_crops_number * local_crop
    parts = {"teacher_forward": teacher, "student_forward": student, "backward": 2 * student}
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- #
# The cases (each runs in its own process)
# --------------------------------------------------------------------------- #


def _peak_rss() -> dict[str, float]:
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "peak_rss_mib": round(kilobytes / 1024, 1),
        "peak_rss_gib": round(kilobytes / 1024**2, 3),
    }


def child_processes_peak_rss() -> dict[str, float]:
    """Summed peak resident memory of this process's children (the loader processes), read
    from /proc while they run; empty where /proc has no such figures."""
    kilobytes, count = 0, 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != os.getpid():
                continue
            with open(f"/proc/{entry}/status", encoding="utf-8") as f:
                peak = [line.split()[1] for line in f if line.startswith("VmHWM:")]
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        if peak:
            kilobytes += int(peak[0])
            count += 1
    if not count:
        return {}
    return {"loader_processes_peak_rss_gib": round(kilobytes / 1024**2, 3)}


def _matmul_gflops(dtype, size: int, min_seconds: float, jit_compile: bool, seed: int) -> float:
    """Best GFLOP/s of an n x n x n matmul over calls totalling >= `min_seconds`."""
    import tensorflow as tf

    # Scaled so that the values stay O(1): no overflow or denormals to slow anything down.
    a = tf.cast(tf.random.stateless_normal([size, size], [seed, 1]) / size**0.5, dtype)
    b = tf.cast(tf.random.stateless_normal([size, size], [seed, 2]) / size**0.5, dtype)
    # The whole product is the output, so no compiler can cut the work down to what is read;
    # reading one element waits for it.
    matmul = tf.function(tf.linalg.matmul, jit_compile=jit_compile)
    for _ in range(_MATMUL_WARMUP_CALLS):
        matmul(a, b)[0, 0].numpy()
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < _MATMUL_MIN_CALLS or time.perf_counter() - start < min_seconds:
        before = time.perf_counter()
        matmul(a, b)[0, 0].numpy()
        best = min(best, time.perf_counter() - before)
        calls += 1
    return 2 * size**3 / best / 1e9


def case_matmul_peak(config: BenchmarkConfig) -> dict:
    import tensorflow as tf

    dtypes = [("float32", tf.float32)]
    if config.precision == "mixed_bfloat16":
        dtypes.append(("bfloat16", tf.bfloat16))
    result = {"matrix_size": config.matmul_size}
    for name, dtype in dtypes:
        graph = _matmul_gflops(dtype, config.matmul_size, config.matmul_seconds, False, config.seed)
        xla = _matmul_gflops(dtype, config.matmul_size, config.matmul_seconds, True, config.seed)
        result[f"{name}_graph_gflops_per_second"] = round(graph, 2)
        result[f"{name}_xla_gflops_per_second"] = round(xla, 2)
        result[f"{name}_peak_gflops_per_second"] = round(max(graph, xla), 2)
    compute_dtype = "bfloat16" if config.precision == "mixed_bfloat16" else "float32"
    result["peak_gflops_per_second"] = result[f"{compute_dtype}_peak_gflops_per_second"]
    return result


def schedule_steps_per_epoch(config: BenchmarkConfig, train_config: TrainConfig) -> int:
    """Steps per epoch of the schedules of both sides' trainers: the epoch of
    `config.num_images` images, or more where a case's calls (first, warm-up and timed) would
    run past the schedule's end."""
    calls = (1 + config.warmup + config.steps) * train_config.steps_per_execution
    return max(
        config.num_images // train_config.batch_size_per_gpu, -(-calls // train_config.epochs)
    )


def _build_trainer(config: BenchmarkConfig, train_config: TrainConfig):
    """The trainer, built as training builds it."""
    import keras

    from dino_keras.training import build_trainer

    keras.utils.set_random_seed(train_config.seed)
    keras.mixed_precision.set_global_policy(train_config.compute_precision)
    steps = schedule_steps_per_epoch(config, train_config)
    return build_trainer(train_config, steps, train_config.batch_size_per_gpu)


def _flop_figures(train_config: TrainConfig, images_per_second: float) -> dict:
    flops = dino_flops_per_image(train_config)
    achieved = flops["total"] * images_per_second
    return {
        "flops_per_image": flops["total"],
        "flops_per_image_parts": flops,
        "gflops_per_second": round(achieved / 1e9, 3),
        "achieved_tflops": round(achieved / 1e12, 6),
    }


def trainer_on_crops_in_memory(config: BenchmarkConfig, train_config: TrainConfig):
    """(trainer with its train function made, an endless iterator over one batch of random
    crops of the recipe's sizes): the training step without any input pipeline."""
    import tensorflow as tf

    trainer = _build_trainer(config, train_config)
    batch = train_config.batch_size_per_gpu
    shapes = [train_config.global_crops_size] * 2
    shapes += [train_config.local_crops_size] * train_config.local_crops_number
    crops = tuple(
        tf.random.stateless_normal([batch, size, size, 3], [config.seed, i])
        for i, size in enumerate(shapes)
    )
    trainer.make_train_function()
    return trainer, iter(tf.data.Dataset.from_tensors(crops).repeat())


def case_step(config: BenchmarkConfig) -> dict:
    from dino_keras.memory import FreeMemoryReleaser

    train_config = config.train_config()
    trainer, iterator = trainer_on_crops_in_memory(config, train_config)
    batch = train_config.batch_size_per_gpu

    def one_call() -> float:
        # Reading the loss waits for the step to finish.
        return float(trainer.train_function(iterator)["loss"])

    start = time.perf_counter()
    with FreeMemoryReleaser():  # as training's ReleaseFreeMemoryWhileCompiling callback
        one_call()
    compile_seconds = time.perf_counter() - start
    for _ in range(config.warmup):
        one_call()
    step_seconds = []
    for _ in range(config.steps):
        before = time.perf_counter()
        loss = one_call()
        step_seconds.append(time.perf_counter() - before)
    images = batch * train_config.steps_per_execution * config.steps
    images_per_second = images / sum(step_seconds)
    return {
        "compile_seconds": round(compile_seconds, 3),
        "images_per_second": round(images_per_second, 3),
        "step_seconds_mean": round(sum(step_seconds) / len(step_seconds), 4),
        "step_seconds_min": round(min(step_seconds), 4),
        "loss": loss,
        **_flop_figures(train_config, images_per_second),
    }


def image_folder(image_dir: str, count: int) -> str:
    """Where `count` generated 500x375 JPEGs live inside `image_dir`."""
    return os.path.join(image_dir, f"jpeg_{IMAGE_WIDTH}x{IMAGE_HEIGHT}_n{count}")


def case_prepare_images(config: BenchmarkConfig) -> dict:
    """Writes the JPEGs of `image_folder` unless a complete set is already there.

    Not a measured case. Each image is random colour noise at three scales (20 x 15, 100 x 75
    and full resolution, decreasing in amplitude) so that it compresses about like a photo.
    """
    import tensorflow as tf

    folder = image_folder(config.image_dir, config.num_images)
    done_marker = folder + ".done"  # outside the folder: the image source ignores no file
    if os.path.isfile(done_marker):
        return {"folder": folder, "generated": 0}
    os.makedirs(folder, exist_ok=True)
    size = [IMAGE_HEIGHT, IMAGE_WIDTH]
    for index in range(config.num_images):
        image = tf.zeros(size + [3])
        for scale, amplitude in ((25, 0.7), (5, 0.2), (1, 0.1)):
            noise = tf.random.stateless_uniform(
                [IMAGE_HEIGHT // scale, IMAGE_WIDTH // scale, 3], [config.seed, index * 3 + scale]
            )
            image += amplitude * tf.image.resize(noise, size, method="bicubic")
        pixels = tf.cast(tf.clip_by_value(image * 255.0, 0.0, 255.0), tf.uint8)
        tf.io.write_file(
            os.path.join(folder, f"image_{index:05d}.jpg"), tf.io.encode_jpeg(pixels, quality=90)
        )
    with open(done_marker, "w", encoding="utf-8") as f:
        f.write(f"{config.num_images}\n")
    return {"folder": folder, "generated": config.num_images}


def jpeg_source(config: BenchmarkConfig):
    """The generated JPEGs (`image_folder`) as a training source."""
    from dino_keras.data.sources import resolve_source

    return resolve_source(image_folder(config.image_dir, config.num_images), "train")


def fit_data_source(config: BenchmarkConfig, train_config: TrainConfig):
    """The training source of the fit case: `config.fit_data_path` (limited to the recipe's
    --limit_images) or, when that is empty, the generated JPEGs."""
    from dino_keras.data.sources import resolve_source

    if not config.fit_data_path:
        return jpeg_source(config)
    return resolve_source(
        config.fit_data_path,
        "train",
        tfds_data_dir=train_config.tfds_data_dir or None,
        limit_images=train_config.limit_images or None,
        flag_name="--fit_data_path",
    )


def case_fit_data(config: BenchmarkConfig) -> dict:
    """Not a measured case: whether the fit case's data can be read, checked before any case
    runs (the error names --fit_data_path)."""
    from dino_keras.data.sources import DataSourceError

    try:
        source = fit_data_source(config, config.train_config())
    except DataSourceError as error:
        return {"error": str(error)}
    return {"source": source.name, "images": source.num_examples}


def _multicrop_dataset(train_config: TrainConfig, source):
    from dino_keras.training import multicrop_dataset

    return multicrop_dataset(train_config, source, batch_size=train_config.batch_size_per_gpu)


def time_pipeline(batches, config: BenchmarkConfig, batch_size: int) -> tuple[dict, object]:
    """Times an input pipeline as both pipeline cases report it: its first batch (start-up),
    `pipeline_warmup` untimed batches, then `pipeline_batches` timed ones. Returns the figures
    (with the loader processes' peak memory, read while they still run) and the last batch."""
    start = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first_batch_seconds = time.perf_counter() - start
    for _ in range(config.pipeline_warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(config.pipeline_batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    figures = {
        "images_per_second": round(config.pipeline_batches * batch_size / seconds, 3),
        "first_batch_seconds": round(first_batch_seconds, 3),
        **child_processes_peak_rss(),
    }
    return figures, batch


def case_pipeline(config: BenchmarkConfig) -> dict:
    train_config = config.train_config()
    source = jpeg_source(config)
    dataset = _multicrop_dataset(train_config, source)
    figures, _ = time_pipeline(dataset, config, train_config.batch_size_per_gpu)
    return {
        **figures,
        "source_images": source.num_examples,
        "loader_processes": train_config.num_workers,
    }


def case_fit(config: BenchmarkConfig) -> dict:
    import keras

    from dino_keras.callbacks import ReleaseFreeMemoryWhileCompiling

    train_config = config.train_config()
    trainer = _build_trainer(config, train_config)
    source = fit_data_source(config, train_config)
    dataset = _multicrop_dataset(train_config, source)

    class BatchEndTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.loss = float(logs["loss"])  # also waits for the step to finish
            self.ends.append(time.perf_counter())

        def on_train_end(self, logs=None):
            self.loaders = child_processes_peak_rss()  # while the loaders still run

    times = BatchEndTimes()
    calls = 1 + config.warmup + config.steps
    trainer.fit(
        dataset,
        epochs=1,
        steps_per_epoch=calls * train_config.steps_per_execution,
        callbacks=[ReleaseFreeMemoryWhileCompiling(), times],
        verbose=0,
        shuffle=False,
    )
    seconds = times.ends[-1] - times.ends[config.warmup]
    images = train_config.batch_size_per_gpu * train_config.steps_per_execution * config.steps
    images_per_second = images / seconds
    return {
        "compile_seconds": round(times.ends[0] - times.start, 3),
        "images_per_second": round(images_per_second, 3),
        "step_seconds_mean": round(seconds / config.steps, 4),
        "loss": times.loss,
        "loader_processes": train_config.num_workers,
        "data": {"source": source.name, "images": source.num_examples},
        **times.loaders,
        **_flop_figures(train_config, images_per_second),
    }


_CASE_FUNCTIONS = {
    "matmul_peak": case_matmul_peak,
    "step": case_step,
    "pipeline": case_pipeline,
    "fit": case_fit,
    "prepare_images": case_prepare_images,
    "fit_data": case_fit_data,
}


def _tensorflow_threads() -> dict:
    """TensorFlow's thread pool sizes as configured; 0 is TensorFlow's default: one thread per
    schedulable core for each pool."""
    import tensorflow as tf

    return {
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def set_tensorflow_intra_op_threads(config: BenchmarkConfig) -> None:
    """TensorFlow's intra-op threads to `config.intra_op_threads` (0: its default); call before
    TensorFlow's runtime starts."""
    if config.intra_op_threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)


def _case_function(case: str):
    if case in REFERENCE_CASES:
        from benchmarks import reference_cases

        return getattr(reference_cases, f"case_{case}")
    # Measure the runtime install (requirements.txt, no PyTorch). A development venv has PyTorch
    # for the parity tests, and keras-cv imports it whenever it is installed, which adds 0.47 GiB
    # of resident memory to every case; hidden here, keras-cv skips it.
    hide_torch()
    return _CASE_FUNCTIONS[case]


def _child_main(argv: list[str]) -> None:
    """`python -m benchmarks.benchmarking CASE SETTINGS_JSON RESULT_PATH`: one case."""
    case, settings, result_path = argv
    values = json.loads(settings)
    values["cases"] = tuple(values["cases"])
    config = BenchmarkConfig(**values)
    case_function = _case_function(case)
    if case not in REFERENCE_CASES:
        set_tensorflow_intra_op_threads(config)
    start = time.perf_counter()
    result = case_function(config)
    result["case_seconds"] = round(time.perf_counter() - start, 3)
    if case in CASES and case not in REFERENCE_CASES:
        result.update(_tensorflow_threads())
    result.update(_peak_rss())
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------- #
# The parent: runs the cases, reports
# --------------------------------------------------------------------------- #


def cpu_supports_bfloat16() -> tuple[bool, str]:
    """Whether the CPU has bfloat16 matmul instructions, and what that was decided from."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            words = set(f.read().split())
    except OSError:
        return False, "/proc/cpuinfo is not readable"
    found = sorted(words & {"avx512_bf16", "amx_bf16", "bf16"})
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, "the CPU has none of the avx512_bf16, amx_bf16 (x86) or bf16 (Arm) flags"


def machine_description(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """The CPU model, whether it has AVX-512 and AMX (its /proc/cpuinfo flags) and the cores
    this process may run on."""
    model, flags = "unknown", set()
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model == "unknown":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "avx512": "avx512f" in flags,
        "amx": bool(flags & {"amx_tile", "amx_bf16", "amx_int8"}),
        "schedulable_cores": len(os.sched_getaffinity(0)),
    }


def missing_reference_modules(modules: tuple[str, ...] | None = None) -> list[str]:
    """Those of `modules` (default: the reference cases' modules) that cannot be imported here;
    none is imported."""
    missing = []
    for name in REFERENCE_MODULES if modules is None else modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # e.g. hidden by an import hook
            found = False
        if not found:
            missing.append(name)
    return missing


def skip_reasons(cases: list[str], precision: str) -> dict[str, str]:
    """Why each case that cannot run here is skipped (case -> reason)."""
    reasons = {}
    if precision == "mixed_bfloat16":
        supported, why = cpu_supports_bfloat16()
        if not supported:
            for case in cases:
                if case in PRECISION_CASES:
                    reasons[case] = f"no bfloat16 ({why})"
        if "reference_step" in cases:
            reasons["reference_step"] = "the reference step is measured in float32 only"
    missing = missing_reference_modules() if REFERENCE_CASES.keys() & set(cases) else []
    for case in cases:
        if case in REFERENCE_CASES and missing:
            reasons[case] = (
                f"{', '.join(missing)} not installed (pip install -r requirements-parity.txt)"
            )
    return reasons


def case_schedule(cases: list[str], repeats: int, skipped: dict[str, str]) -> list[tuple]:
    """(case, repeat number from 1) in running order: each dino_keras case that is compared with
    a running reference case alternates with it `repeats` times (step, reference_step, step, ...);
    every other case runs once, skipped ones are listed once."""
    compared = {  # dino_keras case -> its reference case, both running
        counterpart: reference
        for reference, counterpart in REFERENCE_CASES.items()
        if {reference, counterpart} <= set(cases) and not skipped.keys() & {reference, counterpart}
    }
    schedule = []
    for case in cases:
        if case in compared:
            for repeat in range(1, repeats + 1):
                schedule += [(case, repeat), (compared[case], repeat)]
        elif REFERENCE_CASES.get(case) not in compared:
            schedule.append((case, 1))
    return schedule


def reference_comparison(record: dict, records: list[dict]) -> dict:
    """The ratio fields of a reference case's record, from its dino_keras counterpart's record
    of the same run: the latest one, which ran just before it (empty when that case did not
    run)."""
    counterpart = next(
        (
            r
            for r in reversed(records)
            if r["case"] == REFERENCE_CASES[record["case"]] and "skipped" not in r
        ),
        None,
    )
    if counterpart is None or "images_per_second" not in record:
        return {}
    loaders = {}
    if "loader_processes_peak_rss_gib" in counterpart:
        loaders["dino_keras_loader_processes_peak_rss_gib"] = counterpart[
            "loader_processes_peak_rss_gib"
        ]
    return {
        "dino_keras_case": counterpart["case"],
        "dino_keras_images_per_second": counterpart["images_per_second"],
        "dino_keras_peak_rss_gib": counterpart["peak_rss_gib"],
        **loaders,
        # dino_keras images/s / reference images/s: above 1, dino_keras is faster.
        "images_per_second_ratio": round(
            counterpart["images_per_second"] / record["images_per_second"], 4
        ),
    }


def _run_case_process(case: str, config: BenchmarkConfig) -> dict:
    """Runs one case in a fresh Python process; returns its result or raises BenchmarkError."""
    settings = json.dumps(dataclasses.asdict(config))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="dino_benchmark_result_") as directory:
        result_path = os.path.join(directory, "result.json")
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.benchmarking", case, settings, result_path],
            capture_output=True,
            text=True,
            env=env,
        )
        if process.returncode != 0 or not os.path.isfile(result_path):
            tail = "\n".join((process.stderr or process.stdout).strip().splitlines()[-20:])
            raise BenchmarkError(
                f"case {case} failed (exit code {process.returncode}); its last output:\n{tail}"
            )
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)


def _model_description(train_config: TrainConfig) -> dict:
    width, depth, heads = train_config.vit_dims
    return {
        "arch": train_config.arch,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "patch_size": train_config.patch_size,
        "global_crops": f"2x{train_config.global_crops_size}",
        "local_crops": f"{train_config.local_crops_number}x{train_config.local_crops_size}",
        "out_dim": train_config.out_dim,
        "head_hidden_dim": train_config.head_hidden_dim,
        "head_bottleneck_dim": train_config.head_bottleneck_dim,
        "batch_size": train_config.batch_size_per_gpu,
        "jit_compile": train_config.jit_compile,
        "freeze_last_layer": train_config.freeze_last_layer,
    }


def run_benchmark(
    config: BenchmarkConfig, out=None, err=None, append_output: bool = False
) -> list[dict]:
    """Runs the configured cases, printing JSON lines and then the table; returns the records.

    `--output` (`config.output`) is overwritten with the same JSON lines (appended to with
    `append_output`). A case that fails raises `BenchmarkError` after the records of the cases
    before it have been printed.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    config = config.resolved()
    train_config = config.train_config()
    common = {
        "recipe": config.recipe,
        "precision": config.precision,
        "short": config.short,
        "batch_size": train_config.batch_size_per_gpu,
        "machine": machine_description(),
    }
    cases = list(config.cases)
    skipped = skip_reasons(cases, config.precision)
    for case, reason in skipped.items():
        print(f"Skipping {case}: {reason}", file=err)
    running = [case for case in cases if case not in skipped]
    if "fit" in running and config.fit_data_path:
        # Before any case: a wrong --fit_data_path fails now, not after the other cases.
        fit_data = _run_case_process("fit_data", config)
        if "error" in fit_data:
            raise BenchmarkError(fit_data["error"])

    def reads_images(case: str) -> bool:
        return case in IMAGE_CASES and not (case == "fit" and config.fit_data_path)

    output_file = None
    if config.output:
        output_file = open(config.output, "a" if append_output else "w", encoding="utf-8")
    temporary_dir = None
    if not config.image_dir and any(reads_images(case) for case in running):
        temporary_dir = tempfile.mkdtemp(prefix="dino_benchmark_images_")
        config = dataclasses.replace(config, image_dir=temporary_dir)
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, file=out, flush=True)
        if output_file:
            output_file.write(line + "\n")
            output_file.flush()

    try:
        peak = {}
        schedule = case_schedule(cases, config.repeats, skipped)
        repeated = {case for case, repeat in schedule if repeat > 1}
        for case, repeat in schedule:
            if case in skipped:
                emit({"case": case, **common, "skipped": skipped[case]})
                continue
            if reads_images(case) and not os.path.isfile(
                image_folder(config.image_dir, config.num_images) + ".done"
            ):
                print(
                    f"Writing {config.num_images} {IMAGE_WIDTH}x{IMAGE_HEIGHT} JPEGs to "
                    f"{image_folder(config.image_dir, config.num_images)}",
                    file=err,
                    flush=True,
                )
                _run_case_process("prepare_images", config)
            numbered = case
            if case in repeated:
                numbered += f", repeat {repeat} of {config.repeats}"
            print(f"Running case {numbered} ({_load_text()})", file=err, flush=True)
            result = _run_case_process(case, config)
            record = {
                "case": case,
                **common,
                "repeat": repeat,
                **result,
                "load_average": [round(load, 2) for load in os.getloadavg()],
            }
            if case == "matmul_peak":
                peak = result
            if case in FLOP_CASES:
                achieved = record["gflops_per_second"]
                record["peak_gflops_per_second"] = peak["peak_gflops_per_second"]
                record["mfu"] = round(achieved / peak["peak_gflops_per_second"], 5)
                # What the same FLOP/s is of XLA's own matmul: the XLA-compiled step's ceiling.
                dtype = "bfloat16" if config.precision == "mixed_bfloat16" else "float32"
                xla_peak = peak[f"{dtype}_xla_gflops_per_second"]
                record["mfu_vs_xla_matmul"] = round(achieved / xla_peak, 5)
            if case in REFERENCE_CASES:
                record.update(reference_comparison(record, records))
            if case != "matmul_peak":
                record["model"] = _model_description(train_config)
            emit(record)
    finally:
        if output_file:
            output_file.close()
        if temporary_dir:
            shutil.rmtree(temporary_dir, ignore_errors=True)
    print(format_table(records), file=out, flush=True)
    return records


def _load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


CASE_WIDTH = 20


def _thread_lines(records: list[dict]) -> list[str]:
    tensorflow = next((r for r in records if "tf_intra_op_threads" in r), None)
    torch = next((r for r in records if "torch_num_threads" in r), None)
    parts = []
    if tensorflow:
        parts.append(
            f"TensorFlow intra-op {tensorflow['tf_intra_op_threads']}, inter-op "
            f"{tensorflow['tf_inter_op_threads']} (0: its default, one thread per schedulable "
            "core)"
        )
    if torch:
        parts.append(
            f"PyTorch torch.set_num_threads({torch['torch_num_threads']}), inter-op "
            f"{torch['torch_num_interop_threads']}"
        )
    return [f"threads: {'; '.join(parts)}"] if parts else []


def _comparison_lines(records: list[dict]) -> list[str]:
    compared = [r for r in records if "images_per_second_ratio" in r]
    if not compared:
        return []

    def memory(peak: float, loaders: float | None) -> str:
        return f"peak RSS {peak:.2f} GiB" + (
            f" + {loaders:.2f} GiB in its loader processes" if loaders else ""
        )

    lines = ["Against the reference in this run (dino_keras images/s / reference images/s):"]
    for record in compared:
        dino_keras_memory = memory(
            record["dino_keras_peak_rss_gib"],
            record.get("dino_keras_loader_processes_peak_rss_gib"),
        )
        reference_memory = memory(
            record["peak_rss_gib"], record.get("loader_processes_peak_rss_gib")
        )
        lines.append(
            f"  {record['dino_keras_case']}: {record['images_per_second_ratio']:.3f}x "
            f"(dino_keras {record['dino_keras_images_per_second']:.2f} images/s, "
            f"{dino_keras_memory}; reference {record['images_per_second']:.2f} images/s, "
            f"{reference_memory})"
        )
    for case, ratios in _ratios_by_case(compared).items():
        if len(ratios) > 1:
            lines.append(f"  {case}: {_ratio_spread(ratios)}")
    fit = next((r for r in records if r["case"] == "fit" and "images_per_second" in r), None)
    if fit:
        step_rates = {}
        for record in records:
            if record["case"] in ("step", "reference_step") and "images_per_second" in record:
                step_rates.setdefault(record["case"], []).append(record["images_per_second"])
        parts = [
            f"{fit['images_per_second'] / statistics.median(step_rates[case]):.3f}x the {name}"
            for case, name in (("reference_step", "reference's step"), ("step", "dino_keras step"))
            if case in step_rates
        ]
        lines.append(f"  fit: {', '.join(parts)} (their median images/s)")
    return lines


def _ratios_by_case(records: list[dict]) -> dict[str, list[float]]:
    ratios = {}
    for record in records:
        if "images_per_second_ratio" in record:
            ratios.setdefault(record["dino_keras_case"], []).append(
                record["images_per_second_ratio"]
            )
    return ratios


def _ratio_spread(ratios: list[float]) -> str:
    """'1.402x' for one ratio; 'median 1.402x of 3 (1.351-1.460x)' for several."""
    if len(ratios) == 1:
        return f"{ratios[0]:.3f}x"
    return (
        f"median {statistics.median(ratios):.3f}x of {len(ratios)} "
        f"({min(ratios):.3f}-{max(ratios):.3f}x)"
    )


def format_ratio_summary(records: list[dict]) -> str:
    """One line per recipe: the ratios (dino_keras images/s / reference images/s) of its run."""
    lines = ["Against the reference, dino_keras images/s / reference images/s of the same run:"]
    for recipe in dict.fromkeys(record["recipe"] for record in records):
        ratios = [
            f"{case} {_ratio_spread(values)}"
            for case, values in _ratios_by_case(
                [r for r in records if r["recipe"] == recipe]
            ).items()
        ]
        lines.append(f"  {recipe}: {', '.join(ratios) or 'no ratio (a case did not run)'}")
    return "\n".join(lines)


def format_table(records: list[dict]) -> str:
    """The human-readable summary of `records`, with which part bounds training."""
    if not records:
        return "No case ran."
    first = records[0]
    lines = [
        f"DINO benchmark: recipe {first['recipe']}{' (short)' if first['short'] else ''}, "
        f"{first['precision']}, batch {first['batch_size']}",
    ]
    model = next((r["model"] for r in records if "model" in r), None)
    if model:
        lines.append(
            f"model: {model['arch']} {model['depth']}x{model['embed_dim']} patch "
            f"{model['patch_size']}, crops {model['global_crops']} + {model['local_crops']}, "
            f"head {model['head_hidden_dim']}/{model['head_bottleneck_dim']}, out_dim "
            f"{model['out_dim']}"
        )
    machine = first.get("machine")
    if machine:
        yes_no = {True: "yes", False: "no"}
        lines.append(
            f"CPU: {machine['cpu_model']}; AVX-512 {yes_no[machine['avx512']]}, AMX "
            f"{yes_no[machine['amx']]}; {machine['schedulable_cores']} schedulable cores"
        )
    lines += _thread_lines(records)
    header = (
        f"{'case':<{CASE_WIDTH}}{'images/s':>10}{'compile s':>11}{'step s':>9}{'GFLOP/img':>11}"
        f"{'GFLOP/s':>10}{'MFU':>8}{'peak RSS GiB':>13}"
    )
    lines += [header, "-" * len(header)]

    def cell(record, key, width, spec):
        value = record.get(key)
        return f"{'-' if value is None else format(value, spec):>{width}}"

    repeated = {r["case"] for r in records if r.get("repeat", 1) > 1}
    for record in records:
        if "skipped" in record:
            lines.append(f"{record['case']:<{CASE_WIDTH}}skipped: {record['skipped']}")
            continue
        gflops = record.get("gflops_per_second", record.get("peak_gflops_per_second"))
        flops_per_image = record.get("flops_per_image")
        label = record["case"]
        if label in repeated:
            label += f" #{record['repeat']}"
        lines.append(
            f"{label:<{CASE_WIDTH}}"
            + cell(record, "images_per_second", 10, ".2f")
            + cell(record, "compile_seconds", 11, ".1f")
            + cell(record, "step_seconds_mean", 9, ".3f")
            + f"{'-' if flops_per_image is None else format(flops_per_image / 1e9, '.2f'):>11}"
            + f"{'-' if gflops is None else format(gflops, '.1f'):>10}"
            + cell(record, "mfu", 8, ".3f")
            + cell(record, "peak_rss_gib", 13, ".2f")
        )
    peak = next((r for r in records if r["case"] == "matmul_peak"), None)
    if peak:
        measured = ", ".join(
            f"{key.replace('_gflops_per_second', '').replace('_', ' ')} {value:.1f}"
            for key, value in peak.items()
            if key.endswith(("_graph_gflops_per_second", "_xla_gflops_per_second"))
        )
        lines.append(
            f"matmul_peak GFLOP/s is the peak MFU is relative to ({peak['matrix_size']}^3 "
            f"matmuls: {measured})"
        )
    against_xla = [
        f"{r['case']} {r['mfu_vs_xla_matmul']:.3f}" for r in records if "mfu_vs_xla_matmul" in r
    ]
    if against_xla:
        lines.append(f"FLOP/s as a fraction of the XLA matmul: {', '.join(against_xla)}")
    for record in records:
        if record.get("loader_processes"):
            memory = record.get("loader_processes_peak_rss_gib")
            kind = "DataLoader worker" if record["case"] in REFERENCE_CASES else "loader"
            lines.append(
                f"{record['case']}: batches made by {record['loader_processes']} {kind} "
                f"process(es), one core each"
                + (f", peak RSS {memory:.2f} GiB in all (not in the column)" if memory else "")
            )
    for record in records:
        if "data" in record:
            data = record["data"]
            lines.append(f"{record['case']}: read {data['source']} ({data['images']} images)")
    lines += _comparison_lines(records)
    rates = {r["case"]: r["images_per_second"] for r in records if "images_per_second" in r}
    if "step" in rates and "pipeline" in rates:
        slower = "step" if rates["step"] <= rates["pipeline"] else "pipeline"
        names = {"step": "the training step", "pipeline": "the input pipeline"}
        lines.append(
            f"Bound: {names[slower]} ({rates[slower]:.2f} images/s; step {rates['step']:.2f}, "
            f"pipeline {rates['pipeline']:.2f}"
            + (f", fit {rates['fit']:.2f}" if "fit" in rates else "")
            + ")"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
