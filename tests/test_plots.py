"""Figures: written atomically, in the format their name asks for."""
from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from fastmaml import plots
from fastmaml.errors import FastMAMLWarning
from fastmaml.plots import counted, save_figure, steps_label


def figure() -> Figure:
    fig = plots.new_figure(6.4, 4.8)
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_figure_is_written_in_the_format_of_its_name(tmp_path: Path) -> None:
    assert save_figure(figure(), tmp_path / "a" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert save_figure(figure(), tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in save_figure(figure(), tmp_path / "f.svg").read_bytes()[:500]


def test_postscript_says_in_our_words_that_it_draws_transparency_opaque(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fig = plots.new_figure(6.4, 4.8)
    ax = fig.subplots()
    ax.fill_between([0, 1], [0, 0], [1, 1], alpha=0.2)  # as the 95% bands are drawn
    with pytest.warns(FastMAMLWarning, match="f.eps: PostScript has no transparency"):
        assert save_figure(fig, tmp_path / "f.eps").read_bytes()[:4] == b"%!PS"
    assert not caplog.records  # not matplotlib's log line besides
    assert logging.getLogger("matplotlib.backends.backend_ps").level == logging.NOTSET


def test_a_figure_write_cut_short_leaves_the_old_figure_whole(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    path = save_figure(figure(), tmp_path / "f.png")
    old = path.read_bytes()

    def cut_short(self: Figure, handle, **_: object) -> None:  # e.g. a kill mid-write
        handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_figure(figure(), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_importing_fastmaml_and_drawing_leave_the_users_matplotlib_as_it_was(
        tmp_path: Path) -> None:
    """A researcher's own backend (a notebook's, a GUI's) stays theirs: fastmaml draws on
    figures of its own, outside pyplot, and imports matplotlib only to draw."""
    script = f"""
import sys
import fastmaml
from fastmaml import plots
assert "matplotlib" not in sys.modules
import matplotlib
matplotlib.use("svg")
(csv := __import__("pathlib").Path({str(tmp_path)!r}) / "metrics-maml.csv").write_text(
    "iteration,elapsed_s,loss\\n1,0.5,0.25\\n")
plots.plot_learning_curves([csv], {{"loss": "training MSE"}}, csv.with_suffix(".png"), "run")
assert csv.with_suffix(".png").read_bytes()[:4] == b"\\x89PNG"
assert matplotlib.get_backend() == "svg" and "matplotlib.pyplot" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_counts_take_the_plural_except_one() -> None:
    assert [counted(n, "task") for n in (0, 1, 2, 1200)] == ["0 tasks", "1 task", "2 tasks",
                                                             "1,200 tasks"]
    assert steps_label(1) == "1 step" and steps_label(10) == "10 steps"


def test_learning_curves_show_a_single_row_and_say_when_nothing_is_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    one_row = tmp_path / "metrics-maml.csv"
    one_row.write_text("iteration,elapsed_s,loss\n20,1.5,0.25\n")
    empty = tmp_path / "metrics-pretrained.csv"
    empty.write_text("")
    plots.plot_learning_curves([one_row], {"loss": "training MSE"}, tmp_path / "a.png", "run")
    plots.plot_learning_curves([empty], {"loss": "training MSE"}, tmp_path / "b.png", "run")
    by_iteration = figures[0].axes[0]
    line, = by_iteration.get_lines()
    assert list(line.get_xdata()) == [20.0] and line.get_marker() == "o"  # a point, drawn
    assert by_iteration.get_legend() is not None
    figures[0].canvas.draw()  # (ticks are placed when drawn)
    ticks = [tick for tick in by_iteration.get_xticks()
             if by_iteration.get_xlim()[0] <= tick <= by_iteration.get_xlim()[1]]
    assert ticks and all(tick == int(tick) for tick in ticks)  # iterations are whole
    for ax in figures[1].axes:
        assert [t.get_text() for t in ax.texts] == ["no metrics logged yet"]
        assert ax.get_legend() is None and not ax.get_lines()


def test_each_method_keeps_its_colour_and_each_key_its_line_style(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    logs = []
    for run in ("maml", "oracle", "pretrained"):  # the order the files are found in
        logs.append(tmp_path / f"metrics-{run}.csv")
        logs[-1].write_text("iteration,elapsed_s,loss,val_mse\n10,1,0.5,0.6\n20,2,0.4,\n30,3,0.3,0.4\n")
    plots.plot_learning_curves(logs, {"loss": "training MSE", "val_mse": "validation MSE"},
                               tmp_path / "c.png", "my-run (sinusoid): learning curves")
    fig = figures[0]
    styles = {line.get_label(): (line.get_color(), line.get_linestyle())
              for line in fig.axes[0].get_lines()}
    assert styles["pretrained: training MSE"] == ("tab:orange", "-")
    assert styles["oracle: validation MSE"] == ("tab:green", "--")
    assert fig.axes[0].get_ylabel() == "training MSE / validation MSE"
    assert fig.get_suptitle() == "my-run (sinusoid): learning curves"


def record(method: str, mean: list[float], ci: list[float], k_shot: int = 5) -> dict:
    return {"method": method, "k_shot": k_shot, "steps": list(range(len(mean))), "mean": mean,
            "ci95": ci}


def test_a_log_axis_band_that_reaches_zero_shows_its_upper_edge_and_says_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    records = [record("maml", [3.0, 0.5, 1.1, 0.6], [0.1, 0.1, 1.4, 0.1]),
               {**record("pretrained", [3.0, 2.4, 2.3, 2.2], [0.1, 0.1, 0.1, 0.1]),
                "inner_lr": 0.01}]
    paper = {5: [("paper: MAML", {1: 0.67, 3: 0.35})]}
    plots.plot_step_curves(records, "query MSE", tmp_path / "d.png", "a run", log_scale=True,
                           paper=paper)
    ax = figures[0].axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["maml; 95% CI reaches 0 at step 2 (upper edge dashed)",
                      "pretrained, step 0.01", "paper: MAML"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata())[2] == pytest.approx(2.5)
    stars = ax.collections[-1]
    assert [tuple(p) for p in stars.get_offsets()] == [(1, 0.67), (3, 0.35)]
    assert ax.get_ylim()[0] > 1e-3  # not pulled to the floor by a band below zero


def test_a_zoomed_accuracy_axis_spans_the_steps_after_the_first_in_percent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    plots.plot_step_curves([record("maml", [0.2, 0.97, 0.99], [0.01, 0.002, 0.001], 1)],
                           "test accuracy (%)", tmp_path / "e.png", "a run", scale=100,
                           paper={1: [("paper: MAML", {2: 98.7})]}, zoom=True)
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert 96 < low < 96.8 and 99.1 < high < 100
    assert ax.get_legend().get_texts()[0].get_text() == "maml (0 steps: 20)"


def test_bands_keep_to_their_limits_and_a_diverged_curve_says_where_it_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    plots.plot_step_curves([record("maml", [0.2, 0.97, 0.99], [0.01, 0.05, 0.07], 1),
                            record("pretrained", [0.2, 0.5, math.nan], [0.01, 0.05, math.nan], 1)],
                           "test accuracy (%)", tmp_path / "g.png", "a run", scale=100,
                           limits=(0.0, 100.0))
    ax = figures[0].axes[0]
    top = max(y for band in ax.collections for _, y in band.get_paths()[0].vertices)
    assert top == pytest.approx(100.0)  # 99 + 7 clipped
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["maml", "pretrained; not finite from step 2 on (diverged)"]


def test_references_of_no_steps_are_lines_and_a_run_of_no_steps_is_not_zoomed_away(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    plots.plot_step_curves([record("maml", [0.2], [0.01], 1)], "test accuracy (%)",
                           tmp_path / "f.png", "a run", scale=100, zoom=True,
                           references={1: [("people", 95.5)]})
    ax = figures[0].axes[0]
    people = [line for line in ax.get_lines() if line.get_label() == "people"]
    assert len(people) == 1 and list(people[0].get_ydata()) == [95.5, 95.5]
    low, high = ax.get_ylim()
    assert low < 20 < 95.5 < high  # the run's one point (0 steps) stays in view


def test_a_figure_is_stale_once_a_file_it_drew_changes_or_goes(tmp_path: Path) -> None:
    figures = tmp_path / "figures"
    log, evaluation = tmp_path / "metrics-maml.csv", tmp_path / "eval.json"
    log.write_text("iteration\n1\n")
    evaluation.write_text("[]")
    curves, steps = (save_figure(figure(), figures / name) for name in ("c.png", "s.png"))
    assert plots.stale_figures(figures) == {
        name: "no record of what it was drawn from (drawn-from.json)" for name in ("c.png", "s.png")}
    plots.record_drawn_from(figures, {curves: plots.digests([log])})
    plots.record_drawn_from(figures, {steps: plots.digests([evaluation, log])})  # (c.png kept)
    assert plots.stale_figures(figures) == {}
    log.write_text("iteration\n1\n2\n")
    evaluation.unlink()
    assert plots.stale_figures(figures) == {
        "c.png": "metrics-maml.csv changed since it was drawn",
        "s.png": "metrics-maml.csv changed since it was drawn; eval.json, which it drew, is gone"}
    (figures / "drawn-from.json").write_text('{"c.png": ["an edit"]}')  # not ours: no record
    assert set(plots.stale_figures(figures)) == {"c.png", "s.png"}
    plots.record_drawn_from(figures, {curves: plots.digests([log])})  # (written anew)
    assert list(plots.stale_figures(figures)) == ["s.png"]


def test_learning_curves_are_stale_once_another_learner_logs(tmp_path: Path) -> None:
    """Plotted while MAML alone had trained (the learners train one after another), the curves
    lacked the baseline's, and no log they drew changed: they counted as current."""
    figures = tmp_path / "figures"
    (tmp_path / "metrics-maml.csv").write_text("iteration\n1\n")
    (tmp_path / "eval.json").write_text("[]")
    curves, steps = (save_figure(figure(), figures / name) for name in ("c.png", "s.png"))
    plots.record_drawn_from(figures, {curves: plots.digests([tmp_path / "metrics-maml.csv"]),
                                      steps: plots.digests([tmp_path / "eval.json"])})
    (tmp_path / "metrics-pretrained.csv").write_text("iteration\n1\n")
    assert plots.stale_figures(figures) == {  # (the evaluation's figure draws no log)
        "c.png": "metrics-pretrained.csv, which it did not draw, is new"}


def test_few_shot_learning_curves_draw_accuracy_in_percent_as_its_other_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log keeps accuracy as a fraction; its evaluation figure and tables show percent."""
    from fastmaml.experiments import create_run

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    experiment = create_run("omniglot-5w1s", tmp_path / "run", ["data_root=/nowhere"])
    (tmp_path / "run" / "metrics-maml.csv").write_text(
        "iteration,elapsed_s,query_metric,val_accuracy\n10,1,0.5,\n20,2,0.75,0.8\n")
    experiment.plot()
    by_iteration = figures[0].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in by_iteration.get_lines()}
    assert lines == {"maml: training query accuracy (%)": [50.0, 75.0],
                     "maml: validation accuracy (%)": [80.0]}
    assert by_iteration.get_ylabel() == "training query accuracy (%) / validation accuracy (%)"
