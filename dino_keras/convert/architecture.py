"""The architecture of a parsed checkpoint: inferred from its shapes (and the reference's `args`),
cross-checked against every explicitly given flag, as a `TrainConfig`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dino_keras.config import VIT_ARCHS, ConfigError, TrainConfig
from dino_keras.convert.torch_reading import CheckpointContents, ConversionError, tensor_shape

MLP_RATIO = 4
HEAD_LINEAR_LAYERS = 3  # the reference's DINOHead default (nlayers), as DinoHead's


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
        proj = tensor_shape(backbone["patch_embed.proj.weight"])
        if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
            raise ConversionError(
                f"{key('patch_embed.proj.weight')}: expected shape [D, 3, p, p], found {list(proj)}"
            )
        width, _, patch, _ = proj
        tokens = tensor_shape(backbone["pos_embed"])[1]
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
        if hidden_key in backbone and tensor_shape(backbone[hidden_key])[0] != MLP_RATIO * width:
            raise ConversionError(
                f"{key(hidden_key)}: expected shape {[MLP_RATIO * width, width]} (MLP ratio "
                f"{MLP_RATIO}), found {list(tensor_shape(backbone[hidden_key]))}"
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
        found["out_dim"] = Inferred(tensor_shape(weight_v)[0], v_key)
        found["head_bottleneck_dim"] = Inferred(tensor_shape(weight_v)[1], v_key)
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
            tensor_shape(head[first])[0], names.get("head:" + first, first)
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
    try:
        overrides = TrainConfig.coerce(overrides)
    except ConfigError as error:
        raise ConversionError(str(error)) from error
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
    try:
        config = TrainConfig.from_dict(values)
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
