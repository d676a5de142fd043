"""scripts/eval_knn.py: from a run and from its export, feature cache, bad input."""

import os

import pytest

from dino_keras.data.sources import DataSourceError
from dino_keras.export import ExportError, export_run
from tests.helpers import make_tiny_run, run_script, write_idx_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    make_tiny_run(root / "run")
    export_run(str(root / "run"), str(root / "export"))
    return root, write_idx_dataset(root / "data")


def test_checkpoint_and_saved_model_agree_and_cache_is_reused(setup, capsys):
    root, data = setup
    common = [
        f"--data_path={data}",
        "--nb_knn=1,5,20",
        "--batch_size=16",
        f"--features_cache={root / 'cache'}",
    ]
    from_run = run_script(
        "eval_knn", f"--checkpoint={root / 'run'}", *common, f"--output_json={root / 'knn.json'}"
    )
    assert sorted(from_run["knn"], key=int) == ["1", "5", "20"]
    assert from_run["image_size"] == 28
    output = capsys.readouterr().out
    for k in (1, 5, 20):
        assert f"{k}-NN: top-1" in output
    assert os.path.isfile(root / "knn.json")
    cached = sorted(os.listdir(root / "cache"))
    assert len(cached) == 2 and all(name.endswith(".npz") for name in cached)

    again = run_script("eval_knn", f"--checkpoint={root / 'run'}", *common)
    assert "Using cached train features" in capsys.readouterr().out
    assert again["knn"] == from_run["knn"]

    from_export = run_script("eval_knn", f"--saved_model={root / 'export'}", *common)
    assert from_export["knn"] == from_run["knn"]
    assert len(os.listdir(root / "cache")) == 4  # another model: its own cache entries


def test_bad_input(setup, tmp_path):
    root, data = setup
    script_module_error = "exactly one of --checkpoint and --saved_model"
    with pytest.raises(ValueError, match=script_module_error):
        run_script("eval_knn", f"--data_path={data}")
    with pytest.raises(ExportError, match="does not exist"):
        run_script("eval_knn", f"--saved_model={tmp_path / 'no_export'}", f"--data_path={data}")
    with pytest.raises(ValueError, match="--nb_knn"):
        run_script("eval_knn", f"--checkpoint={root / 'run'}", f"--data_path={data}", "--nb_knn=0")
    train_only = tmp_path / "train_only"
    write_idx_dataset(train_only)
    os.remove(train_only / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataSourceError, match="--data_path"):
        run_script("eval_knn", f"--checkpoint={root / 'run'}", f"--data_path={train_only}")
