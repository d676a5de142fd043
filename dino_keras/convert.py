"""Converts the reference's PyTorch checkpoints into a dino_keras run directory.

Two kinds of source are understood:

* a backbone state dict (the released `..._pretrain.pth` files, or any torchvision ResNet-50 /
  timm-style ViT state dict): student and teacher backbones are both set from it, the heads are
  freshly initialised (the teacher head as an exact copy of the student head);
* a full training checkpoint, a dict with `student`, `teacher` and optionally `dino_loss`
  (holding `center`), `epoch`, `args`, `optimizer`: student, teacher (backbones and heads) and the
  loss centre are restored. The optimizer state is NOT converted: moments start at zero.

Keys may carry `module.` (DistributedDataParallel) and `backbone.` / `head.` (the multi-crop
wrapper) prefixes. The architecture is inferred from the shapes (ViT width, depth, patch size and
native grid, ResNet-50, head out_dim and BatchNorm) and cross-checked against every explicitly
given flag; any disagreement, and any checkpoint tensor whose shape differs from the Keras weight
it should fill, is refused with an error naming the key, the expected and the found shape.

The output is a normal run directory: `<output_dir>/config.json` and
`<output_dir>/checkpoints/latest-N`, written by the same code as training
(`check_or_write_run_config`, `TrainingCheckpoint`), so `scripts/train.py --output_dir=...`
resumes from it and evaluation/export load it the usual way.

Layout conversions: torch Linear weight [out, in] -> Dense kernel [in, out]; Conv2d weight
[D, C, p, p] -> Conv2D kernel [p, p, C, D]; LayerNorm weight/bias -> gamma/beta; BatchNorm
weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance; weight-norm
`weight_g` [out, 1] -> `gain` [1, out], `weight_v` [out, in] -> `kernel_v` [in, out].

torch is imported lazily: only reading a `.pth` file needs it (`requirements-parity.txt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dino_keras.checkpointing import ARCHITECTURE_FLAGS
from dino_keras.config import VIT_ARCHS, ConfigError, TrainConfig

MLP_RATIO = 4
HEAD_LINEAR_LAYERS = 3  # the reference's DINOHead default (nlayers), as DinoHead's

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
    the reference's `args` Namespace); other pickled objects only with `allow_pickle`."""
    if not os.path.isfile(path):
        raise ConversionError(f"--checkpoint: no such file {path!r}")
    torch = import_torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise ConversionError(
                f"{path} holds pickled objects that are not plain tensors ({error}). Pass "
                "--allow_pickle to load it with weights_only=False, only if you trust the "
                "file: unpickling can run arbitrary code."
            ) from error
    return torch.load(path, map_location="cpu", weights_only=False)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _is_tensor(value) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and _is_tensor(v) for k, v in value.items())
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
        if not _is_tensor(value):
            network.unused[original] = "not a tensor"
        elif wrapped and name.startswith("backbone."):
            network.backbone[name[len("backbone.") :]] = _to_numpy(value)
            network.names["backbone:" + name[len("backbone.") :]] = original
        elif wrapped and name.startswith("head."):
            network.head[name[len("head.") :]] = _to_numpy(value)
            network.names["head:" + name[len("head.") :]] = original
        elif wrapped:
            network.unused[original] = "neither a backbone. nor a head. key"
        else:
            network.backbone[name] = _to_numpy(value)
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
            center = _to_numpy(loss_state["center"]).astype(np.float32)
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


# --------------------------------------------------------------------------- #
# The architecture
# --------------------------------------------------------------------------- #


def _shape(array) -> tuple:
    return tuple(int(d) for d in np.shape(array))


@dataclasses.dataclass
class Inferred:
    """An architecture value read from the checkpoint, with the key it was read from."""

    value: Any
    key: str


def infer_architecture(contents: CheckpointContents) -> dict[str, Inferred]:
    """TrainConfig field -> value implied by the tensors (and the reference's `args`)."""
    backbone = contents.teacher.backbone
    names = contents.teacher.names
    found: dict[str, Inferred] = {}

    def key(name: str) -> str:
        return names.get("backbone:" + name, name)

    if "patch_embed.proj.weight" in backbone or "pos_embed" in backbone:
        for required in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
            if required not in backbone:
                raise ConversionError(f"ViT checkpoint without `{required}`: cannot convert")
        proj = _shape(backbone["patch_embed.proj.weight"])
        if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
            raise ConversionError(
                f"{key('patch_embed.proj.weight')}: expected shape [D, 3, p, p], found {list(proj)}"
            )
        width, _, patch, _ = proj
        tokens = _shape(backbone["pos_embed"])[1]
        side = math.isqrt(tokens - 1)
        if side * side != tokens - 1:
            raise ConversionError(
                f"{key('pos_embed')}: {tokens} tokens is not 1 + a square grid; only the "
                "reference's layout (CLS token + square patch grid) converts"
            )
        blocks = {int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))}
        if not blocks:
            raise ConversionError("ViT checkpoint without `blocks.N.*` keys: cannot convert")
        depth = max(blocks) + 1
        hidden_key = "blocks.0.mlp.fc1.weight"
        if hidden_key in backbone and _shape(backbone[hidden_key])[0] != MLP_RATIO * width:
            raise ConversionError(
                f"{key(hidden_key)}: expected shape {[MLP_RATIO * width, width]} (MLP ratio "
                f"{MLP_RATIO}), found {list(_shape(backbone[hidden_key]))}"
            )
        found["embed_dim"] = Inferred(width, key("patch_embed.proj.weight"))
        found["patch_size"] = Inferred(patch, key("patch_embed.proj.weight"))
        found["depth"] = Inferred(depth, key(f"blocks.{depth - 1}.norm1.weight"))
        found["global_crops_size"] = Inferred(side * patch, key("pos_embed"))
    elif "conv1.weight" in backbone and "layer4.0.conv1.weight" in backbone:
        found["arch"] = Inferred("resnet50", key("layer4.0.conv1.weight"))
    else:
        raise ConversionError(
            "cannot recognise the backbone: no ViT keys (patch_embed.proj.weight, pos_embed) and "
            "no ResNet-50 keys (conv1.weight, layer4.0.conv1.weight); first keys: "
            f"{', '.join(list(backbone)[:5])}"
        )

    head = contents.teacher.head
    if head:
        (gain_key, gain), (v_key, weight_v) = _last_layer_tensors(head, names)
        found["out_dim"] = Inferred(_shape(weight_v)[0], v_key)
        found["head_bottleneck_dim"] = Inferred(_shape(weight_v)[1], v_key)
        linears = sorted(
            int(m.group(1))
            for k, v in head.items()
            if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)) and np.ndim(v) == 2
        )
        if len(linears) != HEAD_LINEAR_LAYERS:
            raise ConversionError(
                f"the head has {len(linears)} linear layers before the last layer "
                f"({', '.join(f'mlp.{i}' for i in linears)}); dino_keras' DINO head has "
                f"{HEAD_LINEAR_LAYERS} (the reference's default nlayers=3)"
            )
        first = f"mlp.{linears[0]}.weight"
        found["head_hidden_dim"] = Inferred(
            _shape(head[first])[0], names.get("head:" + first, first)
        )
        has_bn = "mlp.1.running_mean" in head
        found["use_bn_in_head"] = Inferred(
            has_bn,
            names["head:mlp.1.running_mean"]
            if has_bn
            else f"no BatchNorm statistics beside {names.get('head:mlp.0.weight', 'mlp.0.weight')}",
        )
        # The reference keeps the gain at exactly 1 when norm_last_layer is true.
        found["gain_is_one"] = Inferred(bool(np.all(gain == 1.0)), gain_key)
    for name in ("arch", "patch_size", "out_dim", "use_bn_in_head", "norm_last_layer", "optimizer"):
        if name in contents.reference_args and name not in found:
            found[name] = Inferred(contents.reference_args[name], f"args.{name}")
    return found


def _last_layer_tensors(head: dict, names: dict) -> tuple[tuple[str, np.ndarray], ...]:
    """((key, weight_g), (key, weight_v)) of the weight-normalised last layer."""
    for g_name, v_name in (
        ("last_layer.weight_g", "last_layer.weight_v"),
        (
            "last_layer.parametrizations.weight.original0",
            "last_layer.parametrizations.weight.original1",
        ),
    ):
        if g_name in head and v_name in head:
            return (
                (names.get("head:" + g_name, g_name), head[g_name]),
                (names.get("head:" + v_name, v_name), head[v_name]),
            )
    raise ConversionError(
        "head without a weight-normalised last layer (last_layer.weight_g / weight_v); keys: "
        f"{', '.join(sorted(head))}"
    )


def resolve_config(
    contents: CheckpointContents, overrides: Mapping[str, Any], output_dir: str
) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig of the converted run: defaults, then the explicitly given flags
    (`overrides`), then the values implied by the checkpoint, which must agree with the
    explicit flags. Returns the config and notes saying where each architecture value came
    from."""
    overrides = dict(overrides)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConversionError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
    values = {**overrides, "output_dir": output_dir}
    notes: list[str] = []
    inferred = infer_architecture(contents)

    def settle(field: str, value, source: str) -> None:
        if field in overrides and overrides[field] != value:
            raise ConversionError(
                f"--{field}={overrides[field]} does not match the checkpoint: {source} implies "
                f"--{field}={value}"
            )
        values[field] = value
        notes.append(f"{field} = {value!r} (from {source})")

    if "embed_dim" in inferred:  # a ViT
        _resolve_vit(inferred, overrides, values, notes)
        settle("patch_size", inferred["patch_size"].value, inferred["patch_size"].key)
        grid = inferred["global_crops_size"].value // inferred["patch_size"].value
        settle(
            "global_crops_size",
            inferred["global_crops_size"].value,
            f"the {grid}x{grid} patch grid of {inferred['global_crops_size'].key}",
        )
    else:
        settle("arch", "resnet50", inferred["arch"].key)
    for field in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head"):
        if field in inferred:
            settle(field, inferred[field].value, inferred[field].key)
    if "norm_last_layer" in inferred:  # the reference's own flag
        settle(
            "norm_last_layer",
            bool(inferred["norm_last_layer"].value),
            inferred["norm_last_layer"].key,
        )
    elif "gain_is_one" in inferred:
        gain = inferred["gain_is_one"]
        if overrides.get("norm_last_layer") and not gain.value:
            raise ConversionError(
                f"--norm_last_layer=true does not match the checkpoint: {gain.key} is not all "
                "ones, so the gain was trained (--norm_last_layer=false)"
            )
        if "norm_last_layer" not in overrides:
            settle(
                "norm_last_layer",
                gain.value,
                f"{gain.key}: {'all ones' if gain.value else 'trained'}",
            )
    if "optimizer" in inferred and "optimizer" not in overrides:
        values["optimizer"] = inferred["optimizer"].value
        notes.append(f"optimizer = {values['optimizer']!r} (from {inferred['optimizer'].key})")
    config = TrainConfig(**values)
    try:
        config.validate()
    except ConfigError as error:
        raise ConversionError(f"the converted configuration is invalid: {error}") from error
    return config, notes


def _resolve_vit(
    inferred: dict[str, Inferred], overrides: dict, values: dict, notes: list[str]
) -> None:
    """arch, embed_dim, depth and num_heads of a ViT checkpoint."""
    width = inferred["embed_dim"].value
    arch_source = "--arch" if "arch" in overrides else None
    arch = overrides.get("arch")
    if arch is None and "arch" in inferred:
        arch, arch_source = inferred["arch"].value, inferred["arch"].key
    if arch is None:
        arch = next((a for a, dims in VIT_ARCHS.items() if dims[0] == width), "vit_small")
        notes.append(f"arch = {arch!r} (from the width {width} of {inferred['embed_dim'].key})")
    elif arch not in VIT_ARCHS:
        raise ConversionError(
            f"{arch_source}={arch} does not match the checkpoint: "
            f"{inferred['embed_dim'].key} is a ViT patch embedding; ViT archs: "
            f"{', '.join(VIT_ARCHS)}"
        )
    else:
        notes.append(f"arch = {arch!r} (from {arch_source})")
    values["arch"] = arch
    arch_width, arch_depth, arch_heads = VIT_ARCHS[arch]
    for field, arch_value in (("embed_dim", arch_width), ("depth", arch_depth)):
        found = inferred[field]
        given = overrides.get(field, 0)
        if given and given != found.value:
            raise ConversionError(
                f"--{field}={given} does not match the checkpoint: "
                f"{found.key} implies --{field}={found.value}"
            )
        if not given and arch_source and found.value != arch_value:
            raise ConversionError(
                f"{arch_source}={arch} has {field} {arch_value}, but {found.key} implies "
                f"{found.value}: pass --{field}={found.value} for a custom {field}, or the "
                "matching --arch"
            )
        # Keep an explicit flag as given: resuming compares it with the saved config.
        values[field] = given or (0 if found.value == arch_value else found.value)
        notes.append(f"{field} = {found.value} (from {found.key})")
    heads = overrides.get("num_heads", 0)
    if heads and width % heads:
        raise ConversionError(
            f"--num_heads={heads} does not divide the checkpoint's width "
            f"{width} ({inferred['embed_dim'].key})"
        )
    if not heads and width != arch_width:
        raise ConversionError(
            f"the number of attention heads does not show in the shapes and the width {width} "
            f"is not that of {arch}: pass --num_heads"
        )
    values["num_heads"] = heads
    notes.append(
        f"num_heads = {heads or arch_heads} "
        f"({'--num_heads' if heads else f'the default of {arch}'}; not in the shapes)"
    )


# --------------------------------------------------------------------------- #
# Filling the Keras weights
# --------------------------------------------------------------------------- #


def _identity(x):
    return x


def _linear(x):  # torch Linear [out, in] -> Dense [in, out]
    return np.transpose(x)


def _conv(x):  # torch Conv2d [D, C, kh, kw] -> Conv2D [kh, kw, C, D]
    return np.transpose(x, (2, 3, 1, 0))


Assignment = tuple[str, Any, Callable]  # (source key, Keras variable, layout transform)


def vit_assignments(backbone) -> list[Assignment]:
    """(torch key, Keras variable, transform) for a `VisionTransformer`."""
    out = [
        ("cls_token", backbone.cls_token, _identity),
        ("pos_embed", backbone.pos_embed, _identity),
        ("patch_embed.proj.weight", backbone.patch_embed.kernel, _conv),
        ("patch_embed.proj.bias", backbone.patch_embed.bias, _identity),
    ]
    for i, block in enumerate(backbone.blocks):
        p = f"blocks.{i}."
        for torch_name, layer in (("norm1", block.norm1), ("norm2", block.norm2)):
            out += [
                (p + torch_name + ".weight", layer.gamma, _identity),
                (p + torch_name + ".bias", layer.beta, _identity),
            ]
        for torch_name, layer in (
            ("attn.qkv", block.attn.qkv),
            ("attn.proj", block.attn.proj),
            ("mlp.fc1", block.fc1),
            ("mlp.fc2", block.fc2),
        ):
            out.append((p + torch_name + ".weight", layer.kernel, _linear))
            if layer.use_bias:
                out.append((p + torch_name + ".bias", layer.bias, _identity))
    out += [
        ("norm.weight", backbone.norm.gamma, _identity),
        ("norm.bias", backbone.norm.beta, _identity),
    ]
    return out


def _batch_norm_assignments(prefix: str, layer) -> list[Assignment]:
    return [
        (prefix + ".weight", layer.gamma, _identity),
        (prefix + ".bias", layer.beta, _identity),
        (prefix + ".running_mean", layer.moving_mean, _identity),
        (prefix + ".running_var", layer.moving_variance, _identity),
    ]


def resnet_assignments(backbone) -> list[Assignment]:
    """For `dino_keras.models.resnet.resnet50`: Keras layer `layer1_0_downsample_0` is torch
    module `layer1.0.downsample.0`."""
    import keras

    out = []
    for layer in backbone.layers:
        prefix = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv2D):
            out.append((prefix + ".weight", layer.kernel, _conv))
        elif isinstance(layer, keras.layers.BatchNormalization):
            out += _batch_norm_assignments(prefix, layer)
    return out


def head_assignments(head) -> list[Assignment]:
    """For a `DinoHead`: Keras `mlp_K` is torch `mlp.K` (same Sequential indices)."""
    import keras

    out = []
    for layer in head.mlp_layers:
        prefix = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Dense):
            out += [
                (prefix + ".weight", layer.kernel, _linear),
                (prefix + ".bias", layer.bias, _identity),
            ]
        elif isinstance(layer, keras.layers.BatchNormalization):
            out += _batch_norm_assignments(prefix, layer)
    out += [
        ("last_layer.weight_g", head.last_layer.gain, _linear),
        ("last_layer.weight_v", head.last_layer.kernel_v, _linear),
    ]
    return out


_PARAMETRIZATION_NAMES = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


def backbone_assignments(backbone) -> list[Assignment]:
    if hasattr(backbone, "blocks"):
        return vit_assignments(backbone)
    return resnet_assignments(backbone)


@dataclasses.dataclass
class FillResult:
    used: list[str] = dataclasses.field(default_factory=list)
    unused: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
    filled: set = dataclasses.field(default_factory=set)  # id() of the Keras variables
    mismatches: list[str] = dataclasses.field(default_factory=list)

    def merge(self, other: FillResult) -> None:
        self.used += other.used
        self.unused.update(other.unused)
        self.filled |= other.filled
        self.mismatches += other.mismatches


def _torch_shape(transform: Callable, keras_shape: tuple) -> tuple:
    """The checkpoint shape that converts to `keras_shape`."""
    if transform is _conv:
        kh, kw, c, d = keras_shape
        return (d, c, kh, kw)
    return tuple(reversed(keras_shape)) if transform is _linear else tuple(keras_shape)


def plan_fill(
    assignments: list[Assignment],
    tensors: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    part: str,
) -> tuple[list, FillResult]:
    """Checks every shape; returns the (variable, value) writes and what was used."""
    tensors = {_PARAMETRIZATION_NAMES.get(k, k): (k, _to_numpy(v)) for k, v in tensors.items()}
    result = FillResult()
    writes = []
    for key, variable, transform in assignments:
        if key not in tensors:
            continue
        source_key, value = tensors.pop(key)
        original = names.get(f"{part}:{source_key}", source_key)
        expected = tuple(int(d) for d in variable.shape)
        if _shape(value) != _torch_shape(transform, expected):
            keras_path = variable.path.split("/", 1)[-1]  # without student/ or teacher/
            result.mismatches.append(
                f"{original}: expected shape {list(_torch_shape(transform, expected))}, found "
                f"{list(_shape(value))} (Keras {keras_path} {list(expected)})"
            )
            continue
        writes.append((variable, transform(value).astype(np.float32)))
        result.used.append(original)
        result.filled.add(id(variable))
    for key, (source_key, _) in tensors.items():
        original = names.get(f"{part}:{source_key}", source_key)
        reason = (
            "BatchNorm step counter: no Keras counterpart (the momentum is fixed)"
            if key.endswith("num_batches_tracked")
            else "no Keras weight of this name"
        )
        result.unused[original] = reason
    return writes, result


def fill_network(network, weights: NetworkWeights) -> tuple[list, FillResult]:
    """Plans the writes of a MultiCropWrapper's backbone (and head, if `weights` has one)."""
    writes, result = plan_fill(
        backbone_assignments(network.backbone), weights.backbone, weights.names, "backbone"
    )
    if weights.head:
        head_writes, head_result = plan_fill(
            head_assignments(network.head), weights.head, weights.names, "head"
        )
        writes += head_writes
        result.merge(head_result)
    result.unused.update(weights.unused)
    return writes, result


def _load(
    assignments: list[Assignment], state_dict: Mapping, prefixes: tuple[str, ...]
) -> FillResult:
    tensors, names = {}, {}
    for key, value in state_dict.items():
        name = key
        for prefix in prefixes:
            name = name[len(prefix) :] if name.startswith(prefix) else name
        tensors[name] = value
        names[f"part:{name}"] = key
    writes, result = plan_fill(assignments, tensors, names, "part")
    if result.mismatches:
        raise ConversionError(
            "the checkpoint's shapes do not match the architecture:\n  "
            + "\n  ".join(result.mismatches)
        )
    for variable, value in writes:
        variable.assign(value)
    return result


def load_backbone_state_dict(backbone, state_dict: Mapping) -> FillResult:
    """Loads a reference/timm/torchvision backbone state dict into a built dino_keras backbone
    (`VisionTransformer` or `resnet50()`), refusing any shape mismatch. Returns what was used
    (`used`, `unused`); the caller decides about Keras weights not in `filled`."""
    return _load(backbone_assignments(backbone), state_dict, ("module.", "backbone."))


def load_head_state_dict(head, state_dict: Mapping) -> FillResult:
    """Loads a reference `DINOHead` state dict (`mlp.K.*`, `last_layer.weight_g/_v`, with or
    without a `head.` prefix) into a built `DinoHead`."""
    return _load(head_assignments(head), state_dict, ("module.", "head."))


# --------------------------------------------------------------------------- #
# The whole conversion
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class ConversionReport:
    source: str
    kind: str
    config: TrainConfig
    notes: list[str]
    used_keys: int
    unused: dict[str, str]
    unfilled: dict[str, str]  # Keras variable path -> reason
    center_restored: bool
    epoch: int
    optimizer_steps: int
    checkpoint_path: str

    def format(self) -> str:
        kind = "full training checkpoint" if self.kind == "full" else "one network"
        lines = [f"Converted {self.source} ({kind})", "Architecture and notes:"]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"Checkpoint tensors used: {self.used_keys}")
        lines.append(f"Checkpoint keys NOT used: {len(self.unused)}")
        lines += [f"  {key}: {reason}" for key, reason in sorted(self.unused.items())]
        lines.append(f"Keras weights NOT filled from the checkpoint: {len(self.unfilled)}")
        by_reason: dict[str, list[str]] = {}
        for path, reason in sorted(self.unfilled.items()):
            by_reason.setdefault(reason, []).append(path)
        for reason, paths in by_reason.items():
            lines.append(f"  {reason}:")
            lines += [f"    {path}" for path in paths]
        lines.append(
            "Loss centre: " + ("restored" if self.center_restored else "zeros (not in the source)")
        )
        lines.append(
            "Optimizer state: not converted (AdamW/SGD/LARS moments start from zero); "
            f"step counter set to {self.optimizer_steps}"
        )
        lines.append(
            f"Wrote {self.config.output_dir}/config.json and {self.checkpoint_path} "
            f"(epoch {self.epoch})"
        )
        lines.append(
            "Resume or fine-tune with: python scripts/train.py "
            f"--flagfile={os.path.join(self.config.output_dir, 'train_flags.cfg')} "
            "[--data_path=... --epochs=...]"
        )
        return "\n".join(lines)


def convert(
    source,
    output_dir: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    checkpoint_key: str = "",
    allow_pickle: bool = False,
    allow_missing: bool = False,
    steps_per_epoch: int = 0,
    restart: bool = False,
) -> ConversionReport:
    """Converts `source` (a `.pth` path or an already loaded checkpoint object) into the run
    directory `output_dir`.

    Args:
        overrides: explicitly given TrainConfig values (flags); each architecture value must
            agree with the checkpoint.
        checkpoint_key: use this entry of a dict checkpoint (e.g. "teacher") for both networks.
        allow_pickle: allow `torch.load(weights_only=False)` for files with arbitrary objects.
        allow_missing: write the run even if backbone (or, for full checkpoints, head) weights
            are missing from the checkpoint (they keep their fresh initialisation).
        steps_per_epoch: for a full checkpoint, the optimiser steps per epoch of the run that will
            resume it: the step counter, which drives every schedule, is set to
            epoch * steps_per_epoch. 0 leaves it at 0 (the schedules restart).
        restart: save at epoch 0 with a zero step counter even for a full checkpoint.
    """
    from dino_keras.checkpointing import TrainingCheckpoint, check_or_write_run_config
    from dino_keras.training import build_trainer

    name = source if isinstance(source, str) else "<in-memory checkpoint>"
    checkpoint = load_torch_checkpoint(source, allow_pickle) if isinstance(source, str) else source
    contents = parse_checkpoint(checkpoint, checkpoint_key)
    config, notes = resolve_config(contents, overrides or {}, output_dir)
    if os.path.isdir(config.checkpoint_dir) and os.listdir(config.checkpoint_dir):
        raise ConversionError(
            f"{config.checkpoint_dir} already holds checkpoints; convert into a new --output_dir"
        )

    trainer = build_trainer(config, 1, config.batch_size_per_gpu)
    with_head = bool(contents.teacher.head)
    result = FillResult()
    writes = []
    for network, weights in (
        (trainer.student, contents.student),
        (trainer.teacher, contents.teacher),
    ):
        network_writes, network_result = fill_network(network, weights)
        writes += network_writes
        result.merge(network_result)
    result.used = list(dict.fromkeys(result.used))  # one network may fill both
    center_restored = contents.center is not None
    if center_restored:
        if _shape(contents.center) != tuple(trainer.center.shape):
            result.mismatches.append(
                f"dino_loss/center: expected shape {list(trainer.center.shape)}, found "
                f"{list(_shape(contents.center))}"
            )
        else:
            writes.append((trainer.center, contents.center))
    if result.mismatches:
        result.mismatches = list(dict.fromkeys(result.mismatches))  # one network, both roles
        raise ConversionError(
            "the checkpoint's shapes do not match the architecture "
            f"({_describe(config)}):\n  " + "\n  ".join(result.mismatches)
        )

    unfilled = {}
    missing = []
    for network in (trainer.student, trainer.teacher):
        for variable in network.weights:
            if id(variable) in result.filled:
                continue
            if "/head/" in variable.path and not with_head:
                unfilled[variable.path] = (
                    "fresh initialisation (backbone-only source; the "
                    "teacher head is a copy of the student head)"
                )
            else:
                unfilled[variable.path] = "MISSING from the checkpoint: fresh initialisation"
                missing.append(variable.path)
    if not center_restored:
        unfilled["dino_loss/center"] = "zeros, the reference's initial centre (not in the source)"
    if missing and not allow_missing:
        raise ConversionError(
            f"{len(missing)} Keras weights have no tensor in the checkpoint (first: "
            f"{', '.join(missing[:5])}); pass --allow_missing to keep their fresh "
            "initialisation"
        )

    for variable, value in writes:
        variable.assign(value)
    if not with_head:
        # The teacher starts as an exact copy of the student.
        for teacher_var, student_var in zip(
            trainer.teacher.head.weights, trainer.student.head.weights, strict=True
        ):
            teacher_var.assign(student_var)

    epoch = 0 if restart else contents.epoch
    optimizer_steps = epoch * steps_per_epoch
    if epoch and not steps_per_epoch:
        notes.append(
            f"epoch {epoch} without --steps_per_epoch: the optimiser step counter is 0, "
            "so the lr, weight-decay, momentum and temperature schedules and the "
            "last-layer freeze restart from their beginning"
        )
    trainer.optimizer.iterations.assign(optimizer_steps)
    check_or_write_run_config(config)
    _write_flagfile(config, extra=overrides or {})
    saver = TrainingCheckpoint(
        config.checkpoint_dir,
        student=trainer.student,
        teacher=trainer.teacher,
        optimizer=trainer.optimizer,
        center=trainer.center,
    )
    path = saver.save(epoch)
    return ConversionReport(
        name,
        contents.kind,
        config,
        notes,
        len(result.used),
        {**contents.unused, **result.unused},
        unfilled,
        center_restored,
        epoch,
        optimizer_steps,
        path,
    )


def _describe(config: TrainConfig) -> str:
    if not config.is_vit:
        return f"{config.arch}, out_dim {config.out_dim}"
    width, depth, heads = config.vit_dims
    return (
        f"{config.arch} width {width} depth {depth} heads {heads} patch {config.patch_size} "
        f"at {config.global_crops_size} px, out_dim {config.out_dim}"
    )


# Flags a resumed run must repeat: the architecture flags and the output directory.
_FLAGFILE_FIELDS = (*ARCHITECTURE_FLAGS, "output_dir")


def _write_flagfile(config: TrainConfig, extra: Mapping[str, Any]) -> str:
    """`<output_dir>/train_flags.cfg`: the flags `scripts/train.py` needs to resume the run (the
    architecture and every flag given explicitly to the conversion)."""
    path = os.path.join(config.output_dir, "train_flags.cfg")
    lines = ["# Written by scripts/convert_checkpoint.py: the flags of the converted run."]
    fields = list(_FLAGFILE_FIELDS) + [f for f in extra if f not in _FLAGFILE_FIELDS]
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        lines.append(f"--{field}={value}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
