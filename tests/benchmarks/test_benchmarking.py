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
from tests.helpers import REPO_ROOT


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
    # demo.cfg's batch of 32: the default 128 images already make four batches.
    demo_config = demo.train_config()
    assert (demo_config.embed_dim, demo_config.batch_size_per_gpu, demo.num_images) == (64, 32, 128)
    # Loader processes: the recipe's (paper: the reference's 2 workers; demo.cfg: none), 1 for
    # --short, or the flag's.
    assert [
        BenchmarkConfig(**kwargs).resolved().train_config().num_workers
        for kwargs in ({}, dict(recipe="demo"), dict(short=True), dict(num_workers=3))
    ] == [2, 0, 1, 3]
    # What fit trains on: the demo's own data (as make demo), the JPEGs for the paper recipe
    # and --short, or the flag's.
    assert [
        BenchmarkConfig(**kwargs).resolved().fit_data_path
        for kwargs in (
            dict(recipe="demo"), {}, dict(recipe="demo", short=True),
            dict(recipe="demo", fit_data_path=""), dict(fit_data_path="/data/images"),
        )
    ] == ["fashion_mnist", "", "", "", "/data/images"]
    for kwargs, flag in (
        (dict(recipe="imagenet"), "--recipe"),
        (dict(precision="mixed_float16"), "--precision"),
        (dict(cases=("step", "nope")), "--cases"),
        (dict(cases=("step", "step")), "--cases"),
        (dict(steps=0), "--steps"),
        (dict(num_images=4), "--num_images"),
        (dict(matmul_seconds=0.0), "--matmul_seconds"),
        (dict(num_workers=-1), "--num_workers"),
        (dict(repeats=0), "--repeats"),
        (dict(intra_op_threads=-1), "--intra_op_threads"),
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


def test_machine_description_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 fma\n"
    )
    machine = benchmarking.machine_description(str(cpuinfo))
    assert machine["cpu_model"] == "Some CPU @ 2.0GHz"
    assert (machine["avx512"], machine["amx"]) == (False, False)
    assert machine["schedulable_cores"] >= 1
    cpuinfo.write_text("model name\t: Other CPU\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    machine = benchmarking.machine_description(str(cpuinfo))
    assert (machine["cpu_model"], machine["avx512"], machine["amx"]) == ("Other CPU", True, True)
    missing = benchmarking.machine_description(str(tmp_path / "absent"))
    assert (missing["cpu_model"], missing["avx512"]) == ("unknown", False)


def test_missing_reference_modules_and_skip_reasons(monkeypatch):
    assert benchmarking.missing_reference_modules(("json", "no_such_module_2c9f")) == [
        "no_such_module_2c9f"
    ]
    cases = ["matmul_peak", "step", "reference_step", "pipeline", "reference_pipeline"]
    monkeypatch.setattr(benchmarking, "REFERENCE_MODULES", ("json", "no_such_module_2c9f"))
    reasons = benchmarking.skip_reasons(cases, "float32")
    assert set(reasons) == {"reference_step", "reference_pipeline"}
    assert reasons["reference_step"].startswith("no_such_module_2c9f not installed")
    monkeypatch.setattr(benchmarking, "REFERENCE_MODULES", ("json",))
    assert benchmarking.skip_reasons(cases, "float32") == {}
    # The reference step has no bfloat16 counterpart; its loader does not depend on precision.
    assert "reference_step" in benchmarking.skip_reasons(cases, "mixed_bfloat16")
    assert "reference_pipeline" not in benchmarking.skip_reasons(cases, "mixed_bfloat16")


def test_reference_comparison_and_its_table_lines():
    common = dict(recipe="demo", precision="float32", short=False, batch_size=128)
    step = dict(case="step", images_per_second=300.0, peak_rss_gib=1.5, **common)
    pipeline = dict(
        case="pipeline",
        images_per_second=90.0,
        peak_rss_gib=0.8,
        loader_processes_peak_rss_gib=1.7,
        **common,
    )
    reference_step = dict(case="reference_step", images_per_second=120.0, peak_rss_gib=0.9)
    reference_pipeline = dict(case="reference_pipeline", images_per_second=60.0, peak_rss_gib=1.1)
    compared = benchmarking.reference_comparison(reference_step, [step, pipeline])
    assert compared["images_per_second_ratio"] == 2.5 and compared["dino_keras_case"] == "step"
    assert compared["dino_keras_peak_rss_gib"] == 1.5
    reference_step.update(compared)
    reference_pipeline.update(benchmarking.reference_comparison(reference_pipeline, [pipeline]))
    assert reference_pipeline["images_per_second_ratio"] == 1.5
    table = benchmarking.format_table(
        [step, dict(reference_step, **common), pipeline, dict(reference_pipeline, **common)]
    )
    assert "  step: 2.500x (dino_keras 300.00 images/s, peak RSS 1.50 GiB; reference 120.00" in (
        table
    )
    assert (
        "  pipeline: 1.500x (dino_keras 90.00 images/s, peak RSS 0.80 GiB + 1.70 GiB in its "
        "loader processes; reference 60.00 images/s, peak RSS 1.10 GiB)"
    ) in table
    # No counterpart in the run (not selected, or skipped): no ratio.
    assert benchmarking.reference_comparison(reference_step, [pipeline]) == {}
    skipped_step = dict(case="step", skipped="no bfloat16")
    assert benchmarking.reference_comparison(reference_step, [skipped_step]) == {}
    table = benchmarking.format_table(
        [dict(case="reference_step", skipped="torch not installed", **common)]
    )
    assert "reference_step      skipped: torch not installed" in table
    assert "Against the reference" not in table


def test_ratio_summary_lists_each_recipe():
    records = [
        dict(recipe="paper", case="step", images_per_second=2.0),
        dict(
            recipe="paper",
            case="reference_step",
            dino_keras_case="step",
            images_per_second=1.0,
            images_per_second_ratio=2.0,
        ),
        dict(
            recipe="paper",
            case="reference_pipeline",
            dino_keras_case="pipeline",
            images_per_second=50.0,
            images_per_second_ratio=3.125,
        ),
        dict(recipe="demo", case="reference_step", skipped="torch not installed"),
    ]
    summary = benchmarking.format_ratio_summary(records).splitlines()
    assert summary[1:] == [
        "  paper: step 2.000x, pipeline 3.125x",
        "  demo: no ratio (a case did not run)",
    ]


def test_repeats_alternate_each_compared_pair_and_report_the_median():
    cases = ["matmul_peak", "step", "reference_step", "pipeline", "reference_pipeline", "fit"]
    assert benchmarking.case_schedule(cases, 2, {}) == [
        ("matmul_peak", 1),
        ("step", 1), ("reference_step", 1), ("step", 2), ("reference_step", 2),
        ("pipeline", 1), ("reference_pipeline", 1), ("pipeline", 2), ("reference_pipeline", 2),
        ("fit", 1),
    ]
    # Nothing to compare with: each case once (a skipped one is still listed).
    assert benchmarking.case_schedule(["step", "pipeline"], 3, {}) == [("step", 1), ("pipeline", 1)]
    assert benchmarking.case_schedule(["step", "reference_step"], 3, {"reference_step": "x"}) == [
        ("step", 1), ("reference_step", 1)
    ]
    common = dict(recipe="demo", precision="float32", short=False, batch_size=64)
    records = []
    for repeat, (ours, theirs) in enumerate(((300.0, 200.0), (280.0, 160.0), (310.0, 250.0)), 1):
        records.append(dict(case="step", images_per_second=ours, peak_rss_gib=1.4,
                            repeat=repeat, **common))
        reference = dict(case="reference_step", images_per_second=theirs, peak_rss_gib=1.0,
                         repeat=repeat, **common)
        # Each reference record is compared with the step that ran just before it.
        reference.update(benchmarking.reference_comparison(reference, records))
        records.append(reference)
    assert [r["images_per_second_ratio"] for r in records[1::2]] == [1.5, 1.75, 1.24]
    records.append(dict(case="fit", images_per_second=270.0, **common))
    table = benchmarking.format_table(records)
    assert "  step: median 1.500x of 3 (1.240-1.750x)" in table
    assert "  fit: 1.350x the reference's step, 0.900x the dino_keras step" in table
    assert any(row.startswith("reference_step #3") for row in table.splitlines())
    assert benchmarking.format_ratio_summary(records).splitlines()[1] == (
        "  demo: step median 1.500x of 3 (1.240-1.750x)"
    )


def test_time_pipeline_times_the_batches_after_the_first_and_the_warmup(monkeypatch):
    config = BenchmarkConfig(pipeline_batches=3, pipeline_warmup=2)
    ticks = iter(range(100))  # perf_counter: 0, 1, 2, ... seconds
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(benchmarking, "child_processes_peak_rss", lambda: {"workers": 1})
    batches = iter(range(10))
    figures, last = benchmarking.time_pipeline(batches, config, batch_size=4)
    assert last == 5 and next(batches) == 6  # 1 first + 2 warm-up + 3 timed batches read
    # First batch: ticks 0 -> 1; timed: ticks 2 -> 3, 3 timed batches of 4 images in 1 s.
    assert figures == {"images_per_second": 12.0, "first_batch_seconds": 1.0, "workers": 1}


def test_reference_schedule_covers_every_call_of_a_long_step_case():
    # --recipe=demo --steps=30: 1 + 1 + 30 calls; the epoch of 128 images is 2 steps of 64, so
    # 8 epochs made a schedule of 16 entries, and the 17th call failed (IndexError). In its own
    # process, as the benchmark runs it: PyTorch imported after TensorFlow can crash.
    import subprocess
    import sys

    code = (
        "from benchmarks.benchmarking import BenchmarkConfig\n"
        "from benchmarks.reference_cases import reference_training\n"
        "config = BenchmarkConfig(recipe='demo', short=True, steps=30, warmup=1).resolved()\n"
        "print(len(reference_training(config, config.train_config()).lr_schedule))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 1 + 1 + 30
