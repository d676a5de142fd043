"""The reference's multi-crop augmentation (its DataAugmentationDINO) with torchvision and PIL,
and the folder of images its DataLoader reads: the loader of the benchmark's reference case.

Written from the reference semantics (dino_reference.md, "Multi-crop augmentation"): every crop
is a bicubic random-resized crop, a horizontal flip with p=0.5, colour jitter (brightness 0.4,
contrast 0.4, saturation 0.2, hue 0.1, in random order) with p=0.8, grayscale with p=0.2, then
the crop's own Gaussian blur (PIL, radius uniform in 0.1..2.0; p=1.0 for the first global
crop, 0.1 for the second, 0.5 for each local crop), solarization (threshold 128) with p=0.2 on
the second global crop only, and normalisation with the ImageNet mean and std.
"""

from __future__ import annotations

import os
import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_RADIUS = (0.1, 2.0)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class RandomGaussianBlur:
    """With probability `p`, PIL's Gaussian blur with a radius drawn uniformly from `radius`."""

    def __init__(self, p: float, radius: tuple[float, float] = BLUR_RADIUS):
        self.p = p
        self.radius = radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class RandomSolarization:
    """With probability `p`, PIL's solarization (pixels >= 128 inverted)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


class MultiCropAugmentation:
    """An image -> [global crop 1, global crop 2, local crops...], each a normalised CHW tensor."""

    def __init__(
        self,
        *,
        global_crops_size: int,
        local_crops_size: int,
        local_crops_number: int,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
    ):
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                    p=0.8,
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

        def resized_crop(size, scale):
            return transforms.RandomResizedCrop(
                size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC
            )

        self.first_global = transforms.Compose(
            [
                resized_crop(global_crops_size, global_crops_scale),
                flip_and_color_jitter,
                RandomGaussianBlur(1.0),
                normalize,
            ]
        )
        self.second_global = transforms.Compose(
            [
                resized_crop(global_crops_size, global_crops_scale),
                flip_and_color_jitter,
                RandomGaussianBlur(0.1),
                RandomSolarization(0.2),
                normalize,
            ]
        )
        self.local = transforms.Compose(
            [
                resized_crop(local_crops_size, local_crops_scale),
                flip_and_color_jitter,
                RandomGaussianBlur(0.5),
                normalize,
            ]
        )
        self.local_crops_number = local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.first_global(image), self.second_global(image)]
        crops += [self.local(image) for _ in range(self.local_crops_number)]
        return crops


class ImageFiles(torch.utils.data.Dataset):
    """The images of one folder (sorted by name), read as torchvision's ImageFolder reads a
    file (PIL, converted to RGB), each passed through `transform`."""

    def __init__(self, folder: str, transform):
        self.paths = sorted(
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.paths:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} image in {folder}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image)
