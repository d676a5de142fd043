"""Makes `import torch` fail in a process that must not load PyTorch.

keras-cv imports PyTorch whenever it is installed (+0.5 GiB of resident memory), and loader
processes and benchmark cases never need it. An import hook, not `sys.modules["torch"] = None`:
SciPy, when installed, reads `sys.modules["torch"].Tensor` whenever "torch" is in sys.modules.
"""

from __future__ import annotations

import importlib.abc
import sys


class _HideTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def hide_torch() -> None:
    """From now on `import torch` raises ImportError (unless it is imported already)."""
    if "torch" not in sys.modules and not any(isinstance(f, _HideTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideTorch())
