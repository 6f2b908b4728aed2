"""Experiments (problem families) and the named presets that configure them."""
from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from ..atomic import read_json, remove_stale_temporaries, write_text_atomic
from ..config import Config, did_you_mean, load_config_dict, parse_overrides
from ..distributed import gather_ranks, require_a_task_per_rank, world
from ..errors import ConfigError, DataError, FastMAMLWarning, NonFiniteLossError, warn
from ..runlock import learners_held, locked_run_dir, one_starting, others_training
from ..train import Learner, check_resumable, checkpoint_path, fit, scalar_writer_class
from .base import Experiment, fixed_settings, resumable_keys, run_started

# Imported on demand, so that e.g. the RL dependencies load only for RL runs.
EXPERIMENTS = {
    "sinusoid": "fastmaml.experiments.sinusoid:SinusoidExperiment",
    "fewshot": "fastmaml.experiments.fewshot:FewShotExperiment",
    "regression": "fastmaml.experiments.regression:RegressionExperiment",
    "rl": "fastmaml.experiments.rl:RLExperiment",
}


@dataclass(frozen=True)
class Preset:
    experiment: str
    description: str
    values: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "sinusoid": Preset("sinusoid", "paper: MLP 1-40-40-1, K=10, alpha 0.01, 1 step, meta-batch 25, "
                       "70,000 iterations", {"iterations": 70000}),
    "sinusoid-demo": Preset("sinusoid", "the sinusoid experiment in 1-2 minutes on 2 CPU cores "
                            "(6,000 iterations)", {"iterations": 6000, "checkpoint_every": 500}),
    "regression-csv": Preset("regression", "your own regression tasks: --data-root DIR with one "
                             "CSV of x,y (or x1,...,xd,y) points per task (DIR/*.csv, or "
                             "DIR/train|val|test/*.csv); MLP d-40-40-1, K=10, 10,000 iterations",
                             {"features": 0}),
}


# The engine's options that speed up meta-training (MAML++, Antoniou et al. 2019), for the -fast
# presets: its per-layer per-step inner rates, multi-step loss, derivative-order annealing (first
# order at first, as it is cheaper; not for one inner step, below) and cosine meta learning rate,
# over a CPU-sized run.
FAST_RECIPE = dict(lr_mode="per_layer_step", multi_step_loss=True, msl_anneal_iterations=2000,
                   first_order_until=2000, meta_lr_schedule="cosine", iterations=10000,
                   checkpoint_every=100, val_every=250)


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
                inner_steps=5)
    # Sized by measured one-thread iteration times (docs/results.md): 5w1s 0.4 s, 5w5s 2.4 s and
    # 20w1s 5 s on shared cores, 40-70 min each. 20w5s, the paper's recipe: 7.4 s under torchrun
    # with two one-thread ranks (AVX2, session 37), so its 2,000 take about 4 h there; MiniImagenet
    # is not measured here.
    cpu_iterations = {"omniglot-5w1s": 10000, "omniglot-5w5s": 1000, "omniglot-20w1s": 600,
                      "omniglot-20w5s": 2000, "miniimagenet-5w1s": 2000, "miniimagenet-5w5s": 2000}
    presets = {}
    for name, (title, values) in paper.items():
        if name.startswith("mini"):
            values = {**mini, **values}
            # the official code clips its meta-gradient to +-10, but its outer loss sums the
            # N x k_query queries' cross-entropies / K: N x k_query / K times our mean, so the
            # same clip on our gradient is 10 x K / (N x k_query) (0.133 1-shot, 0.667 5-shot)
            values["clip_grad"] = 10.0 * values["k_shot"] / (values["n_way"] * values["k_query"])
        steps = values.get("inner_steps", 1)
        text = (f"paper: {title}, meta-batch {values.get('meta_batch', 32)}, {steps} inner "
                f"step(s), inner_lr {values.get('inner_lr', 2.0)} (mean loss), 60,000 iterations")
        presets[name] = Preset("fewshot", text, values)
        presets[f"{name}-fo"] = Preset("fewshot", f"{title}, first-order MAML",
                                       {**values, "first_order": True})
        presets[f"{name}-cpu"] = Preset("fewshot", f"{title} at a CPU budget: "
                                        f"{cpu_iterations[name]:,} iterations",
                                        {**values, "iterations": cpu_iterations[name]})
    for name in ("omniglot-5w1s", "omniglot-20w1s"):  # Lake et al.'s one-shot protocol
        presets[f"{name}-lake"] = Preset(
            "fewshot", f"{paper[name][0]}, Lake et al.'s split: meta-train on the background "
            "alphabets (rotated), meta-test on the evaluation alphabets (as drawn), random and "
            "within-alphabet tasks", {**paper[name][1], "split": "lake", "rotate": "train"})
    for name in ("omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s"):
        recipe, options = dict(FAST_RECIPE), (
            "MAML++'s per-layer per-step learned rates, multi-step loss (annealed over "
            f"{FAST_RECIPE['msl_anneal_iterations']:,} iterations)")
        if paper[name][1].get("inner_steps", 1) == 1:
            # One inner step of inner_lr 2.0 learned far slower first order than second order
            # (5-way 5-shot validation 47% against 86% at 100 iterations; docs/results.md).
            recipe["first_order_until"] = 0
            options = ("MAML++'s per-layer learned rates (with one inner step its multi-step "
                       "loss is the plain loss)")
        order = (f"first order for the first {recipe['first_order_until']:,} iterations"
                 if recipe["first_order_until"] else "second order throughout")
        presets[f"{name}-fast"] = Preset(
            "fewshot", f"{paper[name][0]}, fastmaml's fast recipe: the paper's task settings with "
            f"{options}, {order} and a cosine meta_lr, {recipe['iterations']:,} iterations",
            {**paper[name][1], **recipe})
    presets["fewshot-folder"] = Preset(
        "fewshot", "your own images: --data-root DIR with DIR/<class>/* (class_depth=2 for "
        "DIR/<group>/<class>/*, or DIR/train|val|test/...); Omniglot 5-way 1-shot's settings, "
        "28x28 grayscale, 20,000 iterations; set n_way, k_shot, image_size, channels, invert",
        {**paper["omniglot-5w1s"][1], "dataset": "folder", "image_size": 28, "channels": 1,
         "iterations": 20000})
    presets["omniglot-5w1s-mlp"] = Preset("fewshot", "Omniglot 5-way 1-shot, the paper's MLP "
                                          "256-128-64-64 variant", {**paper["omniglot-5w1s"][1],
                                                                    "network": "mlp"})
    return presets


PRESETS.update(_fewshot_presets())


def _rl_presets() -> dict[str, Preset]:
    """The paper's meta-RL settings (TRPO meta-updates: KL 0.01, CG 10 iterations, damping 1e-5,
    line search 0.8 x 15; one inner step) with its baselines (pretrained and oracle), and
    CPU-budget variants (-cpu) whose MAML and pretrained learners fit in about two hours on 2
    cores. 2D navigation follows the official code's action scale 0.1 and alpha 0.5
    (see fastmaml/experiments/rl.py)."""
    nav = dict(env="fastmaml/Nav2D-v0", action_scale=0.1, inner_lr=0.5, meta_batch=20,
               trajectories=20)
    # Evaluation episodes: the official test scripts' 4,000 environment steps per task and step
    # (8,000 for the ant direction): 40 episodes of navigation's horizon 100, 20 of locomotion's
    # 200.
    paper = {
        "rl-nav2d": ("2D navigation", nav),
        "rl-cheetah-vel": ("half-cheetah goal velocity",
                           dict(env="fastmaml/HalfCheetahVel-v0", meta_batch=40, trajectories=10,
                                eval_trajectories=20)),
        "rl-cheetah-dir": ("half-cheetah goal direction",
                           dict(env="fastmaml/HalfCheetahDir-v0", meta_batch=40, trajectories=20,
                                eval_trajectories=20)),
        "rl-ant-vel": ("ant goal velocity",
                       dict(env="fastmaml/AntVel-v0", meta_batch=40, trajectories=20,
                            eval_trajectories=20)),
        "rl-ant-dir": ("ant goal direction",
                       dict(env="fastmaml/AntDir-v0", meta_batch=40, trajectories=40,
                            eval_trajectories=40)),
    }
    # CPU budget: locomotion at 20 tasks x 10 episodes (training and evaluation, 20 evaluation
    # episodes per step), horizon 100 for the half-cheetah and the paper's 200 for the ants (at
    # horizon 100 they learned nothing in 150 iterations; at 200 and rllab's time step the ant
    # direction run's post-update gain grew steadily over 150, docs/results.md; ant velocity
    # adapts there too, results/rl-ant-vel at 500 iterations); navigation at the paper's scale,
    # fewer iterations.
    cpu = {"rl-nav2d": (dict(iterations=RL_CPU_ITERATIONS["rl-nav2d"]),
                        "paper scale, the official script's meta-iterations")}
    for name in paper:
        if name != "rl-nav2d":
            horizon = 200 if "ant" in name else 100
            cpu[name] = (dict(meta_batch=20, trajectories=10, horizon=horizon,
                              eval_trajectories=20, iterations=RL_CPU_ITERATIONS[name]),
                         f"20 tasks x 10 episodes x horizon {horizon} (evaluation: 20 x {horizon} "
                         "steps per step)")
    presets = {}
    for name, (title, values) in paper.items():
        values = {**values, "oracle": True}  # the paper's baselines: pretrained and oracle
        horizon = 100 if name == "rl-nav2d" else 200
        text = (f"paper: {title}, meta-batch {values['meta_batch']}, {values['trajectories']} "
                f"episodes per task, horizon {horizon}, inner_lr {values.get('inner_lr', 0.1)}, "
                "500 meta-iterations")
        presets[name] = Preset("rl", text, {**values, "iterations": 500})
        changes, how = cpu[name]
        presets[f"{name}-cpu"] = Preset("rl", f"{title} at a CPU budget: {how}, "
                                        f"{changes['iterations']} meta-iterations",
                                        {**values, **changes})
    presets["rl-env"] = Preset("rl", "your own gymnasium environment with the task API (README): "
                               "env=your_module:YourEnv-v0; meta-batch 20, 20 episodes per task, "
                               "horizon its max_episode_steps, inner_lr 0.1, 500 meta-iterations",
                               {"env": ""})
    return presets


# Measured on 2 busy cores: navigation ~10 s, half-cheetah ~8 s per iteration (maml and
# pretrained; the oracle, added later, costs about as much as the pretrained baseline).
# Navigation: the official script's 100 meta-iterations (maml_trpo_point.py, n_itr=100); longer
# runs adapted worse after 2-3 steps (docs/results.md). Half-cheetah velocity: the paper's 500;
# it only began to adapt after about 400 (85 min for both learners on one busy core). Ants: the
# paper's 500 (ant direction: 13 s per MAML iteration and 5.6 s per pretrained one on a core,
# 1.8 h and 47 min, side by side with `--learner`); at 150 its one-step gain was still growing.
RL_CPU_ITERATIONS = {"rl-nav2d": 100, "rl-cheetah-vel": 500, "rl-cheetah-dir": 300,
                     "rl-ant-vel": 500, "rl-ant-dir": 500}
PRESETS.update(_rl_presets())


def experiment_class(name: str) -> type[Experiment]:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}{did_you_mean(name, EXPERIMENTS)}; known: "
                          f"{', '.join(EXPERIMENTS)}")
    module, _, attr = EXPERIMENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; run "
                          f"`fastmaml presets` to list them ({', '.join(PRESETS)})")
    return PRESETS[name]


def prepare_run(preset_name: str, run_dir: Path, overrides: list[str],
                in_use: bool = False) -> Experiment:
    """The experiment of a new ``preset_name`` run in ``run_dir``, or of the run there to resume
    it; writes nothing (``Experiment.save_config`` does, once the run is known to start).

    A directory of the same preset with a config but neither a checkpoint nor an evaluation
    (e.g. a run that stopped on a bad value before its first checkpoint) holds nothing to
    resume, so it starts afresh with the new settings, unless it is ``in_use`` (another
    learner of it is training): then its settings are fixed as a started run's.
    """
    chosen = preset(preset_name)
    cls = experiment_class(chosen.experiment)
    config_path = run_dir / "config.yaml"
    if not config_path.exists() and run_started(run_dir):
        raise ConfigError(f"{run_dir} holds a trained or evaluated run (checkpoints, eval.json) "
                          f"but no config.yaml: the settings it was trained with are unknown. "
                          "Put its config.yaml back, or train in another --out")
    if config_path.exists():
        values = load_config_dict(config_path)
        if values.get("preset", "") != preset_name:  # (before its keys, maybe another experiment's)
            raise ConfigError(f"{run_dir} holds a {values.get('preset', '')!r} run, not "
                              f"{preset_name!r}; choose another --out")
        if values.get("experiment") != chosen.experiment:  # an edit: as eval names it
            raise ConfigError(f"{config_path}: experiment is {values.get('experiment')!r}, but "
                              f"the {preset_name} preset runs the {chosen.experiment!r} "
                              "experiment: put the file's value back")
        saved = _saved_config(cls, values, config_path)
        if in_use or run_started(run_dir):
            experiment = cls(_resumed(saved, overrides, run_dir), run_dir)
            experiment.in_use = in_use
            return experiment
    return cls(preset_config(preset_name, overrides), run_dir)


def preset_config(preset_name: str, overrides: Sequence[str]) -> Config:
    """A new run's config: the preset's values, then ``overrides``."""
    chosen = preset(preset_name)
    values = {**chosen.values, "preset": preset_name}
    return experiment_class(chosen.experiment).config_cls.from_dict(values).with_overrides(
        list(overrides))


def train_run(preset_name: str, run_dir: Path, overrides: list[str], progress: bool = True,
              learner: str | None = None, verbose: bool = True) -> Experiment:
    """``fastmaml train``: train every learner of a new or resumed run to its iterations, or
    only the one named ``learner`` (another process may train the others meanwhile).
    ``progress``: progress bars; ``verbose``: the start line and each learner's summary, printed.

    Rank 0 holds the run directory's lock throughout, and every rank learns of its refusal
    (another command holds the run), so that each stops with it and none waits for rank 0 at a
    collective; the config is written only once the data, models and checkpoints accept the
    command. Each session appends what it ran on to ``machine.json``. Under torchrun, call it
    on every rank.
    """
    main = world()[0] == 0
    with ExitStack() as held:
        refusal = None
        if main:
            _warn_if_foreign(run_dir)
            try:
                held.enter_context(locked_run_dir(run_dir, learner))
            except ConfigError as error:
                refusal = error
        said = gather_ranks(None if refusal is None else str(refusal))[0]
        if refusal is not None:
            raise refusal
        if said is not None:
            raise ConfigError(said)
        return _train(preset_name, run_dir, overrides, progress, learner, main, verbose)


def _warn_if_foreign(run_dir: Path) -> None:
    """Warn when a new run's ``--out`` already holds files of something else (a mistyped
    folder): the run's files are written beside them. Hidden files (ours, .DS_Store) do not
    count."""
    if not run_dir.is_dir() or (run_dir / "config.yaml").exists() or run_started(run_dir):
        return  # (a run without its config: refused by prepare_run)
    foreign = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))  # .DS_Store
    if foreign:
        warn(f"{run_dir} is not a run's folder and holds {len(foreign)} other "
             f"entr{'ies' if len(foreign) > 1 else 'y'} (e.g. {foreign[0]}): the run's "
             "files are written beside them; stop and give --out a new folder if that "
             "is not meant", FastMAMLWarning)


def _train(preset_name: str, run_dir: Path, overrides: list[str], progress: bool,
           only: str | None, main: bool, verbose: bool) -> Experiment:
    with ExitStack() as held:
        with one_starting(run_dir) if main and only is not None else nullcontext():
            experiment, learners = _start(preset_name, run_dir, overrides, only, main, held)
        cfg = experiment.cfg
        size = world()[1]
        say = print if main and verbose else (lambda *_: None)
        if main:
            _record_machine(run_dir, str(experiment.device), size)
            for message in cfg.training_warnings():
                warn(message, FastMAMLWarning)
        resumed = [learner.name for learner in learners
                   if checkpoint_path(run_dir, learner.name).is_file()]
        note = experiment.data_note()
        say(f"fastmaml: training {preset_name} in {run_dir} on {experiment.device}"
            + (f", {size} processes" if size > 1 else "") + (f", learner {only}" if only else "")
            + (f" ({note})" if note else "")
            + (f"; resuming {', '.join(resumed)} from the last checkpoint" if resumed else ""))
        if cfg.compiles():
            say(f"fastmaml: compile={cfg.compile}: the first iteration compiles the batched path "
                "(seconds for a small MLP, minutes for a conv net on a cold cache) and keeps it "
                "where it is faster")
        settings = fixed_settings(cfg)  # (recorded in every checkpoint)
        for learner in learners:
            try:
                last = fit(learner, run_dir, cfg.checkpoint_every, cfg.log_every,
                           progress=progress, tensorboard=cfg.tensorboard, settings=settings)
            except NonFiniteLossError as error:
                if (isinstance(error, DataError)  # the data's, which no setting mends
                        or not checkpoint_path(run_dir, learner.name).is_file()):
                    raise  # no checkpoint of it to keep: the changed command starts it afresh
                raise NonFiniteLossError(  # a resume may not change what the run learns
                    f"{error}. {run_dir} keeps its last finite checkpoint, but a run's learning "
                    "settings are fixed: try the change in a new run (another --out)") from None
            engine = getattr(getattr(learner, "module", None), "path", None)
            summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
            done = learner.iterations
            # (under torchrun another rank's share of the tasks may chunk otherwise)
            path = f"rank 0's path: {engine}" if world()[1] > 1 else f"{engine} path"
            say(f"  {learner.name}: {done} iteration{'' if done == 1 else 's'} done"
                + (f" ({path})" if engine else "")
                + (f"; last: {summary}" if summary else ""))
    return experiment


def _start(preset_name: str, run_dir: Path, overrides: list[str], only: str | None,
           main: bool, held: ExitStack) -> tuple[Experiment, list[Learner]]:
    """The run's experiment and the learners this command trains, its config written; a whole
    run command's learner locks enter ``held``."""
    # a --learner command beside another learner of the run takes its settings, even before
    # any checkpoint: two learners trained with different settings would make one broken run.
    # Rank 0 tells (once it may start): so every rank reads the same settings
    in_use = gather_ranks(bool(main and only is not None and others_training(run_dir, only)))[0]
    experiment = prepare_run(preset_name, run_dir, overrides, in_use)
    root = experiment.data_root()
    if root is not None and run_dir.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"--out {run_dir} is inside the data folder {root}, whose "
                          "loading would read the run's own files as data: give --out a "
                          "folder outside it")
    if experiment.cfg.tensorboard:
        scalar_writer_class()  # a missing tensorboard package refuses the command at once
    learners = experiment.learners()  # loads the data and builds the models: bad values fail here
    if only is not None:
        names = [learner.name for learner in learners]
        if only not in names:
            raise ConfigError(f"--learner {only!r}{did_you_mean(only, names)}: runs of the "
                              f"{preset_name} preset have the learners {', '.join(names)}")
        learners = [learner for learner in learners if learner.name == only]
    # a command on the whole run also holds every learner: no --learner command trains meanwhile
    whole_run = [learner.name for learner in learners] if main and only is None else []
    held.enter_context(learners_held(run_dir, whole_run))
    if whole_run:  # no other train command writes the run's shared files now
        for shared in ("config.yaml", "machine.json"):
            remove_stale_temporaries(run_dir / shared)
    settings = fixed_settings(experiment.cfg)
    for learner in learners:
        check_resumable(learner, run_dir, settings)
    require_a_task_per_rank(experiment.cfg.meta_batch)
    experiment.save_config()  # so a refused command leaves the run directory as it was
    return experiment, learners


def _record_machine(run_dir: Path, device: str, processes: int) -> None:
    """Append this training session's machine to ``run_dir/machine.json`` (for the report),
    under a lock: two ``--learner`` commands of one run may start together."""
    path = run_dir / "machine.json"
    with FileLock(run_dir / ".fastmaml.machine.lock"):
        try:
            sessions = read_json(path) if path.is_file() else []
        except DataError as error:  # a record for the report only: never a reason not to train
            path.replace(path.with_name("machine.json.damaged"))
            warn(f"{error}; kept as machine.json.damaged, and a new record started",
                 FastMAMLWarning)
            sessions = []
        sessions.append({
            "date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
            "processor": _cpu_model(),
            # the vector instructions torch's CPU kernels use: speed and float32 rounding
            # differ between e.g. AVX2 and AVX512 instances of "one" machine
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "device": device,
            "processes": processes, "threads": torch.get_num_threads()})
        write_text_atomic(json.dumps(sessions, indent=1), path)


def _cpu_model() -> str:
    """The CPU's model name where Linux tells it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def create_run(preset_name: str, run_dir: Path, overrides: list[str]) -> Experiment:
    """``prepare_run``, then its config written: a run directory ready to train."""
    experiment = prepare_run(preset_name, run_dir, overrides)
    experiment.save_config()
    return experiment


def load_experiment(run_dir: Path, overrides: list[str] = ()) -> Experiment:
    """The experiment of an existing run directory, with its saved config (and ``overrides`` of
    the settings that do not change what was learned, e.g. eval_tasks). It evaluates, plots
    and adapts, which seldom repay a compile: the run's ``compile`` was for its training, so
    these run eager unless ``overrides`` say ``compile=true``."""
    values = load_config_dict(run_dir / "config.yaml")
    try:  # an edited or damaged file: named, as a bad value in it is
        cls = experiment_class(str(values.get("experiment", "")))
    except ConfigError as error:
        raise ConfigError(f"{run_dir / 'config.yaml'}: {error}") from None
    eager = _saved_config(cls, {**values, "compile": "false"}, run_dir / "config.yaml")
    return cls(_resumed(eager, list(overrides), run_dir, training=False), run_dir)


def _saved_config(cls: type[Experiment], values: dict[str, Any], path: Path) -> Config:
    """A run's saved config; a bad value in it is an error naming the file, not the command."""
    try:
        return cls.config_cls.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _resumed(saved: Config, overrides: list[str], run_dir: Path, training: bool = True
             ) -> Config:
    """``saved`` with ``overrides`` of the settings a resumed run may change: how long it
    trains only where it trains (``training``)."""
    resumable = resumable_keys(saved, training)
    try:
        cfg = saved.with_overrides(overrides)
    except ConfigError:  # a value the others refuse (features beside the run's x_names):
        typed = saved.typed(parse_overrides(overrides))  # said as a kept one, where it is
        _refuse_changes(saved, {k for k, v in typed.items() if getattr(saved, k) != v},
                        resumable, run_dir, training)
        raise
    _refuse_changes(saved, {k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v},
                    resumable, run_dir, training)
    before, now = getattr(saved, "data_root", ""), getattr(cfg, "data_root", "")
    if training and not (before == now or before and now
                         and os.path.realpath(before) == os.path.realpath(now)):
        trained_on = before or "the folder its data set's environment variable or default named"
        warn(f"{run_dir} trained on the data in {trained_on}; it goes on with "
             f"{now or 'the default'}: the same data moved, or it learns on from other data",
             FastMAMLWarning)
    return cfg


def _refuse_changes(saved: Config, differing: set[str], resumable: set[str], run_dir: Path,
                    training: bool) -> None:
    """A ``ConfigError`` where overrides would change settings (of ``differing``) a run keeps,
    or where an evaluation is given settings of training."""
    changed = differing - resumable
    offered = sorted(resumable - set(saved.unused_settings))  # (those unused: their defaults)
    if changed and not training:
        raise ConfigError(f"an evaluation of {run_dir} (eval, plot, adapt) takes only "
                          f"{', '.join(offered)}, not {', '.join(sorted(changed))}: "
                          "the settings of what it learned and how it trains are its "
                          "training's (fastmaml train resumes it)")
    if changed:
        cosine = saved.meta_lr_schedule == "cosine"
        raise ConfigError(f"{run_dir} keeps the {', '.join(sorted(changed))} it started with "
                          "(for training, evaluation and adapt alike); only "
                          f"{', '.join(offered)} may change"
                          + (" (the cosine meta_lr schedule spans the iterations)" if cosine else "")
                          + "; other settings need a new run: train with another --out")
