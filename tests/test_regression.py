"""Regression on a user's own task CSVs: train, evaluate, plot and adapt from the command line."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fastmaml
from fastmaml.cli import main
from fastmaml.train import checkpoint_path, load_checkpoint


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
    config = (run / "config.yaml").read_text()  # a run of before features: it had one x value
    assert "\nfeatures: 1\n" in config
    (run / "config.yaml").write_text(config.replace("\nfeatures: 1\n", "\n"))

    x = np.linspace(-4, 4, 10)
    (tmp_path / "support.csv").write_text("".join(f"{u},{np.sin(u)}\n" for u in x))
    (tmp_path / "query.csv").write_text("x\n0.5\n2.0\n1.23456789\n")
    capsys.readouterr()
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"),
                 "--query", str(tmp_path / "query.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # x as the query wrote it (float32's 1.2345679 could not be joined back to the input)
    assert [r["x"] for r in rows] == ["0.5", "2.0", "1.23456789"]
    assert all(r["prediction"] for r in rows)


def test_the_adaptation_figure_names_its_axes_as_the_run_names_its_columns(
        tmp_path: Path, capsys, monkeypatch) -> None:
    from fastmaml import plots

    data, run = tmp_path / "tasks", tmp_path / "run"
    write_sinusoid_tasks(data, 12)
    for path in data.glob("*.csv"):
        path.write_text(path.read_text().replace("x,y\n", "hours,score\n", 1))
    assert main(["train", "regression-csv", "--out", str(run), "--data-root", str(data),
                 "iterations=5", "val_every=0", "--no-progress"]) == 0
    (tmp_path / "support.csv").write_text("hours,score\n1,2\n2,3\n3,4\n")
    (tmp_path / "query.csv").write_text("hours\n1.5\n")
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"), "--query",
                 str(tmp_path / "query.csv"), "--plot", str(tmp_path / "task.png")]) == 0
    ax = figures[0].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("hours", "score")


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
    for mark in run.glob(".fastmaml-*.checkpointed"):  # (else: a lost checkpoint, refused)
        mark.unlink()
    (run / "splits.json").write_text(json.dumps({"train": ["gone.csv"], "val": [], "test": []}))
    assert main(["train", "regression-csv", *common]) == 0
    assert json.loads((run / "splits.json").read_text()) == recorded


def test_a_run_resumed_on_another_data_root_says_so(tmp_path: Path, capsys) -> None:
    """Resuming with another --data-root is allowed (the data moved), but it went unsaid where
    the folder held other data."""
    data, run = tmp_path / "tasks", tmp_path / "run"
    write_sinusoid_tasks(data, 10)
    common = ["--out", str(run), "val_every=0", "--no-progress"]
    assert main(["train", "regression-csv", *common, "--data-root", str(data),
                 "iterations=2"]) == 0
    assert main(["train", "regression-csv", *common, "iterations=3"]) == 0  # (kept: unsaid)
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "link").symlink_to(data)  # the same folder, spelt otherwise: unsaid
    assert main(["train", "regression-csv", *common, "--data-root", str(tmp_path / "link"),
                 "iterations=4"]) == 0
    assert "warning" not in capsys.readouterr().err
    shutil.move(data, tmp_path / "moved")
    assert main(["train", "regression-csv", *common, "--data-root", str(tmp_path / "moved"),
                 "iterations=5"]) == 0
    assert (f"fastmaml: warning: {run} trained on the data in {tmp_path / 'link'}; it goes on "
            f"with {tmp_path / 'moved'}: the same data moved, or it learns on from other data"
            ) in capsys.readouterr().err


def test_tasks_of_several_x_values_train_and_adapt(tmp_path: Path, capsys) -> None:
    data, run = tmp_path / "tasks", tmp_path / "run"
    rng = np.random.default_rng(0)
    data.mkdir()
    for t in range(10):  # y = a x1 + b x2 + c, a task per (a, b, c)
        a, b, c = rng.uniform(-1, 1, 3)
        x = rng.uniform(-2, 2, (25, 2))
        (data / f"task{t}.csv").write_text("x1,x2,y\n" + "".join(
            f"{u},{v},{a * u + b * v + c}\n" for u, v in x))
    common = ["--out", str(run), "--data-root", str(data), "val_every=0", "--no-progress"]
    assert main(["train", "regression-csv", *common, "features=1"]) == 2
    assert re.search(r"the task files of .* hold 2 x value\(s\) per point, but the run has "
                     r"features=1 \(a new run with features=0", capsys.readouterr().err)
    for names, message in (("a,A", "x_names must be distinct names .* got a, A"),
                           ("a,b,c", r"x_names names 3 x column\(s\), but the task files .* 2")):
        assert main(["train", "regression-csv", *common, f"x_names={names}"]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert main(["train", "regression-csv", *common, "iterations=20"]) == 0
    assert " on cpu (points of 2 x values: predicting y from x1, x2)\n" in capsys.readouterr().out
    assert "\nfeatures: 2\n" in (run / "config.yaml").read_text()
    assert main(["eval", str(run), "eval_tasks=20", "--no-progress"]) == 0
    (tmp_path / "support.csv").write_text("".join(f"{u},{-u},{2 * u}\n" for u in range(5)))
    (tmp_path / "query.csv").write_text("x1,x2\n0.5,1\n")
    capsys.readouterr()
    common = [str(run), "--support", str(tmp_path / "support.csv"), "--query",
              str(tmp_path / "query.csv")]
    assert main(["adapt", *common]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert list(row) == ["x1", "x2", "prediction"] and (row["x1"], row["x2"]) == ("0.5", "1.0")
    assert "\nx_names:\n- x1\n- x2\n" in (run / "config.yaml").read_text()
    assert main(["train", "regression-csv", "--out", str(run), "features=3"]) == 2  # a kept
    assert "keeps the features it started with" in capsys.readouterr().err  # one (not x_names')
    (tmp_path / "bare.csv").write_text("0.5,1\n")  # taken in the run's order, headed with
    assert main(["adapt", *common[:3], "--query", str(tmp_path / "bare.csv")]) == 0  # its names
    assert capsys.readouterr().out.splitlines() == ["x1,x2,prediction",
                                                    f"0.5,1.0,{row['prediction']}"]
    named_data, named_run = tmp_path / "named-tasks", tmp_path / "named-run"  # names of its own
    named_data.mkdir()  # (not the x1..xd that a query without names gets), as range warnings
    for path in data.iterdir():
        (named_data / path.name).write_text(path.read_text().replace("x1,x2,", "sqft,rooms,", 1))
    assert main(["train", "regression-csv", "--out", str(named_run), "--data-root",
                 str(named_data), "val_every=0", "iterations=2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["adapt", str(named_run), *common[1:3], "--query", str(tmp_path / "bare.csv")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "sqft,rooms,prediction"
    for header, columns in (("Temperature,Pressure", ["Temperature", "Pressure"]),  # its names
                            ("", ["x1", "x2"]), ("a,a", ["x1", "x2"]),  # else x1..xd
                            ("prediction,b", ["x1", "x2"])):
        (tmp_path / "named.csv").write_text(f"{header}\n0.5,1\n".lstrip())
        assert main(["adapt", *common[:3], "--query", str(tmp_path / "named.csv")]) == 0
        out, err = capsys.readouterr()
        assert next(csv.reader(io.StringIO(out))) == [*columns, "prediction"]
        assert (f"fastmaml: warning: the query CSV {tmp_path / 'named.csv'} names its x columns "
                f"{header.replace(',', ', ')}, but the run's are x1, x2: they are taken as they stand"
                in err) == bool(header)
    (tmp_path / "swapped.csv").write_text("X2,x1\n1,0.5\n")  # the run's columns, reordered
    (tmp_path / "swapped-support.csv").write_text(
        "x2,y,x1\n" + "".join(f"{-u},{2 * u},{u}\n" for u in range(5)))
    for support in ("support.csv", "swapped-support.csv"):
        assert main(["adapt", str(run), "--support", str(tmp_path / support), "--query",
                     str(tmp_path / "swapped.csv")]) == 0
        (swapped,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
        assert swapped == {"x1": "0.5", "X2": "1.0", "prediction": row["prediction"]}
    # a query's column beside the x columns is its labels only if named y, or as the run's or
    # the support's target (an id column, or an output's prediction, gave an MSE against it)
    assert "\ny_name: y\n" in (run / "config.yaml").read_text()  # (its task files' target)
    (tmp_path / "ids.csv").write_text("x1,x2,sample_id\n0.5,1,1001\n")
    (tmp_path / "priced.csv").write_text("x1,x2,price\n0.5,1,3\n")
    (tmp_path / "priced-support.csv").write_text(
        "x1,x2,price\n" + "".join(f"{u},{-u},{2 * u}\n" for u in range(5)))
    said = "name a label column {} \\(the run's or the support's target\\), or delete"
    for support, query, message in (
            ("support.csv", "ids.csv", "'sample_id' .*: " + said.format("y")),
            ("priced-support.csv", "ids.csv", "'sample_id' .*: " + said.format("y or price")),
            ("support.csv", "priced.csv", "'price' .*: " + said.format("y"))):
        assert main(["adapt", str(run), "--support", str(tmp_path / support), "--query",
                     str(tmp_path / query)]) == 2
        assert re.search(f"the query CSV .*{query} has a column {message}",
                         capsys.readouterr().err)
    config = (run / "config.yaml").read_text()
    for support, recorded in (("priced-support.csv", config),  # the support's target, or
                              ("support.csv", config.replace("y_name: y", "y_name: price"))):
        (run / "config.yaml").write_text(recorded)  # the run's (trained on files headed so)
        assert main(["adapt", str(run), "--support", str(tmp_path / support), "--query",
                     str(tmp_path / "priced.csv")]) == 0
        (priced,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
        assert priced["y"] == "3.0"
    (run / "config.yaml").write_text(config)
    config = (run / "config.yaml").read_text()  # a run of before x_names: files as they stand
    (run / "config.yaml").write_text(config.replace("\nx_names:\n- x1\n- x2\n", "\n"))
    checkpoint = load_checkpoint(checkpoint_path(run, "maml"))  # (nor did its checkpoints
    del checkpoint["settings"]["x_names"]  # record them)
    torch.save(checkpoint, checkpoint_path(run, "maml"))
    assert main(["adapt", *common[:3], "--query", str(tmp_path / "swapped.csv")]) == 0
    (as_written,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert as_written["X2"] == "1.0" and as_written["prediction"] != row["prediction"]
    assert main(["eval", str(run), "eval_tasks=20", "--no-progress"]) == 0
    assert "x_names" not in (run / "config.yaml").read_text()
    trained = fastmaml.load_run(run)
    support = np.array([[u, -u] for u in range(5)], dtype=np.float32)
    adapted = trained.adapt(support, 2 * support[:, 0])
    assert float(row["prediction"]) == pytest.approx(
        float(trained.predict(adapted, np.array([[0.5, 1.0]]))), abs=1e-6)
    with pytest.raises(fastmaml.errors.ShapeError, match=r"the query values are \(1, 3\), but "
                       r"this run's model takes \(N, 2\) inputs"):
        trained.predict(adapted, np.zeros((1, 3)))
    assert main(["adapt", *common, "--plot", str(tmp_path / "plot.png")]) == 2
    assert "--plot draws a curve over one x value, but this run's points have 2" in (
        capsys.readouterr().err)


def test_adapting_beyond_the_training_tasks_range_is_warned_of(tmp_path: Path, capsys) -> None:
    """The run records each column's range over its meta-train tasks; x or support y beyond it
    (by more than a tenth of its width) is warned of, at adapt and predict, in Python and on
    the command line."""
    data, run = tmp_path / "tasks", tmp_path / "run"
    write_sinusoid_tasks(data, 10)  # x in [-5, 5], amplitudes in [0.5, 4]
    assert main(["train", "regression-csv", "--out", str(run), "--data-root", str(data),
                 "iterations=2", "val_every=0", "--no-progress"]) == 0
    x_low, x_high, y_low, y_high = yaml.safe_load((run / "config.yaml").read_text())[
        "value_ranges"]
    assert -5 <= x_low < -4.5 and 4.5 < x_high <= 5 and -4 <= y_low < 0 < y_high <= 4
    trained = fastmaml.load_run(run)
    x = np.linspace(-4, 4, 10, dtype=np.float32)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training tasks' range: no warning
        adapted = trained.adapt(x, np.sin(x))
        trained.predict(adapted, x)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"the support values run beyond "
                      r"the run's training tasks: x from 40 to 80 \(training: -4\.9\d* to 4\.9\d*\); "
                      r"its meta-learned start suits their range"):
        trained.adapt(x * 5 + 60, np.sin(x))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"support values .*: y from "
                      r"-9\.7\d* to 9\.7\d* \(training"):
        trained.adapt(x, 10 * np.sin(x))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"the query values .*: x from 50 "
                      "to 50 "):
        trained.predict(adapted, np.array([[50.0]]))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"the query values .*: x from -50 "
                      "to -50 "):  # below the range too
        trained.predict(adapted, np.array([[-50.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trained.predict(adapted, np.zeros((0, 1))).shape == (0, 1)
    (tmp_path / "support.csv").write_text("".join(f"{u},{np.sin(u)}\n" for u in x[:, 0]))
    (tmp_path / "query.csv").write_text("x\n0.5\n20\n")
    capsys.readouterr()
    assert main(["adapt", str(run), "--support", str(tmp_path / "support.csv"),
                 "--query", str(tmp_path / "query.csv")]) == 0
    err = capsys.readouterr().err
    assert "the query values run beyond the run's training tasks: x from 0.5 to 20" in err
    assert "support values" not in err
    # recorded once: a resumed run keeps them, whatever its files hold now
    config = (run / "config.yaml").read_text()
    recorded = f"value_ranges:\n- {x_low}\n- {x_high}\n- {y_low}\n- {y_high}\n"
    assert recorded in config
    (run / "config.yaml").write_text(config.replace(recorded, "value_ranges:\n- -1\n- 1\n"
                                                              "- -2\n- 2\n"))
    assert main(["train", "regression-csv", "--out", str(run), "--data-root", str(data),
                 "iterations=3", "val_every=0", "--no-progress"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["value_ranges"] == [-1, 1, -2, 2]
    capsys.readouterr()
    assert main(["train", "regression-csv", "--out", str(tmp_path / "bad"), "--data-root",
                 str(data), "value_ranges=1,0", "--no-progress"]) == 2
    assert ("value_ranges must be pairs of a low and a high value, one per x column and one "
            "for y, got 1.0, 0.0") in capsys.readouterr().err
