"""scripts/make_image_sets.py: layout, sizes, determinism, refusals and bad flags.

Only the generated sets (shapes, textures) at a few images per class, so neither Fashion-MNIST
nor scikit-learn is needed.
"""

import filecmp
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "make_image_sets.py")
GENERATED = ("shapes", "textures")


def load_script():
    spec = importlib.util.spec_from_file_location("script_make_image_sets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_sets(output_dir, *args):
    """`run(flags)` in-process on fresh flags (like tests/helpers.py's `run_script`, without
    importing TensorFlow)."""
    module = load_script()
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values(["make_image_sets", f"--output_dir={output_dir}", *args])
    return module.run(flag_values)


def relative_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(directory, name), root)
        for directory, _, names in os.walk(root)
        for name in names
    )


def test_layout_sizes_and_determinism(tmp_path, capsys):
    common = ["--sets=shapes,textures", "--limit_per_class=2"]
    results = make_sets(tmp_path / "a", *common, "--seed=0")
    table = capsys.readouterr().out
    assert "pixel 20-NN top-1" in table and "shapes" in table and "textures" in table

    for name in GENERATED:
        row = results["sets"][name]
        assert (row["status"], row["train"], row["test"], row["classes"]) == ("written", 20, 20, 10)
        assert row["image_size"] == 32 and 0 <= row["knn_top1"] <= 100
        root = tmp_path / "a" / name
        assert sorted(os.listdir(root)) == ["info.json", "test", "train"]
        info = json.loads((root / "info.json").read_text())
        assert info["num_examples"] == {"train": 20, "test": 20}
        for split in ("train", "test"):
            class_dirs = sorted(os.listdir(root / split))
            assert class_dirs == info["class_folders"]
            assert [d.split("_")[0] for d in class_dirs] == [str(i) for i in range(10)]
            for class_dir in class_dirs:
                assert sorted(os.listdir(root / split / class_dir)) == ["0.png", "1.png"]
                with Image.open(root / split / class_dir / "0.png") as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "L", (32, 32))
    assert not [entry for entry in os.listdir(tmp_path / "a") if entry.endswith(".partial")]

    # Same seed: the same bytes. Other seed: other images, same layout.
    make_sets(tmp_path / "b", *common, "--seed=0", "--nb_knn=0")
    make_sets(tmp_path / "c", *common, "--seed=1", "--nb_knn=0")
    files = relative_files(tmp_path / "a")
    assert files == relative_files(tmp_path / "b") == relative_files(tmp_path / "c")
    images = [f for f in files if f.endswith(".png")]
    assert len(images) == 2 * 2 * 10 * 2
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == errors == []
    _, mismatch, _ = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", images, shallow=False)
    assert len(mismatch) == len(images)

    # A larger limit keeps the smaller set's images.
    make_sets(tmp_path / "d", "--sets=textures", "--limit_per_class=3", "--nb_knn=0")
    first = [f for f in images if f.startswith("textures")]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "d", first, shallow=False)
    assert mismatch == errors == []


def test_non_empty_set_folder_is_refused_unless_overwrite_or_skip(tmp_path, capsys):
    make_sets(tmp_path, "--sets=shapes", "--limit_per_class=1", "--nb_knn=0")
    with pytest.raises(ValueError, match="shapes is not empty; pass --overwrite"):
        make_sets(tmp_path, "--sets=textures,shapes", "--limit_per_class=1")
    assert not os.path.exists(tmp_path / "textures")  # refused before writing anything

    replaced = make_sets(tmp_path, "--sets=shapes", "--limit_per_class=2", "--overwrite")
    assert replaced["sets"]["shapes"]["status"] == "replaced"
    assert sorted(os.listdir(tmp_path / "shapes" / "test" / "7_ring")) == ["0.png", "1.png"]

    kept = make_sets(tmp_path, "--sets=shapes,textures", "--limit_per_class=1", "--skip_existing")
    assert kept["sets"]["shapes"]["status"] == "kept"
    assert kept["sets"]["shapes"]["train"] == 20  # read back: the folder was left as it was
    assert kept["sets"]["textures"]["status"] == "written"
    assert kept["sets"]["shapes"]["knn_top1"] == replaced["sets"]["shapes"]["knn_top1"]
    capsys.readouterr()

    with pytest.raises(ValueError, match="at most one of --overwrite and --skip_existing"):
        make_sets(tmp_path, "--sets=shapes", "--overwrite", "--skip_existing")


def test_bad_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--sets: unknown set nope; choose from fashion_a"):
        make_sets(tmp_path, "--sets=shapes,nope")
    with pytest.raises(ValueError, match="--limit_per_class"):
        make_sets(tmp_path, "--sets=shapes", "--limit_per_class=-1")
    with pytest.raises(ValueError, match=r"fashion_b needs Fashion-MNIST.*--fashion_mnist_dir"):
        make_sets(tmp_path, "--sets=shapes,fashion_b", f"--fashion_mnist_dir={tmp_path / 'none'}")
    assert os.listdir(tmp_path) == []

    # As a command: a clear message and a failing exit status, nothing written.
    process = subprocess.run(
        [sys.executable, SCRIPT, f"--output_dir={tmp_path / 'out'}", "--sets=shapes,circles"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode != 0
    assert "error: --sets: unknown set circles" in process.stderr
    assert not os.path.exists(tmp_path / "out")


def test_pixel_knn():
    module = load_script()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    labels = np.arange(30) % 3
    # Every query is in the bank with similarity 1, whose weight exp(1 / T) outvotes the rest.
    assert module.pixel_knn(images, labels, images, labels, k=20, temperature=0.07) == 100.0
    # Two classes, one bright pixel each (orthogonal); an equal-weight tie goes to class 0.
    bank = np.zeros((4, 2, 2), np.uint8)
    bank[:2, 0, 0] = bank[2:, 1, 1] = 255
    query = np.full((1, 2, 2), 255, np.uint8)
    assert module.pixel_knn(bank, [0, 0, 1, 1], query, [0], k=4) == 100.0
    assert module.pixel_knn(bank, [0, 0, 1, 1], query, [1], k=4) == 0.0
