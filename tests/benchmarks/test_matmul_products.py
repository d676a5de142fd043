"""The step's matrix products (shapes and counts by hand, against the analytic FLOP count), and
`benchmarks/compare_matmuls.py` as a command."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks.benchmarking import dino_flops_per_image, missing_reference_modules
from benchmarks.matmul_products import Product, kind_totals, step_products
from tests.helpers import REPO_ROOT, tiny_config

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "compare_matmuls.py")


def test_products_of_the_tiny_step_by_hand():
    # 32 wide, 2 blocks, 2 heads, 4 px patches; 2 x 28 px (49 patches + CLS) and 2 x 12 px
    # (9 + CLS) crops; batch 8.
    config = tiny_config(head_hidden_dim=64, head_bottleneck_dim=16, out_dim=128)
    products = {product.name: product for product in step_products(config)}
    # Teacher and student forward on the 16 global crops, in each of the 2 blocks.
    assert products["qkv global"] == Product("qkv global", "forward", 0, 800, 32, 96, 4)
    assert products["fc2 global dX"] == Product(
        "fc2 global dX", "input gradient", 0, 800, 32, 128, 2, transpose_b=True)
    assert products["fc1 local dW"] == Product(
        "fc1 local dW", "weight gradient", 0, 32, 160, 128, 2, transpose_a=True)
    assert products["qkv local"].count == 2  # the student only
    # 16 crops x 2 heads; forward in both networks plus one backward product of each form.
    assert products["attention scores global"] == Product(
        "attention scores global", "attention", 32, 50, 16, 50, 6, transpose_b=True)
    assert products["attention dv, dk local"] == Product(
        "attention dv, dk local", "attention", 32, 10, 10, 16, 4, transpose_a=True)
    assert products["patch embedding global"].m == 16 * 49
    assert "patch embedding global dX" not in products  # the images need no gradient
    assert products["head 3 student"] == Product("head 3 student", "forward", 0, 32, 16, 128, 1)
    assert products["head 3 teacher"].m == 16
    assert "head 3 teacher dW" not in products


@pytest.mark.parametrize("recipe_overrides", [
    {},
    dict(local_crops_number=0),
    dict(embed_dim=48, num_heads=3, depth=3, global_crops_size=32, local_crops_size=16,
         local_crops_number=3, batch_size_per_gpu=4),
])
def test_products_add_up_to_the_analytic_flops(recipe_overrides):
    # The analytic count takes the backward pass as twice the student's forward; the products
    # lack only the patch embedding's input gradient, which nothing needs.
    config = tiny_config(head_hidden_dim=64, head_bottleneck_dim=16, **recipe_overrides)
    products = step_products(config)
    batch, patch = config.batch_size_per_gpu, config.patch_size
    width = config.vit_dims[0]
    patch_forward = 0
    for images, size in ((2, config.global_crops_size),
                         (config.local_crops_number, config.local_crops_size)):
        patch_forward += 2 * batch * images * (size // patch) ** 2 * patch * patch * 3 * width
    expected = dino_flops_per_image(config)["total"] * batch - patch_forward
    assert sum(product.flops * product.count for product in products) == expected


def test_kind_totals_weigh_each_product_by_its_count():
    products = [Product("a", "forward", 0, 1, 1, 1, 3), Product("b", "attention", 2, 1, 1, 1, 2),
                Product("c", "forward", 0, 1, 1, 1, 1)]
    totals = kind_totals(products, [0.5, 0.25, 2.0])
    assert totals == {"forward": 3.5, "input gradient": 0.0, "weight gradient": 0.0,
                      "attention": 0.5, "all": 4.0}


@pytest.mark.skipif(bool(missing_reference_modules(("torch",))), reason="torch is not installed")
def test_short_comparison_times_every_product_with_both_libraries():
    result = subprocess.run([sys.executable, SCRIPT, "--short"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(\S.*?)\s+(?:\d+ x )?\d+x\d+x\d+\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                      r"([\d.]+)x$", result.stdout, re.MULTILINE)
    from benchmarks.benchmarking import BenchmarkConfig

    config = BenchmarkConfig(recipe="demo", short=True, cases=("step",)).resolved()
    names = [product.name for product in step_products(config.train_config())]
    assert [row[0] for row in rows] == names, result.stdout
    for _, _, xla, torch, ratio in rows:
        assert float(xla) > 0 and float(torch) > 0
        assert float(ratio) == pytest.approx(float(xla) / float(torch), rel=0.06, abs=0.006)
    totals = dict(re.findall(r"^  (\S.*?)\s+XLA\s+([\d.]+) ms", result.stdout, re.MULTILINE))
    assert set(totals) == {"forward", "input gradient", "weight gradient", "attention", "all"}
    parts = sum(float(value) for kind, value in totals.items() if kind != "all")
    assert float(totals["all"]) == pytest.approx(parts, abs=0.03)
    assert "XLA (TensorFlow " in result.stdout and "against PyTorch " in result.stdout


def test_bad_flag_is_refused_naming_it():
    result = subprocess.run([sys.executable, SCRIPT, "--intra_op_threads=-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: --intra_op_threads: must be >= 0" in result.stderr, result.stderr
