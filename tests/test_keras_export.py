"""The .keras backbone (scripts/export.py --format=keras): restored by keras.saving.load_model, the
SavedModel's features, refusal to overwrite, and the README's fine-tuning example run as written
in a fresh interpreter."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from dino_keras.export import export_run, load_export
from dino_keras.keras_export import KerasExportError, export_keras_run
from tests.helpers import REPO_ROOT, make_tiny_run, run_script

README_PATH = "runs/demo/export/backbone-1.keras"  # the path the README's example loads


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_tiny_run(run_dir)
    export_dir = tmp_path_factory.mktemp("export")
    saved_model = export_run(str(run_dir), str(export_dir))
    keras_file = run_script(
        "export", f"--checkpoint={run_dir}", f"--export_dir={export_dir}", "--format=keras"
    )
    return run_dir, export_dir, saved_model, keras_file


def test_keras_file_gives_the_saved_model_features(exports):
    run_dir, export_dir, saved_model, keras_file = exports
    assert keras_file == str(export_dir / "backbone-1.keras")
    assert sorted(os.listdir(export_dir)) == ["1", "backbone-1.keras"]  # no staging file left
    model = keras.saving.load_model(keras_file)
    loaded, _, _ = load_export(saved_model)
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape in ((3, 28, 28, 3), (2, 20, 24, 3)):  # native size; interpolated position grid
        pixels = rng.uniform(0, 255, shape).astype(np.float32)
        expected = loaded.signatures["serving_default"](images=tf.constant(pixels))["embedding"]
        features = model(pixels).numpy()
        assert features.shape == expected.shape
        worst = max(worst, float(np.max(np.abs(features - expected.numpy()))))
    print(f"\n[keras export] max |.keras - SavedModel| embedding: {worst:.3e}")
    assert worst < 1e-5
    assert model.trainable  # fine-tuning file, though the teacher is frozen in training


def test_existing_keras_file_is_refused(exports):
    run_dir, export_dir, _, keras_file = exports
    before = os.path.getmtime(keras_file)
    with pytest.raises(KerasExportError, match="already exists"):
        export_keras_run(str(run_dir), str(export_dir))
    assert os.path.getmtime(keras_file) == before
    replaced = export_keras_run(str(run_dir), str(export_dir), which="student", overwrite=True)
    assert replaced == keras_file and sorted(os.listdir(export_dir)) == ["1", "backbone-1.keras"]


def readme_fine_tuning_example() -> str:
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    match = re.search(
        r"<!-- tests/test_keras_export.py runs the next block[^>]*-->\n```python\n(.*?)```",
        readme,
        re.DOTALL,
    )
    assert match, "README.md lost the fine-tuning example this test runs"
    return match.group(1)


@pytest.mark.slow
def test_readme_fine_tuning_example_runs(exports, tmp_path):
    """The README block, unchanged but for the file path, on random 28 px images."""
    keras_file = exports[3]
    example = readme_fine_tuning_example()
    assert README_PATH in example
    script = textwrap.dedent(
        """
        import numpy as np

        rng = np.random.default_rng(0)
        train_images = rng.uniform(0, 255, (64, 28, 28, 3)).astype("float32")
        train_labels = rng.integers(0, 10, 64)
        """
    )
    script += example.replace(README_PATH, keras_file)
    script += textwrap.dedent(
        """
        history = classifier.history.history
        assert len(history["loss"]) == 5, history
        assert classifier.predict(train_images[:4], verbose=0).shape == (4, 10)
        print("example ran:", [round(v, 4) for v in history["loss"]])
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "example ran:" in result.stdout
