"""Regression on a user's own task CSVs: train, evaluate, plot and adapt from the command line."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from fastmaml.cli import main


def write_sinusoid_tasks(root: Path, count: int, points: int = 25) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for t in range(count):
        amplitude, phase, x = rng.uniform(0.5, 4), rng.uniform(0, np.pi), rng.uniform(-5, 5, points)
        (root / f"task{t:02d}.csv").write_text(
            "x,y\n" + "".join(f"{u},{amplitude * np.sin(u - phase)}\n" for u in x))


def test_train_evaluate_plot_and_adapt_a_folder_of_task_csvs(tmp_path: Path, capsys) -> None:
    data, run = tmp_path / "tasks", tmp_path / "run"
    write_sinusoid_tasks(data, 20)
    assert main(["train", "regression-csv", "--out", str(run), "--data-root", str(data),
                 "iterations=40", "val_every=20", "val_tasks=10", "log_every=20",
                 "--no-progress"]) == 0
    split = json.loads((run / "splits.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    logged = list(csv.DictReader(open(run / "metrics-maml.csv")))
    assert [r["iteration"] for r in logged] == ["20", "40"] and logged[-1]["val_mse"]

    assert main(["eval", str(run), "eval_tasks=50", "--no-progress"]) == 0
    (record,) = json.loads((run / "eval.json").read_text())
    assert record["metric"] == "mse" and record["tasks"] == 50 and len(record["mean"]) == 11
    assert main(["eval", str(run), "eval_tasks=50", "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())[0]["mean"] == record["mean"]  # fixed tasks
    assert "| method | 0 steps | 1 step | 10 steps |" in (run / "results.md").read_text()
    assert main(["plot", str(run)]) == 0
    assert (run / "figures" / "mse_vs_steps.png").is_file()

    x = np.linspace(-4, 4, 10)
    (tmp_path / "support.csv").write_text("".join(f"{u},{np.sin(u)}\n" for u in x))
    (tmp_path / "query.csv").write_text("x\n0.5\n2.0\n")
    capsys.readouterr()
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"),
                 "--query", str(tmp_path / "query.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["x"] for r in rows] == ["0.5", "2.0"] and all(r["prediction"] for r in rows)


def test_a_missing_data_root_is_one_clear_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "regression-csv", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == ("fastmaml: error: the regression experiment needs its folder of task CSVs: "
                   "--data-root DIR\n")


def test_a_run_whose_test_split_is_empty_is_refused_before_training(tmp_path: Path,
                                                                    capsys) -> None:
    write_sinusoid_tasks(tmp_path / "tasks", 3)
    assert main(["train", "regression-csv", "--out", str(tmp_path / "run"), "--data-root",
                 str(tmp_path / "tasks"), "split_fractions=1,0,0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the test split of" in err and "cannot give a task: it has no task files" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_fresh_run_replaces_a_stale_split_record(tmp_path: Path) -> None:
    data, run = tmp_path / "tasks", tmp_path / "run"
    write_sinusoid_tasks(data, 10)
    common = ["--out", str(run), "--data-root", str(data), "iterations=2", "val_every=0",
              "--no-progress"]
    assert main(["train", "regression-csv", *common]) == 0
    recorded = json.loads((run / "splits.json").read_text())
    shutil.rmtree(run / "checkpoints")  # a directory holding a config, but nothing trained
    (run / "splits.json").write_text(json.dumps({"train": ["gone.csv"], "val": [], "test": []}))
    assert main(["train", "regression-csv", *common]) == 0
    assert json.loads((run / "splits.json").read_text()) == recorded
