"""SavedModel export of a ResNet-50 backbone (no attention output, pooled embedding)."""

import numpy as np
import pytest
import tensorflow as tf

from dino_keras.data import augment
from dino_keras.export import export_backbone, load_export


@pytest.mark.slow
def test_resnet50_export_matches_keras(tmp_path):
    from dino_keras.models.resnet import resnet50  # building it takes a few seconds

    backbone = resnet50()
    path = export_backbone(backbone, str(tmp_path / "resnet"), image_size=64)
    loaded, metadata, _ = load_export(path)
    assert metadata["architecture"]["is_vit"] is False
    assert "attention" not in metadata["signatures"]["serving_default"]["outputs"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 48, 40, 3)).astype(np.float32)
    out = loaded.signatures["serving_default"](images=tf.constant(pixels))
    images = augment.normalize(pixels / 255.0)
    # Pooled features of an untrained ResNet reach ~300: graph and eager convolutions agree
    # to ~1e-6 relative.
    np.testing.assert_allclose(
        out["embedding"].numpy(), backbone(images).numpy(), rtol=1e-4, atol=1e-3
    )
    assert out["patch_tokens"].shape == (2, 2 * 2, 2048)
    assert set(out) == {"embedding", "patch_tokens"}
