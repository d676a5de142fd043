"""Each matrix product of a recipe's training step, timed under XLA and under PyTorch.

    python benchmarks/compare_matmuls.py [--recipe=demo|paper] [--intra_op_threads=N]
        [--repeats=1] [--short]

The products are those of `benchmarks/matmul_products.py`'s `step_products` (what one step's
mathematics needs; the dino_keras step also recomputes the attention's weighted values in its
backward pass, one more such product per block and crop size, not listed), each timed alone
under XLA and under PyTorch, each library in a process of its own: XLA first, then PyTorch
(`--repeats` alternates them and keeps each product's median). Prints, per product, both times
and XLA's over PyTorch's, and per kind of product the total for one step: each product's time
times how many of it the step makes. Elementwise work is not timed. Needs PyTorch
(`requirements-parity.txt`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import benchmarking, matmul_products  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "demo", "paper or demo (as benchmarks/benchmark.py).")
flags.DEFINE_bool("short", False, "The tiny model of benchmark.py --short, briefly timed.")
flags.DEFINE_integer("intra_op_threads", 0, "Intra-op threads of both libraries (0: one per "
                     "schedulable core), as benchmark.py's flag.")
flags.DEFINE_integer("repeats", 1, "Times each library's process runs, alternating; each "
                     "product's time is the median over them.")
flags.DEFINE_enum("time_library", None, ["xla", "torch"],
                  "Internal: time the products with this library and print them as JSON.")


def _library_child(products, config: benchmarking.BenchmarkConfig) -> dict:
    """Times every product with `--time_library` in this process (its only library), with the
    benchmark cases' thread settings."""
    min_seconds, limit = ((0.002, 2) if config.short
                          else (0.05, matmul_products.PRODUCTS_PER_CALL))
    if FLAGS.time_library == "xla":
        benchmarking.hide_torch()
        benchmarking.set_tensorflow_intra_op_threads(config)
        import tensorflow as tf

        seconds = matmul_products.time_with_xla(products, min_seconds, limit)
        version = f"TensorFlow {tf.__version__}"
    else:
        import torch

        from benchmarks import reference_cases

        reference_cases.thread_settings(config)
        seconds = matmul_products.time_with_torch(products, min_seconds, limit)
        version = f"PyTorch {torch.__version__}"
    return {"seconds": seconds, "version": version}


def _run_library(library: str, argv: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--time_library={library}", *argv],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: timing with {library} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    try:
        config = benchmarking.BenchmarkConfig(
            recipe=FLAGS.recipe, short=FLAGS.short, cases=("step",), repeats=FLAGS.repeats,
            intra_op_threads=FLAGS.intra_op_threads).resolved()
        train_config = config.train_config()
        products = matmul_products.step_products(train_config)
    except benchmarking.BenchmarkError as error:
        sys.exit(f"error: {error}")
    if FLAGS.time_library:
        print(json.dumps(_library_child(products, config)))
        return
    missing = benchmarking.missing_reference_modules(("torch",))
    if missing:
        sys.exit("error: PyTorch is not installed (pip install -r requirements-parity.txt)")
    child_argv = [f"--recipe={FLAGS.recipe}", f"--intra_op_threads={FLAGS.intra_op_threads}",
                  f"--short={FLAGS.short}"]
    runs = {"xla": [], "torch": []}
    for _ in range(config.repeats):
        for library in runs:
            runs[library].append(_run_library(library, child_argv))
    seconds = {library: [statistics.median(times) for times in
                         zip(*(run["seconds"] for run in library_runs), strict=True)]
               for library, library_runs in runs.items()}
    machine = benchmarking.machine_description()
    threads = config.intra_op_threads or machine["schedulable_cores"]
    header = (
        f"matrix products of one {FLAGS.recipe}{' (--short)' if FLAGS.short else ''} training "
        f"step, batch {train_config.batch_size_per_gpu}: XLA ({runs['xla'][0]['version']}) "
        f"against {runs['torch'][0]['version']}, {threads} intra-op thread(s) each, "
        f"median of {config.repeats} run(s)\n"
        f"CPU: {machine['cpu_model']}; AVX-512 {'yes' if machine['avx512'] else 'no'}, "
        f"AMX {'yes' if machine['amx'] else 'no'}; {machine['schedulable_cores']} "
        f"schedulable cores")
    print(matmul_products.format_report(products, seconds["xla"], seconds["torch"], header))


if __name__ == "__main__":
    app.run(main)
