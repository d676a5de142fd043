"""The matrix products of a DINO training step (`step_products`), and their timing under XLA and
under PyTorch, for `benchmarks/compare_matmuls.py`.

`step_products` lists the products that one step's mathematics needs: the ViT's dense layers
(qkv, proj, fc1, fc2) and patch embedding (a strided convolution in both steps, listed as
the matrix product it amounts to), forward on the teacher's and the student's crops and,
for the student, the input gradient and the weight gradient (no input gradient for the patch
embedding, whose input is the image); the attention's batched products, forward and backward;
the DINO head's layers. `time_with_xla` times each compiled by XLA, as in the step: one compiled
call making several products of that shape on different inputs, so that the call's launch cost
is shared; `time_with_torch` with `torch.matmul`, as the reference's step runs it. Each is
timed alone: inside the compiled step XLA chooses layouts and threads for the whole program,
so a product can take longer or shorter there (`benchmarks/profile_step.py` measures the step
itself).
"""

from __future__ import annotations

import dataclasses
import math
import time

from benchmarks.benchmarking import BenchmarkError

# Inputs of one compiled call stay under this size: the paper head's last layer has 16.8M
# weights.
_MAX_INPUT_BYTES = 256 * 2**20
PRODUCTS_PER_CALL = 20
_ROUNDS = 5
KINDS = ("forward", "input gradient", "weight gradient", "attention")


@dataclasses.dataclass(frozen=True)
class Product:
    """`count` products per step of a [batch x] m x k by k x n matrix product.

    `transpose_a`: the left operand is stored k x m (a weight gradient, X^T dY, contracts its
    rows); `transpose_b`: the right one is stored n x k (an input gradient, dY W^T).
    """

    name: str
    kind: str
    batch: int
    m: int
    k: int
    n: int
    count: int
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def flops(self) -> int:
        return 2 * max(self.batch, 1) * self.m * self.k * self.n

    @property
    def shape(self) -> str:
        batch = f"{self.batch} x " if self.batch else ""
        return f"{batch}{self.m}x{self.k}x{self.n}"

    def operand_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lead = (self.batch,) if self.batch else ()
        a = (self.k, self.m) if self.transpose_a else (self.m, self.k)
        b = (self.n, self.k) if self.transpose_b else (self.k, self.n)
        return lead + a, lead + b


def _dense(name: str, rows: int, d_in: int, d_out: int, forwards: int, backward: bool):
    """A dense layer's forward products and, with `backward`, its two gradient products."""
    products = [Product(name, "forward", 0, rows, d_in, d_out, forwards)]
    if backward:
        products += [
            Product(f"{name} dX", "input gradient", 0, rows, d_out, d_in, 1, transpose_b=True),
            Product(f"{name} dW", "weight gradient", 0, d_in, rows, d_out, 1, transpose_a=True),
        ]
    return products


def step_products(config) -> list[Product]:
    """The matrix products of one training step of a ViT recipe (a `TrainConfig`)."""
    if not config.is_vit:
        raise BenchmarkError(
            f"--arch={config.arch}: the products are listed for ViTs only")
    width, depth, heads = config.vit_dims
    hidden = 4 * width  # the reference's mlp_ratio
    batch = config.batch_size_per_gpu
    patch_inputs = config.patch_size * config.patch_size * 3
    groups = [("global", 2 * batch, config.global_crops_size, 2)]  # teacher and student
    if config.local_crops_number:
        groups.append(("local", config.local_crops_number * batch, config.local_crops_size, 1))
    products = []
    for crops, images, size, networks in groups:
        patches = (size // config.patch_size) ** 2
        tokens = patches + 1
        rows = images * tokens
        products.append(
            Product(f"patch embedding {crops}", "forward", 0, images * patches, patch_inputs,
                    width, networks))
        products.append(
            Product(f"patch embedding {crops} dW", "weight gradient", 0, patch_inputs,
                    images * patches, width, 1, transpose_a=True))
        for layer, d_in, d_out in (("qkv", width, 3 * width), ("proj", width, width),
                                   ("fc1", width, hidden), ("fc2", hidden, width)):
            for product in _dense(f"{layer} {crops}", rows, d_in, d_out, networks, True):
                products.append(dataclasses.replace(product, count=product.count * depth))
        head_dim, attention_batch = width // heads, images * heads
        # Forward: scores q k^T and weighted values a v. Backward: d(weights) = d(out) v^T has
        # the scores' form, dq = d(scores) k the weighted values', dv = a^T d(out) and
        # dk = d(scores)^T q contract the weights' rows.
        products += [
            Product(f"attention scores {crops}", "attention", attention_batch, tokens,
                    head_dim, tokens, depth * (networks + 1), transpose_b=True),
            Product(f"attention weighted values {crops}", "attention", attention_batch,
                    tokens, tokens, head_dim, depth * (networks + 1)),
            Product(f"attention dv, dk {crops}", "attention", attention_batch, tokens, tokens,
                    head_dim, 2 * depth, transpose_a=True),
        ]
    widths = [width, config.head_hidden_dim, config.head_hidden_dim,
              config.head_bottleneck_dim, config.out_dim]
    student_rows = (2 + config.local_crops_number) * batch
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        products += _dense(f"head {i} student", student_rows, d_in, d_out, 1, True)
        products += _dense(f"head {i} teacher", 2 * batch, d_in, d_out, 1, False)
    return products


def _products_per_call(product: Product, limit: int) -> int:
    a, b = product.operand_shapes()
    bytes_per_product = 4 * (math.prod(a) + math.prod(b))
    return max(1, min(limit, _MAX_INPUT_BYTES // bytes_per_product))


def _best_seconds_per_product(run, products_per_call: int, min_seconds: float) -> float:
    """Fastest of `_ROUNDS` timed rounds, each of enough calls to last `min_seconds`."""
    run()
    start = time.perf_counter()
    run()
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))
    best = math.inf
    for _ in range(_ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best / products_per_call


def time_with_xla(products: list[Product], min_seconds: float, limit: int) -> list[float]:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    seconds = []
    for product in products:
        per_call = _products_per_call(product, limit)
        shape_a, shape_b = product.operand_shapes()
        a = tf.constant(rng.standard_normal((per_call,) + shape_a, np.float32))
        b = tf.constant(rng.standard_normal((per_call,) + shape_b, np.float32))

        @tf.function(jit_compile=True)
        def products_of(a, b, product=product, per_call=per_call):
            return [tf.linalg.matmul(a[i], b[i], transpose_a=product.transpose_a,
                                     transpose_b=product.transpose_b) for i in range(per_call)]

        def run(a=a, b=b, products_of=products_of):
            products_of(a, b)[-1].numpy()  # waits for the call

        seconds.append(_best_seconds_per_product(run, per_call, min_seconds))
    return seconds


def time_with_torch(products: list[Product], min_seconds: float, limit: int) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(0)
    seconds = []
    with torch.no_grad():
        for product in products:
            per_call = _products_per_call(product, limit)
            shape_a, shape_b = product.operand_shapes()
            a = torch.randn((per_call,) + shape_a, generator=generator)
            b = torch.randn((per_call,) + shape_b, generator=generator)
            a_of = [a[i].transpose(-1, -2) if product.transpose_a else a[i]
                    for i in range(per_call)]
            b_of = [b[i].transpose(-1, -2) if product.transpose_b else b[i]
                    for i in range(per_call)]

            def run(a_of=a_of, b_of=b_of):
                for left, right in zip(a_of, b_of, strict=True):
                    torch.matmul(left, right)

            seconds.append(_best_seconds_per_product(run, per_call, min_seconds))
    return seconds


def kind_totals(products: list[Product], seconds: list[float]) -> dict[str, float]:
    """Seconds per step of each kind of product (and `all`): time x count, summed."""
    totals = dict.fromkeys((*KINDS, "all"), 0.0)
    for product, time_each in zip(products, seconds, strict=True):
        totals[product.kind] += time_each * product.count
        totals["all"] += time_each * product.count
    return totals


def format_report(products, xla_seconds, torch_seconds, header: str) -> str:
    lines = [header, "",
             f"{'product':36s} {'shape (batch x) m x k x n':>26s} {'per step':>8s} "
             f"{'XLA us':>9s} {'PyTorch us':>10s} {'XLA/PyTorch':>11s}"]
    for product, xla, torch in zip(products, xla_seconds, torch_seconds, strict=True):
        lines.append(f"{product.name:36s} {product.shape:>26s} {product.count:8d} "
                     f"{xla * 1e6:9.1f} {torch * 1e6:10.1f} {xla / torch:10.2f}x")
    xla_totals = kind_totals(products, xla_seconds)
    torch_totals = kind_totals(products, torch_seconds)
    lines += ["", "per step (time x count, summed):"]
    for kind in (*KINDS, "all"):
        lines.append(f"  {kind:16s} XLA {xla_totals[kind] * 1e3:9.2f} ms   PyTorch "
                     f"{torch_totals[kind] * 1e3:9.2f} ms   XLA/PyTorch "
                     f"{xla_totals[kind] / torch_totals[kind]:.2f}x")
    return "\n".join(lines)
