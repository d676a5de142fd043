"""scripts/export.py as a command: writes the version directory, records the command, and
refuses to overwrite with a one-line error."""

import json
import os

import pytest

from dino_keras.run_loading import RunLoadingError
from tests.helpers import make_tiny_run, run_script, run_script_process


def test_export_command(tmp_path):
    make_tiny_run(tmp_path / "run")
    args = [
        f"--checkpoint={tmp_path / 'run'}",
        f"--export_dir={tmp_path / 'export'}",
        "--version=3",
        "--which=student",
    ]
    result = run_script_process("export", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(tmp_path / "export" / "3") in result.stdout
    with open(tmp_path / "export" / "3" / "assets.extra" / "dino_export.json") as f:
        metadata = json.load(f)
    assert metadata["which"] == "student"
    assert "scripts/export.py" in metadata["command"] and "--version=3" in metadata["command"]
    assert os.path.isfile(tmp_path / "export" / "3" / "saved_model.pb")

    again = run_script_process("export", *args)
    assert again.returncode == 1
    assert "error:" in again.stderr and "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    with pytest.raises(RunLoadingError, match="does not exist"):
        run_script(
            "export", f"--checkpoint={tmp_path / 'nothing'}", f"--export_dir={tmp_path / 'export'}"
        )
