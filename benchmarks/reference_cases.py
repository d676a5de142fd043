"""The benchmark's reference cases: the reference's training step and multi-crop loader in
PyTorch, at the sizes of the dino_keras `step` and `pipeline` cases of the same run.

* `reference_step`: `ReferenceTraining.step` of `benchmarks/reference_torch.py` (the code the
  training-step parity tests hold dino_keras to): teacher forward on the 2 global crops, student
  forward and backward on all crops, the DINO loss with its centre, per-tensor gradient
  clipping, last-layer freezing, AdamW over the reference's two parameter groups (no weight
  decay on biases and 1-D parameters), the EMA teacher update and the centre update. The ViT is
  timm's (the reference's blocks; explicit q k^T softmax attention as the reference computes it,
  not PyTorch's fused kernel) built as the reference builds it: position embeddings for 224 px
  whatever the crop size, interpolated bicubically in every forward pass; drop path in the
  student only. Crops already in memory, float32, as the `step` case.
* `reference_pipeline`: `torch.utils.data.DataLoader` with `num_workers` worker processes
  (forked, as the reference's) over the same generated JPEGs, with the reference's
  DataAugmentationDINO (`benchmarks/reference_augmentation.py`) at the recipe's crop sizes,
  scales and number of local crops.

Both run with `torch.set_num_threads` = the schedulable cores of the process (a DataLoader
worker sets its own to 1). Neither imports TensorFlow, so their peak RSS is PyTorch's alone.
"""

from __future__ import annotations

import os
import random
import time

import torch

from benchmarks import reference_torch as ref
from benchmarks.benchmarking import (
    BenchmarkConfig,
    image_folder,
    schedule_steps_per_epoch,
    time_pipeline,
)

# The reference's ViT: its position-embedding grid is for 224 px crops (img_size=[224]).
REFERENCE_IMAGE_SIZE = 224


def thread_settings(config: BenchmarkConfig) -> dict:
    """Sets PyTorch's intra-op threads to `config.intra_op_threads`, or (0) to the schedulable
    cores; returns what it runs with."""
    torch.set_num_threads(config.intra_op_threads or len(os.sched_getaffinity(0)))
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }


def reference_vit(train_config, drop_path_rate: float) -> torch.nn.Module:
    import timm

    width, depth, heads = train_config.vit_dims
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=REFERENCE_IMAGE_SIZE,
        patch_size=train_config.patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        drop_path_rate=drop_path_rate,
    )
    for module in vit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # the reference's attention: softmax(q k^T * scale) v
    return vit


def reference_network(train_config, drop_path_rate: float) -> ref.MultiCropWrapper:
    head = ref.DinoHead(
        train_config.vit_dims[0],
        train_config.out_dim,
        use_bn=train_config.use_bn_in_head,
        norm_last_layer=train_config.norm_last_layer,
        hidden_dim=train_config.head_hidden_dim,
        bottleneck_dim=train_config.head_bottleneck_dim,
    )
    return ref.MultiCropWrapper(reference_vit(train_config, drop_path_rate), head)


def reference_training(config: BenchmarkConfig, train_config) -> ref.ReferenceTraining:
    """Student, teacher (no drop path, the student's weights, no gradients) and the loop."""
    if train_config.arch not in ("vit_tiny", "vit_small", "vit_base"):
        raise ValueError(f"the reference step case runs ViTs only, not --arch={train_config.arch}")
    torch.manual_seed(train_config.seed)
    student = reference_network(train_config, train_config.drop_path_rate)
    teacher = reference_network(train_config, 0.0)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    batch = train_config.batch_size_per_gpu
    return ref.ReferenceTraining(
        student,
        teacher,
        torch.zeros(1, train_config.out_dim),
        config=train_config,
        steps_per_epoch=schedule_steps_per_epoch(config, train_config),  # as the `step` case's
        global_batch=batch,
    )


def reference_crops(config: BenchmarkConfig, train_config) -> list[torch.Tensor]:
    """One batch of random crops of the recipe's sizes, NCHW, already in memory."""
    sizes = [train_config.global_crops_size] * 2
    sizes += [train_config.local_crops_size] * train_config.local_crops_number
    generator = torch.Generator().manual_seed(config.seed)
    return [torch.randn(train_config.batch_size_per_gpu, 3, size, size, generator=generator)
            for size in sizes]


def case_reference_step(config: BenchmarkConfig) -> dict:
    threads = thread_settings(config)
    train_config = config.train_config()
    training = reference_training(config, train_config)
    batch = train_config.batch_size_per_gpu
    crops = reference_crops(config, train_config)

    start = time.perf_counter()
    training.step(crops)
    first_step_seconds = time.perf_counter() - start
    for _ in range(config.warmup):
        training.step(crops)
    step_seconds = []
    for _ in range(config.steps):
        before = time.perf_counter()
        loss = training.step(crops)  # .item() inside: the step has finished
        step_seconds.append(time.perf_counter() - before)
    images_per_second = batch * config.steps / sum(step_seconds)
    return {
        "first_step_seconds": round(first_step_seconds, 3),
        "images_per_second": round(images_per_second, 3),
        "step_seconds_mean": round(sum(step_seconds) / len(step_seconds), 4),
        "step_seconds_min": round(min(step_seconds), 4),
        "loss": loss,
        "torch_version": torch.__version__,
        **threads,
    }


def case_reference_pipeline(config: BenchmarkConfig) -> dict:
    from benchmarks.reference_augmentation import ImageFiles, MultiCropAugmentation

    threads = thread_settings(config)
    train_config = config.train_config()
    batch = train_config.batch_size_per_gpu
    augmentation = MultiCropAugmentation(
        global_crops_size=train_config.global_crops_size,
        local_crops_size=train_config.local_crops_size,
        local_crops_number=train_config.local_crops_number,
        global_crops_scale=train_config.global_crops_scale,
        local_crops_scale=train_config.local_crops_scale,
    )
    dataset = ImageFiles(image_folder(config.image_dir, config.num_images), augmentation)
    batches = 1 + config.pipeline_warmup + config.pipeline_batches
    random.seed(config.seed)  # the augmentations' draws with num_workers=0
    torch.manual_seed(config.seed)  # and the DataLoader's base seed of its workers
    # One long shuffled epoch (a new permutation after each pass over the images), so that the
    # workers start once, as in the reference's epochs of 1.28M images.
    sampler = torch.utils.data.RandomSampler(
        dataset,
        num_samples=batches * batch,
        generator=torch.Generator().manual_seed(config.seed),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch,
        num_workers=train_config.num_workers,
        drop_last=True,
    )
    figures, crops = time_pipeline(loader, config, batch)  # memory read while the workers run
    expected = [batch, 3, train_config.local_crops_size, train_config.local_crops_size]
    if len(crops) != 2 + train_config.local_crops_number or list(crops[-1].shape) != expected:
        raise RuntimeError(f"unexpected batch: {[list(c.shape) for c in crops]}")
    return {
        **figures,
        "source_images": len(dataset),
        "loader_processes": train_config.num_workers,
        "torch_version": torch.__version__,
        **threads,
    }
