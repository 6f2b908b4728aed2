"""Regression on a user's own tasks: meta-train on a folder of task CSVs, evaluate on held-out tasks.

Each CSV is one task's ``x,y`` points, or ``x1,...,xd,y`` (``tasks.points``); the tasks are
split into meta-train, meta-val and meta-test files (``tasks.splits``, recorded by the run). The
network is the sinusoid experiment's MLP (d-40-40-1 by default), trained on the MSE; the run
then adapts to a new task's CSV with ``fastmaml adapt RUN --support points.csv --query xs.csv``.
Scale x and y to a range of a few units, as the sinusoid's, for the default inner and meta
learning rates.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config
from ..core import MAML
from ..errors import ConfigError, DataError
from ..models import MLP, initialise
from ..plots import plot_step_curves
from ..tasks.points import PointSampler, PointTasks, assign_tasks, load_point_tasks
from ..tasks.splits import Assignment
from ..train import GradientLearner, checkpoint_path, meta_learner
from .base import (TEST_SEED, VAL_SEED, Experiment, build_maml, eval_record, evaluate_tasks,
                   maml_method, results_table, validation_of)


@dataclass
class RegressionConfig(Config):
    experiment: str = "regression"
    data_root: str = ""  # the folder of task CSVs (required)
    split_seed: int = 1  # the shuffle of the task files into splits
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)  # without train/ val/ test/ folders
    iterations: int = 10000
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    k_shot: int = 10  # support points per task
    k_query: int = 10  # query points per task, in training and evaluation
    features: int = 1  # x values per point (0: as many as the task files hold, when it starts)
    # the names of the x columns, by which CSVs naming them in another order are read in this
    # one: the first headed task file's, found when the run starts (a run started before they
    # were recorded reads every file as it stands)
    x_names: tuple[str, ...] = ()
    # the name of the target column (the first headed task file's, found when the run starts;
    # "" without a header): a query's column of that name is its labels, as one named y
    y_name: str = ""
    # each x column's and y's lowest and highest value over the meta-train tasks (x1 low, x1
    # high, ..., y low, y high), recorded when the run starts: adapt warns of leaving them
    value_ranges: tuple[float, ...] = ()
    hidden: tuple[int, ...] = (40, 40)  # the MLP's hidden widths
    val_every: int = 500  # iterations between meta-validations (0: none)
    val_tasks: int = 100  # meta-validation tasks
    threads: int = 1  # a small MLP: one thread is fastest

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_at_least(hidden=1, val_every=0, val_tasks=1, split_seed=0, features=0)
        for name in ("k_shot", "k_query"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (points per task), got "
                                  f"{getattr(self, name)}")
        if len({name.lower() for name in self.x_names}) != len(self.x_names) or (
                self.x_names and self.features and len(self.x_names) != self.features):
            raise ConfigError("x_names must be distinct names (any case), one per x value "
                              f"(features={self.features}), got {', '.join(self.x_names)}")
        if len(self.value_ranges) % 2 or any(low > high for low, high in self.ranges()):
            raise ConfigError("value_ranges must be pairs of a low and a high value, one per x "
                              f"column and one for y, got {', '.join(map(str, self.value_ranges))}")
        if self.data_root:  # absolute, so that the saved run evaluates from any directory
            self.data_root = os.path.abspath(os.path.expanduser(self.data_root))

    def ranges(self) -> tuple[tuple[float, float], ...]:
        """``value_ranges`` as (low, high) pairs: each x column's, then y's."""
        return tuple(zip(self.value_ranges[::2], self.value_ranges[1::2]))


class RegressionExperiment(Experiment):
    name = "regression"
    config_cls = RegressionConfig
    curve_keys = {"query_loss": "training query MSE (after the inner steps)",
                  "val_mse": "validation MSE"}
    cfg: RegressionConfig

    def data_root(self) -> Path:
        if not self.cfg.data_root:
            raise ConfigError("the regression experiment needs its folder of task CSVs: "
                              "--data-root DIR")
        return Path(self.cfg.data_root)

    def assign_split(self) -> Assignment:
        cfg = self.cfg
        return assign_tasks(self.data_root(), cfg.split_fractions, cfg.split_seed,
                            cfg.k_shot + cfg.k_query)

    @functools.cached_property
    def splits(self) -> dict[str, PointTasks]:
        """Per meta-train/val/test split: its task files' points, loaded once."""
        started = checkpoint_path(self.run_dir, "maml").is_file()
        return load_point_tasks(self.data_root(), self.cfg.k_shot + self.cfg.k_query,
                                self.data_split(),
                                self.cfg.x_names if self.cfg.x_names or started else None)

    def sampler(self, split: str) -> PointSampler:
        tasks = self.splits[split]
        if not len(tasks):
            files = len(self.data_split()[split])
            why = (f"none of its {files} task files has {self.cfg.k_shot + self.cfg.k_query} "
                   "points (k_shot + k_query)" if files else "it has no task files")
            raise DataError(f"the {split} split of {self.data_root()} cannot give a task: {why}; "
                            "give a new run more task files (or other split_fractions), longer "
                            "ones or a lower k_shot or k_query")
        return PointSampler(tasks, self.cfg.k_shot, self.cfg.k_query, self.device)

    def build_maml(self) -> MAML:
        if not self.cfg.features:  # found when the run starts (learners)
            raise ConfigError(f"{self.run_dir} has not started training: its features (x "
                              "values per point) are not known yet")
        torch.manual_seed(self.cfg.seed)
        model = initialise(MLP([self.cfg.features, *self.cfg.hidden, 1]), self.cfg.init)
        model = model.to(self.device)
        return build_maml(model, F.mse_loss, self.cfg)

    def learners(self) -> list[GradientLearner]:
        cfg = self.cfg
        train = self.sampler("train")
        self.sampler("test")  # refuse, before training, a run that could not be evaluated
        found = self.splits["train"].features
        if cfg.features and cfg.features != found:
            raise ConfigError(f"the task files of {self.data_root()} hold {found} x value(s) per "
                              f"point, but the run has features={cfg.features} (a new run with "
                              "features=0 takes the files' number)")
        if cfg.x_names and len(cfg.x_names) != found:
            raise ConfigError(f"x_names names {len(cfg.x_names)} x column(s), but the task files "
                              f"of {self.data_root()} hold {found}")
        cfg.features = found  # recorded in config.yaml: the model's input size
        cfg.x_names = tuple(self.splits["train"].x_names or ())  # as recorded, or found (splits)
        cfg.y_name = cfg.y_name or self.splits["train"].y_name or ""
        if not cfg.value_ranges:  # recorded once (a run started before they were: now)
            points = torch.cat(self.splits["train"].points)
            cfg.value_ranges = tuple(value for column in zip(points.amin(0).tolist(),
                                                             points.amax(0).tolist())
                                     for value in column)
        maml = self.build_maml()
        validation = {}
        if cfg.val_every and len(self.splits["val"]):
            val = self.sampler("val")
            validation = validation_of(
                maml, lambda: val.fixed_tasks(cfg.val_tasks, VAL_SEED, cfg.eval_chunk),
                cfg.inner_steps, cfg.val_every, "val_mse")
        return [meta_learner(maml, cfg, lambda generator: train.sample(cfg.meta_batch, generator),
                             torch.Generator().manual_seed(cfg.seed), **validation)]

    def value_ranges(self) -> tuple[tuple[float, float], ...]:
        return self.cfg.ranges()

    def data_note(self) -> str:
        """The x values per point (a stray id column would count as one), and which column is
        predicted from which where the files name them (a target named other than y is taken
        by its place)."""
        count = f"points of {self.cfg.features} x value{'s' if self.cfg.features > 1 else ''}"
        train = self.splits["train"]
        if train.x_names and train.y_name:
            count += f": predicting {train.y_name} from {', '.join(train.x_names)}"
        return count

    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        maml = self.restore(self.learners()[0]).module
        test = self.sampler("test")
        curve = evaluate_tasks(maml, test.fixed_tasks(cfg.eval_tasks, TEST_SEED, cfg.eval_chunk),
                               cfg.eval_inner_steps, progress, "meta-test")
        method, learned = maml_method(cfg)
        records = [eval_record("regression", method, cfg.k_shot, curve, metric="mse",
                               preset=cfg.preset, **learned)]
        table = results_table(f"Regression on {self.data_root()}: query MSE on held-out tasks "
                              "after N inner steps", records,
                              show_steps=sorted({0, 1, cfg.inner_steps, cfg.eval_inner_steps}),
                              paper={}, run_dir=self.run_dir)
        self.write_eval(records, table)
        return records

    def plot_evaluation(self, records: list[dict[str, Any]]) -> list[Path]:
        return [plot_step_curves(records, "query MSE", self.figures_dir() / "mse_vs_steps.png",
                                 self.figure_title(records), log_scale=True)]
