"""benchmarks/benchmark.py --short as a command: JSON lines of every case, finite figures, table."""

import json
import math
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "benchmark.py")
CASES = ["matmul_peak", "step", "pipeline", "fit"]
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
}


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_short_run_reports_every_case(tmp_path):
    output = tmp_path / "benchmark.jsonl"
    result = run_benchmark(
        "--short",
        f"--cases={','.join(CASES)}",
        f"--output={output}",
        f"--image_dir={tmp_path / 'images'}",
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert [record["case"] for record in records] == CASES
    assert output.read_text().splitlines() == lines

    for record in records:
        assert record["recipe"] == "paper" and record["precision"] == "float32"
        assert record["short"] is True
        for key in FIGURES[record["case"]] + ["peak_rss_gib", "peak_rss_mib", "case_seconds"]:
            assert isinstance(record[key], (int, float)), (record["case"], key)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value) and value > 0, (record["case"], key, value)
        if "mfu" in record:
            assert 0 < record["mfu"] < 1.5
            assert record["peak_gflops_per_second"] == records[0]["peak_gflops_per_second"]
    # --short's pipeline and fit read batches from one loader process, whose memory is counted.
    for record in records[2:]:
        assert record["loader_processes"] == 1
        assert 0.2 < record["loader_processes_peak_rss_gib"] < record["peak_rss_gib"] + 1
    # The MFU is the achieved FLOP/s over the matmul peak of the same run.
    step = records[1]
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
    for case in CASES:
        assert any(row.startswith(case) for row in table.splitlines()), case
    assert "Bound: " in table
    assert "pipeline: batches made by 1 loader process(es), one core each, peak RSS" in table
    # The generated JPEGs stay in --image_dir for the next run.
    assert len(os.listdir(tmp_path / "images" / "jpeg_500x375_n16")) == 16


def test_bad_flags_are_refused_naming_the_flag():
    for args, flag in (
        (["--cases=step,nope"], "--cases"),
        (["--recipe=imagenet"], "--recipe"),
        (["--short", "--steps=0"], "--steps"),
        (["--num_workers=-1"], "--num_workers"),
    ):
        result = run_benchmark(*args)
        assert result.returncode != 0
        assert "error: " + flag in result.stderr, result.stderr
