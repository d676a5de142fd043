"""Strategies: mirrored replicas give the numbers of one device, two worker processes stay in
sync and only the chief writes, SLURM tasks find their cluster, the TPU wiring reaches its
resolver, clear cluster errors. The commands run are the README's ("Several devices, several
machines, TPUs"), shrunk to the tiny network by flags added after them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from dino_keras import distribution
from dino_keras.config import ConfigError, TrainConfig, config_from_flags, define_flags
from tests.helpers import (
    REPO_ROOT,
    TINY_FLAGFILE,
    ReadmeCommand,
    readme_commands,
    tiny_config,
    write_idx_dataset,
)

README_COMMANDS = readme_commands("Several devices, several machines, TPUs")

# configs/tiny.cfg with a smaller head; each test sets the batch size and the epochs.
TINY_FLAGS = [
    f"--flagfile={TINY_FLAGFILE}",
    "--head_hidden_dim=64",
    "--head_bottleneck_dim=32",
    "--warmup_epochs=0",
    "--eval_every=0",
    "--nb_knn=5",
]


def readme_command(matches) -> ReadmeCommand:
    """The one README command for which `matches(command)` holds."""
    found = [command for command in README_COMMANDS if matches(command)]
    assert len(found) == 1, (found, README_COMMANDS)
    return found[0]


def parse_train_flags(args: list[str], monkeypatch) -> TrainConfig:
    """`args` parsed as scripts/train.py parses them, from the repository root."""
    monkeypatch.chdir(REPO_ROOT)
    flag_values = flags.FlagValues()
    define_flags(flag_values, TrainConfig)
    flag_values(["train.py", *args])
    return config_from_flags(flag_values)


def on_test_storage(args: list[str], tmp_path) -> list[str]:
    """The README's shared file system and bucket, here: a temporary folder and ram://."""
    bucket = f"ram://bucket-{uuid.uuid4().hex}"
    return [
        arg.replace("/shared", str(tmp_path / "shared")).replace("gs://<bucket>", bucket)
        for arg in args
    ]


def test_every_readme_command_parses_into_a_valid_config(tmp_path, monkeypatch):
    strategies = []
    for command in README_COMMANDS:
        assert command.launcher[-1] == "python", command
        config = parse_train_flags(on_test_storage(command.args, tmp_path), monkeypatch)
        config.validate()
        strategies.append(config.strategy)
    assert strategies == ["mirrored", "mirrored", "multi_worker", "multi_worker", "tpu"]


def training_process(*args, env=None, wait=True):
    command = [sys.executable, os.path.join(REPO_ROOT, "tests", "training_process.py"), *args]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    if not wait:
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_same_weights(first: str, second: str, rtol: float, atol: float = 0.0) -> None:
    a, b = np.load(first), np.load(second)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def knn_records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "knn_top1" in r]


@pytest.mark.slow
def test_mirrored_two_cpu_replicas_match_one_device(tmp_path):
    # The README's command (configs/demo.cfg: Sinkhorn-Knopp centering over the global batch)
    # on 2 replicas, against the same flags without its strategy flags on one device. KoLeo is
    # off: it is computed over each replica's own batch (as DINOv2 does), so it differs.
    readme = readme_command(lambda command: "--cpu_replicas=2" in command.args).args
    one_device = [arg for arg in readme if not arg.startswith(("--strategy", "--cpu_replicas"))]
    assert len(one_device) == len(readme) - 2
    data = write_idx_dataset(tmp_path / "data", train=24, test=12)
    common = [*TINY_FLAGS, f"--data_path={data}", "--epochs=1", "--deterministic",
              "--koleo_loss_weight=0"]
    training_process(
        *one_device, *common, "--batch_size_per_gpu=8", f"--output_dir={tmp_path / 'one'}",
        f"--dump={tmp_path / 'one.npz'}",
    )
    result = training_process(
        *readme, *common, "--batch_size_per_gpu=4",
        f"--output_dir={tmp_path / 'two'}", f"--dump={tmp_path / 'two.npz'}",
    )
    assert "3 steps of 8 (2 replica(s) x 4)" in result.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(one["step"]) == int(two["step"]) == 3
    # Same loss, every weight of student and teacher and the centre after 3 steps.
    largest = max(float(np.abs(one[name]).max()) for name in one.files)
    assert_same_weights(tmp_path / "one.npz", tmp_path / "two.npz", rtol=1e-5, atol=1e-5 * largest)
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5 * abs(float(one["loss"]))
    # The k-NN features computed across both replicas give the single device's accuracy.
    one_knn, two_knn = knn_records(tmp_path / "one"), knn_records(tmp_path / "two")
    assert [r["knn_top1"] for r in one_knn] == [r["knn_top1"] for r in two_knn]
    assert len(one_knn) == 2


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_stay_in_sync_and_only_the_chief_writes(tmp_path):
    command = readme_command(lambda command: "TF_CONFIG" in command.env)
    readme_tf_config = json.loads(command.env["TF_CONFIG"])
    assert len(readme_tf_config["cluster"]["worker"]) == 2
    assert readme_tf_config["task"] == {"type": "worker", "index": 0}
    data = write_idx_dataset(tmp_path / "data", train=48, test=12)
    # The README's cluster of two, on this machine.
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        os.makedirs(tmp_path / f"tmp{index}")
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(
            training_process(
                *command.args,
                *TINY_FLAGS,
                f"--data_path={data}",
                "--strategy=multi_worker",
                "--batch_size_per_gpu=4",
                "--epochs=2",
                "--backup_every_steps=2",
                f"--output_dir={tmp_path / f'worker{index}'}",
                f"--dump={tmp_path / f'worker{index}.npz'}",
                env={"TF_CONFIG": tf_config, "TMPDIR": str(tmp_path / f"tmp{index}")},
                wait=False,
            )
        )
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]
    assert "6 steps of 8 (2 replica(s) x 4)" in outputs[0]
    chief, other = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert int(chief["step"]) == int(other["step"]) == 12
    for name in chief.files:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    assert np.isfinite(float(chief["loss"]))
    assert tf.train.latest_checkpoint(tmp_path / "worker0" / "checkpoints").endswith("latest-2")
    assert os.path.exists(tmp_path / "worker0" / "summary.json")
    assert os.path.exists(tmp_path / "worker0" / "log.jsonl")
    # The other worker's checkpoints went to a scratch directory, removed at the end.
    assert not os.path.exists(tmp_path / "worker1")
    assert [n for n in os.listdir(tmp_path / "tmp1") if n.startswith("dino_worker")] == []


def test_slurm_tasks_of_the_readme_command_find_their_cluster_without_gpus(monkeypatch):
    command = readme_command(lambda command: command.launcher[0] == "srun")
    assert "--strategy=multi_worker" in command.args
    assert command.launcher[1:3] == ["--nodes=2", "--ntasks-per-node=1"]
    # What srun sets for the second of those two tasks; no nvidia-smi on these nodes.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    for name, value in dict(SLURM_JOB_ID="7", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2",
                            SLURM_STEP_NODELIST="node[1-2]",
                            SLURM_STEP_TASKS_PER_NODE="1(x2)").items():
        monkeypatch.setenv(name, value)
    resolver = distribution.cluster_resolver(environ=os.environ)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node2:8888"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    # Two tasks on one node: two ports.
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    resolver = distribution.cluster_resolver(environ=os.environ)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node1:8889"]}


class ResolverReached(Exception):
    pass


def test_readme_tpu_command_reaches_its_resolver_with_a_bucket_for_data_and_output(
    tmp_path, monkeypatch
):
    command = readme_command(lambda command: "--strategy=tpu" in command.args)
    config = parse_train_flags(on_test_storage(command.args, tmp_path), monkeypatch)
    assert config.tfds_data_dir.startswith("ram://") and config.output_dir.startswith("ram://")
    seen = {}

    def fake_resolver(tpu):
        seen["tpu"] = tpu
        raise ResolverReached

    with pytest.raises(ResolverReached):
        distribution.build_strategy(config, tpu_resolver=fake_resolver)
    assert seen == {"tpu": "local"}


def test_tpu_strategy_passes_the_tpu_flag_to_its_resolver():
    seen = {}

    def fake_resolver(tpu):
        seen["tpu"] = tpu
        raise ResolverReached

    config = tiny_config(strategy="tpu", tpu="my-tpu-v4")
    with pytest.raises(ResolverReached):
        distribution.build_strategy(config, tpu_resolver=fake_resolver)
    assert seen == {"tpu": "my-tpu-v4"}
    with pytest.raises(ResolverReached):
        distribution.build_strategy(tiny_config(strategy="tpu"), tpu_resolver=fake_resolver)
    assert seen == {"tpu": None}  # found from the environment (TPU_NAME, TPU VM metadata)


def test_multi_worker_without_a_cluster_description_is_a_clear_error():
    with pytest.raises(ConfigError, match="--strategy=multi_worker: no cluster"):
        distribution.cluster_resolver(environ={})
    resolver = distribution.cluster_resolver(
        environ={"TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1"]}})}
    )
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)


def test_one_device_is_the_chief_and_reads_global_batches(tmp_path):
    strategy = distribution.build_strategy(tiny_config())
    role = distribution.worker_role(strategy)
    assert (role.is_chief, role.num_workers) == (True, 1)
    assert role.output_dir(str(tmp_path)) == str(tmp_path)
    seen = {}

    def make_dataset(**kwargs):
        seen.update(kwargs)
        return tf.data.Dataset.range(4)

    distribution.distribute_training_data(strategy, 16, make_dataset)
    assert seen == {"batch_size": 16, "num_shards": 1, "shard_index": 0}


def test_non_chief_writes_to_a_scratch_directory_that_is_removed():
    role = distribution.WorkerRole(is_chief=False, worker_index=1, num_workers=2)
    scratch = role.output_dir("/runs/shared")
    assert scratch != "/runs/shared" and os.path.isdir(scratch)
    with open(os.path.join(scratch, "file"), "w", encoding="utf-8") as f:
        f.write("x")
    role.cleanup()
    assert not os.path.exists(scratch)
