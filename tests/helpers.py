"""Tiny configurations shared by the tests (2 blocks, width 32)."""

from dino_keras.config import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        arch="vit_tiny",
        embed_dim=32,
        depth=2,
        num_heads=2,
        patch_size=4,
        global_crops_size=28,
        local_crops_size=12,
        local_crops_number=2,
        out_dim=64,
        batch_size_per_gpu=8,
        epochs=2,
        warmup_epochs=1,
        drop_path_rate=0.0,
        verbose=0,
    )
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config
