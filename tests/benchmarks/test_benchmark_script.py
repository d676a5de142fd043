"""benchmarks/benchmark.py --short as a command: JSON lines of every case, finite figures, table;
the reference cases measured (PyTorch installed) or skipped with the reason (PyTorch hidden)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from benchmarks.benchmarking import missing_reference_modules
from tests.helpers import REPO_ROOT, once_across_workers

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "benchmark.py")
CASES = ["matmul_peak", "step", "reference_step", "pipeline", "reference_pipeline", "fit"]
DINO_KERAS_CASES = ["matmul_peak", "step", "pipeline", "fit"]
REFERENCE_CASES = {"reference_step": "step", "reference_pipeline": "pipeline"}
TORCH_INSTALLED = not missing_reference_modules()
# Thread pool sizes as configured: 0 is TensorFlow's default.
THREAD_SETTINGS = {"tf_intra_op_threads", "tf_inter_op_threads"}
TRAINING_FIGURES = [
    "images_per_second",
    "compile_seconds",
    "flops_per_image",
    "gflops_per_second",
    "achieved_tflops",
    "mfu",
    "peak_gflops_per_second",
]
FIGURES = {
    "matmul_peak": ["peak_gflops_per_second", "float32_graph_gflops_per_second"],
    "step": TRAINING_FIGURES,
    "pipeline": ["images_per_second", "first_batch_seconds"],
    "fit": TRAINING_FIGURES,
    "reference_step": ["images_per_second", "first_step_seconds", "step_seconds_mean"],
    "reference_pipeline": ["images_per_second", "first_batch_seconds"],
}


def run_benchmark(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )


def json_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """One `--short` run of every case (the default --cases), shared by the tests below; its fit
    case reads Fashion-MNIST, as the demo recipe's does."""

    def run(directory):
        result = run_benchmark(
            "--short", f"--output={directory / 'benchmark.jsonl'}",
            f"--image_dir={directory / 'images'}", "--fit_data_path=fashion_mnist",
        )
        (directory / "returncode").write_text(str(result.returncode))
        (directory / "stdout").write_text(result.stdout)
        (directory / "stderr").write_text(result.stderr)

    directory = once_across_workers(tmp_path_factory, "benchmark_short_run", run)
    result = subprocess.CompletedProcess(
        [SCRIPT, "--short"],
        int((directory / "returncode").read_text()),
        (directory / "stdout").read_text(),
        (directory / "stderr").read_text(),
    )
    assert result.returncode == 0, result.stderr
    return result, directory / "benchmark.jsonl", directory


@pytest.mark.slow  # scheduled first with the other slow tests: one worker, one run
def test_short_run_reports_every_case(short_run):
    result, output, directory = short_run
    lines = json_lines(result.stdout)
    records = [json.loads(line) for line in lines]
    assert [record["case"] for record in records] == CASES
    assert output.read_text().splitlines() == lines

    measured = [record for record in records if "skipped" not in record]
    assert [r["case"] for r in measured if r["case"] in DINO_KERAS_CASES] == DINO_KERAS_CASES
    for record in measured:
        assert record["recipe"] == "paper" and record["precision"] == "float32"
        assert record["short"] is True
        assert record["machine"]["schedulable_cores"] >= 1
        assert isinstance(record["machine"]["avx512"], bool)
        for key in FIGURES[record["case"]] + ["peak_rss_gib", "peak_rss_mib", "case_seconds"]:
            assert isinstance(record[key], (int, float)), (record["case"], key)
        for key, value in record.items():
            if key in THREAD_SETTINGS:
                assert value >= 0, (record["case"], key, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value) and value > 0, (record["case"], key, value)
        if "mfu" in record:
            assert 0 < record["mfu"] < 1.5
            assert record["peak_gflops_per_second"] == records[0]["peak_gflops_per_second"]
    by_case = {record["case"]: record for record in measured}
    # --short's pipeline and fit read batches from one loader process, whose memory is counted.
    for case in ("pipeline", "fit"):
        record = by_case[case]
        assert record["loader_processes"] == 1
        assert 0.2 < record["loader_processes_peak_rss_gib"] < record["peak_rss_gib"] + 1
    # The MFU is the achieved FLOP/s over the matmul peak of the same run.
    step = by_case["step"]
    assert math.isclose(
        step["gflops_per_second"],
        step["flops_per_image"] * step["images_per_second"] / 1e9,
        rel_tol=1e-3,
    )
    assert math.isclose(
        step["mfu"], step["gflops_per_second"] / step["peak_gflops_per_second"], rel_tol=1e-3
    )

    table = "\n".join(line for line in result.stdout.splitlines() if line not in lines)
    assert "DINO benchmark: recipe paper (short), float32, batch 8" in table
    assert "images/s" in table and "MFU" in table and "peak RSS GiB" in table
    assert re.search(
        r"^CPU: .+; AVX-512 (yes|no), AMX (yes|no); \d+ schedulable cores$", table, re.M
    )
    assert "threads: TensorFlow intra-op " in table
    for case in CASES:
        assert any(row.startswith(case) for row in table.splitlines()), case
    assert "Bound: " in table
    assert "pipeline: batches made by 1 loader process(es), one core each, peak RSS" in table
    assert by_case["pipeline"]["source_images"] == 16  # the JPEGs
    assert by_case["fit"]["data"]["images"] == 60000  # Fashion-MNIST's training split
    assert f"fit: read {by_case['fit']['data']['source']} (60000 images)" in table
    # The generated JPEGs stay in --image_dir for the next run.
    assert len(os.listdir(directory / "images" / "jpeg_500x375_n16")) == 16


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_INSTALLED, reason="torch, torchvision or timm is not installed")
def test_reference_cases_measured_at_tiny_size(short_run):
    result, _, _ = short_run
    records = {r["case"]: r for r in map(json.loads, json_lines(result.stdout))}
    step, loader = records["reference_step"], records["reference_pipeline"]
    assert step["images_per_second"] > 0 and loader["images_per_second"] > 0
    assert math.isfinite(step["loss"])
    # The same tiny sizes as the dino_keras cases, and as many loader processes.
    assert step["model"] == records["step"]["model"]
    assert loader["loader_processes"] == records["pipeline"]["loader_processes"] == 1
    assert loader["source_images"] == records["pipeline"]["source_images"] == 16
    assert step["torch_num_threads"] == step["machine"]["schedulable_cores"]
    assert "PyTorch torch.set_num_threads(" in result.stdout
    assert "reference_pipeline: batches made by 1 DataLoader worker process(es)" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_INSTALLED, reason="torch, torchvision or timm is not installed")
def test_printed_ratios_are_the_quotients_of_the_same_runs_figures(short_run):
    result, output, _ = short_run
    records = {r["case"]: r for r in map(json.loads, output.read_text().splitlines())}
    printed = dict(
        re.findall(r"^  (step|pipeline): (\d+\.\d+)x \(dino_keras ", result.stdout, re.M)
    )
    assert set(printed) == {"step", "pipeline"}, result.stdout
    for reference_case, case in REFERENCE_CASES.items():
        quotient = records[case]["images_per_second"] / records[reference_case]["images_per_second"]
        assert math.isclose(
            records[reference_case]["images_per_second_ratio"], quotient, rel_tol=1e-3
        )
        assert math.isclose(float(printed[case]), quotient, rel_tol=2e-3, abs_tol=1e-3)
        assert records[reference_case]["dino_keras_peak_rss_gib"] == records[case]["peak_rss_gib"]


def test_reference_cases_skipped_without_torch(tmp_path):
    # A sitecustomize module, imported at start-up by the benchmark and every case process,
    # makes torch, torchvision and timm unimportable, as on an install without them.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import importlib.abc
            import sys

            class HideReferenceModules(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in ("torch", "torchvision", "timm"):
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, HideReferenceModules())
            """
        )
    )
    output = tmp_path / "benchmark.jsonl"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = run_benchmark(
        "--short",
        "--cases=reference_step,reference_pipeline",
        f"--output={output}",
        f"--image_dir={tmp_path / 'images'}",
        env={"PYTHONPATH": pythonpath},
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["case"] for record in records] == ["reference_step", "reference_pipeline"]
    for record in records:
        assert record["skipped"].startswith("torch, torchvision, timm not installed"), record
        assert "images_per_second" not in record
        assert f"{record['case']:<20}skipped: torch, torchvision, timm not installed" in (
            result.stdout
        )
    assert "Skipping reference_step: torch, torchvision, timm not installed" in result.stderr
    assert not (tmp_path / "images").exists()  # nothing ran, not even the JPEG writer


def test_unreadable_fit_data_is_refused_before_any_case(tmp_path):
    result = run_benchmark(
        "--short", "--cases=step,fit", f"--fit_data_path={tmp_path / 'missing'}",
        f"--image_dir={tmp_path / 'images'}",
    )
    assert result.returncode != 0
    assert "error: --fit_data_path" in result.stderr and "missing" in result.stderr, result.stderr
    assert "Running case" not in result.stderr and not json_lines(result.stdout)


@pytest.mark.skipif(not TORCH_INSTALLED, reason="torch, torchvision or timm is not installed")
def test_intra_op_threads_set_both_libraries_in_their_case_processes():
    import torch

    from benchmarks import benchmarking, reference_cases

    before = torch.get_num_threads()
    try:
        for threads, expected in ((1, 1), (0, len(os.sched_getaffinity(0)))):
            config = benchmarking.BenchmarkConfig(intra_op_threads=threads)
            assert reference_cases.thread_settings(config)["torch_num_threads"] == expected
    finally:
        torch.set_num_threads(before)
    result = run_benchmark("--short", "--cases=matmul_peak", "--intra_op_threads=1")
    assert result.returncode == 0, result.stderr
    (record,) = map(json.loads, json_lines(result.stdout))
    assert record["tf_intra_op_threads"] == 1
    assert "threads: TensorFlow intra-op 1," in result.stdout


def test_bad_flags_are_refused_naming_the_flag():
    for args, flag in (
        (["--cases=step,nope"], "--cases"),
        (["--recipe=imagenet"], "--recipe"),
        (["--recipe=paper,imagenet"], "--recipe"),
        (["--recipe=paper,paper"], "--recipe"),
        (["--short", "--steps=0"], "--steps"),
        (["--num_workers=-1"], "--num_workers"),
        (["--intra_op_threads=-1"], "--intra_op_threads"),
    ):
        result = run_benchmark(*args)
        assert result.returncode != 0
        assert "error: " + flag in result.stderr, result.stderr
