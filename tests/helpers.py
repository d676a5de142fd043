"""Shared by the tests: the tiny configuration (2 blocks, width 32) and the layer test."""

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


def run_layer_test(layer_class, init_kwargs: dict, input_shape: tuple, save_dir,
                   *, bfloat16_atol: float = 0.1):
    """keras-hub's run_layer_test, for a dino_keras layer (or backbone model).

    Checks: build and call; every constructor argument echoed by `get_config`, and
    `from_config` rebuilding a layer whose config and outputs (same weights) equal the original's;
    traced and XLA-compiled calls equal to the eager one; a `.keras` save and load of a model
    holding the layer, with equal outputs; and a build under the `mixed_bfloat16` global policy
    whose outputs are bfloat16 and close to float32's with the same weights.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    inputs = np.random.default_rng(0).normal(size=input_shape).astype(np.float32)
    layer = layer_class(**init_kwargs)
    outputs = np.asarray(layer(inputs))
    assert np.isfinite(outputs).all()

    config = layer.get_config()
    for name, value in init_kwargs.items():
        assert config[name] == value, f"{layer_class.__name__}.get_config()[{name!r}]"
    clone = layer_class.from_config(config)
    assert clone.get_config() == config
    clone(inputs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(inputs)), outputs, rtol=1e-5, atol=1e-6)

    for jit_compile in (False, True):
        traced = tf.function(lambda x: layer(x), jit_compile=jit_compile)  # noqa: B023
        np.testing.assert_allclose(traced(inputs).numpy(), outputs, rtol=1e-4, atol=1e-5)

    model = keras.Sequential([keras.Input(input_shape[1:]), layer])
    path = str(save_dir / f"{layer_class.__name__}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(inputs)), outputs, rtol=1e-5, atol=1e-6)

    # Mixed precision as training sets it: the global policy, which sub-layers follow too.
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        low = layer_class.from_config({key: value for key, value in config.items()
                                       if key != "dtype"})
        low(inputs)
        low.set_weights(layer.get_weights())
        low_outputs = low(inputs)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    assert low_outputs.dtype == "bfloat16", low_outputs.dtype
    np.testing.assert_allclose(np.asarray(ops_to_float(low_outputs)), outputs, atol=bfloat16_atol)
    return layer


def ops_to_float(x):
    import keras

    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
