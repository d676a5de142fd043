"""scripts/eval_linear.py: one epoch from a run, then a rerun that resumes (nothing to do)."""

import json

from tests.helpers import make_tiny_run, run_script, write_idx_dataset


def test_linear_script_trains_reports_and_resumes(tmp_path, capsys):
    make_tiny_run(tmp_path / "run")
    data = write_idx_dataset(tmp_path / "data", train=64, test=30)
    args = [
        f"--checkpoint={tmp_path / 'run'}",
        f"--output_dir={tmp_path / 'linear'}",
        f"--data_path={data}",
        "--n_last_blocks=2",
        "--avgpool_patchtokens",
        "--epochs=1",
        "--batch_size=32",
        "--lr=0.5",
    ]
    summary = run_script("eval_linear", *args)
    assert summary["epochs_completed"] == 1 and summary["feature_dim"] == 96
    assert summary["num_classes"] == 3
    assert "teacher of" in summary["backbone"]
    assert "Epoch 1/1" in capsys.readouterr().out
    with open(tmp_path / "linear" / "summary.json") as f:
        assert json.load(f)["best_top1"] == summary["best_top1"]
    rerun = run_script("eval_linear", *args)
    out = capsys.readouterr().out
    assert "Resuming" in out and "Epoch 1/1" not in out
    assert rerun["best_top1"] == summary["best_top1"]
