"""Small labelled image sets as PNG class folders, and their raw-pixel k-NN baseline.

    python scripts/make_image_sets.py --output_dir=DIR [--sets=fashion_a,shapes,...] [--seed=0]
        [--limit_per_class=N] [--overwrite | --skip_existing] [--nb_knn=20] [--temperature=0.07]

Writes DIR/SET/train/CLASS/I.png and DIR/SET/test/CLASS/I.png (8-bit grayscale PNGs), the
image-folder form of --data_path (scripts/train.py, scripts/eval_knn.py: `--data_path=DIR/SET`),
plus DIR/SET/info.json. Class folders are named INDEX_NAME, so their sorted order (which gives the
labels) is the class order. Sets (images per class: train + test):

* fashion_a: Fashion-MNIST classes 0-4 (t-shirt/top ... coat), 600 + 200, 28 px;
* fashion_b: Fashion-MNIST classes 5-9 (sandal ... ankle boot), 600 + 200, resized to 24 px;
* fashion_c: all ten Fashion-MNIST classes, 250 + 100, resized to 20 px;
* digits: scikit-learn's bundled 8x8 digits (1,797 images, no download), bicubic to 32 px,
  stratified 80/20 split;
* shapes: 10 generated shapes (circle, ellipse, square, diamond, triangle, cross, star, ring,
  horizontal and vertical bar) of random position, size, rotation and grey levels on a noisy
  background, 300 + 100, 32 px;
* textures: 10 generated textures (stripes of three orientations, fine stripes, checkerboard,
  dots, concentric rings, white, smooth and band-pass noise) of random phase, contrast and
  brightness, 300 + 100, 32 px.

Fashion-MNIST comes from the idx files of Debian's dataset-fashion-mnist package
(--fashion_mnist_dir). Each set depends only on --seed; --limit_per_class keeps the first N images
of each class and split of the full set. A set whose folder is not empty is refused, unless
--overwrite (replaced) or --skip_existing (left as it is and read back for the table). A set is
written to DIR/.SET.partial first and renamed when complete.

Then prints per set: counts, classes, size and the top-1 accuracy of a raw-pixel k-NN on the test
split with the train split as the bank: cosine similarity of the flattened pixels scaled to
[0, 1], the k nearest vote with weights exp(similarity / T) summed per class, as in the
reference's eval_knn.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
import time

import numpy as np
from absl import app, flags

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_CLASSES = (
    "circle",
    "ellipse",
    "square",
    "diamond",
    "triangle",
    "cross",
    "star",
    "ring",
    "horizontal_bar",
    "vertical_bar",
)
TEXTURE_CLASSES = (
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal",
    "stripes_fine",
    "checkerboard",
    "dots",
    "concentric_rings",
    "white_noise",
    "smooth_noise",
    "bandpass_noise",
)
# Fixed numbers that make each set's random stream independent of the others and of --sets.
SET_KEYS = {
    "fashion_a": 1,
    "fashion_b": 2,
    "digits": 3,
    "shapes": 4,
    "textures": 5,
    "fashion_c": 6,
}
SET_NAMES = tuple(SET_KEYS)
SPLITS = ("train", "test")
SPLIT_KEYS = {"train": 0, "test": 1}
GENERATED_PER_CLASS = {"train": 300, "test": 100}
FASHION_PER_CLASS = {"train": 600, "test": 200}
FASHION_C_PER_CLASS = {"train": 250, "test": 100}
DIGITS_TEST_FRACTION = 0.2
INFO_FILE = "info.json"


class UsageError(ValueError):
    pass


def define_flags(flag_values) -> None:
    flags.DEFINE_string(
        "output_dir", None, "Where the set folders are written.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "sets",
        list(SET_NAMES),
        f"Sets to write, of {', '.join(SET_NAMES)}.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of the subsets, splits and generated images.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "limit_per_class",
        0,
        "Keep at most this many images per class in each split (the first ones of the full "
        "set); 0: all. For quick tests.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace set folders that are not empty.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "skip_existing",
        False,
        "Leave set folders that are not empty as they are (read back for the table).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "fashion_mnist_dir",
        FASHION_MNIST_DIR,
        "Folder of Fashion-MNIST's idx files (train-images-idx3-ubyte[.gz], t10k-...).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "nb_knn",
        20,
        "Neighbours of the raw-pixel k-NN baseline; 0: no k-NN.",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "temperature", 0.07, "Temperature of the exp(similarity / T) vote.", flag_values=flag_values
    )


class ImageSet:
    """A labelled set in memory: per split, uint8 [N, H, W] images and int64 [N] labels.

    (A plain class, not a dataclass: dataclasses need the module in sys.modules, which a script
    loaded with importlib, as tests/helpers.py's `load_script` does, is not.)
    """

    def __init__(self, name: str, class_names, images: dict, labels: dict, source: dict):
        self.name = name
        self.class_names = tuple(class_names)
        self.images = images
        self.labels = labels
        self.source = source

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])

    def info(self, seed: int, limit_per_class: int) -> dict:
        return {
            "name": self.name,
            "seed": seed,
            "limit_per_class": limit_per_class,
            "image_size": self.image_size,
            "channels": 1,
            "class_names": list(self.class_names),
            "class_folders": class_folders(self.class_names),
            "num_examples": {split: int(len(self.labels[split])) for split in SPLITS},
            "source": self.source,
        }


def class_folders(class_names) -> list[str]:
    return [f"{index}_{name}" for index, name in enumerate(class_names)]


def _limit(count: int, limit_per_class: int) -> int:
    return min(count, limit_per_class) if limit_per_class else count


def _stack(per_class: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([image for class_images in per_class for image in class_images])
    labels = np.concatenate(
        [np.full(len(class_images), label) for label, class_images in enumerate(per_class)]
    ).astype(np.int64)
    return images, labels


# --------------------------------------------------------------------------- #
# Fashion-MNIST and scikit-learn's digits
# --------------------------------------------------------------------------- #


def read_idx(path: str) -> np.ndarray:
    """An idx images (uint8 [N, H, W]) or labels (uint8 [N]) file, gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, np.uint8, count, 8)
    raise UsageError(f"{path} is not an idx images or labels file (magic number {magic})")


def _fashion_mnist_paths(directory: str, set_name: str) -> dict:
    """split -> (images path, labels path) of Fashion-MNIST's idx files in `directory`."""
    paths, missing = {}, []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pair = []
        for kind, suffix in (("images", "idx3"), ("labels", "idx1")):
            base = os.path.join(directory, f"{prefix}-{kind}-{suffix}-ubyte")
            path = next((p for p in (base + ".gz", base) if os.path.isfile(p)), None)
            if path is None:
                missing.append(os.path.basename(base) + "[.gz]")
            pair.append(path)
        paths[split] = tuple(pair)
    if missing:
        raise UsageError(
            f"{set_name} needs Fashion-MNIST's idx files in --fashion_mnist_dir={directory} "
            f"(Debian package dataset-fashion-mnist); missing: {', '.join(missing)}"
        )
    return paths


def _require_scikit_learn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise UsageError(
            "digits needs scikit-learn (its bundled 8x8 digits): "
            f"{sys.executable} -m pip install scikit-learn"
        )


def check_inputs(name: str, fashion_mnist_dir: str) -> None:
    """Raises UsageError if the data `name` is made from is missing."""
    if name in ("fashion_a", "fashion_b", "fashion_c"):
        _fashion_mnist_paths(fashion_mnist_dir, name)
    elif name == "digits":
        _require_scikit_learn()


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape == (size, size):
        return image
    resized = Image.fromarray(image.astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)


def make_fashion(
    name: str,
    rng,
    *,
    classes,
    image_size: int,
    directory: str,
    limit: int,
    per_class_counts: dict = FASHION_PER_CLASS,
):
    data = {
        split: (read_idx(images), read_idx(labels))
        for split, (images, labels) in _fashion_mnist_paths(directory, name).items()
    }
    images, labels = {}, {}
    for split in SPLITS:
        split_images, split_labels = data[split]
        per_class = []
        for original in classes:
            # The full set's selection, then its first `limit`: a limited set is a subset.
            chosen = rng.permutation(np.flatnonzero(split_labels == original))
            chosen = chosen[: _limit(per_class_counts[split], limit)]
            per_class.append([_resize(split_images[i], image_size) for i in chosen])
        images[split], labels[split] = _stack(per_class)
    return ImageSet(
        name,
        tuple(FASHION_CLASSES[c] for c in classes),
        images,
        labels,
        {
            "data": "Fashion-MNIST",
            "directory": directory,
            "fashion_mnist_labels": list(classes),
            "per_class": dict(per_class_counts),
            "resize": "bicubic" if image_size != 28 else None,
        },
    )


def make_digits(rng, *, limit: int, image_size: int = 32) -> ImageSet:
    _require_scikit_learn()
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255, then bicubic upscaling (clipped: bicubic overshoots).
    pixels = digits.images.astype(np.float32) * (255.0 / 16.0)
    images, labels = {}, {}
    per_class = {split: [] for split in SPLITS}
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        num_test = int(round(DIGITS_TEST_FRACTION * len(indices)))
        for split, chosen in (("train", indices[num_test:]), ("test", indices[:num_test])):
            chosen = chosen[: _limit(len(chosen), limit)]
            per_class[split].append([_resize(pixels[i], image_size) for i in chosen])
    for split in SPLITS:
        images[split], labels[split] = _stack(per_class[split])
    return ImageSet(
        "digits",
        DIGIT_CLASSES,
        images,
        labels,
        {
            "data": "sklearn.datasets.load_digits",
            "scikit_learn": sklearn.__version__,
            "test_fraction": DIGITS_TEST_FRACTION,
            "resize": "bicubic",
        },
    )


# --------------------------------------------------------------------------- #
# Generated sets
# --------------------------------------------------------------------------- #


def _ellipse(ax: float, ay: float, points: int = 64) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([ax * np.cos(angles), ay * np.sin(angles)], axis=1)


def _regular_star(points: int, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rectangle(half_width: float, half_height: float) -> np.ndarray:
    w, h = half_width, half_height
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]])


def _shape_outline(kind: str, rng) -> tuple[list[np.ndarray], float]:
    """Polygons (unit coordinates, extent about 1; the first filled, the rest holes) and the
    rotation in degrees."""
    if kind == "circle":
        return [_ellipse(1, 1)], 0.0
    if kind == "ellipse":
        return [_ellipse(1, rng.uniform(0.4, 0.65))], rng.uniform(0, 180)
    if kind == "square":
        return [_rectangle(0.72, 0.72)], rng.uniform(-15, 15)
    if kind == "diamond":
        width = rng.uniform(0.5, 0.75)
        return [np.array([[0, -1], [width, 0], [0, 1], [-width, 0]])], rng.uniform(-15, 15)
    if kind == "triangle":
        return [_regular_star(3, 0.5)[::2]], rng.uniform(0, 120)
    if kind == "cross":
        t, a = rng.uniform(0.18, 0.3), 0.95
        outline = [[t, t], [a, t], [a, -t], [t, -t], [t, -a], [-t, -a], [-t, -t], [-a, -t]]
        outline += [[-a, t], [-t, t], [-t, a], [t, a]]
        return [np.array(outline)], rng.uniform(0, 90)
    if kind == "star":
        return [_regular_star(5, rng.uniform(0.38, 0.5))], rng.uniform(0, 72)
    if kind == "ring":
        inner = rng.uniform(0.5, 0.7)
        return [_ellipse(1, 1), _ellipse(inner, inner)], 0.0
    if kind in ("horizontal_bar", "vertical_bar"):
        angle = rng.uniform(-15, 15) + (90 if kind == "vertical_bar" else 0)
        return [_rectangle(1, rng.uniform(0.15, 0.28))], angle
    raise ValueError(kind)


def shape_image(kind: str, rng, size: int = 32, supersample: int = 4) -> np.ndarray:
    """One uint8 [size, size] image of a shape of class `kind`."""
    from PIL import Image, ImageDraw

    polygons, angle = _shape_outline(kind, rng)
    radius = rng.uniform(0.19, 0.41) * size
    centre = rng.uniform(radius + 1, size - 1 - radius, size=2)
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    big = size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for index, polygon in enumerate(polygons):
        points = (polygon @ rotation.T * radius + centre) * supersample
        draw.polygon([tuple(p) for p in points], fill=255 if index == 0 else 0)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0

    background = rng.uniform(0.1, 0.9)
    contrast = rng.uniform(0.25, 0.6) * rng.choice([-1, 1])
    if not 0 <= background + contrast <= 1:
        contrast = -contrast
    foreground = np.clip(background + contrast, 0, 1)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    gradient = rng.uniform(-0.15, 0.15, size=2)
    back = background + gradient[0] * xs + gradient[1] * ys
    image = back * (1 - alpha) + foreground * alpha
    image = image + rng.normal(0, rng.uniform(0.03, 0.12), (size, size))
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _grating(xs, ys, angle_degrees: float, cycles: float, rng, size: int) -> np.ndarray:
    theta = np.deg2rad(angle_degrees)
    u = xs * np.cos(theta) + ys * np.sin(theta)
    wave = np.sin(2 * np.pi * cycles * u / size + rng.uniform(0, 2 * np.pi))
    sharpness = rng.uniform(0.5, 4.0)  # sine-like ... square-like
    return np.tanh(sharpness * wave) / np.tanh(sharpness)


def _spectral_noise(rng, size: int, amplitude) -> np.ndarray:
    """Gaussian noise with the amplitude spectrum `amplitude(frequency in cycles per image)`."""
    frequencies = np.fft.fftfreq(size) * size
    radius = np.hypot(frequencies[:, None], frequencies[None, :])
    spectrum = rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
    field = np.real(np.fft.ifft2(spectrum * amplitude(radius)))
    return field / (field.std() + 1e-12)


def texture_pattern(kind: str, rng, size: int = 32) -> np.ndarray:
    """A float [size, size] pattern of class `kind`, roughly in [-1, 1]."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "stripes_horizontal":  # bands along x: the intensity varies along y
        return _grating(xs, ys, 90 + rng.uniform(-12, 12), rng.uniform(2, 4.5), rng, size)
    if kind == "stripes_vertical":
        return _grating(xs, ys, rng.uniform(-12, 12), rng.uniform(2, 4.5), rng, size)
    if kind == "stripes_diagonal":
        angle = rng.choice([45, 135]) + rng.uniform(-12, 12)
        return _grating(xs, ys, angle, rng.uniform(2, 4.5), rng, size)
    if kind == "stripes_fine":
        return _grating(xs, ys, rng.uniform(0, 180), rng.uniform(7, 10), rng, size)
    if kind == "checkerboard":
        angle, cycles = rng.uniform(0, 90), rng.uniform(2.5, 5)
        first = _grating(xs, ys, angle, cycles, rng, size)
        return first * _grating(xs, ys, angle + 90, cycles, rng, size)
    if kind == "dots":
        spacing, theta = rng.uniform(6, 10), rng.uniform(0, np.pi / 2)
        u = xs * np.cos(theta) + ys * np.sin(theta) + rng.uniform(0, spacing)
        v = -xs * np.sin(theta) + ys * np.cos(theta) + rng.uniform(0, spacing)
        du = np.mod(u, spacing) - spacing / 2
        dv = np.mod(v, spacing) - spacing / 2
        disc = np.clip(rng.uniform(0.2, 0.35) * spacing - np.hypot(du, dv) + 0.5, 0, 1)
        return (2 * disc - 1) * rng.choice([-1, 1])
    if kind == "concentric_rings":
        centre = rng.uniform(-0.25 * size, 1.25 * size, size=2)
        distance = np.hypot(xs - centre[0], ys - centre[1])
        return np.sin(2 * np.pi * rng.uniform(2.5, 5) * distance / size + rng.uniform(0, 7))
    if kind == "white_noise":
        return np.clip(0.5 * rng.normal(size=(size, size)), -1, 1)
    if kind == "smooth_noise":
        exponent = rng.uniform(1.0, 1.5)  # power spectrum 1 / f^(2 * exponent)
        pattern = _spectral_noise(
            rng, size, lambda f: np.where(f > 0, 1 / np.maximum(f, 1) ** exponent, 0)
        )
        return np.clip(0.5 * pattern, -1, 1)
    if kind == "bandpass_noise":
        peak, width = rng.uniform(5, 8), rng.uniform(0.8, 1.5)
        pattern = _spectral_noise(rng, size, lambda f: np.exp(-0.5 * ((f - peak) / width) ** 2))
        return np.clip(0.5 * pattern, -1, 1)
    raise ValueError(kind)


def texture_image(kind: str, rng, size: int = 32) -> np.ndarray:
    """One uint8 [size, size] image of a texture of class `kind`."""
    pattern = texture_pattern(kind, rng, size)
    image = rng.uniform(0.3, 0.7) + rng.uniform(0.12, 0.35) * pattern
    image = image + rng.normal(0, rng.uniform(0.01, 0.05), (size, size))
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def make_generated(name: str, seed: int, *, limit: int, size: int = 32) -> ImageSet:
    class_names, draw = {
        "shapes": (SHAPE_CLASSES, shape_image),
        "textures": (TEXTURE_CLASSES, texture_image),
    }[name]
    images, labels = {}, {}
    for split in SPLITS:
        count = _limit(GENERATED_PER_CLASS[split], limit)
        per_class = []
        for label, kind in enumerate(class_names):
            # One stream per image: image i is the same whatever --limit_per_class.
            keys = (seed, SET_KEYS[name], SPLIT_KEYS[split], label)
            per_class.append(
                [draw(kind, np.random.default_rng([*keys, i]), size) for i in range(count)]
            )
        images[split], labels[split] = _stack(per_class)
    return ImageSet(
        name,
        class_names,
        images,
        labels,
        {"data": f"generated {name}", "per_class": dict(GENERATED_PER_CLASS)},
    )


def make_set(name: str, seed: int, *, limit: int, fashion_mnist_dir: str) -> ImageSet:
    rng = np.random.default_rng([seed, SET_KEYS[name]])
    if name == "fashion_a":
        return make_fashion(
            name, rng, classes=range(5), image_size=28, directory=fashion_mnist_dir, limit=limit
        )
    if name == "fashion_b":
        return make_fashion(
            name, rng, classes=range(5, 10), image_size=24, directory=fashion_mnist_dir, limit=limit
        )
    if name == "fashion_c":
        return make_fashion(
            name,
            rng,
            classes=range(10),
            image_size=20,
            directory=fashion_mnist_dir,
            limit=limit,
            per_class_counts=FASHION_C_PER_CLASS,
        )
    if name == "digits":
        return make_digits(rng, limit=limit)
    return make_generated(name, seed, limit=limit)


# --------------------------------------------------------------------------- #
# Writing and reading class folders
# --------------------------------------------------------------------------- #


def write_set(image_set: ImageSet, folder: str, info: dict) -> None:
    """Writes the set to `folder` (which must not exist) through `folder`'s .partial sibling."""
    from PIL import Image

    parent, base = os.path.split(os.path.abspath(folder))
    partial = os.path.join(parent, f".{base}.partial")
    if os.path.exists(partial):
        shutil.rmtree(partial)
    folders = class_folders(image_set.class_names)
    for split in SPLITS:
        counts = [0] * len(folders)
        for image, label in zip(image_set.images[split], image_set.labels[split], strict=True):
            class_dir = os.path.join(partial, split, folders[label])
            if counts[label] == 0:
                os.makedirs(class_dir)
            Image.fromarray(image).save(os.path.join(class_dir, f"{counts[label]}.png"))
            counts[label] += 1
    with open(os.path.join(partial, INFO_FILE), "w", encoding="utf-8") as file:
        json.dump(info, file, indent=2, sort_keys=True)
        file.write("\n")
    os.rename(partial, folder)


def read_set(folder: str) -> ImageSet:
    """A set written by `write_set` (or any SPLIT/CLASS/*.png folder of same-size images)."""
    from PIL import Image

    names = sorted(
        entry.name for entry in os.scandir(os.path.join(folder, "train")) if entry.is_dir()
    )
    images, labels = {}, {}
    for split in SPLITS:
        per_class = []
        for name in names:
            class_dir = os.path.join(folder, split, name)
            files = sorted(
                (f for f in os.listdir(class_dir) if f.endswith(".png")),
                key=lambda f: (len(f), f),
            )
            per_class.append(
                [np.asarray(Image.open(os.path.join(class_dir, f)).convert("L")) for f in files]
            )
        images[split], labels[split] = _stack(per_class)
    return ImageSet(
        os.path.basename(folder), tuple(names), images, labels, {"data": f"read from {folder}"}
    )


# --------------------------------------------------------------------------- #
# Raw-pixel k-NN
# --------------------------------------------------------------------------- #


def pixel_knn(
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN on raw pixels.

    Features: the flattened pixels scaled to [0, 1] and L2-normalised, so the dot product is the
    cosine similarity. Each test image's k most similar train images vote for their class with
    weight exp(similarity / T) (the reference's eval_knn); ties go to the lower class index.
    """

    def features(images):
        flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)

    bank, train_labels = features(train_images), np.asarray(train_labels, np.int64)
    queries, test_labels = features(test_images), np.asarray(test_labels, np.int64)
    k = min(k, len(bank))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ bank.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(similarity), num_classes))
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_labels[nearest]), weights)
        correct += int(np.sum(votes.argmax(axis=1) == test_labels[start : start + chunk_size]))
    return 100.0 * correct / len(queries)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _check_flags(flag_values) -> list[str]:
    if not flag_values.output_dir:
        raise UsageError("--output_dir is required")
    names = [name.strip() for name in flag_values.sets if name.strip()]
    if not names:
        raise UsageError(f"--sets is empty; choose from {', '.join(SET_NAMES)}")
    unknown = [name for name in names if name not in SET_KEYS]
    if unknown:
        raise UsageError(
            f"--sets: unknown set{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"choose from {', '.join(SET_NAMES)}"
        )
    if flag_values.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {flag_values.seed}")
    if flag_values.limit_per_class < 0:
        raise UsageError(f"--limit_per_class must be >= 0, got {flag_values.limit_per_class}")
    if flag_values.overwrite and flag_values.skip_existing:
        raise UsageError("pass at most one of --overwrite and --skip_existing")
    if flag_values.nb_knn < 0:
        raise UsageError(f"--nb_knn must be >= 0, got {flag_values.nb_knn}")
    if flag_values.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {flag_values.temperature}")
    return list(dict.fromkeys(names))


def run(flag_values) -> dict:
    names = _check_flags(flag_values)
    output_dir = flag_values.output_dir
    existing = []
    for name in names:
        folder = os.path.join(output_dir, name)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"{folder} exists and is not a folder")
        if os.path.isdir(folder) and os.listdir(folder):
            if not (flag_values.overwrite or flag_values.skip_existing):
                raise UsageError(
                    f"{folder} is not empty; pass --overwrite to replace it "
                    "or --skip_existing to keep it"
                )
            existing.append(name)
    for name in names:  # before anything is written
        if not (name in existing and flag_values.skip_existing):
            check_inputs(name, flag_values.fashion_mnist_dir)

    results = {"output_dir": output_dir, "seed": flag_values.seed, "sets": {}}
    for name in names:
        folder = os.path.join(output_dir, name)
        start = time.perf_counter()
        if name in existing and flag_values.skip_existing:
            image_set, status = read_set(folder), "kept"
        else:
            image_set = make_set(
                name,
                flag_values.seed,
                limit=flag_values.limit_per_class,
                fashion_mnist_dir=flag_values.fashion_mnist_dir,
            )
            status = "replaced" if name in existing else "written"
        made = time.perf_counter()
        if status != "kept":
            os.makedirs(output_dir, exist_ok=True)
            if os.path.isdir(folder):
                shutil.rmtree(folder)  # empty, or replaced with --overwrite
            write_set(
                image_set, folder, image_set.info(flag_values.seed, flag_values.limit_per_class)
            )
        written = time.perf_counter()
        top1 = None
        if flag_values.nb_knn:
            top1 = pixel_knn(
                image_set.images["train"],
                image_set.labels["train"],
                image_set.images["test"],
                image_set.labels["test"],
                k=flag_values.nb_knn,
                temperature=flag_values.temperature,
            )
        results["sets"][name] = {
            "status": status,
            "folder": folder,
            "train": int(len(image_set.labels["train"])),
            "test": int(len(image_set.labels["test"])),
            "classes": len(image_set.class_names),
            "image_size": image_set.image_size,
            "knn_top1": top1,
            "seconds": {
                "make" if status != "kept" else "read": round(made - start, 3),
                "write": round(written - made, 3),
                "knn": round(time.perf_counter() - written, 3),
            },
        }
        print(f"{name}: {status} {folder}", flush=True)
    _print_table(results, flag_values.nb_knn, flag_values.temperature)
    return results


def _print_table(results: dict, k: int, temperature: float) -> None:
    knn_header = f"pixel {k}-NN top-1" if k else "pixel k-NN"
    header = f"{'set':<10} {'train':>6} {'test':>6} {'classes':>7} {'size':>6} {knn_header:>18}"
    print(f"\n{header}   seconds (make or read / write / k-NN)")
    for name, row in results["sets"].items():
        top1 = f"{row['knn_top1']:.2f}%" if row["knn_top1"] is not None else "-"
        seconds = " / ".join(f"{value:.1f}" for value in row["seconds"].values())
        size = f"{row['image_size']}px"
        print(
            f"{name:<10} {row['train']:>6} {row['test']:>6} {row['classes']:>7} {size:>6} "
            f"{top1:>18}   {seconds}"
        )
    if k:
        print(f"(cosine on raw pixels in [0, 1], exp(similarity / {temperature}) weighted votes)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(flags.FLAGS)
    except UsageError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
