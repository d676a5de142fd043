"""Conversion between the reference's PyTorch checkpoints and dino_keras runs.

* `torch_reading`: reading a `.pth` file and splitting it into networks (`parse_checkpoint`).
* `architecture`: the `TrainConfig` implied by the shapes, checked against explicit flags.
* `weight_mapping`: which torch key fills which Keras variable and how (`backbone_assignments`,
  `head_assignments`), in both directions.
* `run_writer`: `convert`, a checkpoint into a run directory that training resumes from.
* `torch_export`: the inverse, a run into the reference's checkpoint files.

torch is imported lazily, only where a `.pth` file is read or written.
"""

from dino_keras.convert.architecture import infer_architecture, resolve_config
from dino_keras.convert.run_writer import ConversionReport, convert
from dino_keras.convert.torch_reading import (
    ConversionError,
    import_torch,
    load_torch_checkpoint,
    parse_checkpoint,
    split_network,
)
from dino_keras.convert.weight_mapping import (
    backbone_assignments,
    head_assignments,
    load_backbone_state_dict,
    load_head_state_dict,
    plan_fill,
    torch_state_dict,
)

__all__ = [
    "ConversionError",
    "ConversionReport",
    "backbone_assignments",
    "convert",
    "head_assignments",
    "import_torch",
    "infer_architecture",
    "load_backbone_state_dict",
    "load_head_state_dict",
    "load_torch_checkpoint",
    "parse_checkpoint",
    "plan_fill",
    "resolve_config",
    "split_network",
    "torch_state_dict",
]
