"""What every experiment shares: config-to-engine wiring, run directories, and eval records."""
from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..allocator import tune_cpu_allocator
from ..atomic import read_json, replace_atomically, write_text_atomic
from ..config import Config
from ..core import MAML, LossFn
from ..distributed import barrier, gather_in_order, is_main, rank_slice
from ..errors import ConfigError, DataError, FastMAMLError, FastMAMLWarning, warn
from ..inputs import TaskBatch
from ..models import is_norm_param
from ..plots import (LOGS, counted, digests, plot_learning_curves, record_drawn_from,
                     retire_figures, step_size, steps_label)
from ..tasks.splits import Assignment, read_assignment, save_assignment
from ..train import (Learner, checkpoint_path, checkpoints_dir, load_checkpoint, load_state,
                     refuse_changed_settings)


# the settings of how a run is measured (not what it learned): each evaluation records them.
# (The sinusoid's K and query points at evaluation and its pretrained baseline's step-size
# search; a few-shot run's eval_k_query is not one: it fixes which classes a folder run uses.)
EVAL_KEYS = ("eval_tasks", "eval_inner_steps", "eval_trajectories", "eval_inner_lr", "eval_batch",
             "eval_policy", "eval_k_shots", "eval_query", "baseline_lrs", "tune_tasks")
# those that one adaptation uses (not an evaluation's count of test tasks, nor its baselines')
ADAPT_KEYS = ("eval_inner_steps", "eval_trajectories", "eval_inner_lr", "eval_batch",
              "eval_policy")
SPLIT_RECORD = "splits.json"  # a data folder's items per split, fixed when the run starts
EVAL_HISTORY = "eval-history.jsonl"  # the run's evaluations (append_evaluation)
VAL_SEED, TEST_SEED = 31, 2017  # fixed: every run sees the same validation and test tasks


# Settings that may change when a run directory is resumed (they do not change what is learned).
RESUMABLE_KEYS = {"iterations", "baseline_iterations", "checkpoint_every", "log_every", "device",
                  "val_every", "val_tasks", "eval_chunk", "path", "data_root", "download",
                  "compile", "threads", "tune_malloc", "chunk_size", "checkpoint_steps",
                  "workers", "tensorboard", "pretrained", "oracle", *EVAL_KEYS}


def fixed_settings(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` that a resumed run may not change, which each checkpoint
    records; not ``value_ranges`` and ``y_name``, records of the data for adapt (set by hand
    too), which nothing learned depends on."""
    left_out = resumable_keys(cfg) | {"value_ranges", "y_name"}
    return {k: v for k, v in cfg.to_dict().items() if k not in left_out}


# Settings of training alone: an evaluation (eval, plot, adapt) takes none of them.
TRAINING_KEYS = {"iterations", "baseline_iterations", "pretrained", "oracle", "checkpoint_every",
                 "log_every", "val_every", "val_tasks", "tensorboard", "checkpoint_steps"}


def resumable_keys(saved: Config, training: bool = True) -> set[str]:
    """The settings of the run ``saved`` that a resumed run may change: those of training
    (how long it trains, logs and checkpoints, and whether it trains the meta-RL baselines)
    only where it trains (``training``), and not its iterations under a cosine meta_lr
    schedule, whose rates span them."""
    cosine = saved.meta_lr_schedule == "cosine"
    fixed = ({"iterations"} if cosine else set()) | (set() if training else TRAINING_KEYS)
    return (RESUMABLE_KEYS - fixed) & set(saved.to_dict())  # this experiment's keys


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device`` (a name ``Config`` checked), where this
    machine has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu "
                          "(fastmaml adapt: --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s), numbered from 0")
    return device


def usable_threads(wanted: int) -> int:
    """``wanted`` threads, at most the CPUs this process may use (a warning says so): more
    only slows torch, and tens of thousands (a mistyped ``threads``) crash its thread pool."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and wanted > cpus:
        warn(f"threads={wanted} is more than the {cpus} CPU(s) this process may use: it runs "
             f"{cpus} (threads=0 takes torch's default)", FastMAMLWarning)
        return cpus
    return wanted


def adapt_selection(spec: str, model: nn.Module) -> Callable[[str, Tensor], bool] | list[str] | None:
    """``all`` | ``no_norm`` (the paper: batch-norm offsets are outer-loop only) | name prefixes;
    ``head`` (ANIL) is the module of that name, else the model's last layer with parameters
    (the output layer of the numbered layers of fastmaml's MLP)."""
    if spec == "all":
        return None
    if spec == "no_norm":
        if not _has_norm_params(model):
            warn("adapt=no_norm leaves the norm layers' parameters to the outer loop, and this "
                 "model has none: every parameter adapts, as with adapt=all", FastMAMLWarning)
        return lambda name, _: not is_norm_param(name, model)
    return _prefixes(spec, model)


def _has_norm_params(model: nn.Module) -> bool:
    """Whether ``model`` has parameters of a normalisation layer (``adapt=no_norm`` and
    ``per_step=norm`` select them)."""
    return any(is_norm_param(name, model) for name, _ in model.named_parameters())


def _last_layer(model: nn.Module) -> str:
    return [name for name, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None][-1]


def per_step_selection(spec: str, model: nn.Module
                       ) -> Callable[[str, Tensor], bool] | list[str] | None:
    """``none`` | ``norm`` (MAML++'s per-step batch-norm weights and biases) | name prefixes
    (``head`` as in ``adapt_selection``)."""
    if spec == "none":
        return None
    if spec == "norm":
        if not _has_norm_params(model):
            raise ConfigError("per_step=norm gives the norm layers a set per inner step, and "
                              "this model has none: per_step=none, or name parameter prefixes")
        return lambda name, _: is_norm_param(name, model)
    return _prefixes(spec, model)


def _prefixes(spec: str, model: nn.Module) -> list[str]:
    """The comma-separated prefixes of ``spec``; ``head`` names the module of that name, else
    the model's last layer with parameters."""
    prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    if "head" in prefixes and "head" not in dict(model.named_modules()):
        return [_last_layer(model) if prefix == "head" else prefix for prefix in prefixes]
    return prefixes


def build_maml(model: nn.Module, loss_fn: LossFn, cfg: Config,
               metric_fn: LossFn | None = None) -> MAML:
    """A ``MAML`` engine configured from ``cfg``.

    On an accelerator the per-call finite-loss check (a host sync) is off: ``fit`` checks the
    loss at every log point, before any checkpoint is written.
    """
    batched = {"auto": None, "batched": True, "looped": False}[cfg.path]
    on_cpu = next(model.parameters()).device.type == "cpu"
    return MAML(model, loss_fn, cfg.inner_lr, cfg.inner_steps, cfg.first_order,
                lr_mode=cfg.lr_mode, adapt=adapt_selection(cfg.adapt, model),
                per_step=per_step_selection(cfg.per_step, model),
                metric_fn=metric_fn, batched=batched, check_finite=on_cpu, compile=cfg.compiles(),
                chunk_size=cfg.chunk_size or None, checkpoint_steps=cfg.checkpoint_steps)


def validation_of(maml: MAML, chunks: Callable[[], Iterable[TaskBatch]], steps: int, every: int,
                  key: str, metric: str = "loss") -> dict[str, Any]:
    """``meta_learner``'s validation: every ``every`` iterations, log as ``key`` the mean of
    ``metric`` after ``steps`` inner steps over the fixed tasks ``chunks()`` (split across
    torchrun's ranks by ``evaluate_tasks``)."""
    def validate() -> dict[str, float]:
        values = evaluate_tasks(maml, chunks(), steps, False, "validation", metric)
        return {key: values[:, -1].mean().item()}

    return {"validate": validate, "validate_every": every}


def mean_ci95(values: Tensor) -> tuple[list[float], list[float]]:
    """Per-column mean and 95% CI half-width 1.96 * std / sqrt(n) of (tasks, steps) values."""
    values = values.double().cpu()
    std = values.std(dim=0, unbiased=False)
    return values.mean(dim=0).tolist(), (1.96 * std / math.sqrt(values.shape[0])).tolist()


def maml_method(cfg: Config) -> tuple[str, dict[str, Any]]:
    """How evaluations name MAML's records: ``first-order maml`` where it trained first order
    throughout, and its ``lr_mode`` where it adapts with learned rates (tables and legends show
    it as the step size)."""
    return ("first-order maml" if cfg.first_order else "maml",
            {"lr_mode": cfg.lr_mode} if cfg.lr_mode != "fixed" else {})


def eval_record(experiment: str, method: str, k_shot: int, values: Tensor,
                **extra: Any) -> dict[str, Any]:
    """One ``eval.json`` record from per-task values of shape (tasks, steps + 1)."""
    mean, ci = mean_ci95(values)
    return {"experiment": experiment, "method": method, "k_shot": k_shot,
            "tasks": values.shape[0], "steps": list(range(values.shape[1])),
            "mean": mean, "ci95": ci, **extra}


def evaluate_tasks(maml: MAML, chunks: Iterable[TaskBatch], steps: int, progress: bool,
                   desc: str, key: str = "loss") -> Tensor:
    """``maml.evaluate`` over task chunks (bounded memory): (tasks, steps + 1) values of ``key``.
    Under torchrun each rank adapts its slice of every chunk's tasks, and every rank returns all
    the rows in order: the single process's values (tasks adapt independently)."""
    parts = []
    for index, chunk in enumerate(tqdm(chunks, desc=desc, unit="chunk", leave=False,
                                       disable=None if progress and is_main() else True)):
        mine = rank_slice(chunk.num_tasks)
        if len(mine):
            part = TaskBatch(*(t[mine.start:mine.stop] for t in chunk))
            parts.append(((index, mine.start), maml.evaluate(part, steps)[key].cpu()))
    return torch.cat(gather_in_order(parts))


def results_table(title: str, records: list[dict[str, Any]], show_steps: list[int],
                  paper: dict[int, list[tuple[str, dict[int, float]]]], run_dir: Path,
                  scale: float = 1.0, digits: int = 3) -> str:
    """Markdown: per K-shot, each method's mean +- 95% CI at ``show_steps``, beside the paper."""
    lines = [f"# {title}", "", f"Run: `{run_dir}`. Mean +- 95% CI over "
             f"{counted(records[0]['tasks'], 'test task')}.", ""]
    for k_shot in sorted({r["k_shot"] for r in records}):
        lines += [f"## {k_shot}-shot", "",
                  "| method | " + " | ".join(steps_label(s) for s in show_steps) + " |",
                  "|---|" + "---|" * len(show_steps)]
        for r in (r for r in records if r["k_shot"] == k_shot):
            size = step_size(r)
            label = r["method"] + (f" (lr {size})" if size else "")
            cells = [f"{r['mean'][s] * scale:.{digits}f} +- {r['ci95'][s] * scale:.{digits}f}"
                     if s < len(r["mean"]) else "" for s in show_steps]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, values in paper.get(k_shot, []):
            cells = [f"{values[s]:g}" if s in values else "" for s in show_steps]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_started(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has trained (a checkpoint) or been evaluated: from then on
    its settings and data are fixed."""
    return any(checkpoints_dir(run_dir).glob("*.pt")) or (run_dir / "eval.json").exists()


# what train, eval and plot keep in a run directory (besides metrics-*.csv and .fastmaml* locks)
RUN_FILES = ("config.yaml", "machine.json", "eval.json", EVAL_HISTORY, "results.md", SPLIT_RECORD)
RUN_FOLDERS = ("checkpoints", "figures", "tensorboard")


def refuse_run_file(path: Path, run_dir: Path, what: str) -> None:
    """A ``ConfigError`` where ``path`` (``what``: e.g. "--out"), a file a command is to write,
    is, or would be, one of the run's own in ``run_dir``: writing it would damage the run."""
    try:
        parts = path.resolve().relative_to(run_dir.resolve()).parts
    except ValueError:  # outside the run directory
        return
    name = parts[0] if parts else ""
    if name in RUN_FOLDERS or len(parts) == 1 and (
            name in RUN_FILES or name.startswith(".fastmaml") or fnmatch(name, LOGS)):
        raise ConfigError(f"{what} {path} is {run_dir}'s own "
                          f"{'folder ' + name if name in RUN_FOLDERS else 'file'}, which "
                          "fastmaml keeps there: write to another file")

def _as_json(value: Any) -> Any:
    """``value`` with its non-finite floats as None: eval.json stays JSON (which has no NaN or
    Infinity) where an adaptation diverged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    return value


def _from_json(value: Any) -> Any:
    """``_as_json`` undone: every None is NaN again (records hold no other None)."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


# every evaluation of a run, one JSON line each ({"evaluated": UTC time, "records": [...]}),
# oldest first: eval.json holds the latest, this its history (the report's test trend)
def append_evaluation(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Add an evaluation's records to the run's ``EVAL_HISTORY``, the file replaced whole (a
    kill leaves it with or without the new line, never a part of it)."""
    path = run_dir / EVAL_HISTORY
    before = path.read_bytes() if path.is_file() else b""
    line = json.dumps({"evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "records": _as_json(records)}, allow_nan=False).encode()
    replace_atomically(path, lambda handle: handle.write(
        before + (b"\n" if before and not before.endswith(b"\n") else b"") + line + b"\n"))


def read_evaluations(run_dir: Path) -> list[list[dict[str, Any]]]:
    """The records of each evaluation in the run's ``EVAL_HISTORY``, oldest first; a line that
    is not one (edited, or damaged outside fastmaml) is left out with a warning."""
    path = run_dir / EVAL_HISTORY
    if not path.is_file():
        return []
    evaluations, damaged = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            records = json.loads(line)["records"]
            if not all(isinstance(r, dict) and isinstance(r.get("mean"), list)
                       and isinstance(r.get("checkpoint_iterations", {}), dict)
                       for r in records):
                raise TypeError("not records")
        except (ValueError, KeyError, TypeError):  # (UnicodeDecodeError is a ValueError)
            damaged.append(number)
            continue
        evaluations.append(_from_json(records))
    if damaged:
        warn(f"{path}: left out line(s) {', '.join(map(str, damaged[:5]))}"
             + (", ..." if len(damaged) > 5 else "") + ", which hold no evaluation records",
             FastMAMLWarning)
    return evaluations


def read_eval(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "eval.json"
    if not path.is_file():
        raise ConfigError(f"no eval.json in {run_dir}: run `fastmaml eval {run_dir}` first")
    remedy = f"run `fastmaml eval {run_dir}` again"
    records = _from_json(read_json(path, remedy))
    if not (isinstance(records, list) and records and all(
            isinstance(r, dict) and isinstance(r.get("method"), str)
            and isinstance(r.get("mean"), list) and isinstance(r.get("ci95"), list)
            for r in records)):
        raise DataError(f"{path} does not hold fastmaml's evaluation records (a list of them, "
                        f"each with method, mean and ci95): {remedy}")
    return records


# what reading an eval.json whose records lack what they need raises (one edited by hand)
UNREADABLE_RECORDS = (KeyError, TypeError, ValueError, IndexError)


def damaged_evaluation(run_dir: Path, error: Exception) -> DataError:
    """The error for ``run_dir``'s eval.json whose records raised ``error`` when read."""
    return DataError(f"{run_dir / 'eval.json'} does not hold this experiment's evaluation "
                     f"records ({type(error).__name__}: {error}): run `fastmaml eval {run_dir}` "
                     "again")


class Experiment(ABC):
    """A problem family: its config, what it trains, how it is evaluated and plotted."""

    name: ClassVar[str]
    config_cls: ClassVar[type[Config]]
    # the metrics-log columns drawn as learning curves, and what each is; drawn times
    # ``curve_scale`` (100: fractions in the log, percentages in the figures)
    curve_keys: ClassVar[dict[str, str]]
    curve_scale: ClassVar[float] = 1.0

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.device)
        self.restored_iterations: dict[str, int] = {}  # learner -> its checkpoint's iteration
        self.target_iterations: dict[str, int] = {}  # learner -> the iterations it trains to
        self._data_split: Assignment | None = None
        self.in_use = False  # another learner of the run trains: its records are binding
        if cfg.threads:
            torch.set_num_threads(usable_threads(cfg.threads))
        if cfg.tune_malloc and self.device.type == "cpu":
            tune_cpu_allocator()

    @abstractmethod
    def learners(self) -> list[Learner]:
        """What ``fastmaml train`` trains, in order (MAML first, then the baselines)."""

    @abstractmethod
    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run the paper's protocol on trained checkpoints; write eval.json and results.md."""

    def plot(self) -> list[Path]:
        """Write the figures into ``run_dir/figures`` and return their paths: the learning
        curves as soon as a learner has logged (its training may still be running), and the
        evaluation's figures once the run is evaluated. Which files each one drew is
        recorded beside them (``plots.stale_figures`` reads it)."""
        logs = sorted(self.run_dir.glob(LOGS),
                      key=lambda path: (path.stem != "metrics-maml", path.stem))
        evaluated = (self.run_dir / "eval.json").is_file()
        if not logs and not evaluated:
            raise ConfigError(f"nothing to plot in {self.run_dir}: no metrics log and no "
                              f"eval.json; train it first")
        drawn = {}
        if logs:
            inputs = digests(logs)
            drawn[plot_learning_curves(logs, self.curve_keys,
                                       self.figures_dir() / "learning_curves.png",
                                       f"{self.figure_title()}: learning curves",
                                       self.curve_scale)] = inputs
        if evaluated:
            extra = self.evaluation_inputs()
            taken = digests(sorted({self.run_dir / "eval.json",
                                    *(path for paths in extra.values() for path in paths)}),
                            self.run_dir)
            records = read_eval(self.run_dir)
            try:
                figures = self.plot_evaluation(records)
            except FastMAMLError:
                raise
            except UNREADABLE_RECORDS as error:
                raise damaged_evaluation(self.run_dir, error) from None
            for figure in figures:
                names = {"eval.json", *(path.relative_to(self.run_dir).as_posix()
                                        for path in extra.get(figure.name, []))}
                drawn[figure] = {name: taken[name] for name in sorted(names)}
            retire_figures(self.figures_dir(), figures, "eval.json")
        record_drawn_from(self.figures_dir(), drawn)
        return list(drawn)

    def evaluation_inputs(self) -> dict[str, list[Path]]:
        """By figure file name, the run's files that an evaluation figure draws besides
        eval.json (e.g. trained models), recorded with it so that a change of one makes it
        stale."""
        return {}

    def figure_title(self, records: list[dict[str, Any]] | None = None) -> str:
        """Which run a figure shows: its folder and preset, and the iterations of the
        checkpoints ``records`` (an evaluation) measured."""
        name = self.run_dir.resolve().name
        title = name if name == self.cfg.preset else f"{name} ({self.cfg.preset})"
        if records:
            reached, target = (records[0].get(key, {}).get("maml")
                               for key in ("checkpoint_iterations", "target_iterations"))
            if reached is not None:
                algorithm = "first-order MAML" if self.cfg.first_order else "MAML"
                schedule = target if target not in (None, reached) else None
                title += f", {algorithm} after " + (
                    counted(reached, "iteration") if schedule is None
                    else f"{reached:,} of {counted(schedule, 'iteration')}")
                if records[0].get("policy") == "best":  # meta-RL: the policy evaluated
                    title += f" (its best policy: iteration {records[0]['best_iteration']:,})"
        return title

    @abstractmethod
    def plot_evaluation(self, records: list[dict[str, Any]]) -> list[Path]:
        """Draw eval.json's ``records`` (the metric against inner steps, ...) into
        ``run_dir/figures``; return the paths."""

    def save_config(self) -> None:
        """Write ``run_dir/config.yaml`` and ``save_records`` (rank 0 only; every rank waits)."""
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.yaml")
            self.save_records()
        barrier()

    def data_root(self) -> Path | None:
        """The folder the run reads its data from (None: its tasks are generated)."""
        return None

    def assign_split(self) -> Assignment | None:
        """A user data folder's items (classes, tasks) per split, assigned now; None for a
        built-in data set."""
        return None

    def data_split(self) -> Assignment | None:
        """``assign_split`` as recorded when the run started (so that items added to the folder
        since move none between the splits), else assigned now."""
        if self._data_split is None:
            record = self.run_dir / SPLIT_RECORD
            begun = run_started(self.run_dir)
            self._data_split = (read_assignment(record)
                                if record.is_file() and (self.in_use or begun)
                                else self.assign_split())
            if (not record.is_file() and self._data_split is not None and is_main()
                    and begun):  # (a learner beside, in_use, may be first)
                warn(f"{self.run_dir} has no {SPLIT_RECORD} (its record of the data's split): "
                     "the split is made again from the folder as it is now, so items added or "
                     "removed since the run started move others between train and test",
                     FastMAMLWarning)
        return self._data_split

    def save_records(self) -> None:
        """Write what, beside the config, fixes what the run learns from: a data folder's split
        (``data_split``), once the run is known to start."""
        split = self.data_split()
        if split is not None:
            save_assignment(split, self.run_dir / SPLIT_RECORD)

    def restore(self, learner: Learner) -> Learner:
        """Load ``learner``'s final checkpoint from the run directory."""
        return self.restore_all([learner])[0]

    def restore_all(self, learners: list[Learner]) -> list[Learner]:
        """Load each of ``learners``' final checkpoints; a ``ConfigError`` names every one
        untrained (one at a time, each train command met the next refusal)."""
        missing = [learner.name for learner in learners  # (anything else there: damaged, as
                   if not checkpoint_path(self.run_dir, learner.name).exists()]  # train says)
        if missing:
            train = f"fastmaml train {self.cfg.preset} --out {self.run_dir}"
            commands = "; ".join(train + ("" if name == "maml" else f" --learner {name}")
                                 for name in missing)
            raise ConfigError(f"no {', '.join(missing)} checkpoint in {self.run_dir}: train "
                              f"{'it' if len(missing) == 1 else 'them'} first ({commands})")
        return [self._restored(learner) for learner in learners]

    def trained_checkpoint(self, name: str) -> dict[str, Any]:
        """Learner ``name``'s checkpoint, to evaluate or adapt; refused where config.yaml was
        edited since it trained, an edit that would pass for the run's own settings."""
        path = checkpoint_path(self.run_dir, name)
        checkpoint = load_checkpoint(path)
        refuse_changed_settings(checkpoint, fixed_settings(self.cfg), self.run_dir, path)
        return checkpoint

    def _restored(self, learner: Learner) -> Learner:
        path = checkpoint_path(self.run_dir, learner.name)
        checkpoint = self.trained_checkpoint(learner.name)
        load_state(learner, checkpoint["learner"], path)
        reached = self.restored_iterations[learner.name] = int(checkpoint["iteration"])
        self.target_iterations[learner.name] = learner.iterations
        if reached < learner.iterations and is_main():  # one warning under torchrun
            warn(f"{learner.name} of {self.run_dir} is at iteration {reached:,} of "
                 f"{learner.iterations:,} (training, or stopped): it is used as it is "
                 "now", FastMAMLWarning)
        return learner

    def write_eval(self, records: list[dict[str, Any]], table: str) -> None:
        """Write eval.json and results.md, and add the records to the run's evaluation history;
        each record names the iterations of the checkpoints it evaluated, so that a report can
        tell an evaluation older than the training (and draw the test figure's trend)."""
        settings = {k: v for k, v in self.cfg.to_dict().items() if k in EVAL_KEYS}
        for record in records:
            record["checkpoint_iterations"] = dict(self.restored_iterations)
            record["target_iterations"] = dict(self.target_iterations)
            record["eval_settings"] = settings
            diverged = [step for step, value in zip(record["steps"], record["mean"])
                        if not math.isfinite(value)]
            if diverged and is_main():
                warn(f"{record['method']}'s evaluation is not finite from "
                     f"{steps_label(diverged[0])} on (null in eval.json): its adaptation "
                     "diverges at these settings (a smaller inner learning rate or "
                     "fewer eval_inner_steps)", FastMAMLWarning)
        if is_main():  # under torchrun every rank holds the same records
            # eval.json last: it marks the evaluation done (``reproduce`` skips such a run), so a
            # kill between the writes leaves a run that is evaluated again, not a stale table
            # nor a history without it (one iteration evaluated twice counts once there); an
            # earlier evaluation's goes first, not to be left beside the new table
            (self.run_dir / "eval.json").unlink(missing_ok=True)
            write_text_atomic(table, self.run_dir / "results.md")
            append_evaluation(self.run_dir, records)
            write_text_atomic(json.dumps(_as_json(records), indent=2, allow_nan=False),
                              self.run_dir / "eval.json")
        barrier()

    def data_note(self) -> str:
        """What the run found in its data that the user should see at the start ("" if none)."""
        return ""

    def value_ranges(self) -> tuple[tuple[float, float], ...]:
        """A regression run's range of each x column, then of y, over its training tasks
        ((low, high) each), which ``adapt`` warns of leaving; () where not known."""
        return ()

    def figures_dir(self) -> Path:
        path = self.run_dir / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path
