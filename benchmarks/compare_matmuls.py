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


def _library_child(products, threads: int, short: bool) -> dict:
    """Times every product with `--time_library` in this process (its only library)."""
    min_seconds, limit = (0.002, 2) if short else (0.05, matmul_products.PRODUCTS_PER_CALL)
    if FLAGS.time_library == "xla":
        benchmarking.hide_torch()
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        seconds = matmul_products.time_with_xla(products, min_seconds, limit)
        version = f"TensorFlow {tf.__version__}"
    else:
        import torch

        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
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
    if FLAGS.intra_op_threads < 0:
        sys.exit(f"error: --intra_op_threads: must be >= 0, got {FLAGS.intra_op_threads}")
    if FLAGS.repeats < 1:
        sys.exit(f"error: --repeats: must be >= 1, got {FLAGS.repeats}")
    try:
        config = benchmarking.BenchmarkConfig(
            recipe=FLAGS.recipe, short=FLAGS.short, cases=("step",)).resolved()
        train_config = config.train_config()
        products = matmul_products.step_products(train_config)
    except benchmarking.BenchmarkError as error:
        sys.exit(f"error: {error}")
    if FLAGS.time_library:
        print(json.dumps(_library_child(products, FLAGS.intra_op_threads, FLAGS.short)))
        return
    missing = benchmarking.missing_reference_modules(("torch",))
    if missing:
        sys.exit("error: PyTorch is not installed (pip install -r requirements-parity.txt)")
    child_argv = [f"--recipe={FLAGS.recipe}", f"--intra_op_threads={FLAGS.intra_op_threads}",
                  f"--short={FLAGS.short}"]
    runs = {"xla": [], "torch": []}
    for _ in range(FLAGS.repeats):
        for library in runs:
            runs[library].append(_run_library(library, child_argv))
    seconds = {library: [statistics.median(times) for times in
                         zip(*(run["seconds"] for run in library_runs), strict=True)]
               for library, library_runs in runs.items()}
    machine = benchmarking.machine_description()
    threads = FLAGS.intra_op_threads or machine["schedulable_cores"]
    header = (
        f"matrix products of one {FLAGS.recipe}{' (--short)' if FLAGS.short else ''} training "
        f"step, batch {train_config.batch_size_per_gpu}: XLA ({runs['xla'][0]['version']}) "
        f"against {runs['torch'][0]['version']}, {threads} intra-op thread(s) each, "
        f"median of {FLAGS.repeats} run(s)\n"
        f"CPU: {machine['cpu_model']}; AVX-512 {'yes' if machine['avx512'] else 'no'}, "
        f"AMX {'yes' if machine['amx'] else 'no'}; {machine['schedulable_cores']} "
        f"schedulable cores")
    print(matmul_products.format_report(products, seconds["xla"], seconds["torch"], header))


if __name__ == "__main__":
    app.run(main)
