"""Self-attention maps of a ViT backbone: the reference's `visualize_attention`, as PNGs and as
TensorBoard image summaries.

For each head of the last block the attention of the CLS query to the patches is a map on the
h0 x w0 patch grid; it is upsampled (nearest neighbour, by the patch size) to the image. The
thresholded mask keeps, per head, the smallest set of patches that holds `threshold` of the
head's attention mass (the reference's `--threshold`, e.g. 0.6).
"""

from __future__ import annotations

import io

import keras
import numpy as np
import tensorflow as tf

from dino_keras import run_dir
from dino_keras.data import augment

# Colours of the mask overlays, one per head (cycled).
_MASK_COLOURS = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (170, 110, 40),
    ],
    np.float32,
)
# Key points of the map colouring (dark blue -> teal -> yellow), interpolated linearly.
_COLOUR_STOPS = np.array(
    [
        (0.0, 68, 1, 84),
        (0.25, 59, 82, 139),
        (0.5, 33, 145, 140),
        (0.75, 94, 201, 98),
        (1.0, 253, 231, 37),
    ],
    np.float32,
)


class AttentionError(ValueError):
    """An image or a backbone that attention maps cannot be made for."""


# --------------------------------------------------------------------------- #
# Maps and masks (numpy)
# --------------------------------------------------------------------------- #


def cls_attention(backbone, images) -> np.ndarray:
    """Last-block attention of the CLS query to the patches: [B, heads, h0, w0].

    `images`: normalised float32 [B, H, W, 3] with H and W multiples of the patch size.
    """
    if not hasattr(backbone, "get_last_selfattention"):
        raise AttentionError(
            f"attention maps need a ViT backbone; {backbone.name} has no self-attention"
        )
    images = tf.convert_to_tensor(images, tf.float32)
    patch = backbone.patch_size
    height, width = images.shape[1], images.shape[2]
    if height % patch or width % patch:
        raise AttentionError(
            f"image size {height}x{width} is not a multiple of the patch size {patch}"
        )
    attention = backbone.get_last_selfattention(images)[:, :, 0, 1:]
    attention = np.asarray(keras.ops.convert_to_numpy(attention), np.float32)
    return attention.reshape(
        attention.shape[0], attention.shape[1], height // patch, width // patch
    )


def threshold_mask(attention: np.ndarray, threshold: float) -> np.ndarray:
    """Per map (last two axes), the smallest set of cells holding `threshold` of its mass.

    As the reference: sort ascending, normalise, keep the cells whose cumulative mass exceeds
    1 - threshold.
    """
    if not 0.0 < threshold <= 1.0:
        raise AttentionError(f"--threshold must be in (0, 1], got {threshold}")
    shape = attention.shape
    flat = attention.reshape(-1, shape[-2] * shape[-1]).astype(np.float64)
    order = np.argsort(flat, axis=-1, kind="stable")
    ascending = np.take_along_axis(flat, order, axis=-1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=-1, keepdims=True), axis=-1)
    keep_sorted = cumulative > 1.0 - threshold
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask.reshape(shape)


def upsample(maps: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by `factor`."""
    return np.repeat(np.repeat(maps, factor, axis=-2), factor, axis=-1)


def colorize(maps: np.ndarray) -> np.ndarray:
    """Maps [..., H, W] -> uint8 RGB [..., H, W, 3], each map scaled to its own min..max."""
    maps = np.asarray(maps, np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    high = maps.max(axis=(-2, -1), keepdims=True)
    scaled = (maps - low) / np.maximum(high - low, 1e-12)
    channels = [np.interp(scaled, _COLOUR_STOPS[:, 0], _COLOUR_STOPS[:, c]) for c in (1, 2, 3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """One overlay per mask: the image [H, W, 3] uint8 with the masked pixels tinted in the
    head's colour and the others darkened. masks: bool [heads, H, W] -> uint8 [heads, H, W, 3]."""
    image = image.astype(np.float32)
    overlays = []
    for head, mask in enumerate(masks):
        colour = _MASK_COLOURS[head % len(_MASK_COLOURS)]
        tinted = (1 - alpha) * image + alpha * colour
        overlays.append(np.where(mask[..., None], tinted, 0.4 * image))
    return np.clip(np.round(np.stack(overlays)), 0, 255).astype(np.uint8)


def denormalize(images) -> np.ndarray:
    """Network inputs (ImageNet-normalised) -> uint8 RGB."""
    images = np.asarray(images, np.float32) * np.array(augment.IMAGENET_STD, np.float32)
    images = images + np.array(augment.IMAGENET_MEAN, np.float32)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def to_network_input(images) -> np.ndarray:
    """uint8 RGB images -> normalised float32 network inputs."""
    return np.asarray(augment.normalize(np.asarray(images, np.float32) / 255.0), np.float32)


def attention_visuals(backbone, images_uint8: np.ndarray, threshold: float) -> dict:
    """Everything drawn for a batch of uint8 images [B, H, W, 3] (H, W multiples of the patch):
    "attention" [B, heads, h0, w0], "maps" uint8 [B, heads, H, W, 3] (coloured, upsampled),
    "masks" bool [B, heads, H, W] and "overlays" uint8 [B, heads, H, W, 3]."""
    attention = cls_attention(backbone, to_network_input(images_uint8))
    patch = backbone.patch_size
    masks = upsample(threshold_mask(attention, threshold), patch)
    return {
        "attention": attention,
        "maps": colorize(upsample(attention, patch)),
        "masks": masks,
        "overlays": np.stack(
            [overlay_masks(image, mask) for image, mask in zip(images_uint8, masks, strict=True)]
        ),
    }


# --------------------------------------------------------------------------- #
# Image files (any path `tf.io.gfile` reads and writes)
# --------------------------------------------------------------------------- #


def load_image(path: str) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; `AttentionError` naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not run_dir.is_file(path):
        raise AttentionError(f"image {path} does not exist")
    try:
        with Image.open(io.BytesIO(run_dir.read_bytes(path))) as image:
            image.load()
            return np.asarray(image.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, tf.errors.OpError) as error:
        raise AttentionError(
            f"cannot read image {path} (corrupt or not an image): {error}"
        ) from error


def prepare_image(image: np.ndarray, patch_size: int, image_size=()) -> np.ndarray:
    """Resize as the reference's script does, then crop (top-left) to multiples of the patch.

    `image_size`: () keeps the image's size; (S,) resizes the shorter side to S; (H, W) resizes
    to exactly H x W (the reference's default is (480, 480)). Bilinear, antialiased.
    """
    height, width = image.shape[:2]
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) == 1:
        scale = image_size[0] / min(height, width)
        size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
    elif len(image_size) == 2:
        size = image_size
    elif not image_size:
        size = (height, width)
    else:
        raise AttentionError(f"--image_size takes one or two numbers, got {list(image_size)}")
    if min(size) <= 0:
        raise AttentionError(f"--image_size must be positive, got {list(image_size)}")
    if size != (height, width):
        resized = tf.image.resize(image.astype(np.float32), size, method="bilinear", antialias=True)
        image = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
    crop_height, crop_width = size[0] - size[0] % patch_size, size[1] - size[1] % patch_size
    if crop_height == 0 or crop_width == 0:
        raise AttentionError(
            f"image of {size[0]}x{size[1]} pixels is smaller than one "
            f"{patch_size}x{patch_size} patch"
        )
    return image[:crop_height, :crop_width]


def _write_png(path: str, array: np.ndarray) -> str:
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="PNG")
    return run_dir.write_atomically(path, encoded.getvalue())


def save_attention_pngs(
    backbone, image: np.ndarray, output_dir: str, threshold: float | None = 0.6
) -> list[str]:
    """Write img.png, attn-head{i}.png per head and (with a threshold) mask-head{i}.png per head
    for one prepared uint8 image [H, W, 3]; returns the paths."""
    visuals = attention_visuals(backbone, image[None], threshold or 1.0)
    run_dir.makedirs(output_dir)
    paths = [_write_png(run_dir.join(output_dir, "img.png"), image)]
    for head, coloured in enumerate(visuals["maps"][0]):
        paths.append(_write_png(run_dir.join(output_dir, f"attn-head{head}.png"), coloured))
    if threshold:
        for head, overlay in enumerate(visuals["overlays"][0]):
            paths.append(_write_png(run_dir.join(output_dir, f"mask-head{head}.png"), overlay))
    return paths


# --------------------------------------------------------------------------- #
# TensorBoard
# --------------------------------------------------------------------------- #


class AttentionImages(keras.callbacks.Callback):
    """TensorBoard image summaries of the attention maps of fixed evaluation images.

    Written before the first epoch of a fresh run (step 0) and after every `every`-th
    epoch (step = epochs completed), to the event files in `run_log_dir` (e.g.
    `<output_dir>/tensorboard`, beside the run's scalars). Per image i:
    ``attention/image_{i}``: the input then one coloured map per head; ``attention_mask/image_{i}``:
    one thresholded-mask overlay per head.

    Args:
        images: uint8 RGB [N, H, W, 3], or float32 network inputs (ImageNet-normalised, as
            `build_eval_dataset` yields them); H and W multiples of the patch size.
        run_log_dir: directory of the TensorBoard event files.
        every: epochs between summaries (>= 1).
        threshold: mass kept by the masks.
        get_backbone: model -> ViT backbone; default: the `DinoTrainer`'s teacher backbone.
    """

    def __init__(
        self, images, run_log_dir: str, every: int = 1, *, threshold: float = 0.6, get_backbone=None
    ):
        super().__init__()
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise AttentionError(f"images must be [N, H, W, 3], got shape {images.shape}")
        if every < 1:
            raise AttentionError(f"every must be >= 1, got {every}")
        self.images = images if images.dtype == np.uint8 else denormalize(images)
        self.run_log_dir = run_log_dir
        self.every = every
        self.threshold = threshold
        self.get_backbone = get_backbone or (lambda model: model.teacher.backbone)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.run_log_dir)
        return self._writer

    def write(self, backbone, step: int) -> None:
        visuals = attention_visuals(backbone, self.images, self.threshold)
        heads = visuals["maps"].shape[1]
        with self.writer.as_default(step=step):
            for i, image in enumerate(self.images):
                maps = np.concatenate([image[None], visuals["maps"][i]], axis=0)
                tf.summary.image(
                    f"attention/image_{i}",
                    maps,
                    max_outputs=heads + 1,
                    description="input, then the last block's CLS attention of each head",
                )
                tf.summary.image(
                    f"attention_mask/image_{i}",
                    visuals["overlays"][i],
                    max_outputs=heads,
                    description=f"per head, the patches holding {self.threshold} "
                    "of the attention mass",
                )
        self.writer.flush()

    def on_epoch_begin(self, epoch, logs=None):
        # Keras 3 does not pass `initial_epoch` to callbacks: the first epoch tells a fresh
        # run (epoch 0) from a resumed one.
        if epoch == 0:
            self.write(self.get_backbone(self.model), 0)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self.write(self.get_backbone(self.model), epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
