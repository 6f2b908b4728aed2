"""``fastmaml report`` and ``fastmaml reproduce``: every experiment beside the paper, in one
generated document.

The report reads run directories only (config.yaml, eval.json, eval-history.jsonl,
metrics-*.csv, machine.json, figures/), compares each evaluated run with the paper's row in
``fastmaml.paper.HEADLINES`` and writes Markdown. It holds no date or absolute path of its own
making, so regenerating it from the same runs gives the same bytes (``docs/REPORT.md`` is
checked to be current).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic import read_json, write_text_atomic
from .config import did_you_mean, load_config_dict
from .distributed import is_main, world
from .errors import CheckpointError, ConfigError, DataError, FastMAMLError, FastMAMLWarning, warn
from .experiments import PRESETS, experiment_class, load_experiment, preset_config, train_run
from .experiments.base import (RESUMABLE_KEYS, UNREADABLE_RECORDS, damaged_evaluation, read_eval,
                               read_evaluations, refuse_run_file)
from .paper import HEADLINES, LOCOMOTION, NAV, Headline
from .plots import counted, stale_figures, steps_label
from .train import checkpoint_path, load_checkpoint, read_metrics

# ----- status of a row -----

# the rounding of a float32 record: an accuracy saved as 0.8999999761581421 reached 90%
ROUNDING = 1e-6


def status(mean: float, ci: float, headline: Headline) -> str:
    """``met`` (at or beyond the paper's figure), ``within CI`` (the paper's figure inside our
    95% interval) or ``short by X`` (X in the row's unit; said where our interval still meets
    the paper's, which is not itself a test of the difference); ``not finite`` where the
    adaptation diverged."""
    if not math.isfinite(mean):
        return "not finite (the adaptation diverges)"
    gap = (mean - headline.value) if headline.higher_is_better else (headline.value - mean)
    if gap >= -ROUNDING * max(1.0, abs(headline.value)):  # (a float32 mean at the figure: met)
        return "met"
    if -gap <= ci:
        return "within CI"
    meet = headline.ci is not None and -gap <= ci + headline.ci
    return f"short by {-gap:.3g}" + (" (the 95% intervals meet)" if meet else "")


def shape_status(maml: tuple[float, float], pretrained: tuple[float, float],
                 paired: tuple[float, float] | None = None) -> str:
    """Locomotion (returns on another scale than rllab's): MAML's (mean, ci) after one step
    against the pretrained baseline's: ``met`` when MAML is above it, ``below pretrained by X``
    when below, else ``overlaps pretrained`` (not the paper's CI or figure). Judged by the
    task-by-task difference (mean, ci) where both ran on the same test tasks (``paired``, the
    sharper test), else by the two intervals."""
    (m, m_ci), (p, p_ci) = maml, pretrained
    if not all(map(math.isfinite, (m, m_ci, p, p_ci, *(paired or ())))):
        return "not finite (an adaptation diverges)"
    low, high = ((paired[0] - paired[1], paired[0] + paired[1]) if paired
                 else (m - m_ci - (p + p_ci), m + m_ci - (p - p_ci)))
    if low > 0:
        return "met (MAML above pretrained)"
    if high >= 0:
        return "overlaps pretrained"
    return f"below pretrained by {p - m:.3g}"


# ----- what a run directory holds -----

@dataclass
class Run:
    """A run directory as the report sees it."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    iterations: int  # MAML's iterations done (its checkpoint's, else its metrics log's)
    train_seconds: float  # summed over the learners (their checkpoints', else their logs')
    machines: list[dict[str, Any]]
    figures: list[Path] = field(default_factory=list)
    validation: list[tuple[int, float, float]] = field(default_factory=list)  # it, s, accuracy
    checkpoints: dict[str, int] = field(default_factory=dict)  # learner -> checkpoint iteration
    # its evaluation history, oldest first (``history``: read from the run when first asked)
    evaluations: list[list[dict[str, Any]]] | None = None

    def history(self) -> list[list[dict[str, Any]]]:
        """The records of each of its evaluations, oldest first (``read_evaluations``)."""
        if self.evaluations is None:
            self.evaluations = read_evaluations(self.path)
        return self.evaluations

    @property
    def preset(self) -> str:
        return str(self.config.get("preset", ""))

    @property
    def stale_figures(self) -> dict[str, str]:
        """Its figures that may not show it as it is now, and why (``plots.stale_figures``)."""
        return stale_figures(self.path / "figures") if self.figures else {}

    @property
    def stale_evaluation(self) -> str:
        """A warning when eval.json evaluated older checkpoints than the run now holds, or none
        of a learner trained since (a meta-RL oracle added), or a baseline short of its
        iterations."""
        record = self.records[0] if self.records else {}
        evaluated = record.get("checkpoint_iterations", {})
        newer = [f"{name} {at:,} -> {self.checkpoints[name]:,}" for name, at in evaluated.items()
                 if self.checkpoints.get(name, at) > at]
        since = [f"{name} trained to {self.checkpoints[name]:,} iterations"
                 for name in sorted(set(self.checkpoints) - set(evaluated))] if evaluated else []
        if newer or since:
            said = ([f"evaluated older checkpoints ({', '.join(newer)} iterations)"] if newer
                    else []) + ([f"{' and '.join(since)} since the evaluation"] if since
                                 else [])
            return f"{'; '.join(said)}: run `fastmaml eval {self.path.as_posix()}`"
        # a baseline evaluated before it finished (MAML's own iterations are in the table)
        targets = record.get("target_iterations", {})
        early = [f"{name} at {at:,} of {targets[name]:,}" for name, at in evaluated.items()
                 if name != "maml" and at < targets.get(name, at)]
        return (f"evaluated {', '.join(early)} iterations: train it on, then `fastmaml eval "
                f"{self.path.as_posix()}`" if early else "")


def read_run(path: Path) -> Run:
    """The run at ``path``; its config as training reads it (a key left out: its default)."""
    config = load_config_dict(path / "config.yaml")
    try:  # a bad value (an edit): named with its file, as train and eval name it
        config = experiment_class(str(config.get("experiment", ""))).config_cls.from_dict(
            config).to_dict()
    except ConfigError as error:
        raise ConfigError(f"{path / 'config.yaml'}: {error}") from None
    eval_path = path / "eval.json"
    records = read_eval(path) if eval_path.is_file() else []
    evaluated = records[0].get("checkpoint_iterations", {}) if records else {}
    checkpoints, elapsed = {}, {}
    trained = {p.stem for p in (path / "checkpoints").glob("*.pt") if not p.name.startswith(".")}
    for learner in {"maml", *evaluated, *trained}:  # a damaged one is left to `train` to name
        with contextlib.suppress(CheckpointError):
            checkpoint = checkpoint_path(path, learner)
            if checkpoint.is_file():
                state = load_checkpoint(checkpoint)
                checkpoints[learner] = state["iteration"]
                if isinstance(state.get("elapsed_s"), (int, float)):
                    elapsed[learner] = float(state["elapsed_s"])
    iterations, seconds, validation = 0, 0.0, []
    for log in sorted(path.glob("metrics-*.csv")):
        learner, rows = log.stem.removeprefix("metrics-"), read_metrics(log)
        if learner in checkpoints:  # rows past it are work lost (a resume drops them)
            rows = [row for row in rows if int(row["iteration"]) <= checkpoints[learner]]
        if rows:  # the checkpoint's time: a run stopped between log rows trained on to it
            seconds += elapsed.get(learner, _seconds(rows[-1], log))
            if learner == "maml":
                iterations = int(rows[-1]["iteration"])
                validation = [(int(r["iteration"]), _seconds(r, log), float(r["val_accuracy"]))
                              for r in rows if r.get("val_accuracy") not in (None, "")]
    # a run stopped between log rows (SIGTERM) is as far as its checkpoint, and one stopped
    # before its first checkpoint kept nothing (a damaged checkpoint: the log's count)
    # (a run shipped without its checkpoints: as far as its evaluation says)
    iterations = checkpoints.get("maml", iterations if checkpoint_path(path, "maml").is_file()
                                 else evaluated.get("maml", 0))
    machine_path, machines = path / "machine.json", []
    with contextlib.suppress(DataError):  # a damaged record: the machine is not known
        machines = read_json(machine_path) if machine_path.is_file() else []
    if not (isinstance(machines, list) and all(isinstance(m, dict) for m in machines)):
        machines = []  # (an edited one too)
    return Run(path, config, records, iterations, seconds, machines,
               sorted((path / "figures").glob("*.png")), validation, checkpoints)


def _seconds(row: dict[str, str], log: Path) -> float:
    """A metrics row's ``elapsed_s``; a ``DataError`` naming the log where it is not a number."""
    try:
        return float(row.get("elapsed_s") or "")
    except ValueError:
        raise DataError(f"{log}: the row of iteration {row['iteration']} has no elapsed_s "
                        "(an edit?): mend or remove it") from None


def run_dirs(path: Path) -> list[Path]:
    """The run directories at ``path``: itself, or the folders just below it."""
    if (path / "config.yaml").is_file():
        return [path]
    below = sorted(path.iterdir()) if path.is_dir() else []
    return [p for p in below if (p / "config.yaml").is_file()]


def find_runs(paths: Sequence[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The run directories in ``paths`` (``run_dirs``), read, and those left unread with why.

    A run directory named in ``paths`` that cannot be read is an error; one found below a
    named folder is left out with a warning, so that one damaged run does not hide the others.
    """
    found = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist" + (
                " (report reads results/ of the current folder unless given run directories)"
                if path == Path("results") else ""))
        candidates = run_dirs(path)
        if not candidates:
            raise ConfigError(f"no fastmaml run directory at or below {path}")
        found += candidates
    named = {path.resolve() for path in paths if (path / "config.yaml").is_file()}
    unique: dict[Path, Path] = {}  # one run given twice: reported once, where it came first
    for p in found:
        unique.setdefault(p.resolve(), p)
    runs, unread = [], []
    for resolved, p in unique.items():
        try:
            runs.append(_readable(read_run(p)))
        except FastMAMLError as error:
            if resolved in named:
                raise
            warn(f"{p.as_posix()} is left out of the report: {error}", FastMAMLWarning)
            unread.append((p, str(error)))
    return runs, unread


def _readable(run: Run) -> Run:
    """``run``, once its records render (an edited eval.json may lack what they need)."""
    try:
        render([run], run.path / "REPORT.md")
    except FastMAMLError:
        raise
    except UNREADABLE_RECORDS as error:
        raise damaged_evaluation(run.path, error) from None
    return run


def headline_key(config: dict[str, Any]) -> str | None:
    """Which of the paper's rows a run's config reproduces."""
    experiment = config.get("experiment")
    if experiment == "sinusoid":
        return "sinusoid"
    if experiment == "fewshot" and config.get("dataset") in ("omniglot", "miniimagenet"):
        key = f"{config['dataset']}-{config['n_way']}w{config['k_shot']}s"
        if config.get("split") == "lake":
            return f"{key}-lake"
        if config.get("within_alphabet"):  # tasks within one alphabet on another split: no
            return None                    # protocol of the paper's
        if config.get("network") == "mlp":  # Table 1's MLP row
            key += "-mlp"
        if config.get("first_order") and _is_headline(f"{key}-fo"):  # (MiniImagenet's)
            key += "-fo"
        return key if _is_headline(key) else None
    if experiment == "rl":
        names = {NAV: "rl-nav2d", **dict(zip(LOCOMOTION, ("rl-cheetah-vel", "rl-cheetah-dir",
                                                         "rl-ant-vel", "rl-ant-dir")))}
        return names.get(config.get("env", ""))
    return None


def _is_headline(key: str) -> bool:
    return any(h.key == key for h in HEADLINES)


@dataclass
class Row:
    headline: Headline
    run: Run | None
    mean: float | None = None
    ci: float | None = None
    status: str = ""


def _record(run: Run, **match: Any) -> dict[str, Any] | None:
    return next((r for r in run.records if all(r.get(k) == v for k, v in match.items())), None)


def evaluate_row(headline: Headline, run: Run) -> Row:
    """Our figure for ``headline`` from ``run``'s eval.json, and its status."""
    scale = 100.0 if headline.metric.startswith("accuracy") else 1.0
    maml = [r for r in run.records if r.get("method") in ("maml", "first-order maml")]
    if headline.key == "sinusoid":
        record = next((r for r in maml if r["k_shot"] == 5), None)
    elif headline.key.endswith("-lake"):
        record = _record(run, within_alphabet=True)
    elif headline.key.startswith("rl-"):
        record = _record(run, method="maml")
    else:
        record = next((r for r in run.records if not r.get("within_alphabet")), None)
    shots = ([str(r["k_shot"]) for r in maml]
             if headline.key == "sinusoid" else [])
    if record is None and shots:
        return Row(headline, run, status=f"evaluated with K={', '.join(shots)}, the paper's row "
                   f"is 5-shot: `fastmaml eval {run.path.as_posix()} "
                   f"eval_k_shots={','.join(['5', *shots])}`")
    if record is None:
        return Row(headline, run, status="not evaluated")
    if headline.step >= len(record["mean"]):
        return Row(headline, run, status=f"evaluated to {len(record['mean']) - 1} step(s); the "
                   f"paper's figure is after {headline.step}: `fastmaml eval "
                   f"{run.path.as_posix()} eval_inner_steps={headline.step}`")
    mean, ci = record["mean"][headline.step] * scale, record["ci95"][headline.step] * scale
    horizon = run.config.get("horizon") or headline.horizon  # 0: the paper's
    if horizon != headline.horizon and not headline.shape_only:  # (those: MAML vs pretrained)
        verdict = (f"not comparable: horizon {horizon}, the paper's {headline.horizon} (a "
                   "return sums over an episode's steps)")
    elif headline.shape_only:
        pretrained = _record(run, method="pretrained")
        paired = record.get("paired_difference", {}).get("pretrained")
        # the same test tasks for both: the task-by-task difference is the sharper test
        at = headline.step
        difference = (paired["mean"][at], paired["ci95"][at]) if paired else None
        verdict = (shape_status((mean, ci), (pretrained["mean"][1], pretrained["ci95"][1]),
                                difference) if pretrained else "no pretrained baseline")
        if "right_way" in record:  # direction tasks: from the wrong way to the right way?
            before, after = record["right_way"][0], record["right_way"][headline.step]
            if verdict.startswith("met") and after <= before:  # its step did not find the way
                verdict = "not met: MAML above pretrained, but turns no more tasks the right way"
            verdict += f"; right way {_percent(before)} -> {_percent(after)} of tasks"
        if difference and all(map(math.isfinite, difference)):
            verdict += (f"; MAML minus pretrained on the same tasks {difference[0]:+.1f} "
                        f"+- {difference[1]:.1f}")
    else:
        verdict = status(mean, ci, headline)
    if record.get("tasks", headline.tasks) != headline.tasks:
        verdict += f" ({record['tasks']} test tasks; the paper's protocol has {headline.tasks})"
    if headline.shape_only and horizon != headline.horizon:
        verdict += f" (horizon {horizon}, the paper's {headline.horizon})"
    episodes = record.get("eval_settings", {}).get("eval_trajectories",
                                                   run.config.get("eval_trajectories"))
    if headline.eval_steps and episodes and episodes * horizon != headline.eval_steps:
        verdict += (f" (evaluated on {episodes} x {horizon} environment steps per task and "
                    f"step; the official test's {headline.eval_steps:,})")
    if run.stale_evaluation:
        verdict += f" ({run.stale_evaluation})"
    return Row(headline, run, mean, ci, verdict)


# ----- the document -----

def _percent(share: float) -> str:
    """``share`` in per cent, whole where it is (40%), else to a tenth (12.5% of 40 tasks)."""
    return f"{share * 100:.1f}".removesuffix(".0") + "%"


def _fmt(value: float | None, digits: int = 2) -> str:
    """``value`` to ``digits`` decimals; one that rounds to zero is "0.0", not "-0.0"."""
    return "" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"


def _link(target: Path, report_dir: Path) -> str:
    return os.path.relpath(target.resolve(), report_dir.resolve())


def _changed_settings(run: Run) -> dict[str, Any]:
    """The run's settings that differ from its preset (what the train command must say)."""
    if run.preset not in PRESETS:
        return {}
    defaults = preset_config(run.preset, []).to_dict()
    saved = experiment_class(PRESETS[run.preset].experiment).config_cls.from_dict(
        run.config).to_dict()
    # where the data is; how fast it trains; what the run records of its data
    skip = {"data_root", "download", "compile", "value_ranges"}
    return {k: v for k, v in saved.items() if k not in skip and defaults.get(k) != v}


def _as_overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in settings.items()]


def _overrides(run: Run) -> list[str]:
    return _as_overrides(_changed_settings(run))


# settings of the baselines alone, not of the MAML run a row shows
_BASELINE_SETTINGS = {"pretrained", "baseline_lrs", "tune_tasks"}


def _row_title(headline: Headline, run: Run | None) -> str:
    """The headline's title, and how the run's recipe differs from the paper's: ``fast
    recipe`` for a ``-fast`` preset, else the preset where it is not the row's own (e.g. a
    ``-cpu`` one), and the run's changes to its preset's recipe (``_recipe``; evaluation and
    baseline settings left out; the iterations of a cosine schedule, which they stretch, in)."""
    if run is None:
        return headline.title
    notes = (["fast recipe"] if run.preset.endswith("-fast")
             else [f"preset {run.preset}"] if run.preset != headline.key else [])
    schedule = _changed_settings(run).get("iterations")
    if schedule is not None and run.config.get("meta_lr_schedule") == "cosine":
        notes.append(f"iterations={schedule}")
    notes += _as_overrides({k: v for k, v in _recipe(run)[1].items()
                            if k not in _BASELINE_SETTINGS and not k.startswith("eval_")})
    return headline.title + (f" ({', '.join(notes)})" if notes else "")


def _commands(run: Run) -> list[str]:
    data = " --data-root DATA" if run.config.get("data_root") else ""
    train = " ".join([f"fastmaml train {run.preset} --out {run.path.as_posix()}{data}",
                      *_overrides(run)])
    used = run.records[0].get("eval_settings", {}) if run.records else {}
    evaluate = " ".join([f"fastmaml eval {run.path.as_posix()}",  # as the evaluation ran
                         *_as_overrides({k: v for k, v in used.items()
                                         if run.config.get(k) != v})])
    return [train, evaluate, f"fastmaml plot {run.path.as_posix()}"]


def _data_note(run: Run) -> list[str]:
    """What ``DATA`` in ``_commands`` stands for: the run's own folder is its machine's."""
    if not run.config.get("data_root"):
        return []
    fetch = (" (`download=true` fetches Omniglot's official files into it)"
             if run.config.get("dataset") == "omniglot" else "")
    return [f"`DATA`: the folder that holds the data set{fetch}.", ""]


def _machine(run: Run) -> str:
    if not run.machines:
        return "not recorded"
    kinds = {f"{m.get('processor', '?')}"
             + (f" ({m['cpu_capability']})" if "cpu_capability" in m else "")
             + f", {m.get('cpus', '?')} CPUs, {m.get('device', '?')}, torch {m.get('torch', '?')}"
             for m in run.machines}
    return "; ".join(sorted(kinds))


def _digits(headline: Headline) -> int:
    return 3 if headline.metric == "MSE" else 1 if headline.metric == "return" else 2


def render(runs: list[Run], report_path: Path, unread: Sequence[tuple[Path, str]] = (),
           budget: str | None = None, not_reproduced: Mapping[str, str] | None = None) -> str:
    """The report's Markdown for ``runs`` (and a list of the ``unread`` run directories, with
    why); links are relative to ``report_path``'s folder. An experiment without a run names
    ``reproduce``'s ``budget`` (where it has the experiment), or why ``reproduce`` could not
    run it (``not_reproduced``: experiment -> error)."""
    report_dir, anchors, labels = report_path.parent, _anchors(runs), run_labels(runs)
    rows: list[Row] = []
    for headline in HEADLINES:
        matching = [r for r in runs if headline_key(r.config) == headline.key]
        rows += [evaluate_row(headline, r) for r in matching]
        if not headline.variant and all(r.preset.endswith("-fast") for r in matching):
            # no run of the paper's recipe
            rows.append(Row(headline, None))
    lines = ["# fastmaml against the paper", "",
             "Generated by `fastmaml report` from the run directories listed below; do not edit "
             "by hand. Status: `met` = at or beyond the published figure; `within CI` = the "
             "published figure lies inside our 95% interval; `short by X` = below it by more "
             "(said where our interval still meets the published one). "
             "Locomotion returns (gymnasium's models, not rllab's) are judged by shape: MAML "
             "against the pretrained policy after one step (`met` where MAML is above it, "
             "`below pretrained by X` where below, else `overlaps pretrained`; by the "
             "task-by-task difference on the same test tasks where the evaluation holds it, "
             "else by the two intervals), and for the direction tasks the share of test tasks "
             "run the right way before and after it (`not met` where the step turns no more "
             "tasks the right way). A run measured otherwise than the paper "
             "(another RL horizon, "
             "another number of test tasks) says so.", "",
             "| experiment | paper (MAML) | MAML++ | fastmaml | status | iterations | run |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        h = row.headline
        paper = (f"{h.value:g}" + (f" +- {h.ci:g}" if h.ci else "")
                 + f" ({h.published or steps_label(h.step)})")
        ours = (f"{_fmt(row.mean, _digits(h))} +- {_fmt(row.ci, _digits(h))}"
                if row.mean is not None else "")
        if row.run is None:
            ours, verdict, where, its = "", _missing(h, budget, not_reproduced or {}), "", ""
        else:
            verdict, its = row.status, _iterations(row.run)
            where = f"[{labels[row.run.path]}](#{anchors[row.run.path]})"
        lines.append(f"| {_row_title(h, row.run)} | {paper} | "
                     f"{_fmt(h.maml_pp) if h.maml_pp else ''} | {ours} | {verdict} | {its} "
                     f"| {where} |")
    lines.append("")
    lines += time_to_accuracy([r for r in runs if r.validation
                               or r.config.get("experiment") == "fewshot"], runs)
    for row in (r for r in rows if r.run is not None):
        lines += _section(row.run, row.headline, row.status, report_dir, anchors)
    known = {id(row.run) for row in rows}
    others = [run for run in runs if id(run) not in known]
    if others:
        lines += ["# Other runs", "", "Runs that no row of the paper covers.", ""]
        for run in others:
            lines += _section(run, None, "", report_dir, anchors)
    if unread:
        lines += ["# Runs not read", "", "Run directories left out of this report:", ""]
        lines += [f"- `{path.as_posix()}`: {why}" for path, why in unread]
    return "\n".join(lines).rstrip() + "\n"


THRESHOLDS = (0.90, 0.95, 0.97, 0.99)


def run_labels(runs: Iterable[Run]) -> dict[Path, str]:
    """Each run's name in the report's tables: its folder's name, or where another run's
    folder has the same name, as many of its path's last parts as tell them apart
    (``exA/try``, ``exB/try``)."""
    paths = {run.path for run in runs}
    labels = {path: path.name for path in paths}
    for depth in range(2, max((len(path.parts) for path in paths), default=0) + 1):
        taken = Counter(labels.values())
        if all(count == 1 for count in taken.values()):
            break
        labels = {path: "/".join(path.parts[-depth:]) if taken[label] > 1 else label
                  for path, label in labels.items()}
    return labels


def time_to_accuracy(runs: list[Run], evaluated: Sequence[Run] = ()) -> list[str]:
    """Per run, the iteration and training minutes at which meta-validation accuracy first
    reached each of ``THRESHOLDS`` (as far as it got), and for a run still below the paper's
    figure, the iterations its validation trend projects for it (for a cosine meta_lr, the
    schedule length that the ``evaluated`` runs of its recipe project)."""
    if not runs:
        return []
    labels = run_labels([*runs, *evaluated])
    lines = ["## Time to accuracy", "",
             "The iteration and training wall-clock at which meta-validation accuracy first "
             "reached each level (each run's own validation protocol: its val_tasks tasks, 100 "
             "by default, and its training steps). *Projected*: for a run whose best validation "
             "accuracy is still below the paper's test figure, the iteration at which a power "
             "law fitted to the second half of its validation curve (error against iterations, "
             "log-log) reaches that figure: a rough guide, since validation is not the test "
             "protocol. A cosine meta learning rate flattens the curve by design whatever more "
             "iterations would give, so such a run is projected only by finished runs of its "
             "recipe at two or more schedule lengths: the length at which a power law through "
             "their test errors reaches the paper's figure. *From tests*: for a run evaluated "
             "six or more times as it trained (`eval-history.jsonl`), the same power law "
             "through the second half of its test figures (those with its latest evaluation's "
             "protocol: the paper's unless it says otherwise), and what it gives at the run's "
             "iterations.", "",
             "| run | " + " | ".join(f"{t:.0%}" for t in THRESHOLDS)
             + " | best | projected | from tests |",
             "|---|" + "---|" * (len(THRESHOLDS) + 3)]
    for run in runs:
        if not run.validation:
            every = run.config.get("val_every")
            said = ("no validation (val_every=0)" if not isinstance(every, int) or every <= 0
                    else "no validation (no val split)" if run.iterations >= every
                    else f"no validation yet (every {every:,} iterations)")
            lines.append(f"| {labels[run.path]} | "
                         + " | ".join([said] + [""] * (len(THRESHOLDS) + 1)
                                      + [_test_projection(run)]) + " |")
            continue
        cells = []
        for threshold in THRESHOLDS:
            first = next(((it, s) for it, s, acc in run.validation
                          if acc >= threshold - ROUNDING), None)
            cells.append(f"{first[0]:,} it, {first[1] / 60:.0f} min" if first else "not reached")
        best = max((acc for _, _, acc in run.validation if math.isfinite(acc)), default=None)
        lines.append(f"| {labels[run.path]} | " + " | ".join(cells) + " | "
                     + (f"{best:.1%} | {_projection(run, best, evaluated)} |" if best is not None
                        else "not finite | |") + f" {_test_projection(run)} |")
    return lines + [""]


# how far past a run's own iterations a validation trend is extrapolated at most
EXTRAPOLATION_LIMIT = 100


def _projection(run: Run, best: float, evaluated: Sequence[Run] = ()) -> str:
    headline = _accuracy_headline(run)
    if headline is None:
        return ""
    target = headline.value / 100
    if best >= target - ROUNDING:
        return "reached"
    if run.config.get("meta_lr_schedule") == "cosine":  # the curve flattens by design
        return _schedule_projection(run, headline, evaluated)
    if len(run.validation) < 6:
        return "too few validation points"
    iterations = projected_iterations(run.validation, target)
    if iterations is None:
        return f"{target:.1%}: no falling trend"
    if iterations > EXTRAPOLATION_LIMIT * run.iterations:
        return _out_of_reach(target, f"its validation, beyond {EXTRAPOLATION_LIMIT}x its "
                                     "iterations")
    return f"{target:.1%} at ~{iterations:,.0f} it"


# what a run may change on resume (how it runs and is evaluated), and its seed: not its recipe
_NOT_THE_RECIPE = RESUMABLE_KEYS | {"seed"}


def _recipe(run: Run) -> tuple[str, dict[str, Any]]:
    return run.preset, {k: v for k, v in _changed_settings(run).items()
                        if k not in _NOT_THE_RECIPE}


def _schedule_projection(run: Run, headline: Headline, evaluated: Sequence[Run]) -> str:
    """The schedule length at which a power law through the test errors of the finished,
    evaluated runs of ``run``'s recipe (two or more lengths; runs of one length, e.g. seeds,
    averaged) reaches ``headline``'s figure. The recipe's fixed-length phases (e.g. first order
    for 2,000 iterations) take a shorter schedule's larger share."""
    target = headline.value / 100
    recipe = _recipe(run)
    by_length: dict[int, list[float]] = {}  # schedule length -> test accuracies
    for other in evaluated:
        if (_recipe(other) != recipe or other.stale_evaluation
                or other.iterations < int(other.config.get("iterations", 0))):
            continue
        row = evaluate_row(headline, other)
        if row.mean is not None:
            by_length.setdefault(other.iterations, []).append(row.mean / 100)
    test_accuracy = {length: sum(means) / len(means) for length, means in by_length.items()}
    if len(test_accuracy) < 2:
        return (f"{target:.1%}: not projected (cosine meta_lr: needs finished runs of this "
                "recipe at two schedule lengths)")
    *shorter, longest = [f"{length:,}" for length in sorted(test_accuracy)]
    runs = f"its recipe's finished runs of {', '.join(shorter)} and {longest} iterations"
    iterations = power_law_crossing(sorted(test_accuracy.items()), target)
    if iterations is None:
        return f"{target:.1%}: no falling trend over {runs}"
    if iterations > EXTRAPOLATION_LIMIT * max(test_accuracy):
        return _out_of_reach(target, f"{runs}, beyond {EXTRAPOLATION_LIMIT}x the longest")
    return f"{target:.1%} with a ~{iterations:,.0f}-iteration schedule (test error of {runs})"


def _out_of_reach(target: float, where: str) -> str:
    return f"{target:.1%}: out of reach of the trend (the power law through {where})"


def projected_iterations(validation: Sequence[tuple[int, float, float]], target: float
                         ) -> float | None:
    """The iteration at which a power law fitted over the second half of the validation points
    reaches ``target``; ``None`` with fewer than three points there or no falling trend."""
    half = [(it, acc) for it, _, acc in validation[len(validation) // 2:] if acc < 1.0]
    return power_law_crossing(half, target) if len(half) >= 3 else None


def power_law(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The power law ``error = a * x ** b`` through the ``(x, accuracy)`` points (least squares
    in log-log), as ``(log a, b)``; ``None`` with fewer than two x values of points below 100%
    or no falling trend (b >= 0)."""
    errors = [(x, 1.0 - acc) for x, acc in points if acc < 1.0]
    xs = [math.log(x) for x, _ in errors]
    if len(set(xs)) < 2:
        return None
    ys = [math.log(error) for _, error in errors]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
             / sum((x - x_mean) ** 2 for x in xs))
    return None if slope >= 0 else (y_mean - slope * x_mean, slope)


def power_law_crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Where the ``power_law`` through the ``(x, accuracy)`` points reaches accuracy
    ``target``; ``None`` where it has no falling trend."""
    law = power_law(points)
    return None if law is None else _crossing(law, target)


def _crossing(law: tuple[float, float], target: float) -> float:
    """Where ``power_law``'s ``law`` reaches accuracy ``target`` (infinity past floats' range,
    as a nearly flat trend gives)."""
    log_x = (math.log(1.0 - target) - law[0]) / law[1]
    return math.exp(log_x) if log_x < math.log(sys.float_info.max) else math.inf


def evaluation_trend(headline: Headline, run: Run) -> list[tuple[int, float]]:
    """``headline``'s figure (in its unit: % for accuracy) in each evaluation of ``run``'s
    history that used the protocol of its latest one (eval.json's settings and number of
    tasks), by the MAML checkpoint's iteration it evaluated (one evaluated again: its latest)."""
    if not run.records:
        return []
    protocol = _protocol(run.records)
    by_iteration: dict[int, float] = {}
    for records in run.history():
        iteration = records[0].get("checkpoint_iterations", {}).get("maml") if records else None
        if _protocol(records) != protocol or not isinstance(iteration, int) or iteration < 1:
            continue
        try:
            mean = evaluate_row(headline, replace(run, records=records)).mean
        except UNREADABLE_RECORDS:  # an edited line: as if it were not there
            continue
        if mean is not None and math.isfinite(mean):
            by_iteration[iteration] = mean
    return sorted(by_iteration.items())


def _protocol(records: list[dict[str, Any]]) -> tuple[Any, Any]:
    return (records[0].get("eval_settings"), records[0].get("tasks")) if records else (None, None)


def _test_projection(run: Run) -> str:
    """Where a power law through the second half of the run's test trend (6 or more
    evaluations) reaches the paper's figure, and what it gives at the run's iterations."""
    headline = _accuracy_headline(run)
    if headline is None or run.config.get("meta_lr_schedule") == "cosine":
        return ""  # (a cosine run's curve flattens by design: projected by its schedule)
    trend = [(iteration, value / 100) for iteration, value in evaluation_trend(headline, run)]
    if len(trend) < 6:
        return f"too few evaluations ({len(trend)} of 6)" if len(trend) > 1 else ""
    target = headline.value / 100
    if trend[-1][1] >= target - ROUNDING:
        return "reached"
    half = trend[len(trend) // 2:]
    tasks = run.records[0].get("tasks", headline.tasks)
    points = (f"the last {len(half)} of {len(trend)} evaluations, {half[0][0]:,}-"
              f"{half[-1][0]:,} it" + (f", of {tasks} test tasks" if tasks != headline.tasks
                                      else ""))
    law = power_law(half)
    if law is None:
        return f"{target:.1%}: no falling trend ({points})"
    length = int(run.config.get("iterations", 0))
    at_end = (f"; {1 - math.exp(law[0] + law[1] * math.log(length)):.2%} at its {length:,}"
              if length > half[-1][0] else "")
    crossing = _crossing(law, target)
    if crossing > EXTRAPOLATION_LIMIT * half[-1][0]:
        return _out_of_reach(target, f"{points}, beyond {EXTRAPOLATION_LIMIT}x its "
                                     "iterations") + at_end
    return f"{target:.1%} at ~{crossing:,.0f} it{at_end} ({points})"


def _accuracy_headline(run: Run) -> Headline | None:
    """The paper's accuracy row that ``run`` reproduces on its protocol (not Lake et al.'s,
    which compare people on another protocol), if any."""
    key = headline_key(run.config) or ""
    headline = next((h for h in HEADLINES if h.key == key), None)
    if headline is None or not headline.metric.startswith("accuracy") or key.endswith("-lake"):
        return None
    return headline


def _missing(headline: Headline, budget: str | None, not_reproduced: Mapping[str, str]) -> str:
    """The status of an experiment without a run: why reproduce could not run it, or how to."""
    if headline.key in not_reproduced:
        said = re.split(r"\.\s+(?=[A-Z])", " ".join(not_reproduced[headline.key].split()))[0]
        return "not reproduced: " + said.replace("|", "\\|")  # (its first sentence, one cell)
    if headline.key.endswith("-lake"):  # a preset of its own, not one of reproduce's rows
        return f"no run yet (`fastmaml train {headline.key}`)"
    if budget is None or headline.key not in BUDGETS[budget]:
        budget = "cpu" if headline.key.startswith(("rl-", "sinusoid")) else "paper"
    command = f"`fastmaml reproduce --budget {budget} {headline.key}`"
    if headline.key.startswith("miniimagenet"):  # not downloadable: the user's own copy
        from .experiments.fewshot import default_data_root  # (not at every command's start)
        data = "no run yet" if default_data_root("miniimagenet").is_dir() else "no data here"
        return (f"{data} ({command} with the data in $FASTMAML_MINIIMAGENET; the loader is "
                "tested on synthetic files)")
    return f"no run yet ({command})"


def _anchors(runs: Sequence[Run]) -> dict[Path, str]:
    """The id of each run's section, by its path: from the whole path, so that runs of one
    name in two folders (kept results beside a reproduction) link to their own sections, and
    numbered where two paths differ only in case or punctuation."""
    anchors: dict[Path, str] = {}
    for run in runs:
        anchor = base = "run-" + re.sub(r"[^a-z0-9]+", "-", run.path.as_posix().lower()).strip("-")
        number = 1
        while anchor in anchors.values():
            number += 1
            anchor = f"{base}-{number}"
        anchors[run.path] = anchor
    return anchors


def _section(run: Run, h: Headline | None, verdict: str, report_dir: Path,
             anchors: dict[Path, str]) -> list[str]:
    minutes = run.train_seconds / 60
    took = f"{minutes:,.0f} min" if run.train_seconds >= 59.5 else f"{run.train_seconds:.0f} s"
    title = h.title if h else run.preset
    done = (f"{_iterations(run)} MAML iterations (unfinished: the train command below resumes "
            "it)" if _unfinished(run) else counted(run.iterations, "MAML iteration"))
    lines = [f'<a id="{anchors[run.path]}"></a>', f"## {title}: `{run.path.as_posix()}`", "",
             f"Preset `{run.preset}`; {done}; {took} of training (all learners); machine: "
             f"{_machine(run)}.", ""]
    if run.records:
        accuracy = run.records[0].get("metric") == "accuracy"
        metric = h.metric if h else ("accuracy (%)" if accuracy else "query MSE"
                                     if run.records[0].get("metric") == "mse" else "return"
                                     if run.config.get("experiment") == "rl" else "loss")
        digits = _digits(h) if h else 2
        steps = sorted({0, 1, h.step if h else 1, len(run.records[0]["mean"]) - 1})
        scale = 100.0 if accuracy else 1.0
        lines += [f"{metric} after N inner steps, mean +- 95% CI over "
                  f"{run.records[0]['tasks']} tasks:", "",
                  "| method | " + " | ".join(steps_label(s) for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for r in run.records:
            label = r["method"] + (f" (K={r['k_shot']})" if r["experiment"] == "sinusoid" else "")
            cells = [f"{_fmt(r['mean'][s] * scale, digits)} +- {_fmt(r['ci95'][s] * scale, digits)}"
                     if s < len(r["mean"]) else "" for s in steps]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, values in h.rows if h else ():
            lines.append(f"| {label} | " + " | ".join(
                f"{values[s]:g}" if s in values else "" for s in steps) + " |")
        lines += [""] + (_published(h) if h and h.published else [])
        lines += [f"Status against the paper after {steps_label(h.step)}: **{verdict}**.",
                  ""] if h else []
        lines += _test_history(run, h)
        if run.stale_evaluation and not h:
            lines += [f"Note: {run.stale_evaluation}.", ""]
    else:
        lines += ["Not evaluated yet: `fastmaml eval` writes eval.json.", ""]
    lines += ["Reproduce:", "", "```bash", *_commands(run), "```", "", *_data_note(run)]
    if run.figures:
        lines += ["Figures: " + ", ".join(f"[{f.stem}]({_link(f, report_dir)})"
                                          for f in run.figures), ""]
        if stale := run.stale_figures:
            lines += ["Note: figures that may not show the run as it is now ("
                      + "; ".join(f"{name}: {why}" for name, why in stale.items())
                      + f"): run `fastmaml plot {run.path.as_posix()}`.", ""]
    return lines


def _test_history(run: Run, headline: Headline | None) -> list[str]:
    """The paper's figure at each evaluation of the run as it trained (``evaluation_trend``), where
    it was evaluated at two or more iterations with its latest evaluation's protocol."""
    trend = evaluation_trend(headline, run) if headline and not headline.shape_only else []
    if len(trend) < 2:
        return []
    figures = "; ".join(f"{it:,}: {_fmt(value, _digits(headline))}" for it, value in trend)
    return [f"After {steps_label(headline.step)}, at each evaluation as it trained "
            f"(iteration: figure; `eval-history.jsonl`): {figures}.", ""]


def _iterations(run: Run) -> str:
    """``run``'s MAML iterations, and of how many where it is unfinished."""
    return f"{run.iterations:,}" + (f" of {run.config['iterations']:,}" if _unfinished(run)
                                    else "")


def _unfinished(run: Run) -> bool:
    return run.iterations < run.config.get("iterations", 0)


def _published(headline: Headline) -> list[str]:
    """The published figures of a row that is not MAML's (Lake et al.'s): after no inner steps,
    so beside the table, not in it."""
    figures = "; ".join(f"{label} {value:g}" for label, value in headline.others)
    return [f"Published, not MAML's and after no inner steps: {figures}.", ""]


def write_report(paths: Sequence[Path], out: Path, budget: str | None = None,
                 not_reproduced: Mapping[str, str] | None = None) -> Path:
    """Render the runs in ``paths`` into ``out`` (written whole; ``render``'s ``budget`` and
    ``not_reproduced``)."""
    runs, unread = find_runs(paths)
    for run in runs:
        refuse_run_file(out, run.path, "--out")
    write_text_atomic(render(runs, out, unread, budget, not_reproduced), out, follow_links=True)
    return out


# ----- fastmaml reproduce -----

# experiment -> (preset, overrides) per budget. tiny: seconds (CI); demo: about 7 minutes on 2
# cores, every family; cpu: the CPU-budget presets; paper: the paper's settings.
EXPERIMENTS = ("sinusoid", "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
               "miniimagenet-5w1s", "miniimagenet-5w5s", "rl-nav2d", "rl-cheetah-vel",
               "rl-cheetah-dir", "rl-ant-vel", "rl-ant-dir")
DEMO = ("sinusoid", "omniglot-5w1s", "rl-nav2d")
_TINY_FEWSHOT = ["hidden=8", "meta_batch=2", "iterations=4", "val_every=0", "eval_tasks=10",
                 "eval_inner_steps=3"]
_TINY_RL = ["iterations=2", "meta_batch=2", "trajectories=2", "horizon=10", "hidden=8,8",
            "eval_tasks=3", "eval_trajectories=2", "eval_batch=episodes"]
BUDGETS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "tiny": {"sinusoid": ("sinusoid-demo", ["iterations=20", "baseline_iterations=20",
                                            "eval_tasks=20", "eval_k_shots=5"]),
             **{name: (name, _TINY_FEWSHOT) for name in EXPERIMENTS
                if name.startswith(("omniglot", "mini"))},
             **{name: (f"{name}-cpu", _TINY_RL) for name in EXPERIMENTS if name.startswith("rl")}},
    "demo": {"sinusoid": ("sinusoid-demo", []),
             "omniglot-5w1s": ("omniglot-5w1s", ["iterations=1000", "val_every=250"]),
             "rl-nav2d": ("rl-nav2d-cpu", ["iterations=10"])},
    "cpu": {"sinusoid": ("sinusoid", []),
            **{name: (f"{name}-cpu", []) for name in EXPERIMENTS if name != "sinusoid"}},
    "paper": {name: (name, []) for name in EXPERIMENTS},
}


def finished(run_dir: Path, preset_name: str, overrides: Sequence[str]) -> bool:
    """A run of ``preset_name`` with ``overrides`` (a budget's), trained to its iterations and
    evaluated (every learner at its end)."""
    if not (run_dir / "eval.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    run = read_run(run_dir)
    return (run.preset == preset_name
            and run.iterations >= preset_config(preset_name, overrides).iterations
            and not run.stale_evaluation)


def _refuse_a_shorter_run(run_dir: Path, preset_name: str, iterations: int, budget: str) -> None:
    """A ``ConfigError`` when ``run_dir`` holds a ``preset_name`` run set to fewer
    ``iterations`` than the budget's (e.g. a smaller budget's): resumed, it would stop short of
    them. (A run of another preset is refused by ``train_run``.)"""
    config = run_dir / "config.yaml"
    if config.is_file():
        values = load_config_dict(config)
        planned = values.get("iterations")
        if (values.get("preset") == preset_name and isinstance(planned, int)
                and planned < iterations):
            raise ConfigError(f"{run_dir} holds a run of {planned:,} iterations, the {budget} "
                              f"budget trains {iterations:,}: give another --root, or train it "
                              f"on (fastmaml train {preset_name} --out {run_dir} "
                              f"iterations={iterations})")


def reproduce(budget: str, experiments: Sequence[str], root: Path, out: Path | None = None,
              progress: bool = True, say: Any = print) -> Path:
    """Train, evaluate and plot each experiment at ``budget`` under ``root/<experiment>``
    (finished runs are not trained or evaluated again, unfinished ones resume), then write the
    report of ``root``. Every run's figures are drawn again (seconds): a run stopped between its
    evaluation and its plot counts as finished. Under torchrun the ranks train and evaluate
    together (splitting the tasks as ``fastmaml train`` and ``eval`` do), rank 0 alone plots
    and writes the report, and an experiment that fails stops the command instead of being
    skipped (an error on one rank, e.g. its run lock, would leave the ranks on different runs).
    An experiment named in ``experiments`` that could not be reproduced (e.g. no data here) is
    a ``DataError`` once the report of the others is written."""
    if budget not in BUDGETS:
        raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    chosen = list(experiments) or list(DEMO if budget in ("tiny", "demo") else EXPERIMENTS)
    unknown = [e for e in chosen if e not in BUDGETS[budget]]
    if unknown:
        named = ", ".join(name + did_you_mean(name, BUDGETS[budget]) for name in unknown)
        raise ConfigError(f"unknown experiment(s) {named} for budget {budget}; "
                          f"known: {', '.join(BUDGETS[budget])}")
    not_reproduced: dict[str, str] = {}  # experiment -> why
    for name in chosen:
        preset_name, overrides = BUDGETS[budget][name]
        run_dir = root / name
        try:
            experiment = None
            if finished(run_dir, preset_name, overrides):
                say(f"fastmaml: {name}: finished in {run_dir}, skipped (figures drawn again)")
            else:
                _refuse_a_shorter_run(run_dir, preset_name,
                                      preset_config(preset_name, overrides).iterations, budget)
                train_run(preset_name, run_dir, overrides, progress=progress)
                experiment = load_experiment(run_dir)
                if is_main():
                    say(f"fastmaml: {name}: evaluating {run_dir} with the paper's protocol")
                experiment.evaluate(progress=progress)
                if is_main():
                    say(f"fastmaml: {name}: evaluated: {run_dir}/results.md")
            if is_main():
                (experiment or load_experiment(run_dir, ["threads=0"])).plot()  # (as `plot`)
        except FastMAMLError as error:  # e.g. no data here: the others still run
            if world()[1] > 1:  # one rank's error (its run lock): the ranks would part ways
                raise
            say(f"fastmaml: {name}: not reproduced: {error}")
            not_reproduced[name] = str(error)
    out = out or root / "REPORT.md"
    if not is_main():
        return out
    if not run_dirs(root):
        raise ConfigError(f"no run in {root} to report: {', '.join(chosen)} could not be "
                          "reproduced (said above)")
    write_report([root], out, budget, not_reproduced)
    named = [name for name in not_reproduced if name in experiments]
    if named:  # asked for by name: a script must tell, though the others' report is written
        raise DataError(f"not reproduced: {', '.join(named)} (said above); the report of "
                        f"{root} is in {out}")
    return out
