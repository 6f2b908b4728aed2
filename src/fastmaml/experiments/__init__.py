"""Experiments (problem families) and the named presets that configure them."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, load_config_dict
from ..distributed import barrier, is_main
from ..errors import ConfigError
from .base import Experiment

# Imported on demand, so that e.g. the RL dependencies load only for RL runs.
EXPERIMENTS = {
    "sinusoid": "fastmaml.experiments.sinusoid:SinusoidExperiment",
    "fewshot": "fastmaml.experiments.fewshot:FewShotExperiment",
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


def _fewshot_presets() -> dict[str, Preset]:
    """The paper's classification settings (inner_lr = N x the paper's alpha, see fewshot.py),
    each with a first-order variant (-fo) and a CPU-budget variant (-cpu, fewer iterations)."""
    paper = {
        "omniglot-5w1s": ("Omniglot 5-way 1-shot", dict(n_way=5, k_shot=1, k_query=1)),
        "omniglot-5w5s": ("Omniglot 5-way 5-shot", dict(n_way=5, k_shot=5, k_query=5)),
        "omniglot-20w1s": ("Omniglot 20-way 1-shot", dict(n_way=20, k_shot=1, k_query=1,
                                                           meta_batch=16, inner_steps=5)),
        "omniglot-20w5s": ("Omniglot 20-way 5-shot", dict(n_way=20, k_shot=5, k_query=5,
                                                           meta_batch=16, inner_steps=5)),
        "miniimagenet-5w1s": ("MiniImagenet 5-way 1-shot", dict(k_shot=1, meta_batch=4)),
        "miniimagenet-5w5s": ("MiniImagenet 5-way 5-shot", dict(k_shot=5, meta_batch=2)),
    }
    mini = dict(dataset="miniimagenet", n_way=5, k_query=15, hidden=32, inner_lr=0.05,
                inner_steps=5, clip_grad=10.0)
    cpu_iterations = {"omniglot-5w1s": 10000, "omniglot-5w5s": 4000, "omniglot-20w1s": 3000,
                      "omniglot-20w5s": 2000, "miniimagenet-5w1s": 2000, "miniimagenet-5w5s": 2000}
    presets = {}
    for name, (title, values) in paper.items():
        values = {**(mini if name.startswith("mini") else {}), **values}
        steps = values.get("inner_steps", 1)
        text = (f"paper: {title}, meta-batch {values.get('meta_batch', 32)}, {steps} inner "
                f"step(s), inner_lr {values.get('inner_lr', 2.0)} (mean loss), 60,000 iterations")
        presets[name] = Preset("fewshot", text, values)
        presets[f"{name}-fo"] = Preset("fewshot", f"{title}, first-order MAML",
                                       {**values, "first_order": True})
        presets[f"{name}-cpu"] = Preset("fewshot", f"{title} at a CPU budget: "
                                        f"{cpu_iterations[name]:,} iterations",
                                        {**values, "iterations": cpu_iterations[name]})
    presets["omniglot-5w1s-mlp"] = Preset("fewshot", "Omniglot 5-way 1-shot, the paper's MLP "
                                          "256-128-64-64 variant", {**paper["omniglot-5w1s"][1],
                                                                    "network": "mlp"})
    return presets


PRESETS.update(_fewshot_presets())


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
                  "eval_tasks", "eval_chunk", "eval_inner_steps", "path", "data_root", "download",
                  "compile", "threads"}


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
        cfg = _resumed(saved, overrides, run_dir)
    else:
        cfg = cls.config_cls.from_dict({**chosen.values, "preset": preset_name}).with_overrides(overrides)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(config_path)
    barrier()
    return cls(cfg, run_dir)


def load_run(run_dir: Path, overrides: list[str] = ()) -> Experiment:
    """The experiment of an existing run directory, with its saved config (and ``overrides`` of
    the settings that do not change what was learned, e.g. eval_tasks)."""
    values = load_config_dict(run_dir / "config.yaml")
    cls = experiment_class(str(values.get("experiment", "")))
    return cls(_resumed(cls.config_cls.from_dict(values), list(overrides), run_dir), run_dir)


def _resumed(saved: Config, overrides: list[str], run_dir: Path) -> Config:
    cfg = saved.with_overrides(overrides)
    changed = {k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v} - RESUMABLE_KEYS
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with changed {', '.join(sorted(changed))}; "
                          f"only {', '.join(sorted(RESUMABLE_KEYS))} may change")
    return cfg
