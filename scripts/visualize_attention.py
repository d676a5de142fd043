"""Self-attention maps of the last block of a run's ViT, one PNG per head.

    python scripts/visualize_attention.py --image=photo.jpg --checkpoint=runs/dino
        --output_dir=attention [--threshold=0.6] [--image_size=480,480] [--which=teacher]

Writes img.png (the image as the network saw it), attn-head{i}.png (the CLS attention of head i,
upsampled by the patch size) and, with --threshold, mask-head{i}.png (the image with the
smallest set of patches holding that fraction of head i's attention highlighted).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    flags.DEFINE_string("image", None, "Image file (JPEG or PNG).", flag_values=flag_values)
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Run directory, its checkpoints directory or a checkpoint prefix.",
        flag_values=flag_values,
    )
    flags.DEFINE_string("output_dir", ".", "Where the PNGs are written.", flag_values=flag_values)
    flags.DEFINE_float(
        "threshold", 0.6, "Attention mass kept by the masks; 0: no masks.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "image_size",
        ["480", "480"],
        "Resize to H,W (the reference's default "
        "480,480), or the shorter side to S with one number; 0 keeps the image's "
        "size. Then cropped to multiples of the patch size.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "which", "teacher", ["teacher", "student"], "Network to visualise.", flag_values=flag_values
    )
    flags.mark_flags_as_required(["image", "checkpoint"], flag_values=flag_values)


def run(flag_values) -> list[str]:
    from dino_keras.evaluation import attention
    from dino_keras.run_loading import load_backbone

    try:
        size = [int(value) for value in flag_values.image_size]
    except ValueError:
        raise attention.AttentionError(
            f"--image_size takes integers, got {','.join(flag_values.image_size)}"
        ) from None
    if size == [0]:
        size = []
    image = attention.load_image(flag_values.image)
    loaded = load_backbone(flag_values.checkpoint, which=flag_values.which)
    if not loaded.config.is_vit:
        raise attention.AttentionError(
            f"{loaded.config.arch} has no self-attention; attention maps need a ViT run"
        )
    prepared = attention.prepare_image(image, loaded.config.patch_size, size)
    paths = attention.save_attention_pngs(
        loaded.backbone, prepared, flag_values.output_dir, flag_values.threshold or None
    )
    print(
        f"Wrote {len(paths)} images ({prepared.shape[0]}x{prepared.shape[1]}) to "
        f"{flag_values.output_dir}"
    )
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.evaluation.attention import AttentionError
    from dino_keras.run_loading import RunLoadingError

    try:
        run(flags.FLAGS)
    except (AttentionError, RunLoadingError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
