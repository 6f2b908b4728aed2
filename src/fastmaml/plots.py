"""Figures shared by the experiments: metric against inner steps, and learning curves."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import read_json, refuse_unwritable, replace_atomically, write_text_atomic
from .errors import ConfigError, DataError, FastMAMLWarning, warn
from .paper import PaperValues
from .train import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Each method's colour in every figure (learning curves, curves against steps, adaptation)
METHOD_COLORS = {"maml": "tab:blue", "pretrained": "tab:orange", "oracle": "tab:green",
                 "random": "tab:red", "first-order maml": "tab:purple"}
OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def colors_for(methods: Sequence[str]) -> dict[str, str]:
    """Each method's colour: its own where it has one, else the next unused one."""
    others = iter(OTHER_COLORS * len(methods))
    return {m: METHOD_COLORS.get(m) or next(others) for m in dict.fromkeys(methods)}


def new_figure(width: float, height: float) -> Figure:
    """A figure of its own, outside pyplot: drawing one (or importing fastmaml) leaves the
    user's matplotlib backend and pyplot's figures as they were, and the import of matplotlib
    waits until a figure is drawn."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def method_label(record: dict[str, Any]) -> str:
    """A record's method, with its inner step size where it has its own (as the paper's
    legends: "pretrained, step 0.01")."""
    size = step_size(record)
    return record["method"] + (f", step {size}" if size else "")


def step_size(record: dict[str, Any]) -> str | None:
    """A record's first inner step size as tables and legends show it: a number, or its
    ``lr_mode`` where the method adapted with its own learned rates."""
    if record.get("lr_mode", "fixed") != "fixed":
        return f"learned ({record['lr_mode']})"
    return f"{record['inner_lr']:g}" if "inner_lr" in record else None


def ci_band(record: dict[str, Any], scale: float = 1.0) -> tuple[list[float], ...]:
    """A record's mean and the lower and upper edges of its 95% CI, times ``scale``."""
    pairs = list(zip(record["mean"], record["ci95"]))
    return ([m * scale for m, _ in pairs], [(m - c) * scale for m, c in pairs],
            [(m + c) * scale for m, c in pairs])


def plot_step_curves(records: list[dict[str, Any]], ylabel: str, path: Path, title: str,
                     log_scale: bool = False, scale: float = 1.0,
                     paper: dict[int, PaperValues] | None = None, zoom: bool = False,
                     references: dict[int, list[tuple[str, float]]] | None = None,
                     limits: tuple[float, float] | None = None) -> Path:
    """One panel per K-shot: each method's mean with its 95% CI band against inner steps
    (values times ``scale``), the paper's figures as stars at their steps, and ``references``
    of no steps (people, other methods) as dotted lines. ``zoom``: the axis spans the run's
    steps 1 on (an accuracy from chance at step 0 would flatten the rest), step 0's value in the
    legend. On a log axis, a band whose lower edge is not positive is drawn as its upper edge
    alone. ``limits``: the values' range (accuracy: 0-100%), to which the bands are clipped. A
    curve that is not finite from some step on (a diverged adaptation) says so in the legend."""
    shots = sorted({r["k_shot"] for r in records})
    colors = colors_for([r["method"] for r in records])
    fig = new_figure(4.8 * len(shots), 3.9)
    axes = fig.subplots(1, len(shots), squeeze=False)
    for ax, k in zip(axes[0], shots):
        shown = []  # the values the zoomed axis spans
        for r in (r for r in records if r["k_shot"] == k):
            mean, low, high = ci_band(r, scale)
            if limits:
                low, high = [max(v, limits[0]) for v in low], [min(v, limits[1]) for v in high]
            label = method_label(r) + (f" (0 steps: {mean[0]:.3g})" if zoom else "")
            diverged = next((s for s, v in zip(r["steps"], mean) if not math.isfinite(v)), None)
            if diverged is not None:
                label += f"; not finite from step {diverged} on (diverged)"
            bounded = [not (log_scale and value <= 0) for value in low]
            unbounded = [s for s, b in zip(r["steps"], bounded) if not b]
            if unbounded:
                label += (f"; 95% CI reaches 0 at step{'s' if len(unbounded) > 1 else ''} "
                          f"{', '.join(map(str, unbounded))} (upper edge dashed)")
            color = colors[r["method"]]
            ax.plot(r["steps"], mean, marker="o", ms=3, color=color, label=label)
            ax.fill_between(r["steps"], low, high, where=bounded, color=color, alpha=0.2)
            if unbounded:
                ax.plot(r["steps"], [h if not b else float("nan") for h, b in zip(high, bounded)],
                        ls="--", lw=0.8, marker="_", color=color)
            shown += [v for s, *values in zip(r["steps"], mean, low, high) if s >= 1
                      for v in values]
        run_shown = bool(shown)
        for (label, values), marker in zip((paper or {}).get(k, []), "*Pd"):
            ax.scatter(list(values), list(values.values()), marker=marker, s=70, color="black",
                       zorder=3, label=label)
            shown += list(values.values())
        for (label, value), style in zip((references or {}).get(k, []), (":", "-.", (0, (1, 3)))):
            ax.axhline(value, color="black", lw=1, ls=style, label=label)
            shown.append(value)
        ax.set(title=f"{k}-shot", xlabel="inner gradient steps", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)  # (no step 1.5)
        if zoom and run_shown:
            pad = max(0.05 * (max(shown) - min(shown)), 0.1)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9, wrap=True)
    return save_figure(fig, path)


def plot_learning_curves(csv_paths: list[Path], keys: dict[str, str], path: Path,
                         title: str, scale: float = 1.0) -> Path:
    """Each key of each metrics CSV (``keys``: column -> what it is) against iterations (left)
    and wall-clock time (right): one colour per learner, one line style per key. The values
    are drawn times ``scale`` (100: a log's fractions as the percentages of the evaluation's
    figures)."""
    fig = new_figure(10, 3.9)
    by_iter, by_time = fig.subplots(1, 2)
    runs = [csv_path.stem.removeprefix("metrics-") for csv_path in csv_paths]
    colors = colors_for(runs)
    drawn = False
    for csv_path, run in zip(csv_paths, runs):
        rows = read_metrics(csv_path)
        for (key, meaning), line_style in zip(keys.items(), itertools.cycle(("-", "--", ":"))):
            points = [(float(r["iteration"]), float(r["elapsed_s"]), float(r[key]) * scale)
                      for r in rows if r.get(key) not in ("", None)]
            if points:
                its, secs, values = zip(*points)
                style = {"label": f"{run}: {meaning}" if len(keys) > 1 else run,
                         "color": colors[run], "ls": line_style,
                         "marker": "o" if len(points) < 3 else None,  # (one row: no line)
                         # hollow past the first style: the legend's short line hides dashes
                         "mfc": "none" if line_style != "-" else None}
                by_iter.plot(its, values, **style)
                by_time.plot([s / 60 for s in secs], values, **style)
                drawn = True
    by_iter.set(xlabel="iteration", ylabel=" / ".join(keys.values()))
    by_iter.xaxis.get_major_locator().set_params(integer=True)  # (no iteration 1.5)
    by_time.set(xlabel="wall-clock of training (min)")
    for ax in (by_iter, by_time):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no metrics logged yet", ha="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=9, wrap=True)
    return save_figure(fig, path)


def counted(count: int, noun: str) -> str:
    """``count`` and a regular noun in words: "1 task", "5 tasks" (tables, notes and legends)."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def steps_label(count: int) -> str:
    """``count`` inner steps in words: "1 step", "5 steps"."""
    return counted(count, "step")


def plot_regression_adaptation(grid: Any, before: Any, after: Any, steps: int, support_x: Any,
                               support_y: Any, query_x: Any, query_y: Any, path: Path,
                               query_labelled: bool, labels: tuple[str, str] = ("x", "y")
                               ) -> Path:
    """A new regression task: its support points, the prediction before and after ``steps``
    inner steps, and the query points (their labels, or the predictions for them); ``labels``:
    the axes' (the run's column names)."""
    fig = new_figure(6, 3.8)
    ax = fig.subplots()
    ax.plot(grid, before, ":", color="tab:green", label="before adaptation")
    ax.plot(grid, after, "-", color="tab:green", label=f"after {steps_label(steps)}")
    ax.scatter(support_x, support_y, marker="^", color="purple", zorder=3,
               label=f"{len(support_x)} support points")
    ax.scatter(query_x, query_y, marker="o", s=12, color="tab:red" if query_labelled else "tab:gray",
               zorder=3, label="query points" if query_labelled else "query predictions")
    ax.set(xlabel=labels[0], ylabel=labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def check_figure_path(path: Path) -> None:
    """Refuse, before any work, a figure file that matplotlib cannot write by its suffix."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"cannot draw a figure to {path}: name a file ending in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    if path.is_dir():
        raise ConfigError(f"cannot draw a figure to {path}: it is a folder")
    refuse_unwritable(path, "the figure")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its folder created) atomically, so that a plot killed while
    writing leaves the old figure whole."""
    fig.tight_layout()
    file_format = path.suffix.lstrip(".").lower() or None  # (the temporary's name has none)
    postscript = logging.getLogger("matplotlib.backends.backend_ps")
    level = postscript.level
    if file_format in ("ps", "eps"):
        warn(f"{path}: PostScript has no transparency, so the shaded bands are drawn "
             "opaque and may hide lines; .pdf or .svg keep them", FastMAMLWarning)
        postscript.setLevel(logging.ERROR)  # (matplotlib's own words for it, said above)
    try:
        replace_atomically(path, lambda handle: fig.savefig(handle, dpi=120, format=file_format))
    except OSError as error:
        raise DataError(f"cannot write the figure {path}: {error}") from None
    finally:
        postscript.setLevel(level)
    return path


# Beside a run's figures: the files each figure was drawn from, with their SHA-256, so that a
# figure left behind by its run (trained on, evaluated again, not plotted) is known to be stale.
DRAWN_FROM = "drawn-from.json"
LOGS = "metrics-*.csv"  # the learners' logs: a figure that draws logs draws all of them


def digests(paths: Sequence[Path], root: Path | None = None) -> dict[str, str]:
    """Each file's path relative to ``root`` (default: its name) and SHA-256: what a figure is
    drawn from. Taken before drawing, so a log that grows meanwhile (its run still training)
    makes the figure stale, never current."""
    return {(path.relative_to(root).as_posix() if root else path.name): _sha256(path)
            for path in paths}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _drawn_from(figures_dir: Path) -> dict[str, dict[str, str]]:
    """The record of ``figures_dir``; none where it is missing, damaged or edited (the figures
    are then not known to be current, and drawing them again writes it anew)."""
    path = figures_dir / DRAWN_FROM
    try:
        record = read_json(path) if path.is_file() else {}
    except DataError:
        return {}
    valid = isinstance(record, dict) and all(
        isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())
        for inputs in record.values())
    return record if valid else {}


def record_drawn_from(figures_dir: Path, drawn: dict[Path, dict[str, str]]) -> None:
    """Add to ``figures_dir``'s record which inputs (their ``digests``, from the run folder
    above it) each figure in ``drawn`` was drawn from; the other figures' entries are kept."""
    record = {name: inputs for name, inputs in  # (a figure removed since: its entry goes)
              (_drawn_from(figures_dir) | {path.name: inputs for path, inputs in drawn.items()}
               ).items() if (figures_dir / name).is_file()}
    write_text_atomic(json.dumps(dict(sorted(record.items())), indent=1) + "\n",
                      figures_dir / DRAWN_FROM)


def retire_figures(figures_dir: Path, drawn: Sequence[Path], input_name: str) -> None:
    """Remove the figures recorded as drawn from ``input_name`` (e.g. eval.json) that are not
    among ``drawn``, the figures drawn from it now (an evaluation without a K an earlier one
    had): left, they would stay stale for good."""
    drawn_names = {path.name for path in drawn}
    for name, inputs in _drawn_from(figures_dir).items():
        if input_name in inputs and name not in drawn_names:
            (figures_dir / name).unlink(missing_ok=True)


def stale_figures(figures_dir: Path) -> dict[str, str]:
    """Each figure (``*.png``) in ``figures_dir`` that may not show its run's files as they
    are now, and why: an input changed or gone since it was drawn, a log new since (a learner
    trained after it), or no record of its inputs."""
    record, stale = _drawn_from(figures_dir), {}
    for figure in sorted(figures_dir.glob("*.png")):
        if (inputs := record.get(figure.name)) is None:
            stale[figure.name] = f"no record of what it was drawn from ({DRAWN_FROM})"
            continue
        files = {name: figures_dir.parent / name for name in inputs}  # (relative to the run)
        gone = [name for name, path in files.items() if not path.is_file()]
        changed = [name for name, path in files.items()
                   if path.is_file() and inputs[name] != _sha256(path)]
        new = [path.name for path in sorted(figures_dir.parent.glob(LOGS))
               if path.name not in inputs] if any(fnmatch(name, LOGS) for name in inputs) else []
        reasons = ([f"{', '.join(changed)} changed since it was drawn"] if changed else []) \
            + ([f"{', '.join(gone)}, which it drew, {'are' if len(gone) > 1 else 'is'} gone"]
               if gone else []) \
            + ([f"{', '.join(new)}, which it did not draw, is new"] if new else [])
        if reasons:
            stale[figure.name] = "; ".join(reasons)
    return stale
