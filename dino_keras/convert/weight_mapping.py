"""The PyTorch <-> Keras weight mapping: which torch key fills which Keras variable, and how.

Layout conversions: torch Linear weight [out, in] -> Dense kernel [in, out]; Conv2d weight
[D, C, p, p] -> Conv2D kernel [p, p, C, D]; LayerNorm weight/bias -> gamma/beta; BatchNorm
weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance; weight-norm
`weight_g` [out, 1] -> `gain` [1, out], `weight_v` [out, in] -> `kernel_v` [in, out]. Every
transform is a transposition, so the inverse mapping (`keras_state_dict`) is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dino_keras.convert.torch_reading import (
    ConversionError,
    NetworkWeights,
    tensor_shape,
    to_numpy,
)


def _identity(x):
    return x


def _linear(x):  # torch Linear [out, in] -> Dense [in, out]
    return np.transpose(x)


def _conv(x):  # torch Conv2d [D, C, kh, kw] -> Conv2D [kh, kw, C, D]
    return np.transpose(x, (2, 3, 1, 0))


def _conv_to_torch(x):  # Conv2D [kh, kw, C, D] -> torch Conv2d [D, C, kh, kw]
    return np.transpose(x, (3, 2, 0, 1))


# Keras layout -> torch layout, per transform (both transpositions are their own inverse).
_INVERSE = {_identity: _identity, _linear: _linear, _conv: _conv_to_torch}

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
    tensors = {_PARAMETRIZATION_NAMES.get(k, k): (k, to_numpy(v)) for k, v in tensors.items()}
    result = FillResult()
    writes = []
    for key, variable, transform in assignments:
        if key not in tensors:
            continue
        source_key, value = tensors.pop(key)
        original = names.get(f"{part}:{source_key}", source_key)
        expected = tuple(int(d) for d in variable.shape)
        if tensor_shape(value) != _torch_shape(transform, expected):
            keras_path = variable.path.split("/", 1)[-1]  # without student/ or teacher/
            result.mismatches.append(
                f"{original}: expected shape {list(_torch_shape(transform, expected))}, found "
                f"{list(tensor_shape(value))} (Keras {keras_path} {list(expected)})"
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


def torch_state_dict(assignments: list[Assignment], prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse mapping: torch key (with `prefix`) -> the Keras variable's value in the torch
    layout, float32. Loading the result through the same assignments gives the variables
    back exactly."""
    return {
        prefix + key: np.ascontiguousarray(
            _INVERSE[transform](np.asarray(variable.numpy()))
        ).astype(np.float32)
        for key, variable, transform in assignments
    }
