"""Reading the reference's PyTorch checkpoints: the `.pth` file, and its split into networks.

Two kinds of source are understood:

* a backbone state dict (the released `..._pretrain.pth` files, or any torchvision ResNet-50 /
  timm-style ViT state dict): student and teacher backbones are both set from it;
* a full training checkpoint, a dict with `student`, `teacher` and optionally `dino_loss`
  (holding `center`), `epoch`, `args`, `optimizer`.

Keys may carry `module.` (DistributedDataParallel) and `backbone.` / `head.` (the multi-crop
wrapper) prefixes. torch is imported lazily: only reading a `.pth` file needs it
(`requirements-parity.txt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from dino_keras.config import VIT_ARCHS

# Reference training flags that describe the networks (read from a full checkpoint's `args`).
_REFERENCE_ARCH_ARGS = (
    "arch",
    "patch_size",
    "out_dim",
    "norm_last_layer",
    "use_bn_in_head",
    "optimizer",
)


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message names the key or flag."""


# --------------------------------------------------------------------------- #
# Reading the PyTorch file
# --------------------------------------------------------------------------- #


def import_torch():
    try:
        import torch
    except ImportError as error:
        raise ConversionError(
            "reading PyTorch checkpoints needs torch, which is not a dependency of dino_keras: "
            "pip install -r requirements-parity.txt"
        ) from error
    return torch


def load_torch_checkpoint(path: str, allow_pickle: bool = False) -> Any:
    """`torch.load(path, map_location="cpu")` with `weights_only=True` (plain tensors, dicts and
    the reference's `args` Namespace); other pickled objects only with `allow_pickle`. `path`
    may be on any filesystem `tf.io.gfile` reaches (remote files are read into memory)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise ConversionError(f"--checkpoint: no such file {path!r}")
    torch = import_torch()

    def source():
        if os.path.isfile(path):
            return path
        with tf.io.gfile.GFile(path, "rb") as f:
            return io.BytesIO(f.read())

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise ConversionError(
                f"{path} holds pickled objects that are not plain tensors ({error}). Pass "
                "--allow_pickle to load it with weights_only=False, only if you trust the "
                "file: unpickling can run arbitrary code."
            ) from error
    return torch.load(source(), map_location="cpu", weights_only=False)


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def tensor_shape(array) -> tuple:
    return tuple(int(d) for d in np.shape(array))


def is_tensor(value) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and is_tensor(v) for k, v in value.items())
    )


# --------------------------------------------------------------------------- #
# Splitting a checkpoint into networks
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class NetworkWeights:
    """One network's tensors, keys without `module.` / `backbone.` / `head.` prefixes.

    `names` maps a stripped key (prefixed `backbone:` or `head:`) back to the original key of
    the checkpoint, for messages.
    """

    backbone: dict[str, np.ndarray]
    head: dict[str, np.ndarray]
    names: dict[str, str]
    unused: dict[str, str]  # original key -> reason


def split_network(state_dict: Mapping, where: str = "") -> NetworkWeights:
    """Strips `module.`, then sorts keys into backbone (`backbone.` prefix, or everything when no
    key has it) and head (`head.` prefix, only when `backbone.` keys exist)."""
    stripped = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        stripped[name] = (key, value)
    wrapped = any(name.startswith("backbone.") for name in stripped)
    network = NetworkWeights({}, {}, {}, {})
    for name, (key, value) in stripped.items():
        original = f"{where}{key}"
        if not is_tensor(value):
            network.unused[original] = "not a tensor"
        elif wrapped and name.startswith("backbone."):
            network.backbone[name[len("backbone.") :]] = to_numpy(value)
            network.names["backbone:" + name[len("backbone.") :]] = original
        elif wrapped and name.startswith("head."):
            network.head[name[len("head.") :]] = to_numpy(value)
            network.names["head:" + name[len("head.") :]] = original
        elif wrapped:
            network.unused[original] = "neither a backbone. nor a head. key"
        else:
            network.backbone[name] = to_numpy(value)
            network.names["backbone:" + name] = original
    return network


@dataclasses.dataclass
class CheckpointContents:
    kind: str  # "backbone" (student and teacher from one network) or "full"
    student: NetworkWeights
    teacher: NetworkWeights
    center: np.ndarray | None
    epoch: int
    reference_args: dict
    unused: dict[str, str]  # top-level entries not converted -> reason


def parse_checkpoint(checkpoint: Any, checkpoint_key: str = "") -> CheckpointContents:
    """Recognises a backbone state dict or a full training checkpoint (see module doc).

    checkpoint_key: use only this entry (e.g. "teacher") of a full checkpoint as the network of
        both student and teacher, as the reference's evaluation scripts do.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(
            f"expected a state dict or a training checkpoint dict, got {type(checkpoint).__name__}"
        )
    unused: dict[str, str] = {}
    if checkpoint_key:
        if checkpoint_key not in checkpoint:
            raise ConversionError(
                f"--checkpoint_key={checkpoint_key}: the checkpoint has no such entry (entries: "
                f"{', '.join(sorted(map(str, checkpoint)))})"
            )
        for key in checkpoint:
            if key != checkpoint_key:
                unused[str(key)] = f"not the selected --checkpoint_key={checkpoint_key}"
        network = split_network(checkpoint[checkpoint_key], f"{checkpoint_key}/")
        return CheckpointContents(
            "backbone", network, network, None, 0, _reference_args(checkpoint.get("args")), unused
        )
    if "student" in checkpoint and "teacher" in checkpoint:
        student = split_network(checkpoint["student"], "student/")
        teacher = split_network(checkpoint["teacher"], "teacher/")
        center = None
        loss_state = checkpoint.get("dino_loss")
        if isinstance(loss_state, Mapping) and "center" in loss_state:
            center = to_numpy(loss_state["center"]).astype(np.float32)
            for key in loss_state:
                if key != "center":
                    unused[f"dino_loss/{key}"] = "not part of dino_keras' loss state"
        elif loss_state is not None:
            unused["dino_loss"] = "has no `center`"
        epoch = int(checkpoint.get("epoch", 0) or 0)
        for key in checkpoint:
            if key in ("student", "teacher", "dino_loss", "epoch"):
                continue
            unused[str(key)] = {
                "optimizer": "optimizer state is not converted (moments restart from zero)",
                "args": "reference training flags (read for the architecture only)",
                "fp16_scaler": "loss-scaler state is not converted",
            }.get(key, "unknown entry")
        return CheckpointContents(
            "full", student, teacher, center, epoch, _reference_args(checkpoint.get("args")), unused
        )
    if _is_state_dict(checkpoint):
        network = split_network(checkpoint)
        return CheckpointContents("backbone", network, network, None, 0, {}, unused)
    raise ConversionError(
        "not a state dict (string keys, tensor values) nor a full checkpoint with `student` and "
        f"`teacher`; entries: {', '.join(sorted(map(str, checkpoint)))}. Use --checkpoint_key to "
        "pick the entry holding the network."
    )


# Early releases of the reference named the ViTs after DeiT.
_ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


def _reference_args(args) -> dict:
    """The architecture flags of the reference's `args` (a Namespace or a dict)."""
    if isinstance(args, argparse.Namespace):
        values = vars(args)
    elif isinstance(args, Mapping):
        values = dict(args)
    else:
        return {}
    found = {k: values[k] for k in _REFERENCE_ARCH_ARGS if k in values}
    if "arch" in found:
        found["arch"] = _ARCH_ALIASES.get(found["arch"], found["arch"])
        if found["arch"] not in VIT_ARCHS and found["arch"] != "resnet50":
            del found["arch"]  # e.g. a timm name: the shapes decide
    return found
