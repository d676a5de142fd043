"""scripts/visualize_attention.py: PNGs from a run, and a one-line error for a corrupt image."""

import os

import numpy as np
import pytest
from PIL import Image

from dino_keras.evaluation.attention import AttentionError
from tests.helpers import make_tiny_run, run_script, run_script_process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    make_tiny_run(directory)
    return directory


def test_writes_one_png_per_head(run_dir, tmp_path):
    image = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)).save(image)
    paths = run_script(
        "visualize_attention",
        f"--image={image}",
        f"--checkpoint={run_dir}",
        f"--output_dir={tmp_path / 'out'}",
        "--image_size=30,41",
        "--threshold=0.6",
    )
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in paths)
    assert len(paths) == 1 + 2 * 2  # the image, then a map and a mask per head
    for path in paths:
        with Image.open(path) as png:
            assert png.size == (40, 28)
    native = run_script(
        "visualize_attention",
        f"--image={image}",
        f"--checkpoint={run_dir}",
        f"--output_dir={tmp_path / 'native'}",
        "--image_size=0",
        "--threshold=0",
    )
    assert len(native) == 3
    with Image.open(native[0]) as png:
        assert png.size == (68, 48)


def test_corrupt_image_and_missing_checkpoint(run_dir, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(AttentionError, match="corrupt.png"):
        run_script(
            "visualize_attention",
            f"--image={corrupt}",
            f"--checkpoint={run_dir}",
            f"--output_dir={tmp_path / 'out'}",
        )
    result = run_script_process(
        "visualize_attention",
        f"--image={corrupt}",
        f"--checkpoint={tmp_path / 'no_run'}",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 1
    assert "error: cannot read image" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")
