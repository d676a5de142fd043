"""Attention maps: thresholding, PNG files, and TensorBoard image summaries."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from dino_keras.evaluation import attention
from dino_keras.evaluation.attention import AttentionError, AttentionImages
from dino_keras.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def vit():
    model = VisionTransformer(image_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model(np.zeros((1, 28, 28, 3), np.float32))
    return model


def test_threshold_keeps_the_smallest_set_holding_the_mass():
    maps = np.array(
        [
            [[0.5, 0.1], [0.3, 0.1]],  # 0.5 + 0.3 >= 0.6
            [[0.25, 0.25], [0.25, 0.25]],
        ]
    )  # uniform: ceil(0.6 * 4) = 3 cells
    mask = attention.threshold_mask(maps, 0.6)
    np.testing.assert_array_equal(mask[0], [[True, False], [True, False]])
    assert mask[1].sum() == 3
    # Exactly half the mass in one cell: that cell alone holds 0.5.
    np.testing.assert_array_equal(
        attention.threshold_mask(maps[:1], 0.5)[0], [[True, False], [False, False]]
    )
    assert attention.threshold_mask(maps, 1.0).all()
    with pytest.raises(AttentionError, match="threshold"):
        attention.threshold_mask(maps, 0.0)


def test_upsample_is_nearest_by_the_patch_size():
    maps = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    up = attention.upsample(maps, 4)
    assert up.shape == (1, 8, 12)
    np.testing.assert_array_equal(up[0, :4, :4], 0.0)
    np.testing.assert_array_equal(up[0, 4:, 8:], 5.0)


def test_cls_attention_is_the_last_blocks_cls_row(vit):
    images = np.random.default_rng(0).normal(size=(2, 28, 36, 3)).astype(np.float32)
    maps = attention.cls_attention(vit, images)
    assert maps.shape == (2, 2, 7, 9)
    full = vit.get_last_selfattention(images).numpy()
    np.testing.assert_allclose(maps.reshape(2, 2, -1), full[:, :, 0, 1:], rtol=1e-6)
    with pytest.raises(AttentionError, match="multiple of the patch"):
        attention.cls_attention(vit, images[:, :27])


def test_prepare_image_resizes_then_crops_to_patch_multiples():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert attention.prepare_image(image, 4, ()).shape == (48, 68, 3)
    assert attention.prepare_image(image, 4, (30, 41)).shape == (28, 40, 3)
    assert attention.prepare_image(image, 4, (25,)).shape == (24, 32, 3)  # 25 x 35
    with pytest.raises(AttentionError, match="smaller than one"):
        attention.prepare_image(image, 64, ())


def test_pngs_per_head_with_the_image_size(vit, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8)
    paths = attention.save_attention_pngs(vit, image, str(tmp_path / "out"), threshold=0.6)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == [
        "attn-head0.png",
        "attn-head1.png",
        "img.png",
        "mask-head0.png",
        "mask-head1.png",
    ]
    assert sorted(os.listdir(tmp_path / "out")) == names
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (40, 28)  # PIL: (width, height)
    no_masks = attention.save_attention_pngs(vit, image, str(tmp_path / "maps"), threshold=None)
    assert len(no_masks) == 3


def test_unreadable_images_give_errors_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(AttentionError, match="corrupt.jpg"):
        attention.load_image(str(corrupt))
    with pytest.raises(AttentionError, match="does not exist"):
        attention.load_image(str(tmp_path / "missing.png"))


def read_image_summaries(log_dir):
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    summaries = {}
    for tag in accumulator.Tags()["tensors"]:
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images"
        summaries[tag] = {
            event.step: tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)
        }
    return summaries


def test_attention_images_callback_writes_image_summaries_during_fit(vit, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    callback = AttentionImages(
        images, str(tmp_path / "tensorboard"), every=2, get_backbone=lambda model: vit
    )
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    data = np.zeros((4, 3), np.float32), np.zeros((4, 1), np.float32)
    model.fit(*data, epochs=4, verbose=0, callbacks=[callback])

    summaries = read_image_summaries(tmp_path / "tensorboard")
    assert sorted(summaries) == [
        "attention/image_0",
        "attention/image_1",
        "attention_mask/image_0",
        "attention_mask/image_1",
    ]
    for tag, by_step in summaries.items():
        assert sorted(by_step) == [0, 2, 4]  # before training, then every 2 epochs
        # An image summary tensor is [width, height, png_1, ..., png_n] as strings.
        pngs = by_step[2][2:]
        assert len(pngs) == (3 if tag.startswith("attention/") else 2)  # input + heads / heads
        decoded = tf.io.decode_png(pngs[-1]).numpy()
        assert decoded.shape == (28, 28, 3)
    first_input = tf.io.decode_png(summaries["attention/image_1"][0][2]).numpy()
    np.testing.assert_array_equal(first_input, images[1])


def test_attention_images_accepts_normalised_inputs_and_skips_the_start_on_resume(vit, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (1, 28, 28, 3), dtype=np.uint8)
    callback = AttentionImages(
        attention.to_network_input(pixels), str(tmp_path), every=1, get_backbone=lambda model: vit
    )
    np.testing.assert_array_equal(callback.images, pixels)
    callback.set_model(object())
    callback.on_epoch_begin(3)  # a resumed run: no "before training" summary
    callback.on_epoch_end(3)
    callback.on_train_end()
    assert {step for by_step in read_image_summaries(tmp_path).values() for step in by_step} == {4}
    with pytest.raises(AttentionError, match="every"):
        AttentionImages(pixels, str(tmp_path), every=0)
