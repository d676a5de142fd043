"""The run directory's files through tf.io.gfile: atomic writes, the JSON-lines log, paths."""

import json
import uuid

import pytest
import tensorflow as tf

from dino_keras import run_dir


@pytest.fixture(params=["local", "ram"])
def directory(request, tmp_path):
    """A fresh run directory on the local disk and one in TensorFlow's in-memory file system."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"ram://test_run_dir/{uuid.uuid4().hex}/run"


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(directory):
    path = run_dir.join(directory, "nested", "summary.json")
    run_dir.write_json(path, {"epoch": 1})  # makes the directories
    run_dir.write_json(path, {"epoch": 2, "b": [1, 2]})
    assert run_dir.read_json(path) == {"epoch": 2, "b": [1, 2]}
    assert tf.io.gfile.listdir(run_dir.join(directory, "nested")) == ["summary.json"]
    run_dir.write_atomically(run_dir.join(directory, "image.png"), b"\x89PNG\x00\xff")
    assert run_dir.read_bytes(run_dir.join(directory, "image.png")) == b"\x89PNG\x00\xff"


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(directory, monkeypatch):
    path = run_dir.join(directory, "config.json")
    run_dir.write_config(directory, {"b": 1, "a": 2})
    assert run_dir.read_text(path) == json.dumps({"a": 2, "b": 1}, indent=2)  # keys sorted

    def refuse(*args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, "rename refused")

    monkeypatch.setattr(tf.io.gfile, "rename", refuse)
    with pytest.raises(tf.errors.PermissionDeniedError):
        run_dir.write_config(directory, {"a": 3})
    assert run_dir.read_config(directory) == {"a": 2, "b": 1}
    assert tf.io.gfile.listdir(directory) == ["config.json"]


def test_jsonl_appends_and_reads_back_past_a_cut_line(directory):
    path = run_dir.join(directory, run_dir.LOG_FILE)
    assert run_dir.read_jsonl(path) == []
    run_dir.makedirs(directory)
    run_dir.append_jsonl(path, {"epoch": 1, "loss": 2.5})
    run_dir.append_jsonl(path, {"epoch": 2, "loss": 2.0})
    with tf.io.gfile.GFile(path, "a") as f:
        f.write('{"epoch": 3, "lo')  # a process killed inside a write
    assert run_dir.read_jsonl(path) == [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 2.0}]
    run_dir.append_jsonl(path, {"epoch": 3, "loss": 1.5})  # the rerun's record: kept
    assert run_dir.read_jsonl(path) == [
        {"epoch": 1, "loss": 2.5},
        {"epoch": 2, "loss": 2.0},
        {"epoch": 3, "loss": 1.5},
    ]


def test_config_and_summary_files(directory):
    assert run_dir.read_config(directory) is None
    assert run_dir.read_config(directory, "linear_config.json") is None
    run_dir.write_config(directory, {"lr": 0.1}, "linear_config.json")
    assert run_dir.read_config(directory, "linear_config.json") == {"lr": 0.1}
    written = run_dir.write_summary(directory, {"epochs_completed": 3})
    assert written == run_dir.join(directory, "summary.json")
    assert run_dir.read_json(written) == {"epochs_completed": 3}
    assert run_dir.is_file(written) and run_dir.is_dir(directory)


def test_paths_keep_urls_intact(tmp_path):
    assert run_dir.join("gs://bucket/run", "checkpoints", "backup") == (
        "gs://bucket/run/checkpoints/backup"
    )
    assert run_dir.normalize("gs://bucket/run/") == "gs://bucket/run"
    assert run_dir.normalize("a/./b/") == "a/b"
    assert run_dir.absolute("gs://bucket/run") == "gs://bucket/run"
    assert run_dir.absolute("run").startswith("/") and run_dir.absolute("run").endswith("/run")
    assert not run_dir.is_local("ram://x") and run_dir.is_local(str(tmp_path))


def test_file_from_a_local_writer_replaces_the_file_atomically(directory):
    path = run_dir.join(directory, "model.keras")
    written = []

    def save(local_path):  # a writer that takes only a local path (Keras' save)
        assert run_dir.is_local(local_path) and local_path.endswith("model.keras")
        with open(local_path, "wb") as f:
            f.write(b"v%d" % len(written))
        written.append(local_path)

    assert run_dir.write_file_atomically(path, save) == path
    assert run_dir.write_file_atomically(path, save) == path  # overwrites by default
    assert run_dir.read_bytes(path) == b"v1"
    with pytest.raises(tf.errors.AlreadyExistsError):
        run_dir.write_file_atomically(path, save, overwrite=False)
    assert run_dir.read_bytes(path) == b"v1"
    assert tf.io.gfile.listdir(directory) == ["model.keras"]  # no temporary left


def test_move_tree_moves_every_file_and_removes_the_source(directory):
    source, target = run_dir.join(directory, ".staging"), run_dir.join(directory, "1")
    # `assets` beside `assets.extra`: on ram:// a listing of the first also names `.extra`.
    for name in ("saved_model.pb", "variables/variables.index", "assets.extra/meta.json"):
        run_dir.write_atomically(run_dir.join(source, name), name)
    run_dir.makedirs(run_dir.join(source, "assets"))
    assert run_dir.move_tree(source, target, last="saved_model.pb") == target
    for name in ("saved_model.pb", "variables/variables.index", "assets.extra/meta.json"):
        assert run_dir.read_text(run_dir.join(target, name)) == name
    assert run_dir.is_dir(run_dir.join(target, "assets"))
    assert tf.io.gfile.listdir(directory) == ["1"]
    run_dir.remove(target)
    run_dir.remove(target)  # nothing there: no error
    assert tf.io.gfile.listdir(directory) == []
