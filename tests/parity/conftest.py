"""Parity tests: dino_keras against the reference's computations written in PyTorch.

torch, torchvision and timm come from requirements-parity.txt (CI installs it). The PyPI torch
wheel depends on triton, a GPU kernel compiler whose bundled LLVM crashes the process
(segmentation fault) when it is loaded after TensorFlow; torch only imports it to probe for it
(`torch.utils._triton.has_triton_package`). On these CPU-only machines it is never used, so it
is made unimportable before torch is imported.
"""

from __future__ import annotations

import sys

if "triton" not in sys.modules:
    sys.modules["triton"] = None  # `import triton` now raises ImportError

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    # The PyPI torch wheel is a CUDA build; on a machine without a GPU it warns that CUDA cannot
    # be initialised. Nothing here uses CUDA.
    config.addinivalue_line("filterwarnings", "ignore:CUDA initialization:UserWarning")


@pytest.fixture
def report_diff():
    """Prints a measured difference (read them with `pytest -s`) and returns it."""

    def report(name: str, value: float) -> float:
        print(f"\n[parity] {name}: {value:.3e}", flush=True)
        return value

    return report
