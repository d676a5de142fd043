"""The `tf.distribute` strategy of a run, the worker's role, and how data reaches the replicas.

* `default`: the current device.
* `mirrored`: one process, all local GPUs; on a machine without GPUs, `--cpu_replicas`
  logical CPU devices (for tests and for measuring the scaling on a CPU).
* `multi_worker`: `MultiWorkerMirroredStrategy`; the cluster comes from `TF_CONFIG` or, when
  that is unset and the process is a SLURM task, from SLURM's environment.
* `tpu`: `TPUStrategy` on the TPU named by `--tpu`.

Single-worker strategies read one pipeline of global batches that Keras splits across the
replicas, so a replica count changes no number. Each multi-worker process builds its own
pipeline over its shard of every epoch's permutation (`num_shards`, `shard_index`), batched
per worker and split per replica.

Only the chief writes the run's outputs; other workers write what collective saving needs to
a temporary directory that is removed at the end (`WorkerRole`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable

import tensorflow as tf

from dino_keras.config import ConfigError, TrainConfig


def configure_cpu_replicas(count: int) -> list[str]:
    """Split the physical CPU into `count` logical devices; returns their names.

    Must run before TensorFlow initialises its devices; if it already did (another run in the
    same process), the existing logical devices are used when there are enough.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing < count:
            raise ConfigError(
                f"--cpu_replicas={count}: TensorFlow already started with {existing} CPU "
                "device(s) in this process; logical devices must be configured before any "
                "TensorFlow work (run training in a fresh process)"
            ) from None
    return [device.name for device in tf.config.list_logical_devices("CPU")[:count]]


def cluster_resolver(environ=os.environ):
    """The multi-worker cluster: from TF_CONFIG, else from SLURM's environment."""
    if environ.get("TF_CONFIG"):
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_PROCID") is not None:
        if shutil.which("nvidia-smi"):
            return tf.distribute.cluster_resolver.SlurmClusterResolver()
        # Nodes without GPUs. TF's resolver would run nvidia-smi, and it lists a task only with
        # GPUs to allot: one notional GPU per task, never made visible (auto_set_gpu=False).
        tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False
        )
    raise ConfigError(
        "--strategy=multi_worker: no cluster description; set TF_CONFIG (see the README) or "
        "launch the workers as SLURM tasks (srun)"
    )


def build_strategy(
    config: TrainConfig,
    *,
    tpu_resolver: Callable = tf.distribute.cluster_resolver.TPUClusterResolver,
) -> tf.distribute.Strategy:
    """The strategy named by `--strategy` (call before any other TensorFlow work)."""
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            if config.cpu_replicas:
                raise ConfigError("--cpu_replicas: this machine has GPUs; mirrored uses them all")
            return tf.distribute.MirroredStrategy()
        devices = configure_cpu_replicas(config.cpu_replicas or 1)
        return tf.distribute.MirroredStrategy(devices)
    if config.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    resolver = tpu_resolver(tpu=config.tpu or None)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


@dataclasses.dataclass
class WorkerRole:
    """This process's place in the cluster and where it may write."""

    is_chief: bool
    worker_index: int
    num_workers: int
    scratch_dir: str | None = None  # non-chief workers' temporary output

    def output_dir(self, output_dir: str) -> str:
        """`output_dir` for the chief; a temporary directory for the other workers."""
        if self.is_chief:
            return output_dir
        if self.scratch_dir is None:
            self.scratch_dir = tempfile.mkdtemp(prefix=f"dino_worker{self.worker_index}_")
        return self.scratch_dir

    def cleanup(self) -> None:
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
            self.scratch_dir = None


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return WorkerRole(is_chief=True, worker_index=0, num_workers=1)
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    if task_type == "chief":
        is_chief, index = True, 0
    else:
        # Without a "chief" task, worker 0 is the chief.
        is_chief = task_type in (None, "worker") and task_id == 0 and "chief" not in spec
        index = task_id + (1 if "chief" in spec else 0)
    return WorkerRole(is_chief=is_chief, worker_index=index, num_workers=max(workers, 1))


def distribute_training_data(
    strategy: tf.distribute.Strategy,
    global_batch: int,
    make_dataset: Callable[..., tf.data.Dataset],
):
    """The training input for `fit`.

    `make_dataset(batch_size=, num_shards=, shard_index=)` builds the pipeline. One worker:
    one pipeline of global batches (Keras splits each across the replicas). Several workers:
    each builds batches of its own replicas from its own shard, split per replica here.
    """
    role = worker_role(strategy)
    if role.num_workers == 1:
        return make_dataset(batch_size=global_batch, num_shards=1, shard_index=0)
    local_replicas = strategy.num_replicas_in_sync // role.num_workers
    per_replica = global_batch // strategy.num_replicas_in_sync

    def dataset_fn(input_context: tf.distribute.InputContext):
        dataset = make_dataset(
            batch_size=per_replica * local_replicas,
            num_shards=input_context.num_input_pipelines,
            shard_index=input_context.input_pipeline_id,
        )
        return dataset.rebatch(per_replica) if local_replicas > 1 else dataset

    return strategy.distribute_datasets_from_function(dataset_fn)
