"""The profile summary's pure parts (operation kinds, self times of nested events), and the
reference step's profile as a command."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks.benchmarking import missing_reference_modules
from benchmarks.profile_step import operation_kind, self_times
from tests.helpers import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "profile_step.py")
TORCH_INSTALLED = not missing_reference_modules()


def test_operation_kind_drops_the_instance_number():
    assert operation_kind("fusion.12") == "fusion"
    assert operation_kind("loop_add_fusion.1") == "loop_add_fusion"
    assert operation_kind("MatMul_3.46") == "MatMul_"
    assert operation_kind("ThunkExecutor::Execute") == "ThunkExecutor"


def test_self_times_subtract_nested_events_once():
    # A wrapper 0-100 holds a 10-40 event (itself holding 20-30) and a 50-90 event; a
    # separate event follows at 100.
    events = [
        ("wrapper", 0, 100), ("dot", 10, 30), ("inner", 20, 10), ("fusion", 50, 40),
        ("after", 100, 5),
    ]
    times = dict(self_times(events))
    assert times == {"wrapper": 30, "dot": 20, "inner": 10, "fusion": 40, "after": 5}
    assert sum(times.values()) == 105  # the covered wall time, counted once


@pytest.mark.skipif(not TORCH_INSTALLED, reason="torch, torchvision or timm is not installed")
def test_reference_profile_lists_the_reference_steps_operators():
    result = subprocess.run(
        [sys.executable, SCRIPT, "--recipe=demo", "--steps=1", "--top=40", "--reference",
         "--intra_op_threads=1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 reference steps, recipe demo, torch threads 1" in result.stdout
    operators = re.findall(r"ms\s+[\d.]+%\s+(\d+) calls\s+(\S+)", result.stdout)
    # The reference step's matrix products: its linear layers and its attention.
    assert {"aten::addmm", "aten::bmm"} <= {name for _, name in operators}, result.stdout


def test_bad_flag_is_refused_naming_it():
    result = subprocess.run([sys.executable, SCRIPT, "--intra_op_threads=-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: --intra_op_threads: must be >= 0" in result.stderr, result.stderr
