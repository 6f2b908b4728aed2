"""Typed run configuration: dataclasses, ``key=value`` overrides and YAML round trips."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import math
import re
import tokenize
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .atomic import write_text_atomic
from .errors import ConfigError
from .inner_lr import check_lr_mode
from .models import INITS

C = TypeVar("C", bound="Config")
# compile=auto compiles training runs of this many iterations or more: a first compile takes
# seconds (the sinusoid MLP) to minutes (Omniglot's conv nets, cold cache), and then saves
# 15-36% of each Omniglot iteration (docs/results.md), which pays back over thousands of
# iterations, not over a demo's hundreds
COMPILE_FROM_ITERATIONS = 10_000
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")  # a bool on the command line


def close_names(given: str, names: Iterable[str]) -> list[str]:
    """The ``names`` a mistyped ``given`` may mean: the nearest spellings (a typo; up to three
    equally near), else up to three names that hold it as a part (``size`` of
    ``meta_batch_size``, ``folder`` of ``fewshot-folder``)."""
    names = list(names)
    nearness = {name: difflib.SequenceMatcher(None, given, name).ratio() for name in
                difflib.get_close_matches(given, names, n=3)}
    return ([name for name, ratio in nearness.items() if ratio == max(nearness.values())]
            or [name for name in names if given in re.split(r"[_-]", name)][:3])


def did_you_mean(given: str, names: Iterable[str]) -> str:
    """`` (did you mean X?)`` for an unknown name, or nothing where no name is close."""
    near = close_names(given, names)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


@dataclass
class Config:
    """Settings shared by every experiment; each experiment subclasses it with its own fields."""

    # settings an experiment's own loop does not use (and refuses changes to): not shown as its
    # settings by `fastmaml presets NAME`
    unused_settings: typing.ClassVar[tuple[str, ...]] = ()
    experiment: str = ""
    preset: str = ""
    seed: int = 0  # the run's random seed: initialisation and the tasks drawn
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    iterations: int = 1000  # meta-training iterations (outer-loop updates)
    meta_batch: int = 25  # tasks per meta-iteration
    meta_lr: float = 1e-3  # Adam's outer-loop learning rate (the paper's beta)
    # constant | cosine (to meta_lr_min at the last iteration; MAML's: the sinusoid's pretrained
    # and oracle baselines keep meta_lr)
    meta_lr_schedule: str = "constant"
    meta_lr_min: float = 1e-5  # the cosine schedule's final meta learning rate (MAML++'s)
    inner_lr: float = 0.01  # the inner step size (the paper's alpha; learned rates start at it)
    inner_steps: int = 1  # inner gradient steps per task in meta-training
    eval_inner_steps: int = 10  # inner steps at evaluation (figures after 0 up to these)
    first_order: bool = False  # first-order MAML throughout: no second derivatives
    first_order_until: int = 0  # first-order MAML before this iteration, then second order (MAML++)
    lr_mode: str = "fixed"  # fixed | scalar | per_param (Meta-SGD) | per_layer_step (MAML++)
    adapt: str = "all"  # all | no_norm (paper) | comma-separated parameter-name prefixes (ANIL: head)
    # outer-loop parameters with one meta-learned set per inner step (inner_steps >= 2; with
    # second order or multi_step_loss): none | norm (MAML++'s per-step batch-norm weights and
    # biases; with adapt=no_norm) | name prefixes
    per_step: str = "none"
    multi_step_loss: bool = False  # MAML++ query loss after every inner step
    # iterations over which the MSL weights anneal; then the last step's loss alone (MAML++)
    msl_anneal_iterations: int = 10000
    clip_grad: float = 0.0  # element-wise meta-gradient clip (0: off)
    path: str = "auto"  # auto | batched (vmap) | looped
    # torch.compile the batched path: true | false | auto (training runs of 10,000 iterations or
    # more, where the minutes of a first compile pay back; evaluation and adapt run eager)
    compile: str = "auto"
    chunk_size: int = 0  # vmap this many tasks at a time (0: auto, cache-sized chunks on CPU)
    checkpoint_steps: bool = False  # recompute inner steps in the backward: flat memory in steps
    threads: int = 0  # torch intra-op threads (0: torch's default); 1 is fastest for small models
    # the supervised networks' initialisation: default (torch's own) | official (the paper's
    # code's, cbfinn/maml: see fastmaml.models.initialise); the meta-RL policy's is maml_rl's
    init: str = "default"
    tune_malloc: bool = True  # CPU: glibc keeps freed memory for reuse (faster; RSS stays at peak)
    eval_tasks: int = 600  # meta-test tasks at evaluation
    eval_chunk: int = 100  # tasks per evaluation call, to bound memory
    checkpoint_every: int = 1000  # iterations between checkpoints (a resume loses no more)
    log_every: int = 100  # iterations between rows of the metrics log
    # also write the logged metrics as TensorBoard scalars, to tensorboard/<learner>/ in the run
    # directory (needs the tensorboard package: pip install tensorboard)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.require_at_least(iterations=1, meta_batch=1, eval_tasks=1, eval_chunk=1,
                              checkpoint_every=1, log_every=1, inner_steps=0, eval_inner_steps=0,
                              threads=0, chunk_size=0, first_order_until=0, clip_grad=0,
                              msl_anneal_iterations=1, meta_lr_min=0)
        if not (0 <= self.inner_lr < math.inf and 0 < self.meta_lr < math.inf):  # NaN fails too
            raise ConfigError(f"inner_lr must be >= 0 and meta_lr > 0 (finite), got "
                              f"inner_lr={self.inner_lr} and meta_lr={self.meta_lr}")
        if self.meta_lr_schedule not in ("constant", "cosine"):
            raise ConfigError("meta_lr_schedule must be constant or cosine, got "
                              f"{self.meta_lr_schedule!r}")
        if self.meta_lr_schedule == "cosine" and self.meta_lr_min > self.meta_lr:
            raise ConfigError(f"the cosine schedule anneals meta_lr down to meta_lr_min: need "
                              f"meta_lr_min <= meta_lr, got meta_lr_min={self.meta_lr_min} and "
                              f"meta_lr={self.meta_lr}")
        if self.multi_step_loss and self.inner_steps < 1:
            raise ConfigError("multi_step_loss weighs the query loss after each inner step: it "
                              "needs inner_steps >= 1")
        check_lr_mode(self.lr_mode, self.inner_steps)
        if not -2 ** 63 <= self.seed < 2 ** 63:  # torch.manual_seed takes it (and seed + offset)
            raise ConfigError(f"seed must be an integer in [-2**63, 2**63), got {self.seed}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):  # (mps, xpu: not tested)
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.path not in ("auto", "batched", "looped"):
            raise ConfigError(f"path must be auto, batched or looped, got {self.path!r}")
        switch = str(self.compile).strip().lower()
        self.compile = ("true" if switch in TRUE_WORDS else "false" if switch in FALSE_WORDS
                        else switch)
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError(f"compile must be auto, true or false, got {self.compile!r}")

    def compiles(self) -> bool:
        """Whether training compiles (``compile``, with ``auto`` resolved by the iterations);
        never where the experiment's loop does not use it (meta-RL's)."""
        return "compile" not in self.unused_settings and (
            self.compile == "true" or (self.compile == "auto"
                                       and self.iterations >= COMPILE_FROM_ITERATIONS))

    def settings_apart(self) -> dict[str, tuple[str, ...]]:
        """Settings these values leave unused, keyed by what uses them (another dataset, say):
        ``fastmaml presets NAME`` lists them apart from the run's own."""
        return {}

    def training_warnings(self) -> list[str]:
        """What these settings train that a user likely does not mean (each is allowed)."""
        said = []
        first_order_throughout = self.first_order or self.first_order_until >= self.iterations
        if self.first_order and self.first_order_until:
            said.append(f"first_order_until={self.first_order_until} has no effect: "
                        "first_order=true trains first order throughout")
        elif first_order_throughout and self.first_order_until:
            said.append(f"first_order_until={self.first_order_until} is not below iterations="
                        f"{self.iterations}: the run trains first order throughout (say so with "
                        "first_order=true), and is evaluated as MAML")
        if first_order_throughout and self.per_step != "none" and self.inner_steps >= 2:
            if not self.multi_step_loss:
                said.append(f"per_step={self.per_step} with first-order MAML and no "
                            "multi_step_loss: only the last inner step's set gets a "
                            "meta-gradient, so the model's own (step 1's) and the other steps' "
                            "sets keep their initial values; set multi_step_loss=true, as "
                            "MAML++ does")
            elif self.msl_anneal_iterations < self.iterations:
                said.append(f"per_step={self.per_step} with first-order MAML throughout: the "
                            "multi-step loss ends after msl_anneal_iterations="
                            f"{self.msl_anneal_iterations} (as MAML++'s), and from then on only "
                            "the last inner step's set gets a meta-gradient; train second order "
                            "after it (first_order_until), as MAML++ does")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if (not self.multi_step_loss
                and self.msl_anneal_iterations != defaults["msl_anneal_iterations"]):
            said.append(f"msl_anneal_iterations={self.msl_anneal_iterations} has no effect "
                        "without multi_step_loss=true")
        if self.meta_lr_schedule == "constant" and self.meta_lr_min != defaults["meta_lr_min"]:
            said.append(f"meta_lr_min={self.meta_lr_min:g} has no effect with a constant meta "
                        "learning rate: meta_lr_schedule=cosine anneals to it")
        return said

    def require_at_least(self, **minimums: float) -> None:
        """A ``ConfigError`` naming the first field (or element of a tuple field, e.g. the
        hidden sizes) below its minimum; NaN fails too."""
        for name, low in minimums.items():
            value = getattr(self, name)
            items = value if isinstance(value, tuple) else (value,)
            if not items or not all(item >= low for item in items):
                raise ConfigError(f"{name} must be >= {low}, got {value}"
                                  + (" (give one or more values)" if not items else ""))

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def field_notes(cls) -> dict[str, str]:
        """Each setting's comment in its class's source (the line above a field, then the one
        beside it), a subclass's where it has one, else its base's: the settings' one
        documentation, shown by ``fastmaml presets NAME``. Empty where no source is installed."""
        notes: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if issubclass(klass, Config):
                notes.update(_source_notes(klass))
        return {name: notes[name] for name in cls.field_types() if name in notes}

    def replace(self: C, **changes: Any) -> C:
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        return cls(**cls.typed(values))

    @classmethod
    def typed(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (strings or YAML's values) of known keys, as their fields' types."""
        types = cls.field_types()
        unnamed = [key for key in values if not isinstance(key, str)]
        if unnamed:  # YAML reads a key 1:, yes: or null: as a number, a bool or None
            raise ConfigError(f"config key(s) {', '.join(map(repr, unnamed))} are not names "
                              f"(a number, true/false or null to YAML); valid keys: "
                              f"{', '.join(types)}")
        unknown = sorted(set(values) - set(types))
        if unknown:
            elsewhere = {key: cls._experiments_with(key) for key in unknown}
            hints = [f"{key} is a setting of the {' and '.join(names)} experiment"
                     + ("s" if len(names) > 1 else "") for key, names in elsewhere.items() if names]
            near = {key: close_names(key, types) for key in unknown if not elsewhere[key]}
            hints += [f"{key}: did you mean {' or '.join(match)}?" for key, match in near.items()
                      if match]
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)} for {cls.__name__}"
                              + (f" ({'; '.join(hints)})" if hints else "")
                              + f"; valid keys: {', '.join(types)}")
        return {k: _coerce(k, v, types[k]) for k, v in values.items()}

    @classmethod
    def _experiments_with(cls, key: str) -> list[str]:
        """The other experiments that have the setting ``key`` (given to the wrong preset)."""
        from .experiments import EXPERIMENTS, experiment_class  # (an error's path: all load)
        return [name for name in EXPERIMENTS if experiment_class(name).config_cls is not cls
                and key in experiment_class(name).config_cls.field_types()]

    def with_overrides(self: C, overrides: list[str]) -> C:
        """Apply ``key=value`` strings, typed by the dataclass fields, with ``refuse_given``'s
        checks of the keys given."""
        changes = parse_overrides(overrides)
        changed = self.replace(**changes)
        changed.refuse_given(set(changes))
        return changed

    def refuse_given(self, given: set[str]) -> None:
        """A ``ConfigError`` for values refused only where they are given (``key=value``), so that
        a run saved with them before still loads: ``eval_tasks=1``."""
        if "eval_tasks" in given and self.eval_tasks == 1:
            raise ConfigError("eval_tasks must be >= 2: the evaluation gives the mean over the "
                              "test tasks and its 95% confidence interval, which one task cannot "
                              "(`fastmaml adapt` adapts to one task of your own)")

    def save(self, path: Path) -> None:
        write_text_atomic(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


@functools.cache
def _source_notes(klass: type) -> dict[str, str]:
    """The comments of ``klass``'s own fields in its source (see ``Config.field_notes``)."""
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):  # no source file installed: the settings go without notes
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip() for token in
                tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    notes = {}
    for number, line in enumerate(lines, start=1):
        field = re.match(r" {4}(\w+) *:", line)
        if field is None or field[1] not in klass.__annotations__:
            continue
        above = number - 1
        while above in comments and lines[above - 1].strip().startswith("#"):
            above -= 1
        said = [comments[n] for n in range(above + 1, number)] + (
            [comments[number]] if number in comments else [])
        if said:
            notes[field[1]] = " ".join(said)
    return notes


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``key=value`` strings as {key: value} (a key given twice with two values is an error)."""
    changes: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key.strip() in ("experiment", "preset"):  # what the run is: its preset's choice
            raise ConfigError(f"{key.strip()} is set by the preset a run is trained from, "
                              "not by an override: name another preset")
        key, value = key.strip(), raw.strip()
        if changes.get(key, value) != value:  # which one was meant is not for us to guess
            raise ConfigError(f"override {key!r} given twice ({key}={changes[key]}, then "
                              f"{key}={value}): give it once")
        changes[key] = value
    return changes


def load_config_dict(path: Path) -> dict[str, Any]:
    """A run's config.yaml (``path``), as YAML's mapping; a run directory that is not one is
    named as what it is."""
    run_dir = path.parent
    if not run_dir.exists():
        raise ConfigError(f"the run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run directory")
    if not path.is_file():
        raise ConfigError(f"no config file at {path}: is this a fastmaml run directory?")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise ConfigError(f"{path} is not valid YAML ({detail}): fix it, or copy it from "
                          "another run of the same preset") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a config mapping")
    return values


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Turn ``value`` (a string from the command line, or a YAML value) into ``kind``."""
    if typing.get_origin(kind) is tuple:
        (item_kind, _) = typing.get_args(kind)
        if isinstance(value, str):
            text = value.strip()
            if text[:1] + text[-1:] in ("[]", "()"):  # as YAML and Python write a list
                text = text[1:-1]
            items = [item.strip() for item in text.split(",")]
        else:
            items = value
        try:
            return tuple(_coerce(key, v, item_kind) for v in items if v != "")
        except (ConfigError, TypeError):  # (TypeError: not a list)
            example = "a,b" if item_kind is str else "1,2"
            raise ConfigError(f"config key {key!r} expects comma-separated {item_kind.__name__} "
                              f"values (e.g. {key}={example}), got {value!r}") from None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(value)
            return text in TRUE_WORDS
        if kind in (int, float) and isinstance(value, bool):  # YAML's yes/true: not 1
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key {key!r} expects {getattr(kind, '__name__', kind)}, "
                          f"got {value!r}") from error
    raise ConfigError(f"config key {key!r} has an unsupported type {kind}")
