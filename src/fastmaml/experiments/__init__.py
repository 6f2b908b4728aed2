"""Experiments (problem families) and the named presets that configure them."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config_dict
from ..distributed import barrier, is_main
from ..errors import ConfigError
from .base import Experiment

# Imported on demand, so that e.g. the RL dependencies load only for RL runs.
EXPERIMENTS = {
    "sinusoid": "fastmaml.experiments.sinusoid:SinusoidExperiment",
}


@dataclass(frozen=True)
class Preset:
    experiment: str
    description: str
    values: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "sinusoid": Preset("sinusoid", "paper: MLP 1-40-40-1, K=10, alpha 0.01, 1 step, meta-batch 25, "
                       "70,000 iterations", {"iterations": 70000}),
    "sinusoid-demo": Preset("sinusoid", "the sinusoid experiment in a few minutes on 2 CPU cores "
                            "(6,000 iterations)", {"iterations": 6000, "checkpoint_every": 500}),
}


def experiment_class(name: str) -> type[Experiment]:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    module, _, attr = EXPERIMENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run `fastmaml presets` to list them "
                          f"({', '.join(PRESETS)})")
    return PRESETS[name]


# Settings that may change when a run directory is resumed (they do not change what is learned).
RESUMABLE_KEYS = {"iterations", "baseline_iterations", "checkpoint_every", "log_every", "device",
                  "eval_tasks", "eval_chunk", "eval_inner_steps", "path"}


def create_run(preset_name: str, run_dir: Path, overrides: list[str]) -> Experiment:
    """A new run directory for ``preset_name``, or the existing one there (to resume it)."""
    chosen = preset(preset_name)
    cls = experiment_class(chosen.experiment)
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        saved = cls.config_cls.from_dict(load_config_dict(config_path))
        if saved.preset != preset_name:
            raise ConfigError(f"{run_dir} holds a {saved.preset!r} run, not {preset_name!r}; "
                              "choose another --out")
        cfg = saved.with_overrides(overrides)
        changed = {k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v} - RESUMABLE_KEYS
        if changed:
            raise ConfigError(f"cannot resume {run_dir} with changed {', '.join(sorted(changed))}; "
                              f"only {', '.join(sorted(RESUMABLE_KEYS))} may change")
    else:
        cfg = cls.config_cls.from_dict({**chosen.values, "preset": preset_name}).with_overrides(overrides)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(config_path)
    barrier()
    return cls(cfg, run_dir)


def load_run(run_dir: Path) -> Experiment:
    """The experiment of an existing run directory, with its saved config."""
    values = load_config_dict(run_dir / "config.yaml")
    cls = experiment_class(str(values.get("experiment", "")))
    return cls(cls.config_cls.from_dict(values), run_dir)
