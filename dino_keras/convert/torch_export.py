"""A dino_keras run written as the reference's PyTorch checkpoint files (the inverse of
`run_writer.convert`).

Two files:

* `checkpoint.pth`, the layout `main_dino.py` writes and resumes from: `student` (keys
  `module.backbone.*` / `module.head.*`: the reference wraps the student in
  DistributedDataParallel), `teacher` (`backbone.*` / `head.*`; `module.`-prefixed when the
  networks have BatchNorm, where the reference wraps the teacher too), `dino_loss` (`center`),
  `epoch` (completed epochs, the epoch a resumed run starts at) and `args` (the reference's
  flags, from the run's config). No `optimizer` and no `fp16_scaler`: the reference's
  `restart_from_checkpoint` skips entries that are missing, so its AdamW/SGD/LARS moments
  restart from zero while its schedules, indexed by epoch and iteration, continue.
* `backbone_pretrain.pth`, the layout of the released `*_pretrain.pth` files: the plain
  state dict of one backbone (the teacher by default), no prefix, which the reference's
  `eval_knn.py` / `eval_linear.py` (`--pretrained_weights`), timm's `vit_*` models
  (`num_classes=0`) and torchvision's `resnet50` (after `fc = nn.Identity()`) load.

`args` is a dict, not the reference's `argparse.Namespace`: torch >= 2.6 loads with
`weights_only=True` by default, which refuses a pickled Namespace (the reference's own files
need `weights_only=False`), and a dict is read the same way by `dino_keras.convert`.

The tensors are the mapping of `weight_mapping` inverted (transpositions only, float32): a
round trip through `convert` restores every variable exactly. torch is imported lazily.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow as tf

from dino_keras.checkpointing import network_checkpoint
from dino_keras.config import TrainConfig
from dino_keras.convert.torch_reading import ConversionError, import_torch
from dino_keras.convert.weight_mapping import (
    backbone_assignments,
    head_assignments,
    torch_state_dict,
)
from dino_keras.run_dir import write_atomically
from dino_keras.run_loading import (
    CONFIG_FILE,
    build_networks,
    check_checkpoint_matches,
    read_run_config,
    resolve_checkpoint,
)

CHECKPOINT_FILE = "checkpoint.pth"
BACKBONE_FILE = "backbone_pretrain.pth"
NETWORKS = ("teacher", "student")

# The reference's main_dino.py flags that a TrainConfig field of the same name holds.
REFERENCE_FLAGS = (
    "arch",
    "patch_size",
    "out_dim",
    "norm_last_layer",
    "momentum_teacher",
    "use_bn_in_head",
    "warmup_teacher_temp",
    "teacher_temp",
    "warmup_teacher_temp_epochs",
    "use_fp16",
    "weight_decay",
    "weight_decay_end",
    "clip_grad",
    "batch_size_per_gpu",
    "epochs",
    "freeze_last_layer",
    "lr",
    "warmup_epochs",
    "min_lr",
    "optimizer",
    "drop_path_rate",
    "global_crops_scale",
    "local_crops_number",
    "local_crops_scale",
    "data_path",
    "output_dir",
    "saveckp_freq",
    "seed",
    "num_workers",
)


@dataclasses.dataclass
class RunState:
    """The restored networks, centre and epoch of one checkpoint of a run."""

    config: TrainConfig
    student: object
    teacher: object
    center: np.ndarray
    epoch: int
    checkpoint_path: str


def read_run_state(path: str) -> RunState:
    """Student, teacher, centre and epoch of the run at `path` (a run directory, its checkpoints
    directory or a checkpoint prefix), checked against its config.json as evaluation loads it."""
    run_dir, prefix = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    student, teacher = build_networks(config)
    for name, network in (("student", student), ("teacher", teacher)):
        check_checkpoint_matches(prefix, name, network, os.path.join(run_dir, CONFIG_FILE))
    network_checkpoint(student=student, teacher=teacher).restore(prefix).expect_partial()
    center = tf.train.load_variable(prefix, "center/.ATTRIBUTES/VARIABLE_VALUE")
    epoch = int(tf.train.load_variable(prefix, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    return RunState(config, student, teacher, np.asarray(center, np.float32), epoch, prefix)


def has_batch_norm(config: TrainConfig) -> bool:
    return not config.is_vit or config.use_bn_in_head


def network_state_dict(network, prefix: str = "") -> dict[str, np.ndarray]:
    """A MultiCropWrapper as the reference's: `<prefix>backbone.*` and `<prefix>head.*`."""
    return {
        **torch_state_dict(backbone_assignments(network.backbone), prefix + "backbone."),
        **torch_state_dict(head_assignments(network.head), prefix + "head."),
    }


def reference_args(config: TrainConfig) -> dict:
    args = {}
    for flag in REFERENCE_FLAGS:
        value = getattr(config, flag)
        args[flag] = list(value) if isinstance(value, tuple) else value
    return args


def reference_checkpoint(state: RunState) -> dict:
    """The `main_dino.py` checkpoint dict, with numpy arrays for tensors."""
    return {
        "student": network_state_dict(state.student, "module."),
        "teacher": network_state_dict(
            state.teacher, "module." if has_batch_norm(state.config) else ""
        ),
        "dino_loss": {"center": state.center},
        "epoch": state.epoch,
        "args": reference_args(state.config),
    }


def _to_torch(value):
    torch = import_torch()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, np.float32))
    if isinstance(value, dict):
        return {key: _to_torch(item) for key, item in value.items()}
    return value


def save_torch(obj, path: str) -> None:
    """`torch.save(obj)` to `path` (any tf.io.gfile filesystem), atomically: written beside it
    under a temporary name, then renamed over it."""
    torch = import_torch()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


@dataclasses.dataclass
class TorchExport:
    checkpoint_file: str
    backbone_file: str
    which: str
    epoch: int
    source: str

    def format(self) -> str:
        return "\n".join(
            [
                f"Exported {self.source} (epoch {self.epoch})",
                f"  {self.checkpoint_file}: the reference's main_dino.py checkpoint (student, "
                "teacher, dino_loss, epoch, args; no optimizer state)",
                f"  {self.backbone_file}: the {self.which} backbone, the layout of the released "
                "*_pretrain.pth files",
            ]
        )


def export_torch_run(
    checkpoint: str, output_dir: str, *, which: str = "teacher", overwrite: bool = False
) -> TorchExport:
    """Writes `<output_dir>/checkpoint.pth` and `<output_dir>/backbone_pretrain.pth` (the `which`
    backbone) from the run at `checkpoint`. Existing files are refused unless `overwrite`;
    nothing is written then."""
    if which not in NETWORKS:
        raise ConversionError(f"--which must be one of {', '.join(NETWORKS)}, got {which!r}")
    import_torch()
    paths = [os.path.join(output_dir, name) for name in (CHECKPOINT_FILE, BACKBONE_FILE)]
    existing = [path for path in paths if tf.io.gfile.exists(path)]
    if existing and not overwrite:
        raise ConversionError(
            f"{', '.join(existing)} already exist(s); pass --overwrite to replace. Nothing was "
            "written."
        )
    state = read_run_state(checkpoint)
    network = state.teacher if which == "teacher" else state.student
    backbone = torch_state_dict(backbone_assignments(network.backbone))
    tf.io.gfile.makedirs(output_dir)
    save_torch(_to_torch(reference_checkpoint(state)), paths[0])
    save_torch(_to_torch(backbone), paths[1])
    return TorchExport(paths[0], paths[1], which, state.epoch, state.checkpoint_path)
