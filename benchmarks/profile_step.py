"""Where the compiled training step spends its time: a TensorFlow profiler trace of a few steps,
summed by XLA operation kind; with `--reference`, the reference's step under PyTorch's profiler.

    python benchmarks/profile_step.py [--recipe=demo|paper] [--steps=3] [--top=25]
        [--trace_dir=/tmp/dino_profile] [--intra_op_threads=N] [--reference]

Builds the step as `benchmarks/benchmark.py`'s `step` case does (crops already in memory),
runs it once to compile, then traces `--steps` calls. Prints, per kind of XLA operation (dot,
convolution, each fusion kind, copy, ...), its share of the traced time on all threads, and the
`--top` single operations by total time. The trace stays in `--trace_dir` for TensorBoard's
profile plugin. `--reference` profiles `reference_step` instead (PyTorch installed): the self
CPU time of each PyTorch operator per step. With `--intra_op_threads=1` each operation's self
time is its whole cost, so the two profiles compare operation by operation.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import benchmarking  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "demo", "paper or demo (as benchmarks/benchmark.py).")
flags.DEFINE_integer("steps", 3, "Traced steps after the compiling call and one warm-up.")
flags.DEFINE_integer("top", 25, "Single operations listed by total time.")
flags.DEFINE_string("trace_dir", "/tmp/dino_profile", "Where the profiler writes its trace.")
flags.DEFINE_integer("intra_op_threads", 0, "Intra-op threads (0: the library's default, one "
                     "per schedulable core), as benchmark.py's flag.")
flags.DEFINE_bool("reference", False, "Profile the reference's step in PyTorch instead.")


def operation_kind(name: str) -> str:
    """'fusion.12' -> 'fusion', 'dot.3' -> 'dot', 'loop_add_fusion.1' -> 'loop_add_fusion'."""
    return re.sub(r"[.\d]+$", "", name.split(":")[0]) or name


def self_times(events):
    """(name, self time) of each (name, offset, duration) event of one thread: its duration
    less that of the events nested in it, so that wrappers around the compiled program
    (executor, eager call) do not count its operations twice."""
    open_events = []  # [end, name, self time] of the enclosing events
    for name, offset, duration in sorted(events, key=lambda e: (e[1], -e[2])):
        while open_events and open_events[-1][0] <= offset:
            _, closed, self_time = open_events.pop()
            yield closed, self_time
        if open_events:
            open_events[-1][2] -= duration
        open_events.append([offset + duration, name, duration])
    for _, closed, self_time in reversed(open_events):
        yield closed, self_time


def read_events(trace_dir: str):
    """(thread name, event name, self time in ps) for every event of the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"--trace_dir: no *.xplane.pb under {trace_dir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as handle:
        space.ParseFromString(handle.read())
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            events = [(names.get(e.metadata_id, "?"), e.offset_ps, e.duration_ps)
                      for e in line.events]
            for name, self_time in self_times(events):
                yield line.name, name, self_time


def profile_reference_step(config) -> None:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import reference_cases

    threads = reference_cases.thread_settings(config)["torch_num_threads"]
    train_config = config.train_config()
    training = reference_cases.reference_training(config, train_config)
    crops = reference_cases.reference_crops(config, train_config)
    for _ in range(2):
        training.step(crops)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(FLAGS.steps):
            training.step(crops)
    averages = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"{FLAGS.steps} reference steps, recipe {FLAGS.recipe}, torch threads {threads}; "
          f"self CPU time of all operators: {total / 1e6:.3f} s")
    print("\nby operator (per step):")
    for event in averages[:FLAGS.top]:
        print(f"  {event.self_cpu_time_total / 1e3 / FLAGS.steps:9.2f} ms  "
              f"{100 * event.self_cpu_time_total / total:5.1f}%  "
              f"{event.count // FLAGS.steps:5d} calls  {event.key}")


def main(argv):
    del argv
    # Enough schedule for the compiling call, a warm-up and the traced steps.
    try:
        config = benchmarking.BenchmarkConfig(
            recipe=FLAGS.recipe, cases=("step",), steps=FLAGS.steps + 2,
            intra_op_threads=FLAGS.intra_op_threads).resolved()
    except benchmarking.BenchmarkError as error:
        sys.exit(f"error: {error}")
    if FLAGS.reference:
        profile_reference_step(config)
        return
    benchmarking.hide_torch()
    benchmarking.set_tensorflow_intra_op_threads(config)
    import tensorflow as tf

    trainer, iterator = benchmarking.trainer_on_crops_in_memory(config, config.train_config())
    for _ in range(2):
        float(trainer.train_function(iterator)["loss"])
    tf.profiler.experimental.start(FLAGS.trace_dir)
    for _ in range(FLAGS.steps):
        float(trainer.train_function(iterator)["loss"])
    tf.profiler.experimental.stop()

    by_kind = collections.Counter()
    by_name = collections.Counter()
    threads = collections.Counter()
    for thread, name, duration in read_events(FLAGS.trace_dir):
        threads[thread] += duration
        by_kind[operation_kind(name)] += duration
        by_name[name] += duration
    total = sum(by_kind.values())
    print(f"{FLAGS.steps} steps, recipe {FLAGS.recipe}; self time of all events on all threads: "
          f"{total / 1e12:.3f} s")
    print("\nby thread:")
    for thread, duration in threads.most_common(10):
        print(f"  {duration / 1e12:8.3f} s  {thread}")
    print("\nby operation kind (per step):")
    for kind, duration in by_kind.most_common(30):
        print(f"  {duration / 1e9 / FLAGS.steps:9.2f} ms  {100 * duration / total:5.1f}%  {kind}")
    print(f"\ntop {FLAGS.top} operations (per step):")
    for name, duration in by_name.most_common(FLAGS.top):
        print(f"  {duration / 1e9 / FLAGS.steps:9.2f} ms  {name}")


if __name__ == "__main__":
    app.run(main)
