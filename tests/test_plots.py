"""Figures: written atomically, in the format their name asks for."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from fastmaml.plots import counted, save_figure, steps_label


def figure() -> plt.Figure:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_figure_is_written_in_the_format_of_its_name(tmp_path: Path) -> None:
    assert save_figure(figure(), tmp_path / "a" / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert save_figure(figure(), tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in save_figure(figure(), tmp_path / "f.svg").read_bytes()[:500]


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
