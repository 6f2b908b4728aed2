"""Figures: written atomically, in the format their name asks for."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from fastmaml import plots
from fastmaml.errors import FastMAMLWarning
from fastmaml.plots import counted, save_figure, steps_label


def figure() -> plt.Figure:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_figure_is_written_in_the_format_of_its_name(tmp_path: Path) -> None:
    assert save_figure(figure(), tmp_path / "a" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert save_figure(figure(), tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in save_figure(figure(), tmp_path / "f.svg").read_bytes()[:500]


def test_postscript_says_in_our_words_that_it_draws_transparency_opaque(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fig, ax = plt.subplots()
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

    def cut_short(self: plt.Figure, handle, **_: object) -> None:  # e.g. a kill mid-write
        handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(plt.Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_figure(figure(), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["f.png"]


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
    plots.plot_learning_curves([one_row], ["loss"], tmp_path / "a.png")
    plots.plot_learning_curves([empty], ["loss"], tmp_path / "b.png")
    by_iteration = figures[0].axes[0]
    line, = by_iteration.get_lines()
    assert list(line.get_xdata()) == [20.0] and line.get_marker() == "o"  # a point, drawn
    assert by_iteration.get_legend() is not None
    for ax in figures[1].axes:
        assert [t.get_text() for t in ax.texts] == ["no metrics logged yet"]
        assert ax.get_legend() is None and not ax.get_lines()
    for fig in figures:
        plt.close(fig)
