"""Builds the student and teacher networks described by a `TrainConfig`."""

from __future__ import annotations

import keras
from keras import ops

from dino_keras.config import TrainConfig
from dino_keras.models.head import DinoHead
from dino_keras.models.initializers import layer_seed
from dino_keras.models.multicrop_wrapper import MultiCropWrapper
from dino_keras.models.resnet import resnet50
from dino_keras.models.vit import VisionTransformer


def build_backbone(
    config: TrainConfig,
    *,
    drop_path_rate: float,
    synchronized_bn: bool = False,
    name: str = "backbone",
) -> keras.Model:
    if config.is_vit:
        width, depth, heads = config.vit_dims
        return VisionTransformer(
            image_size=config.global_crops_size,
            patch_size=config.patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            drop_path_rate=drop_path_rate,
            seed=config.seed,
            name=name,
        )
    return resnet50(synchronized_bn=synchronized_bn, seed=config.seed, name=name)


def _build_network(
    config: TrainConfig, *, drop_path_rate: float, synchronized_bn: bool, name: str
) -> MultiCropWrapper:
    backbone = build_backbone(
        config, drop_path_rate=drop_path_rate, synchronized_bn=synchronized_bn, name="backbone"
    )
    head = DinoHead(
        config.out_dim,
        use_bn=config.use_bn_in_head,
        norm_last_layer=config.norm_last_layer,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        synchronized_bn=synchronized_bn,
        seed=layer_seed(config.seed, "head"),
        name="head",
    )
    network = MultiCropWrapper(backbone, head, name=name)
    crops = [ops.zeros((1, config.global_crops_size, config.global_crops_size, 3))]
    if config.local_crops_number:
        crops.append(ops.zeros((1, config.local_crops_size, config.local_crops_size, 3)))
    network(crops)  # creates the variables
    return network


def build_student_and_teacher(config: TrainConfig, synchronized_bn: bool = False):
    """Student (with drop path) and teacher (without, not trainable) with identical weights."""
    student = _build_network(
        config,
        drop_path_rate=config.drop_path_rate,
        synchronized_bn=synchronized_bn,
        name="student",
    )
    teacher = _build_network(
        config, drop_path_rate=0.0, synchronized_bn=synchronized_bn, name="teacher"
    )
    teacher.set_weights(student.get_weights())
    teacher.trainable = False
    return student, teacher
