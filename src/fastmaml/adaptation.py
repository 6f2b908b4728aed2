"""A trained run applied to a new task: load it, adapt it on a few labelled examples, predict.

```python
run = fastmaml.load_run("runs/omniglot-5w1s")
x = run.preprocess(["a.png", "b.png"])                 # the run's own image preprocessing
adapted = run.adapt(x, torch.tensor([0, 1]))           # 2 classes: the model's first 2 outputs
query = run.preprocess(["query.png"])
probabilities = run.predict(adapted, query, context=x).softmax(-1)   # normalised beside x
```

MAML assigns labels to a task's classes at random, so any N of a classifier's outputs serve a
new N-way task (N <= the run's n_way): the first N are used, for adaptation and prediction.
Each class weighs in the inner loss as one of meta-training's n_way classes did, whatever N and
its number of examples.
Batch norm uses the statistics of the batch, as in meta-training and the paper's evaluation.
So that a prediction does not depend on which other images are asked about at once (a query of
one image, or of one class, has no useful statistics of its own), ``predict_files`` by default
passes the support set as ``context``: each query image is normalised together with the support
set alone (``norm="each"``). ``norm="query"`` normalises the whole query set as one batch, the
paper's evaluation protocol: more accurate when the query holds every class in equal numbers
(Omniglot 5-way 1-shot: 99.53% against 97.33%, docs/results.md), wrong for a lone image.

``meta_train`` meta-trains a run on a user's own data from Python, as ``fastmaml train`` does,
and returns it loaded: ``fastmaml.meta_train("fewshot-folder", "runs/flowers",
data_root="flowers", n_way=5, k_shot=1)``.

A meta-RL run loads as a ``TrainedPolicy``, which adapts by sampling its environment::

    run = fastmaml.load_run("results/rl-cheetah-vel")
    adapted = run.adapt({"velocity": 1.3}, steps=1)    # adapted.policy, adapted.returns
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .core import MAML
from .distributed import world, world_size_asked
from .errors import (ConfigError, DataError, FastMAMLWarning, NonFiniteLossError, ShapeError,
                     is_out_of_memory, warn)
from .experiments import load_experiment, train_run
from .experiments.base import ADAPT_KEYS
from .inputs import Params, check_steps
from .norms import has_batch_norm
from .plots import check_figure_path, plot_regression_adaptation
from .tasks.images import ImageFormat, as_model_input, channels_first, stack_decoded
from .tasks.folder import NOT_IMAGES, image_files, is_image_file, warn_of_featureless_images
from .tasks.points import ColumnNamesWarning, Points, align_columns, read_points
from .tasks.splits import (UNICODE_FORMS, composed, skipped_files_warning,
                           subfolders as visible_subfolders, unicode_twins, unread_files)
from .train import checkpoint_path, load_state

ImageSource = str | bytes | os.PathLike[str] | Image.Image


class Adapted(NamedTuple):
    """Parameters adapted to one task, and the number of classes it has (None: regression)."""

    params: Params
    num_classes: int | None


@dataclass
class TrainedRun:
    """A trained run directory's MAML, with what a new task needs from its config."""

    run_dir: Path
    maml: MAML
    task: str  # "classification" | "regression"
    num_classes: int | None  # the classifier's outputs (the run's n_way)
    steps: int  # default inner steps at adaptation: the run's evaluation setting
    image_format: ImageFormat | None  # how an image becomes the model's input
    device: torch.device
    x_names: tuple[str, ...] = ()  # a regression run's names of its x columns, if recorded
    y_name: str = ""  # a regression run's name of its target column, if recorded
    # a regression run's (low, high) of each x column, then of y, over its training tasks
    value_ranges: tuple[tuple[float, float], ...] = ()
    # adapt and predict take turns: each swaps its parameters into the one model for a forward
    # (``functional_call``), so threads sharing a run would read each other's
    _turns: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False,
                                    compare=False)

    def __getstate__(self) -> dict[str, Any]:  # a copy (deepcopy, pickle) takes turns alone
        return {k: v for k, v in self.__dict__.items() if k != "_turns"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _turns=threading.RLock())

    @property
    def features(self) -> int | None:
        """A regression run's x values per point (its model's input size); None for images."""
        if self.task != "regression":
            return None
        return next((m.in_features for m in self.maml.model.modules()
                     if isinstance(m, nn.Linear)), 1)

    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> Tensor:
        """Image files or PIL images (or one of them) as the model's input, exactly as the run's
        training data: float (N, C, H, W) on the run's device."""
        if self.image_format is None:
            raise ConfigError(f"{self.run_dir} is a {self.task} run; preprocess reads images")
        one = (str, bytes, os.PathLike, Image.Image)
        if isinstance(images, one) or not isinstance(images, Iterable):
            images = [images]
        images = list(images)  # (a generator too)
        if not images:
            raise DataError("preprocess needs at least one image")
        other = [type(item).__name__ for item in images if not isinstance(item, one)]
        if other:
            raise DataError(f"preprocess reads image files or PIL images, got {other[0]} (an "
                            "array of pixels: PIL.Image.fromarray turns it into an image)")
        raw = next((i for i, item in enumerate(images) if isinstance(item, bytes)
                    and (b"\0" in item or len(item) > 4096)), None)
        if raw is not None:
            raise DataError(f"preprocess got the bytes of an image file as item {raw}, where it "
                            "reads a path: open them as PIL.Image.open(io.BytesIO(data))")
        fmt = self.image_format
        pixels = stack_decoded([fmt.read_or_why(item, f"image {i}") if isinstance(item, Image.Image)
                                else fmt.read_or_why(Path(os.fsdecode(item))) for i, item
                                in enumerate(images)])
        names = [f"image {i}" if isinstance(item, Image.Image) else os.fsdecode(item)
                 for i, item in enumerate(images)]
        warn_of_featureless_images(pixels, names)
        means = pixels.reshape(len(pixels), -1).mean(axis=1) / 255 if fmt.invert else []
        dark = [i for i, mean in enumerate(means) if mean > 0.5]
        if dark:
            shown = ", ".join(names[i] for i in dark[:3]) + (", ..." if len(dark) > 3 else "")
            warn(f"{len(dark)} of the {len(images)} images ({shown}) look like light strokes "
                 f"on a dark background: after this run's inversion "
                 f"(invert=true) their pixels average up to {means.max():.2f} of white, where "
                 "its inverted training images (dark strokes on a light background) are "
                 "mostly black: invert them first", FastMAMLWarning)
        return as_model_input(channels_first(pixels)).to(self.device)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Adapted:
        """``steps`` (default: the run's) inner steps on the support set. Classification labels
        are 0..N-1 with N <= the run's n_way; the model's first N outputs are adapted, each
        class weighing in the loss as one of meta-training's n_way (``_first_outputs_loss``)."""
        support_x = self._as_input(support_x, "support")
        support_y = self._as_tensor(support_y, "support labels" if self.task == "classification"
                                    else "support targets")
        num_classes, loss_fn = None, None
        if self.task == "classification":
            support_y, num_classes = self._checked_labels(support_y)
            loss_fn = _first_outputs_loss(num_classes, self.num_classes)
        else:
            support_y = self._as_input(support_y, "support", targets=True)
            if support_y.dim() == 1:
                support_y = support_y[:, None]
            self._warn_outside_training("support", support_x, support_y)
        steps = self.steps if steps is None else steps
        with self._turns, torch.no_grad():
            try:  # (the engine checks the adapted parameters; the inputs are finite here)
                params = self.maml.adapt(support_x, support_y, steps, loss_fn=loss_fn)
            except NonFiniteLossError:
                raise NonFiniteLossError(
                    f"the adaptation diverged: after {steps} inner step(s) on this support set "
                    "the model's parameters are not finite; give fewer steps, or support values "
                    "on the scale of the run's training data") from None
        return Adapted(params, num_classes)

    def predict(self, adapted: Adapted, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The adapted model's output on ``x``: logits over the task's N classes, or values.

        With ``context`` (e.g. the support inputs), each row of ``x`` is predicted in one batch
        with the context alone (vectorised), so that batch norm's statistics, and with them the
        prediction, do not depend on the other rows of ``x``.
        """
        if not isinstance(adapted, Adapted):
            raise ConfigError(f"adapted must be what run.adapt returns, got "
                              f"{type(adapted).__name__} (MAML.adapt's parameters go to "
                              "run.maml.predict)")
        x = self._as_input(x, "query")
        self._warn_outside_training("query", x)
        if context is not None:
            context = self._as_input(context, "context")
        elif (adapted.num_classes and len(x) < adapted.num_classes
              and has_batch_norm(self.maml.model)):
            warn(f"the {len(x)} query image(s) are normalised as one batch (norm query, or "
                 f"run.predict without context), fewer than the task's {adapted.num_classes} "
                 "classes: its batch statistics are far from training's and the predictions "
                 "unreliable; norm each (adapt's default), or run.predict's "
                 "context=support_x, suits a few images", FastMAMLWarning)
        with self._turns, torch.no_grad():
            out = self.maml.predict(adapted.params, x, context)
        return out if adapted.num_classes is None else out[:, :adapted.num_classes]

    def _warn_outside_training(self, role: str, x: Tensor, y: Tensor | None = None) -> None:
        """Warn of regression values beyond the range of the run's training tasks in a column
        (by more than a tenth of its width): the meta-learned start suits that range."""
        if self.task != "regression" or not self.value_ranges or not len(x):
            return
        names = list(self.x_names) or _default_x_names(x.shape[1])
        columns = list(zip(names, x.T, self.value_ranges))
        if y is not None:
            columns.append(("y", y[:, 0], self.value_ranges[-1]))
        beyond = [f"{name} from {float(v.min()):g} to {float(v.max()):g} (training: {low:g} to "
                  f"{high:g})" for name, v, (low, high) in columns
                  if v.min() < low - (high - low) / 10 or v.max() > high + (high - low) / 10]
        if beyond:
            warn(f"the {role} values run beyond the run's training tasks: {'; '.join(beyond)}; "
                 "its meta-learned start suits their range, so expect less of the adaptation "
                 "(scale the data as the training tasks were)", FastMAMLWarning)

    def _as_input(self, values: Tensor | np.ndarray, role: str, targets: bool = False) -> Tensor:
        """``values`` in the model's floating dtype, on its device (e.g. float64 points from
        numpy). Images must already be floating point: ``preprocess`` makes them so. Regression
        inputs of one feature may come as (N,)."""
        values = self._as_tensor(values, f"{role} images" if self.task == "classification"
                                 else f"{role} values")
        if self.task == "regression" and values.dim() not in (1, 2):
            raise ShapeError(f"the {role} {'targets' if targets else 'values'} are "
                             f"{tuple(values.shape)}, but a regression task's are (N,) or (N, "
                             "features): one task at a time, one row per point")
        if self.task == "regression" and not targets:
            features = self.features
            if values.dim() == 1 and features == 1:
                values = values[:, None]
            if values.dim() == 1 or values.shape[1] != features:
                raise ShapeError(f"the {role} values are {tuple(values.shape)}, but this run's "
                                 f"model takes (N, {features}) inputs: one row of {features} "
                                 "per point")
        if self.task == "classification" and not values.is_floating_point():
            raise ShapeError(f"the {role} images are {values.dtype}, not floating point: "
                             "run.preprocess turns image files into the run's model input")
        fmt = self.image_format
        if fmt is not None and tuple(values.shape[1:]) != (fmt.channels, fmt.size, fmt.size):
            raise ShapeError(f"the {role} images are {tuple(values.shape)}, but this run takes "
                             f"(N, {fmt.channels}, {fmt.size}, {fmt.size}): run.preprocess turns "
                             "image files into the run's model input")
        values = values.to(next(self.maml.model.parameters()).dtype)
        if not values.isfinite().all():
            raise DataError(f"the {role} {'targets' if targets else 'inputs'} hold a NaN or "
                            "infinite value")
        if fmt is not None and values.numel() and (values.min() < 0 or values.max() > 1):
            warn(f"the {role} images hold values from {values.min():g} to {values.max():g}, but "
                 "this run was trained on pixels scaled to [0, 1] (0..255 / 255): "
                 "run.preprocess turns image files into the run's model input", FastMAMLWarning)
        return values

    def _as_tensor(self, values: Any, what: str) -> Tensor:
        """``values`` (a tensor, an array or nested lists of numbers) as a tensor on the run's
        device; anything else is a ``ShapeError`` that says what was given."""
        try:
            return torch.as_tensor(values, device=self.device)
        except (TypeError, ValueError, RuntimeError) as error:
            if is_out_of_memory(error):  # the device's, said as such by the command line
                raise
            items = (list(values) if isinstance(values, (list, tuple))
                     else list(values.ravel()) if isinstance(values, np.ndarray) else [values])
            if "labels" in what and any(isinstance(v, str) for v in items):
                hint = ("; labels are the class indices 0..N-1: map the class names to them, "
                        "e.g. [names.index(y) for y in labels]")
            elif self.image_format is not None and any(
                    isinstance(v, (str, bytes, os.PathLike, Image.Image)) for v in items):
                hint = "; image files and PIL images go through run.preprocess first"
            elif any(isinstance(v, Tensor) for v in items):
                hint = "; stack a list of tensors into one: torch.stack(tensors)"
            else:
                hint = ""
            raise ShapeError(f"the {what} must be numbers (a tensor, an array or lists), got "
                             f"{type(values).__name__}: {str(error).splitlines()[0]}{hint}"
                             ) from error

    def _checked_labels(self, labels: Tensor) -> tuple[Tensor, int]:
        """Integer (or bool) labels as int64, and the task's number of classes."""
        if (labels.dim() != 1 or labels.is_floating_point() or labels.is_complex()
                or not len(labels)):
            raise ShapeError("classification labels must be a non-empty 1-d integer tensor, got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long()
        present = labels.unique().tolist()
        num_classes = len(present)
        if num_classes > self.num_classes:
            raise ConfigError(f"the task has {num_classes} classes, but the run was trained "
                              f"{self.num_classes}-way: it can adapt to at most "
                              f"{self.num_classes} classes")
        if num_classes < 2:
            raise ConfigError("the support set has one class: a classifier needs at least 2 "
                              "classes to choose between")
        if present != list(range(num_classes)):
            shown = ", ".join(map(str, present[:10])) + (", ..." if num_classes > 10 else "")
            raise ShapeError(f"classification labels must be 0..N-1 for a task of N classes, "
                             f"every one with a support example; got the {num_classes} distinct "
                             f"labels {shown}: number them 0..{num_classes - 1}")
        return labels, num_classes


def _first_outputs_loss(num_classes: int, n_way: int):  # noqa: ANN202 (a LossFn)
    """The inner loss of a task of ``num_classes`` <= ``n_way`` classes on the model's first
    outputs: each class's mean cross-entropy over its examples, summed and divided by
    ``n_way``. That is meta-training's loss (the mean over n_way classes of k_shot examples
    each) for a balanced n_way task; a plain mean over fewer classes would move each class's
    output n_way / N times as far as meta-training did, and over unequal shots lean towards
    the class with the most examples."""
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        shots = (labels[:, None] == labels).sum(dim=1)  # each example's class's examples
        losses = F.cross_entropy(logits[..., :num_classes], labels, reduction="none")
        return (losses / shots).sum() / n_way
    return loss


def meta_train(preset: str, out: str | os.PathLike[str], *, progress: bool = True,
               **settings: Any) -> TrainedRun | TrainedPolicy:
    """Meta-train a new run of ``preset`` in ``out``, or resume the run there, as ``fastmaml
    train`` does (checkpoints, metrics log, the run's lock; a Ctrl-C once training has begun
    stops at a checkpoint and raises ``TrainingStopped``), and load it for adaptation
    (``load_run``). ``progress=False`` trains silently (no bars, no start or summary lines).
    ``settings`` are the command line's ``key=value`` overrides as keyword
    arguments (``data_root="data/flowers", n_way=5, k_shot=1``; lists as lists). torch's thread
    count and random generator are left as they were; glibc's malloc tuning stays
    (``tune_malloc=False`` keeps it off). Where a process group exists, the run trains over its
    ranks as the command does: under torchrun, call ``fastmaml.distributed.init_from_env()``
    first on every rank (and ``shutdown()`` at the end)."""
    if world_size_asked() > 1 and world()[1] == 1:
        raise ConfigError("fastmaml.meta_train under torchrun trains one run over the ranks: "
                          "call fastmaml.distributed.init_from_env() first on every rank (and "
                          "fastmaml.distributed.shutdown() at the end)")
    threads = torch.get_num_threads()
    try:
        with _generators_kept():
            train_run(preset, Path(out),
                      [f"{key}={_as_setting(value)}" for key, value in settings.items()],
                      progress=progress, verbose=progress)
    finally:
        torch.set_num_threads(threads)
    return load_run(out)


def _generators_kept() -> contextlib.AbstractContextManager[None]:
    """torch's random generators restored on leaving (CUDA's only where in use, without
    starting it on every GPU)."""
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _as_setting(value: Any) -> str:
    """A Python value as the command line writes it (``true``, ``a,b``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def load_run(run_dir: str | os.PathLike[str], device: str | None = None,
             settings: Sequence[str] | str | Mapping[str, Any] = ()
             ) -> TrainedRun | TrainedPolicy:
    """The trained MAML of a few-shot or regression run directory, ready to adapt; of a meta-RL
    run, its policy (``TrainedPolicy``), ready to adapt to a task by sampling its environment.

    ``device`` defaults to the run's setting. ``settings``: ``key=value`` evaluation settings
    that replace the run's for this adaptation, as ``fastmaml eval`` takes them (e.g.
    ``eval_inner_steps=5``, a string of them, or a dict such as ``{"eval_inner_steps": 5}``;
    meta-RL: ``eval_policy=last``, ``eval_inner_lr=0.05``). Loading changes no process-wide
    setting (threads, allocator, torch's random generator), unlike the ``fastmaml`` commands.
    """
    if isinstance(settings, str):  # "key=value key=value"; a blank string: none
        text = settings.strip()
        settings = re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", text) if text else []
    elif isinstance(settings, Mapping):
        settings = [f"{key}={value}" for key, value in settings.items()]
    with _generators_kept():  # building the run's model seeds torch
        return _load_run(Path(run_dir), device, list(settings))


def _load_run(run_dir: Path, device: str | None, settings: list[str]
              ) -> TrainedRun | TrainedPolicy:
    overrides = ["threads=0", "tune_malloc=false"] + ([f"device={device}"] if device else [])
    experiment = load_experiment(run_dir, overrides)
    keys = [key for key in ADAPT_KEYS if key in experiment.cfg.to_dict()]  # this run's
    other = [item for item in settings if item.partition("=")[0].strip() not in keys]
    if other:
        raise ConfigError(f"{', '.join(other)}: an adaptation of this {experiment.name} run "
                          f"takes only its evaluation settings ({', '.join(keys)})")
    if settings:
        experiment = load_experiment(run_dir, overrides + settings)
    if experiment.name == "rl":
        return _trained_policy(run_dir, experiment)
    if experiment.name not in ("fewshot", "sinusoid", "regression"):
        raise ConfigError(f"{run_dir} is a run of the {experiment.name} experiment, which "
                          "load_run does not apply")
    path = checkpoint_path(run_dir, "maml")
    if not path.exists():  # (anything else there: damaged, as train says)
        raise ConfigError(f"{run_dir} has no trained model ({path} is missing): train it first "
                          f"with fastmaml train {experiment.cfg.preset} --out {run_dir}")
    with torch.inference_mode(False):  # (loaded under it, its parameters could never adapt)
        maml = experiment.build_maml()
        maml.check_finite = True  # a diverged adaptation is said, on any device (one check)
        checkpoint = experiment.trained_checkpoint("maml")
        load_state(maml, checkpoint["learner"].get("module"), path)
    cfg = experiment.cfg
    if checkpoint["iteration"] < cfg.iterations:
        warn(f"{run_dir} is trained to iteration {checkpoint['iteration']:,} of "
             f"{cfg.iterations:,}: adapting its model as it is now", FastMAMLWarning)
    classification = experiment.name == "fewshot"
    return TrainedRun(run_dir, maml, "classification" if classification else "regression",
                      cfg.n_way if classification else None, cfg.eval_inner_steps,
                      cfg.image_format() if classification else None, experiment.device,
                      getattr(cfg, "x_names", ()), getattr(cfg, "y_name", ""),
                      experiment.value_ranges())


class AdaptedPolicy(NamedTuple):
    """A policy adapted to one task, and the mean return of its episodes after 0..steps steps."""

    policy: nn.Module  # observations -> (action mean, log std), with the adapted parameters
    returns: list[float]  # returns[k]: mean return of the episodes sampled after k steps


@dataclass
class TrainedPolicy:
    """A trained meta-RL run's policy (its ``eval_policy``: by default the best one), which adapts
    to a new task of its environment as ``fastmaml eval`` does: it samples the run's
    ``eval_trajectories`` x horizon steps with the policy (``eval_batch``: or episodes), takes a
    policy-gradient step on them, and so on (the run's first and later step sizes)."""

    run_dir: Path
    maml: MAML  # the policy (maml.model) inside its engine
    task: ClassVar[str] = "rl"  # (a TrainedRun's is "classification" or "regression")
    env_id: str
    steps: int  # default policy-gradient steps: the run's eval_inner_steps
    experiment: Any  # the run's RLExperiment, whose evaluation protocol adapt runs

    def sample_tasks(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """``n`` tasks of the run's task distribution, e.g. ``{"velocity": 1.3}``."""
        from .rl import sample_tasks
        if not _is_count(n, at_least=1):
            raise ConfigError(f"sample_tasks needs an integer n >= 1 of tasks, got {n!r}")
        if not _is_count(seed):
            raise ConfigError(f"the seed must be an integer >= 0, got {seed!r}")
        return sample_tasks(self.env_id, int(n), np.random.default_rng(int(seed)))

    def parse_task(self, items: Sequence[str]) -> dict[str, Any]:
        """A task from ``key=value`` items, as ``fastmaml adapt --task`` takes them:
        ``velocity=1.3``, ``direction=-1``, ``goal=0.3,-0.2`` (a vector's values by commas)."""
        example = self.sample_tasks(1)[0]
        keys = " ".join(f"{key}=..." for key in example)
        task: dict[str, Any] = {}
        for item in items:
            key, equals, text = item.partition("=")
            if not equals or key not in example or key in task:
                raise ConfigError(f"a task of {self.env_id} is {keys}, got {item!r}"
                                  + (" again" if key in task else ""))
            try:
                values = np.array([float(value) for value in text.split(",")])
            except ValueError:
                raise ConfigError(f"{key} takes numbers (a vector's separated by commas), got "
                                  f"{text!r}") from None
            if not np.isfinite(values).all():
                raise ConfigError(f"{key} must be finite, got {text!r}")
            if values.size != np.size(example[key]):
                raise ConfigError(f"{key} takes {np.size(example[key])} number(s) (separated by "
                                  f"commas), got {text!r}")
            task[key] = values.reshape(np.shape(example[key]))
        if task.keys() != example.keys():
            raise ConfigError(f"a task of {self.env_id} is {keys}, got "
                              f"{' '.join(items) or 'nothing'}")
        return {key: value.item() if isinstance(example[key], float) else value
                for key, value in task.items()}

    @staticmethod
    def task_text(task: dict[str, Any]) -> str:
        """A task as ``parse_task`` (and ``--task``) takes it, each number as written shortest
        that reads back exactly: ``velocity=1.3``, ``goal=0.3,-0.2``."""
        return " ".join(f"{key}={','.join(repr(float(v)) for v in np.ravel(value))}"
                        for key, value in task.items())

    def adapt(self, task: dict[str, Any], steps: int | None = None, seed: int = 0
              ) -> AdaptedPolicy:
        """The policy adapted to ``task`` (a dict such as ``sample_tasks`` gives) by ``steps``
        policy-gradient steps, and its returns along the way; ``seed`` (an integer >= 0) sets
        the episodes."""
        example = self.sample_tasks(1)[0]
        if not isinstance(task, dict) or task.keys() != example.keys():
            given = repr(task) if isinstance(task, dict) else type(task).__name__
            raise ConfigError(f"a task of {self.env_id} is a dict such as {example!r} "
                              f"(run.sample_tasks draws them), got {given}")
        steps = self.steps if steps is None else steps
        check_steps("steps", steps)
        if not _is_count(seed):
            raise ConfigError(f"the seed must be an integer >= 0, got {seed!r}")
        curve, params = self.experiment.adapt_tasks(self.maml, [task], [0], steps, int(seed))
        from .rl import env_class
        outside_training = getattr(env_class(self.env_id), "outside_training", None)
        unlike = outside_training(task) if outside_training else None
        if unlike:
            warn(f"{self.task_text(task)} is none of the tasks {self.run_dir} was meta-trained "
                 f"on ({unlike}): its start suits those, so expect less of its adaptation",
                 FastMAMLWarning)
        policy = copy.deepcopy(self.maml.model)
        with torch.no_grad():
            for name, value in params.items():
                policy.get_parameter(name).copy_(value[0])
        return AdaptedPolicy(policy, curve[0].tolist())


def _is_count(value: Any, at_least: int = 0) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= at_least)


def _trained_policy(run_dir: Path, experiment: Any) -> TrainedPolicy:
    """``load_run`` of a meta-RL run: its MAML learner's ``eval_policy`` parameters, at the
    evaluation's step size."""
    with torch.inference_mode(False):
        experiment.cfg = experiment.cfg.replace(workers=0)  # one task at a time: no workers
        maml = experiment.eval_engine(experiment.restore(experiment.learners()[0]))
    maml.check_finite = True  # a diverged adaptation is said, on any device (as load_run's)
    return TrainedPolicy(run_dir, maml, experiment.cfg.env, experiment.cfg.eval_inner_steps,
                         experiment)


# ----- new tasks from files: what `fastmaml adapt` reads -----

class ImageSet(NamedTuple):
    """Image files, their class labels (None: unlabelled) and the class names."""

    paths: list[Path]
    labels: list[int] | None
    classes: list[str]


def _folder_entries(folder: Path, role: str) -> tuple[list[Path], list[Path]]:
    """(class subfolders, image files) directly in ``folder``."""
    if folder.is_file() and role == "support":
        raise DataError(f"the support set {folder} is a file, but this is an image run: give a "
                        "folder of images (one subfolder per class)")
    if folder.is_file():  # (an image file is read before: its suffix is not an image format's)
        raise DataError(f"the query set {folder} is a file, but this is an image run: give a "
                        "folder of images or one image file, its name ending in a format's "
                        "suffix this Pillow reads (e.g. .png or .jpg: rename it if an image)")
    if not folder.is_dir():
        raise DataError(f"the {role} folder {folder} does not exist")
    folders = visible_subfolders(folder)  # hidden ones and those systems add skipped
    images = _images_in(folder, role)
    if folders and images:
        raise DataError(f"the {role} folder {folder} mixes images and class subfolders: use one "
                        "subfolder per class, or a flat folder of images")
    return folders, images


def _images_in(folder: Path, role: str) -> list[Path]:
    """The image files in ``folder``; any other visible file is named in a warning (an image in
    a format this Pillow cannot read, e.g. HEIC, would otherwise get no prediction unsaid)."""
    images = image_files(folder)
    skipped_files_warning(unread_files(folder, images), f"the {role} folder {folder}", folder,
                          NOT_IMAGES)
    return images


def _class_images(folder: Path, role: str, may_be_empty: bool = False) -> list[Path]:
    """The images of one class: directly in its folder (a folder inside it is named in a
    warning, as its images are not read). None, where ``may_be_empty`` and the folder holds
    nothing visible, is no error."""
    images, nested = _images_in(folder, role), visible_subfolders(folder)
    if nested and images:
        warn(f"skipped {len(nested)} folder(s) in the {role} class folder {folder} (a "
             f"class's images lie directly in its folder): "
             + ", ".join(p.name for p in nested[:3]) + (", ..." if len(nested) > 3 else ""),
             FastMAMLWarning)
    if not images and not (may_be_empty and not nested):
        raise DataError(f"the {role} class folder {folder} holds no images"
                        + (" (a class's images lie directly in its folder, not in "
                           f"{nested[0].name}/)" if nested else ""))
    return images


def support_images(folder: str | os.PathLike[str]) -> ImageSet:
    """A support set: one subfolder per class (its name is the class name; any number of
    images), or a flat folder whose every image is a class of its own (one-shot)."""
    folder = Path(folder)
    subfolders, images = _folder_entries(folder, "support")
    if images:
        twins = _alike(images, [p.stem for p in images])
        if twins:
            raise DataError(f"the support images {', '.join(twins)} in {folder} would be classes "
                            "of the same name (each image of a flat folder is the class of its "
                            "file name): rename them")
        return ImageSet(images, list(range(len(images))), [p.stem for p in images])
    if not subfolders:
        raise DataError(f"the support folder {folder} holds no images or class subfolders")
    twins = unicode_twins([sub.name for sub in subfolders])
    if twins:
        raise DataError(f"the support class folders {' and '.join(map(ascii, twins))} in "
                        f"{folder} are one name in {UNICODE_FORMS}: rename one, or merge them")
    paths, labels = [], []
    for label, sub in enumerate(subfolders):
        found = _class_images(sub, "support")
        paths += found
        labels += [label] * len(found)
    return ImageSet(paths, labels, [sub.name for sub in subfolders])


def _alike(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """The file names of ``paths`` whose class ``names`` are one name in Unicode's composed
    form (a query folder is matched to its class so)."""
    forms = [composed(name) for name in names]
    return sorted(p.name for p, name in zip(paths, forms) if forms.count(name) > 1)


def query_images(folder: str | os.PathLike[str], classes: Sequence[str]) -> ImageSet:
    """A query set: a flat folder of images or one image file (unlabelled), or subfolders
    named like the support classes (labelled, so that accuracy can be reported)."""
    folder = Path(folder)
    if is_image_file(folder, named=True):
        return ImageSet([folder], None, list(classes))
    subfolders, images = _folder_entries(folder, "query")
    if images:
        return ImageSet(images, None, list(classes))
    if not subfolders:
        raise DataError(f"the query folder {folder} holds no images")
    # by name in Unicode's composed form: macOS writes "É" decomposed, other systems composed
    label_of = {composed(name): label for label, name in enumerate(classes)}
    unknown = [sub.name for sub in subfolders if composed(sub.name) not in label_of]
    if unknown:
        by_case = {name.casefold(): name for name in label_of}
        cased = [f"{name} for {by_case[composed(name).casefold()]}" for name in unknown
                 if composed(name).casefold() in by_case]
        raise DataError(f"query class folder(s) {', '.join(unknown)} in {folder} are not support "
                        f"classes ({', '.join(classes)})"
                        + (f"; only the case differs: {', '.join(cased)}" if cased else ""))
    paths, labels = [], []
    for sub in subfolders:  # a class with no query images is left out of the accuracy
        found = _class_images(sub, "query", may_be_empty=True)
        paths += found
        labels += [label_of[composed(sub.name)]] * len(found)
    empty = [sub.name for sub in subfolders if label_of[composed(sub.name)] not in labels]
    if not paths:
        raise DataError(f"the query folder {folder} holds no images (in its class folder(s) "
                        f"{', '.join(empty)})")
    if empty:
        warn(f"the query class folder(s) {', '.join(empty)} in {folder} hold no images: the "
             "accuracy is over the other classes' images", FastMAMLWarning)
    return ImageSet(paths, labels, list(classes))


class Predictions(NamedTuple):
    """``predict_files``' result: one row per query item, and the task's summary (steps,
    classes, and the accuracy or MSE when the query is labelled, else None)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


NORMS = ("each", "query")


def predict_files(run: TrainedRun, support: str | os.PathLike[str],
                  query: str | os.PathLike[str], steps: int | None = None,
                  plot: str | os.PathLike[str] | None = None, norm: str = "each") -> Predictions:
    """Adapt ``run`` on the support set on disk and predict the query set on disk.

    Image runs read folders (``support_images``, ``query_images``); regression runs read CSVs
    (``read_points``), and with ``plot`` draw the support points, the prediction before and
    after adaptation, and the query points.
    """
    if isinstance(run, TrainedPolicy):
        raise ConfigError(f"{run.run_dir} is a meta-RL run: its policy adapts by sampling its "
                          "environment, not from files (fastmaml eval; in Python, "
                          "fastmaml.load_run(run_dir).adapt(task))")
    steps = run.steps if steps is None else steps
    check_steps("steps", steps)
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if plot is not None:
        check_figure_path(Path(plot))
    if run.task == "regression":
        return _predict_points(run, support, query, steps, plot)
    if plot is not None:
        raise ConfigError("--plot draws regression tasks; an image run has no curve to draw")
    shots = support_images(support)  # too many classes: run.adapt says so
    asked = query_images(query, shots.classes)
    support_x, query_x = run.preprocess(shots.paths), run.preprocess(asked.paths)
    if asked.labels is not None:
        _warn_of_support_in_query([str(path) for path, shared in
                                   zip(asked.paths, _shared_rows(query_x, support_x)) if shared],
                                  len(asked.paths), "images", "accuracy")
    adapted = run.adapt(support_x, torch.tensor(shots.labels), steps)
    logits = run.predict(adapted, query_x, context=support_x if norm == "each" else None)
    probabilities = logits.softmax(-1).cpu()
    rows = []
    for i, (path, p) in enumerate(zip(asked.paths, probabilities)):
        row = {"path": str(path), "prediction": shots.classes[int(p.argmax())]}
        if asked.labels is not None:
            row["label"] = shots.classes[asked.labels[i]]
        rows.append({**row, "probabilities": dict(zip(shots.classes, p.tolist()))})
    accuracy = (None if asked.labels is None else  # a fraction of counts: 0.4, not float32's
                int((probabilities.argmax(-1) == torch.tensor(asked.labels)).sum())
                / len(asked.labels))
    return Predictions(rows, {"task": "classification", "steps": steps, "norm": norm,
                              "classes": shots.classes, "support": len(shots.paths),
                              "query": len(asked.paths), "accuracy": accuracy})


def _shared_rows(query: Tensor, support: Tensor) -> list[bool]:
    """Whether each query item (row) is a support item too: the same values as read (a copy of
    a support file counts), by a set of the support rows' bytes (0.0 for -0.0, as == has it)."""
    def key(row: Tensor) -> bytes:
        return (row + 0.0).cpu().numpy().tobytes()
    seen = {key(row) for row in support.flatten(1)}
    return [key(row) in seen for row in query.flatten(1)]


def _warn_of_support_in_query(shared: list[str], total: int, items: str, score: str) -> None:
    """Warn where labelled query items are support items too (``shared`` names them): the
    adapted model was fitted to them, so the ``score`` on them says nothing of adaptation."""
    if shared:
        warn(f"{len(shared)} of the {total} query {items} are support {items} too (e.g. "
             f"{shared[0]}): the adaptation was fitted to them, so the {score} on them says "
             "nothing of how it does on new ones", FastMAMLWarning)


def _as_written(values: Tensor) -> list[list[float]]:
    """A table's rows, each value the shortest decimal that reads back as it at the table's
    precision (a float32 prediction's -1.667, not -1.6670000553131104; a query's x as read)."""
    return [[float(str(value)) for value in row] for row in values.numpy()]


def _can_head_output(names: list[str] | None) -> bool:
    """Whether a query CSV's names of its x columns can head the output's: present, distinct,
    none empty and none of the output's own (prediction, y)."""
    lowered = [name.lower() for name in names or []]
    return (bool(lowered) and all(lowered) and len(set(lowered)) == len(lowered)
            and not set(lowered) & {"prediction", "y"})


def _read_for(run: TrainedRun, path: str | os.PathLike[str], role: str, need_y: bool) -> Points:
    """A points CSV for ``run``: its x columns in the run's order where its header names them
    in another; one naming other columns is taken in order, with a warning."""
    points, matched = align_columns(read_points(path, role, need_y=need_y,
                                                features=run.features, x_names=run.x_names),
                                    run.x_names)
    if not matched:
        warn(f"the {role} CSV {path} names its x columns {', '.join(points.x_names or [])}, "
             f"but the run's are {', '.join(run.x_names)}: they are taken as they stand",
             ColumnNamesWarning)
    return points


def _default_x_names(features: int) -> list[str]:
    """The names of x columns that no header named: x, or x1..xd."""
    return ["x"] if features == 1 else [f"x{i}" for i in range(1, features + 1)]


def _predict_points(run: TrainedRun, support: str | os.PathLike[str],
                    query: str | os.PathLike[str], steps: int,
                    plot: str | os.PathLike[str] | None) -> Predictions:
    features = run.features
    if plot is not None and features != 1:
        raise ConfigError(f"--plot draws a curve over one x value, but this run's points have "
                          f"{features}")
    support_x, support_y, _, target = _read_for(run, support, "support", need_y=True)
    query_x, query_y, names, labels_name = _read_for(run, query, "query", need_y=False)
    targets = [name for name in dict.fromkeys(["y", run.y_name, target or ""]) if name]
    if labels_name and labels_name.lower() not in {name.lower() for name in targets}:
        raise DataError(f"the query CSV {query} has a column {labels_name!r} beside the run's x "
                        "columns, which would be read as the query's labels: name a label column "
                        f"{' or '.join(targets)} (the run's or the support's target), or delete "
                        "that column")
    if query_y is not None:
        query_xy = torch.cat([query_x, query_y], 1)
        shared = _shared_rows(query_xy, torch.cat([support_x, support_y], 1))
        _warn_of_support_in_query([",".join(f"{v:g}" for v in point.tolist())
                                   for point, known in zip(query_xy, shared) if known],
                                  len(query_x), "points", "MSE")
    adapted = run.adapt(support_x, support_y, steps)
    prediction = run.predict(adapted, query_x).cpu()
    if not _can_head_output(names):  # else the query's own names head the output
        names = list(run.x_names) or _default_x_names(features)
    labels = [[None]] * len(query_x) if query_y is None else _as_written(query_y)
    rows = [{**dict(zip(names, x)), "prediction": p, **({} if y is None else {"y": y})}
            for x, (p,), (y,) in zip(_as_written(query_x), _as_written(prediction), labels)]
    mse = (None if query_y is None  # (in the model's precision, as eval's)
           else float((prediction - query_y.to(prediction)).pow(2).mean()))
    if plot is not None:
        every = torch.cat([support_x, query_x])[:, 0]
        margin = 0.05 * float(every.max() - every.min()) or 1.0
        grid = torch.linspace(float(every.min()) - margin, float(every.max()) + margin,
                              300)[:, None]
        model = next(run.maml.model.parameters())  # its device and dtype, not the CSV's
        on_device = grid.to(model)
        with torch.no_grad():
            start = run.maml.adapt(support_x.to(model), support_y.to(model), 0)
            before = run.maml.predict(start, on_device).cpu()
            after = run.maml.predict(adapted.params, on_device).cpu()
        plot_regression_adaptation(grid, before, after, steps, support_x, support_y, query_x,
                                   query_y if query_y is not None else prediction, Path(plot),
                                   query_labelled=query_y is not None,
                                   labels=(names[0], run.y_name or "y"))
    return Predictions(rows, {"task": "regression", "steps": steps, "support": len(support_x),
                              "query": len(query_x), "mse": mse})
