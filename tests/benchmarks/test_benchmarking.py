"""benchmarks/benchmarking.py: the analytic FLOP count against hand-computed cases, flag checks."""

import pytest

from benchmarks import benchmarking
from benchmarks.benchmarking import (
    BenchmarkConfig,
    BenchmarkError,
    dino_flops_per_image,
    head_forward_flops,
    vit_forward_flops,
)
from dino_keras.config import TrainConfig


def test_vit_forward_flops_small_case_by_hand():
    # 8 px image, 4 px patches: 2 x 2 = 4 patches + CLS = 5 tokens, width 8, one block.
    patch_embedding = 4 * (4 * 4 * 3) * 8  # 4 patches, 48 inputs, 8 outputs: 1536
    qkv = 5 * 8 * 24  # 960
    scores_and_weighted_sum = 2 * (5 * 5 * 8)  # 400
    projection = 5 * 8 * 8  # 320
    mlp = 5 * 8 * 32 + 5 * 32 * 8  # 2560
    multiply_adds = patch_embedding + qkv + scores_and_weighted_sum + projection + mlp
    assert multiply_adds == 5776
    assert vit_forward_flops(8, 4, 8, 1) == 2 * 5776
    assert vit_forward_flops(8, 4, 8, 3) == 2 * (1536 + 3 * 4240)


def test_head_forward_flops_by_hand():
    # 8 -> 16 -> 16 -> 4 (MLP), 4 -> 10 (weight-normed last layer).
    assert head_forward_flops(8, 16, 4, 10) == 2 * (8 * 16 + 16 * 16 + 16 * 4 + 4 * 10)
    assert head_forward_flops(8, 16, 4, 10, nlayers=1) == 2 * (8 * 4 + 4 * 10)


def test_dino_flops_per_image_by_hand():
    config = TrainConfig(
        arch="vit_tiny",
        embed_dim=8,
        depth=1,
        num_heads=2,
        patch_size=4,
        global_crops_size=8,
        local_crops_size=4,
        local_crops_number=2,
        out_dim=10,
        head_hidden_dim=16,
        head_bottleneck_dim=4,
    )
    config.validate()
    head = 2 * 488
    global_crop = 2 * 5776 + head  # the small case above
    # 4 px local crop: 1 patch + CLS = 2 tokens.
    local_backbone = 384 + 2 * 8 * 24 + 2 * (2 * 2 * 8) + 2 * 8 * 8 + 2 * 2 * 8 * 32
    local_crop = 2 * local_backbone + head
    flops = dino_flops_per_image(config)
    assert flops["teacher_forward"] == 2 * global_crop == 25056
    assert flops["student_forward"] == 2 * global_crop + 2 * local_crop == 34944
    assert flops["backward"] == 2 * flops["student_forward"]
    assert flops["total"] == 25056 + 3 * 34944


def test_paper_recipe_magnitude():
    # ViT-S/16: about 4.6 GMAC per 224 px image (the published 4.6 GFLOPs count MACs).
    flops = dino_flops_per_image(BenchmarkConfig(recipe="paper").train_config())
    assert 4.5e9 < vit_forward_flops(224, 16, 384, 12) / 2 < 4.7e9
    assert 1.0e11 < flops["total"] < 1.3e11


def test_resnet_is_refused():
    with pytest.raises(BenchmarkError, match="--arch=resnet50"):
        dino_flops_per_image(TrainConfig(arch="resnet50"))


def test_config_resolution_and_validation():
    config = BenchmarkConfig(cases=("fit", "step"), short=True).resolved()
    assert config.cases == ("matmul_peak", "step", "fit")
    assert (config.steps, config.warmup, config.num_images) == (3, 2, 16)
    assert BenchmarkConfig(cases=("pipeline",)).resolved().cases == ("pipeline",)
    demo = BenchmarkConfig(recipe="demo").resolved()
    assert demo.train_config().embed_dim == 64 and demo.num_images == 256
    # Loader processes: the recipe's (paper: the reference's 2 workers; demo.cfg: none), 1 for
    # --short, or the flag's.
    assert [BenchmarkConfig(**kwargs).resolved().train_config().num_workers for kwargs in (
        {}, dict(recipe="demo"), dict(short=True), dict(num_workers=3))] == [2, 0, 1, 3]
    for kwargs, flag in (
        (dict(recipe="imagenet"), "--recipe"),
        (dict(precision="mixed_float16"), "--precision"),
        (dict(cases=("step", "nope")), "--cases"),
        (dict(cases=("step", "step")), "--cases"),
        (dict(steps=0), "--steps"),
        (dict(num_images=4), "--num_images"),
        (dict(matmul_seconds=0.0), "--matmul_seconds"),
        (dict(num_workers=-1), "--num_workers"),
    ):
        with pytest.raises(BenchmarkError, match=flag):
            BenchmarkConfig(**kwargs).resolved()


def test_table_names_the_bound():
    common = dict(recipe="paper", precision="float32", short=False, batch_size=8)
    records = [
        dict(
            case="matmul_peak",
            matrix_size=64,
            peak_gflops_per_second=100.0,
            float32_graph_gflops_per_second=100.0,
            float32_xla_gflops_per_second=90.0,
            **common,
        ),
        dict(case="step", images_per_second=5.0, compile_seconds=30.0, mfu=0.4, **common),
        dict(case="pipeline", images_per_second=80.0, **common),
    ]
    table = benchmarking.format_table(records)
    assert "Bound: the training step (5.00 images/s" in table
    assert "float32 graph 100.0, float32 xla 90.0" in table
