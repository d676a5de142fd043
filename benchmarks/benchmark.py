"""Benchmark of DINO training: matmul peak, compiled step, input pipeline, fit; MFU, memory;
the reference's step and loader in PyTorch at the same sizes, and the ratios.

    python benchmarks/benchmark.py [--recipe=paper|demo] [--precision=float32|mixed_bfloat16]
        [--cases=matmul_peak,step,reference_step,pipeline,reference_pipeline,fit]
        [--steps=5] [--warmup=1] [--repeats=1] [--fit_data_path=...] [--short]
        [--output=bench.jsonl]

Each case runs in its own process, one after the other. Prints one JSON object per case (also
written to --output) and then a table. `step` and `fit` need the matmul peak of the same run
for their MFU, so `matmul_peak` runs first whenever one of them is selected. The reference
cases are skipped, with the reason, when PyTorch is not installed. See
`benchmarks/benchmarking.py` for what each case measures.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import benchmarking  # noqa: E402


def define_flags(flag_values) -> None:
    def string(name, default, help_text):
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)

    def integer(name, help_text):
        flags.DEFINE_integer(name, None, help_text, flag_values=flag_values)

    flags.DEFINE_list(
        "recipe",
        ["paper"],
        "paper: ViT-S/16, 2x224 + 8x96 crops, out_dim 65536, head 2048/256, batch 8; "
        "demo: configs/demo.cfg; paper,demo: both, one recipe's cases after the other's, "
        "then the ratios of both.",
        flag_values=flag_values,
    )
    string("precision", "float32", f"One of {', '.join(benchmarking.PRECISIONS)}.")
    flags.DEFINE_list(
        "cases",
        list(benchmarking.CASES),
        f"Cases to run, from {', '.join(benchmarking.CASES)} (always in that order).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "short",
        False,
        "Tiny model (2 blocks, width 32, patch 4, 28/12 crops, out_dim 64, batch 8), few "
        "steps, 16 small images, a 512 matmul: a quick check that everything runs.",
        flag_values=flag_values,
    )
    integer("steps", "Measured training steps of step and fit (default 5; 3 with --short).")
    integer(
        "warmup",
        "Unmeasured steps after the first, compiling call (default 1; 2 with --short).",
    )
    integer("pipeline_batches", "Measured batches of the pipeline cases (default 150; 3 --short).")
    integer("pipeline_warmup", "Unmeasured batches before those (default 5; 2 with --short).")
    integer(
        "num_images",
        "Generated 500x375 JPEGs read by pipeline and fit (default max(128, 2 x batch); 16 "
        "with --short).",
    )
    integer("matmul_size", "Side of the square matmuls of matmul_peak (default 4096; 512 --short).")
    flags.DEFINE_float(
        "matmul_seconds",
        None,
        "Minimum measured seconds per matmul variant (default 3; 0.2 with --short).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "jit_compile",
        None,
        "XLA-compile the training step (default: the recipe's --jit_compile, true).",
        flag_values=flag_values,
    )
    integer(
        "num_workers",
        "Loader processes of pipeline and fit, one core each, as training's --num_workers "
        "(default: the recipe's: paper 2, as the reference's 2 DataLoader workers, demo "
        "configs/demo.cfg's 0; 1 with --short); 0 makes the batches with tf.data in the "
        "case's own process.",
    )
    flags.DEFINE_integer(
        "repeats",
        1,
        "Times each compared pair (step and reference_step, pipeline and reference_pipeline) "
        "runs, alternating; with more than 1 the summary gives each ratio's median and range.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "intra_op_threads",
        0,
        "Intra-op threads of each case's process, TensorFlow's and PyTorch's alike (e.g. 1: "
        "both steps on one core); 0: each library's default, one per schedulable core. Loader "
        "processes and DataLoader workers keep one each.",
        flag_values=flag_values,
    )
    string(
        "image_dir",
        "",
        "Keep the generated JPEGs here and reuse them in later runs; empty: a temporary "
        "directory, deleted at the end.",
    )
    flags.DEFINE_string(
        "fit_data_path",
        None,
        "What the fit case trains on: a scripts/train.py --data_path (limited to the recipe's "
        "--limit_images), or empty for the generated JPEGs. Default: the recipe's own data "
        "(demo: configs/demo.cfg's fashion_mnist, as make demo; paper and --short: the JPEGs, "
        "standing in for ImageNet).",
        flag_values=flag_values,
    )
    string("output", "", "Also write the JSON lines to this file (overwritten).")
    flags.DEFINE_integer("seed", 0, "Seed of the model, data and images.", flag_values=flag_values)


def configs_from_flags(flag_values) -> list[benchmarking.BenchmarkConfig]:
    """The parsed flags as resolved, validated `BenchmarkConfig`s, one per --recipe."""
    recipes = [recipe.strip() for recipe in flag_values.recipe if recipe.strip()]
    if not recipes:
        raise benchmarking.BenchmarkError(
            f"--recipe: is empty; choose from {', '.join(benchmarking.RECIPES)}"
        )
    if len(set(recipes)) != len(recipes):
        raise benchmarking.BenchmarkError(f"--recipe: lists a recipe twice: {','.join(recipes)}")
    names = (
        "precision",
        "short",
        "steps",
        "warmup",
        "pipeline_batches",
        "pipeline_warmup",
        "num_images",
        "matmul_size",
        "matmul_seconds",
        "jit_compile",
        "num_workers",
        "repeats",
        "intra_op_threads",
        "image_dir",
        "fit_data_path",
        "output",
        "seed",
    )
    configs = [
        benchmarking.BenchmarkConfig(
            recipe=recipe,
            cases=tuple(case.strip() for case in flag_values.cases if case.strip()),
            **{name: flag_values[name].value for name in names},
        )
        for recipe in recipes
    ]
    return [config.resolved() for config in configs]  # all validated before any case runs


def run(flag_values) -> list[dict]:
    configs = configs_from_flags(flag_values)
    records = []
    for index, config in enumerate(configs):
        records += benchmarking.run_benchmark(config, append_output=index > 0)
    if len(configs) > 1:
        print(benchmarking.format_ratio_summary(records), flush=True)
    return records


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(flags.FLAGS)
    except benchmarking.BenchmarkError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
