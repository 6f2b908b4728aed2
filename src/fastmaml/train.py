"""Training driver: a resumable loop with atomic checkpoints, a metrics CSV and a progress bar.

Anything that trains is a ``Learner`` (MAML, a pretrained baseline, a meta-RL policy): it knows
how to take one step and how to save its state. ``fit`` does the rest, the same for all.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import remove_stale_temporaries, replace_atomically, write_text_atomic
from .config import Config
from .core import MAML, multi_step_loss_weights
from .distributed import (any_rank, average_gradients, average_metrics, gather_ranks, is_main,
                          shard)
from .errors import (CheckpointError, ConfigError, DataError, FastMAMLWarning, NonFiniteLossError,
                     warn)
from .inputs import TaskBatch

Metrics = dict[str, float | Tensor]


class Learner(Protocol):
    """One thing to train: a name, a number of iterations, a step, and a state to checkpoint."""

    name: str
    iterations: int

    def step(self, iteration: int) -> Metrics: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


BackwardFn = Callable[[int], tuple[Tensor, Metrics]]


def backpropagated(loss_of: BackwardFn) -> BackwardFn:
    """A ``backward_of`` for ``GradientLearner`` from a function returning (loss, metrics)."""
    def backward_of(iteration: int) -> tuple[Tensor, Metrics]:
        loss, metrics = loss_of(iteration)
        loss.backward()
        return loss.detach(), metrics
    return backward_of


class GradientLearner:
    """Minimises a loss over ``module`` with a ``torch.optim`` optimizer.

    ``backward_of(iteration)`` computes the iteration's loss, accumulates its gradient into the
    module's ``.grad`` and returns (detached loss, metrics): ``MAML.meta_backward`` for MAML,
    ``backpropagated(loss_of)`` for a plain loss. It draws its data from ``generator``, whose
    state is checkpointed so that a resumed run sees the same tasks as an uninterrupted one.
    """

    def __init__(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                 backward_of: BackwardFn, iterations: int,
                 generator: torch.Generator, clip_grad: float = 0.0,
                 validate: Callable[[], Metrics] | None = None, validate_every: int = 0):
        self.name, self.module, self.optimizer = name, module, optimizer
        self.backward_of, self.iterations, self.generator = backward_of, iterations, generator
        self.clip_grad = clip_grad
        self.validate, self.validate_every = validate, validate_every

    def step(self, iteration: int) -> Metrics:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.backward_of(iteration)
        average_gradients(self.module)
        if self.clip_grad > 0:
            nn.utils.clip_grad_value_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()
        metrics = {"loss": loss, **metrics}
        if self.validate and self.validate_every and (iteration + 1) % self.validate_every == 0:
            metrics.update(self.validate())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        # the execution paths MAML chose by timing, so that a resumed run takes the same ones
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "path_choices": dict(getattr(self.module, "path_choices", {})),
                "searched_shapes": dict(getattr(self.module, "searched_shapes", {}))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if hasattr(self.module, "path_choices"):
            self.module.path_choices = {key: tuple(choice) for key, choice
                                        in state.get("path_choices", {}).items()}
            self.module.searched_shapes = {
                key: [(tuple(size), role, eager) for size, role, eager in shapes]
                for key, shapes in state.get("searched_shapes", {}).items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])


def meta_learner(maml: MAML, cfg: Config, sample: Callable[[torch.Generator], TaskBatch],
                 generator: torch.Generator, **validation: Any) -> GradientLearner:
    """The MAML outer loop as a ``GradientLearner``: sample a meta-batch, meta-gradient, Adam step.

    ``cfg`` gives the meta learning rate and its schedule (``meta_lr_at``), the multi-step loss,
    the gradient clip and ``first_order_until``. Both schedules are functions of the iteration
    alone, so a resumed run follows them exactly.
    """
    optimizer = torch.optim.Adam(maml.parameters(), cfg.meta_lr)
    maml.gather_ranks = gather_ranks  # the ranks step together: they search one path

    def backward_of(iteration: int) -> tuple[Tensor, Metrics]:
        for group in optimizer.param_groups:
            group["lr"] = meta_lr_at(cfg, iteration)
        maml.first_order = cfg.first_order or iteration < cfg.first_order_until
        # MAML++: every step's query loss while the weights anneal, then the last step's alone
        weights = (multi_step_loss_weights(maml.inner_steps,
                                           iteration / cfg.msl_anneal_iterations)
                   if cfg.multi_step_loss and iteration < cfg.msl_anneal_iterations else None)
        batch, share = shard(sample(generator))
        loss, metrics = maml.meta_backward(batch, step_weights=weights)
        if share != 1.0:  # an uneven split: this rank's share of the means (see rank_share)
            for p in maml.parameters():
                if p.grad is not None:
                    p.grad.mul_(share)
            loss, metrics = loss * share, {key: value * share for key, value in metrics.items()}
        return loss, metrics

    return GradientLearner("maml", maml, optimizer, backward_of, cfg.iterations, generator,
                           cfg.clip_grad, **validation)


def meta_lr_at(cfg: Config, iteration: int) -> float:
    """The meta learning rate of ``iteration``: ``meta_lr`` throughout (``constant``), or
    annealed from ``meta_lr`` to ``meta_lr_min`` over ``iterations`` by a half cosine
    (``cosine``, as MAML++)."""
    if cfg.meta_lr_schedule == "constant":
        return cfg.meta_lr
    progress = min(iteration / max(cfg.iterations - 1, 1), 1.0)
    return cfg.meta_lr_min + 0.5 * (cfg.meta_lr - cfg.meta_lr_min) * (1 + math.cos(math.pi * progress))


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to a temporary file, flush it to disk, then rename it over ``path``."""
    try:
        replace_atomically(path, lambda handle: torch.save(state, handle))
    except RuntimeError as error:
        if not any(mark in str(error) for mark in ("inline_container", "PytorchStreamWriter")):
            raise  # not torch's writer failing on the file (e.g. an object it cannot pickle)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"could not write {path} ({str(error).splitlines()[0]}); its disk has "
                      f"{free:,.0f} MiB free: once there is room (a full disk, a quota), the same "
                      "command resumes from the last checkpoint") from error


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return checkpoints_dir(run_dir) / f"{name}.pt"


def metrics_path(run_dir: Path, name: str) -> Path:
    """Learner ``name``'s metrics log."""
    return run_dir / f"metrics-{name}.csv"


def checkpointed_mark(run_dir: Path, name: str) -> Path:
    """An empty file that ``fit`` leaves once it has written learner ``name``'s checkpoint: the
    run's record that the checkpoint existed, should it go."""
    return run_dir / f".fastmaml-{name}.checkpointed"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``fit``; a damaged file is a ``CheckpointError`` naming it."""
    unreadable = CheckpointError(
        f"cannot read the checkpoint {path}: it is damaged (e.g. truncated by a full disk or "
        "an unfinished copy) or not a fastmaml checkpoint. Restore it from a backup, or "
        f"delete it and {metrics_path(path.parent.parent, path.stem)} to train that "
        "learner again from the start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError, ...
        raise unreadable from None
    if not (isinstance(state, dict) and isinstance(state.get("learner"), dict)
            and isinstance(state.get("iteration"), int)):
        raise unreadable
    return state


def load_state(target: Learner | nn.Module, state: Any, path: Path) -> None:
    """``target.load_state_dict(state)``, where ``state`` comes from the checkpoint ``path``;
    one that does not fit (another model, or a config.yaml edited after training) is a
    ``CheckpointError`` naming the file, not torch's traceback."""
    try:
        target.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        detail = " ".join(line.strip() for line in str(error).splitlines())
        raise CheckpointError(
            f"the checkpoint {path} does not fit this run's model and settings (was config.yaml "
            "edited after training, do the data or the environment now give inputs of another "
            f"shape, or is the file another run's?): {detail}") from None


# metrics logged as their value at the row's iteration, not as a mean over its interval:
# validation figures, and running bests (RL's best_return)
POINT_METRICS = ("val_", "best_")


class IntervalMeans:
    """A learner's per-iteration metrics summed since the last logged row, so that each row
    holds their mean over its ``log_every`` iterations rather than one meta-batch's noisy value
    (``POINT_METRICS``: the row's own iteration's). Its state is checkpointed, so a resumed run
    logs the rows an uninterrupted one would."""

    def __init__(self, state: dict[str, dict[str, Any]] | None = None):
        self.sums: dict[str, Any] = dict(state["sums"]) if state else {}
        self.counts: dict[str, int] = dict(state["counts"]) if state else {}

    def add(self, metrics: Metrics) -> None:
        for key, value in metrics.items():
            if not key.startswith(POINT_METRICS):  # (a tensor stays one: no device sync here)
                value = value.detach() if isinstance(value, Tensor) else value
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def row(self, metrics: Metrics) -> dict[str, float]:
        """The interval's means and ``metrics``' point values, in ``metrics``' order; a new
        interval starts."""
        row = {key: float(self.sums[key]) / self.counts[key] if key in self.sums
               else float(value) for key, value in metrics.items()}
        row.update({key: float(total) / self.counts[key] for key, total in self.sums.items()
                    if key not in row})
        self.sums, self.counts = {}, {}
        return row

    def state(self) -> dict[str, dict[str, Any]]:
        """The sums so far, averaged over torchrun's ranks (each rank keeps the average, which
        leaves the ranks' mean at the next row as it was): every rank checkpoints, and resumes
        from, the same state. Call it on every rank."""
        self.sums = average_metrics({key: float(total) for key, total in self.sums.items()})
        return {"sums": dict(self.sums), "counts": dict(self.counts)}


class MetricsLog:
    """Append-only CSV of logged iterations; on resume, rows past the checkpoint are dropped.

    Whole rewrites (on resume, and when a column first appears) are atomic, and a row torn by a
    kill in the middle of an append is dropped on resume, so a killed run keeps its history.
    """

    def __init__(self, path: Path, keep_until: int):
        self.path, self.fields = path, None
        rows = []
        if path.exists() and keep_until > 0:
            rows = read_metrics(path)
            self.fields = list(rows[0]) if rows else None
            rows = [r for r in rows if int(r["iteration"]) <= keep_until]
        self.kept = rows  # the rows up to the checkpoint (all of them where one resumes)
        self._rewrite(rows)

    def write(self, row: dict[str, float]) -> None:
        new = [k for k in row if k not in (self.fields or [])]
        if new:  # a first row, or a column that appears later (e.g. validation): rewrite the header
            rows = read_metrics(self.path) if self.fields else []
            self.fields = [*(self.fields or []), *new]
            self._rewrite(rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields, restval="").writerow(row)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        text = io.StringIO()
        if self.fields:
            writer = csv.DictWriter(text, self.fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        write_text_atomic(text.getvalue(), self.path)


def scalar_writer_class() -> Any:
    """TensorBoard's ``SummaryWriter`` (for ``tensorboard=true``); a ``ConfigError`` without the
    tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install "
                          "tensorboard (or train with tensorboard=false)") from None
    return SummaryWriter


@contextlib.contextmanager
def scalar_log(directory: Path, kept: list[dict[str, str]] | None) -> Iterator[Any]:
    """A TensorBoard writer of ``directory`` (None for ``kept`` None), closed at the end. Its
    event files are written afresh, from the metrics log's ``kept`` rows: so they mirror the
    CSV whatever earlier sessions logged, lost to a kill, or did not log (tensorboard off)."""
    if kept is None:
        yield None
        return
    writer_class = scalar_writer_class()
    for old in directory.glob("events.out.tfevents.*"):
        old.unlink()
    writer = writer_class(str(directory))
    try:
        for row in kept:
            add_scalars(writer, int(row["iteration"]),
                        {key: float(value) for key, value in row.items() if value != ""})
        yield writer
    finally:
        writer.close()


def add_scalars(writer: Any, iteration: int, row: dict[str, float]) -> None:
    """A metrics row as TensorBoard scalars at step ``iteration`` (not its bookkeeping columns),
    each tagged by ``scalar_tag``."""
    for key, value in row.items():
        if key not in ("iteration", "elapsed_s"):
            writer.add_scalar(scalar_tag(key), value, iteration)


def scalar_tag(column: str) -> str:
    """A metrics column's TensorBoard tag, in the section TensorBoard shows it under:
    ``validation/`` (``val_*``), ``best/`` (``best_*``), ``seconds/`` (``*_s``: timings) or
    ``train/``, e.g. ``val_accuracy`` -> ``validation/val_accuracy``."""
    section = ("validation" if column.startswith("val_") else "best" if column.startswith("best_")
               else "seconds" if column.endswith("_s") else "train")
    return f"{section}/{column}"


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics CSV, without a last line that is unfinished: one being appended by
    a live run, or one that a kill cut short (every row ``MetricsLog`` writes ends in a newline).
    A row that is not numbers (an edit, a disk error) is a ``DataError`` naming its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file (a disk error?): remove or mend it") from None
    text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    if text and "iteration" not in (reader.fieldnames or []):
        raise DataError(f"{path} line 1 is not the header of a metrics log (it needs an "
                        "iteration column): remove or mend it")
    rows = []
    for row in reader:
        if not _is_metrics_row(row):  # our rows hold no quoted newlines: a row is a line
            line = text.splitlines()[reader.line_num - 1]
            if not rows and len(line.split(",")) != len(reader.fieldnames or []):
                raise DataError(f"{path} line 1, its header, names {len(reader.fieldnames or [])}"
                                f" columns, but line {reader.line_num} holds "
                                f"{len(line.split(','))} values: mend the header")
            raise DataError(f"{path} line {reader.line_num} is not a row of numbers ({line!r}): "
                            "remove or mend it")
        rows.append(row)
    return rows


def _is_metrics_row(row: dict[str, str | None]) -> bool:
    """An iteration number, then numbers or blanks (a column a row has no value for)."""
    try:
        int(row.get("iteration") or "")
        for value in row.values():
            if value is None or (value != "" and not isinstance(value, str)):
                return False  # a short row, or one with more values than the header
            if value:
                float(value)
    except ValueError:
        return False
    return True


class TrainingStopped(Exception):
    """``fit`` stopped on SIGTERM or Ctrl-C, after a checkpoint (not a ``FastMAMLError``:
    nothing failed, and a driver of several runs must stop too); ``signum`` is the request's
    signal, so that the command exits as that signal's would (143, or 130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_handled(signums: Sequence[int], handler: Any) -> Iterator[None]:
    """``handler`` (a function, or ``signal.SIG_IGN``) for each of ``signums`` inside; the
    handlers in force before are restored after."""
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():  # None: a handler not set from Python
            signal.signal(signum, signal.SIG_DFL if before is None else before)


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], int]]:
    """While training, SIGTERM (``kill``, a scheduler's preemption) and a first Ctrl-C (SIGINT)
    only record the request; yields a check: 0 while no rank has received one, else the signal
    (this rank's first, or SIGTERM where only another rank received one). A second Ctrl-C stops at
    once (``KeyboardInterrupt``), losing the work since the last checkpoint. Outside the main
    thread (where Python cannot take signals) the signals keep their own effect."""
    received: list[int] = []

    def request(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)  # first: a message that cannot be written must not lose it
        if signum == signal.SIGINT and is_main():  # os.write: no buffered stream re-entered
            with contextlib.suppress(OSError):  # e.g. `| tee log`, which the Ctrl-C also ended
                os.write(sys.stderr.fileno(), b"\nfastmaml: stopping after this iteration, "
                         b"with a checkpoint (Ctrl-C again: at once)\n")

    # not where Python cannot take signals, nor a signal the process was told to ignore (a
    # shell starts background jobs with SIGINT ignored)
    ours = [signum for signum in STOP_SIGNALS
            if threading.current_thread() is threading.main_thread()
            and signal.getsignal(signum) is not signal.SIG_IGN]

    def requested() -> int:
        if not any_rank(bool(received)):
            return 0
        return received[0] if received else signal.SIGTERM

    with signals_handled(ours, request):
        yield requested


def fit(learner: Learner, run_dir: Path, checkpoint_every: int, log_every: int,
        progress: bool = True, stop_after: int | None = None,
        tensorboard: bool = False, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Train ``learner`` to ``learner.iterations``, resuming from its checkpoint if there is one.

    Checkpoints every ``checkpoint_every`` iterations and at the end, so a run killed at any
    moment loses at most the work since its last checkpoint; on SIGTERM (or a first Ctrl-C)
    it finishes the current iteration, checkpoints it and raises ``TrainingStopped`` (also
    after the last iteration, so that a driver trains no further learner). A row is logged
    every ``log_every`` iterations, and at any iteration whose metrics hold a validation figure
    (a ``val_`` key); it holds each metric's mean since the row before (``IntervalMeans``).
    ``stop_after`` ends the call early after that many iterations (used to test resumption).
    ``tensorboard`` writes the log as TensorBoard scalars too (``run_dir/tensorboard/<name>``).
    ``settings``, the run's fixed settings, go into each checkpoint (``check_resumable``).
    Returns the last logged metrics.
    Under torchrun every rank trains and only rank 0 writes the log and checkpoints.
    """
    main = is_main()
    path = checkpoint_path(run_dir, learner.name)
    log_path = metrics_path(run_dir, learner.name)
    if main:  # what a writer killed mid-write left of this learner's files
        remove_stale_temporaries(path)
        remove_stale_temporaries(log_path)
    start, elapsed, logged = 0, 0.0, 0  # logged: the last iteration with a row in the log
    interval = IntervalMeans()
    if path.exists():
        state = load_checkpoint(path)
        _refuse_going_back(learner, run_dir, state["iteration"])
        load_state(learner, state["learner"], path)
        start, elapsed = state["iteration"], state["elapsed_s"]
        logged = state.get("logged", 0)  # (absent from checkpoints before session 28)
        interval = IntervalMeans(state.get("interval"))  # (absent before session 40)
    log = MetricsLog(log_path, keep_until=start) if main else None
    if log and logged and not log.kept:  # e.g. emptied or deleted by hand
        warn(f"{log_path} holds no rows though {learner.name} logged up to iteration "
             f"{logged}: the run's logged history is lost, and the log goes on from "
             f"its checkpoint at {start}", FastMAMLWarning)
    end = learner.iterations if stop_after is None else min(learner.iterations, start + stop_after)
    last: dict[str, float] = {}
    bar = tqdm(range(start, end), initial=start, total=learner.iterations,
               disable=None if progress and main else True,
               desc=learner.name, unit="it", dynamic_ncols=True, leave=False)
    tick = time.perf_counter()
    with (_stop_requests() as stop_requested,  # (scalars also for a finished learner: its log)
          scalar_log(run_dir / "tensorboard" / learner.name,
                     log.kept if log and tensorboard else None) as scalars):
        for iteration in bar:
            metrics = learner.step(iteration)
            interval.add(metrics)
            done = iteration + 1
            validated = any(key.startswith("val_") for key in metrics)
            if done % log_every == 0 or done == learner.iterations or validated:
                covered = interval.counts.get("loss", 1)  # the iterations the row's mean sums
                last = average_metrics(interval.row(metrics))
                _check_finite_loss(learner.name, last.get("loss", 0.0), done - covered + 1, done)
                now = time.perf_counter()
                elapsed, tick = elapsed + now - tick, now
                if log:
                    log.write({"iteration": done, "elapsed_s": round(elapsed, 3), **last})
                if scalars:
                    add_scalars(scalars, done, last)
                logged = done
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()}, refresh=False)
            stopping = stop_requested()  # also at the last iteration: no next learner then
            if done % checkpoint_every == 0 or done == end or stopping:
                # every rank checks (they hold the same state), so that all stop together
                state = learner.state_dict()
                if not all_finite(state):  # never overwrite a good checkpoint with a diverged run
                    kept = ("the last checkpoint is kept" if path.exists() else
                            "no checkpoint was written yet: trained again (with a smaller "
                            "inner or meta learning rate), it starts afresh")
                    raise NonFiniteLossError(f"{learner.name}: non-finite parameters or "
                                             f"optimizer state at iteration {done}; {kept}")
                unlogged = interval.state()  # (on every rank: averaged over them)
                if main:
                    now = time.perf_counter()
                    elapsed, tick = elapsed + now - tick, now
                    save_atomic({"iteration": done, "elapsed_s": elapsed, "logged": logged,
                                 "interval": unlogged, "learner": state,
                                 **({"settings": settings} if settings else {})}, path)
                    checkpointed_mark(run_dir, learner.name).touch()
            if stopping:
                bar.close()
                raise _stopped(learner, done, stopping)
        bar.close()
        stopping = stop_requested() if end > start else 0  # (during the last checkpoint's write)
        if stopping:
            raise _stopped(learner, end, stopping)
    return last


def _stopped(learner: Learner, done: int, signum: int) -> TrainingStopped:
    request = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    return TrainingStopped(f"{learner.name}: stopped on request ({request}) at iteration {done} "
                           f"of {learner.iterations}, checkpointed: the same command resumes",
                           signum)


def check_resumable(learner: Learner, run_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse, before anything is written, a checkpoint past ``learner.iterations``, trained
    with other fixed ``settings`` than the run's config.yaml now holds (an edit of the file) or
    not fitting the learner's model (another shape of the data or environment it is built for),
    and a learner whose checkpoint is gone though one was written (``checkpointed_mark``) and
    its metrics log holds rows: starting afresh would overwrite its history."""
    path = checkpoint_path(run_dir, learner.name)
    if path.exists():
        state = load_checkpoint(path)
        checkpointed_mark(run_dir, learner.name).touch()  # (a run trained before marks were)
        _refuse_going_back(learner, run_dir, state["iteration"])
        refuse_changed_settings(state, settings, run_dir, path)
        with torch.random.fork_rng(devices=[]):  # (its generator state: for fit to set)
            load_state(learner, state["learner"], path)  # one that does not fit: refused now
        return
    log_path = metrics_path(run_dir, learner.name)
    marked = checkpointed_mark(run_dir, learner.name).exists()
    rows = read_metrics(log_path) if marked and log_path.is_file() else []
    if rows:
        raise CheckpointError(f"{learner.name}: {log_path} logged it up to iteration "
                              f"{rows[-1]['iteration']}, but its checkpoint {path} is gone: "
                              "training would start afresh and overwrite that log. Put the "
                              f"checkpoint back to resume, or delete {log_path} too to train "
                              f"{learner.name} again from the start")


def refuse_changed_settings(checkpoint: dict[str, Any], settings: dict[str, Any], run_dir: Path,
                            path: Path) -> None:
    """A ``ConfigError`` where the run's config.yaml (its fixed ``settings``) was edited since
    the ``checkpoint`` at ``path`` trained: resumed, evaluated or adapted, it would take the
    edit for the run's own settings."""
    trained = checkpoint.get("settings", {})  # (absent from checkpoints before session 48)
    changed = sorted(k for k in trained.keys() & settings.keys() if trained[k] != settings[k])
    if changed:
        raise ConfigError(f"{run_dir / 'config.yaml'} sets "
                          + ", ".join(f"{k}={settings[k]!r}" for k in changed)
                          + f", but {path} was trained with "
                          + ", ".join(f"{k}={trained[k]!r}" for k in changed)
                          + ": a run's learning settings are fixed once it has trained. "
                          "Put the file's values back, or train in another --out")


def _refuse_going_back(learner: Learner, run_dir: Path, reached: int) -> None:
    if reached > learner.iterations:
        raise ConfigError(f"{learner.name}: the checkpoint in {run_dir} is at iteration {reached}, "
                          f"past the {learner.iterations} iterations it is set to train; training "
                          "cannot go back, so set iterations (baseline_iterations for a baseline) "
                          f"to {reached} or more")


def _check_finite_loss(name: str, loss: float, first: int, last: int) -> None:
    """A logged loss, the mean of iterations ``first`` to ``last``, must be finite."""
    if not math.isfinite(loss):
        where = (f"at iteration {last}" if first == last else
                 f"in iterations {first} to {last} (their mean)")
        raise NonFiniteLossError(f"{name}: loss is {loss} {where}")


def all_finite(value: Any) -> bool:
    """True when every floating-point tensor in a (nested) state is finite."""
    if isinstance(value, Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True
