"""The reference's computations written in PyTorch, for the parity tests (tests/parity) and the
benchmark's reference cases (benchmarks/reference_cases.py).

Written from the reference semantics (the project's reference document, dino_reference.md, and
the issue): the
bicubic position-embedding resize with the +0.1 scale factors, the last block's attention, the
multi-crop wrapper, the DINO head and loss, the centre update, the `cosine_scheduler` tables, per
tensor gradient clipping, last-layer freezing, AdamW with its two parameter groups and the
teacher EMA. timm provides the ViT blocks, torchvision the ResNet-50; everything that DINO adds
is here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def max_abs_diff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --------------------------------------------------------------------------- #
# Random parameters (default inits leave norms at 1/0 and biases at 0, which would hide
# a swapped gamma/beta or a dropped bias)
# --------------------------------------------------------------------------- #


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor, std):
        return torch.randn(tensor.shape, generator=generator) * std

    for name, parameter in module.named_parameters():
        if parameter.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm gains
            parameter.copy_(1.0 + noise(parameter, 0.2))
        elif parameter.ndim == 1:  # biases
            parameter.copy_(noise(parameter, 0.05))
        elif "original0" in name or name.endswith("weight_g"):  # weight-norm gain: keep at 1
            continue
        else:
            parameter.add_(noise(parameter, 0.02))
    return module


# --------------------------------------------------------------------------- #
# ViT with the reference's position-embedding interpolation
# --------------------------------------------------------------------------- #


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid_height: int, grid_width: int):
    """The reference: bicubic, scale_factor ((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N))."""
    num_patches = pos_embed.shape[1] - 1
    if grid_height * grid_width == num_patches and grid_height == grid_width:
        return pos_embed
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(num_patches))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=(
            (grid_height + 0.1) / math.sqrt(num_patches),
            (grid_width + 0.1) / math.sqrt(num_patches),
        ),
        mode="bicubic",
    )
    assert tuple(grid.shape[-2:]) == (grid_height, grid_width)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def vit_tokens(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS + patch tokens + (interpolated) position embedding; images NCHW, any size."""
    patch = vit.patch_embed.proj.kernel_size[0]
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + interpolate_pos_encoding(
        vit.pos_embed, images.shape[2] // patch, images.shape[3] // patch
    )


def block_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights [B, heads, T, T] of a timm block, computed as the reference
    does: (q @ k^T) * scale, softmax."""
    attn = block.attn
    y = block.norm1(x)
    batch, tokens, dim = y.shape
    qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(dim=-1)


def vit_forward(vit: nn.Module, images: torch.Tensor, with_attention: bool = False):
    """CLS feature after the final norm (and the last block's attention weights)."""
    x = vit_tokens(vit, images)
    for block in vit.blocks[:-1]:
        x = block(x)
    attention = block_attention(vit.blocks[-1], x) if with_attention else None
    x = vit.norm(vit.blocks[-1](x))[:, 0]
    return (x, attention) if with_attention else x


# --------------------------------------------------------------------------- #
# DINO head, multi-crop wrapper, loss
# --------------------------------------------------------------------------- #


class DinoHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear (BatchNorm after the hidden linears if use_bn),
    L2-normalise, weight-normalised Linear without bias (gain 1, frozen if norm_last_layer)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(
            ((in_dim, hidden_dim), (hidden_dim, hidden_dim), (hidden_dim, bottleneck_dim))
        ):
            layers.append(nn.Linear(a, b))
            if i < 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def reference_state_dict(module: nn.Module, prefix: str = "") -> dict:
    """A state dict with the reference's key names for the weight-normalised last layer
    (torch.nn.utils.weight_norm's `weight_g` / `weight_v`), cloned, keys prefixed."""
    renames = {
        "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
        "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
    }
    out = {}
    for key, value in module.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[prefix + key] = value.detach().clone()
    return out


class MultiCropWrapper(nn.Module):
    """One backbone pass per run of consecutive same-size crops; head on the concatenation."""

    def __init__(self, backbone: nn.Module, head: nn.Module, backbone_forward=vit_forward):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_forward = backbone_forward

    def forward(self, crops):
        sizes = torch.tensor([crop.shape[-1] for crop in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, features = 0, []
        for end in ends.tolist():
            features.append(self.backbone_forward(self.backbone, torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def dino_loss(
    student_output,
    teacher_output,
    center,
    teacher_temp: float,
    num_crops: int,
    student_temp: float = 0.1,
):
    student_out = (student_output / student_temp).chunk(num_crops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for i, q in enumerate(teacher_out):
        for v, s in enumerate(student_out):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def updated_center(center, teacher_output, momentum: float = 0.9):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return center * momentum + batch_center * (1 - momentum)


# --------------------------------------------------------------------------- #
# The training loop's pieces
# --------------------------------------------------------------------------- #


def cosine_scheduler(
    base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0
) -> np.ndarray:
    """The reference's per-iteration table: linspace warm-up, then a cosine over the rest."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = (
        np.linspace(start_warmup_value, base_value, warmup_iters)
        if warmup_epochs > 0
        else np.array([])
    )
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def params_groups(model: nn.Module) -> list[dict]:
    regularized, not_regularized = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".bias") or len(parameter.shape) == 1:
            not_regularized.append(parameter)
        else:
            regularized.append(parameter)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> None:
    for parameter in model.parameters():
        if parameter.grad is not None:
            norm = parameter.grad.data.norm(2)
            clip_coef = clip / (norm + 1e-6)
            if clip_coef < 1:
                parameter.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for name, parameter in model.named_parameters():
        if "last_layer" in name:
            parameter.grad = None


class ReferenceTraining:
    """The reference's training loop, one `step` per iteration: the per-iteration lr, weight
    decay and teacher momentum tables, the per-epoch teacher temperature, AdamW over the two
    parameter groups, and the centre.

    config: a dino_keras TrainConfig (same flag names and meanings as the reference).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        center: torch.Tensor,
        *,
        config,
        steps_per_epoch: int,
        global_batch: int,
    ):
        self.student, self.teacher, self.center = student, teacher, center
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.iteration = 0
        self.lr_schedule = cosine_scheduler(
            config.lr * global_batch / 256.0,
            config.min_lr,
            config.epochs,
            steps_per_epoch,
            warmup_epochs=config.warmup_epochs,
        )
        self.wd_schedule = cosine_scheduler(
            config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch
        )
        self.momentum_schedule = cosine_scheduler(
            config.momentum_teacher, 1, config.epochs, steps_per_epoch
        )
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(
                    config.warmup_teacher_temp,
                    config.teacher_temp,
                    config.warmup_teacher_temp_epochs,
                ),
                np.ones(config.epochs - config.warmup_teacher_temp_epochs) * config.teacher_temp,
            )
        )
        self.optimizer = torch.optim.AdamW(params_groups(student))

    def step(self, crops: list) -> float:
        """One iteration on `crops` (2 global crops first, NCHW); returns the loss."""
        it, config = self.iteration, self.config
        epoch = it // self.steps_per_epoch
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if i == 0:
                group["weight_decay"] = self.wd_schedule[it]
        teacher_output = self.teacher(crops[:2])
        student_output = self.student(crops)
        loss = dino_loss(
            student_output,
            teacher_output,
            self.center,
            self.teacher_temp_schedule[epoch],
            len(crops),
        )
        self.center = updated_center(self.center, teacher_output)
        self.optimizer.zero_grad()
        loss.backward()
        if config.clip_grad:
            clip_gradients(self.student, config.clip_grad)
        cancel_gradients_last_layer(epoch, self.student, config.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(
                self.student.parameters(), self.teacher.parameters(), strict=True
            ):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        self.iteration += 1
        return float(loss.item())


def train_steps(
    student: nn.Module,
    teacher: nn.Module,
    center: torch.Tensor,
    batches: list,
    *,
    config,
    steps_per_epoch: int,
) -> tuple[list[float], torch.Tensor]:
    """Runs len(batches) steps of the reference's training loop; returns losses and centre."""
    training = ReferenceTraining(
        student,
        teacher,
        center,
        config=config,
        steps_per_epoch=steps_per_epoch,
        global_batch=batches[0][0].shape[0],
    )
    losses = [training.step(crops) for crops in batches]
    return losses, training.center


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return teacher
