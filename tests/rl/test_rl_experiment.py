"""The meta-RL experiment: presets, learning on 2D navigation, CLI round trip, exact resumption."""
from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastmaml import report
from fastmaml.cli import main
from fastmaml.errors import ConfigError, FastMAMLWarning
from fastmaml.experiments import PRESETS, base, create_run, load_experiment, preset
from fastmaml.experiments.base import mean_ci95
from fastmaml.experiments import rl as rl_experiment
from fastmaml.experiments.rl import EVAL_SEED, RLConfig, RLExperiment, episode_seed
from fastmaml.train import checkpoint_path, fit, load_checkpoint

# Small but real: a 32-32 policy, 10 tasks x 10 episodes of 30 steps per meta-iteration.
TINY_NAV = ["hidden=32,32", "meta_batch=10", "trajectories=10", "horizon=30", "log_every=1",
            "checkpoint_every=100"]


def test_presets_hold_the_paper_settings() -> None:
    names = ["rl-nav2d", "rl-cheetah-vel", "rl-cheetah-dir", "rl-ant-vel", "rl-ant-dir"]
    expected = {"rl-nav2d": (20, 20, 100), "rl-cheetah-vel": (40, 10, 200),
                "rl-cheetah-dir": (40, 20, 200), "rl-ant-vel": (40, 20, 200),
                "rl-ant-dir": (40, 40, 200)}
    # evaluation: the official test scripts' batch_size (environment steps per task and step)
    official_steps = {"rl-ant-dir": 8000}
    for name in names:
        cfg = RLConfig.from_dict(preset(name).values)
        horizon = cfg.horizon or (100 if name == "rl-nav2d" else 200)
        assert (cfg.meta_batch, cfg.trajectories, horizon) == expected[name]
        assert cfg.iterations == 500 and cfg.inner_steps == 1 and cfg.threads == 1
        assert (cfg.max_kl, cfg.cg_iters, cfg.cg_damping) == (0.01, 10, 1e-5)
        assert (cfg.backtrack_ratio, cfg.max_backtracks) == (0.8, 15)
        assert (cfg.eval_tasks, cfg.eval_inner_steps) == (40, 3)
        assert cfg.eval_trajectories * horizon == official_steps.get(name, 4000)
        assert cfg.inner_lr == (0.5 if name == "rl-nav2d" else 0.1)
        cpu = RLConfig.from_dict(PRESETS[f"{name}-cpu"].values)
        assert cfg.pretrained and cfg.oracle and cpu.pretrained and cpu.oracle  # the baselines
        assert cpu.iterations <= cfg.iterations and cpu.meta_batch <= 20
        assert cpu.meta_batch * cpu.trajectories * (cpu.horizon or 100) <= 20 * 20 * 100
    assert RLConfig.from_dict(preset("rl-nav2d").values).action_scale == 0.1
    with pytest.raises(ConfigError, match="action_scale"):
        RLConfig(env="fastmaml/AntVel-v0", action_scale=0.1)
    for scale in ("0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="action_scale must be > 0 and finite"):
            RLConfig().with_overrides([f"action_scale={scale}"])
    with pytest.raises(ConfigError, match="unknown meta-RL environment 'Foo-v0'; fastmaml's are "
                                          "fastmaml/Nav2D-v0, "):
        RLConfig(env="Foo-v0", action_scale=0.1)  # named for itself, not for the action scale
    with pytest.raises(ConfigError, match="hvp"):
        RLConfig(hvp="magic")
    with pytest.raises(ConfigError, match="init=official: the policy is always initialised as "
                                          "maml_rl's"):
        RLConfig().with_overrides(["init=official"])
    with pytest.raises(ConfigError, match="per_step=norm: per-step parameter sets are for the "
                                          "supervised experiments"):
        RLConfig().with_overrides(["per_step=norm"])
    with pytest.raises(ConfigError, match="lr_mode=per_layer_step with inner_steps=2: meta-RL's "
                                          "evaluation adapts one policy-gradient step at a time"):
        RLConfig().with_overrides(["lr_mode=per_layer_step", "inner_steps=2"])
    for accepted in (["lr_mode=per_layer_step"], ["lr_mode=per_param", "inner_steps=2"]):
        assert RLConfig().with_overrides(accepted).lr_mode == accepted[0].split("=")[1]
    with pytest.raises(ConfigError, match="eval_batch"):
        RLConfig(eval_batch="magic")
    with pytest.raises(ConfigError, match="batch"):
        RLConfig(batch="magic")
    for bad in ("max_kl=-0.01", "max_kl=nan", "gamma=1.5", "gamma=0", "gae_lambda=-0.1",
                "backtrack_ratio=1.5", "init_std=0", "hidden=100,0", "cg_damping=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            RLConfig().with_overrides([bad])
    assert RLConfig().with_overrides(["gamma=1", "gae_lambda=0"]).gamma == 1.0
    for inert in ("meta_lr_schedule=cosine", "first_order_until=100", "meta_lr=5",
                  "clip_grad=0.001", "multi_step_loss=true", "path=looped", "chunk_size=2",
                  "checkpoint_steps=true", "compile=true"):  # each was taken and had no effect
        with pytest.raises(ConfigError, match=rf"^{inert.split('=')[0]}: settings of the "
                                              "gradient-based outer loop, .* is TRPO"):
            RLConfig().with_overrides([inert])
    assert RLConfig().with_overrides(["compile=false"]).compile == "false"  # (saved runs hold it)
    # compile=auto compiled a policy engine of 10,000 meta-iterations or more; meta-RL never does
    assert not RLConfig().with_overrides(["iterations=10000"]).compiles()


@pytest.mark.parametrize("name, step_sizes, later", [
    ("rl-nav2d", (0.5, 0.5, 0.5), 0.5), ("rl-cheetah-vel", (0.1, 0.02, 0.1), 0.5),
    ("rl-cheetah-dir", (0.1, 0.2, 0.5), 0.5), ("rl-ant-vel", (0.1, 0.2, 1.0), 0.5),
    ("rl-ant-dir", (0.1, 0.2, 1.0), 0.01)])
def test_evaluation_takes_the_official_step_sizes(tmp_path: Path, name: str,
                                                  step_sizes: tuple[float, ...], later: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each official test script fine-tuned MAML, the pretrained and the random policy with
    its own first step size, and the later steps with a share of it; eval_inner_lr overrides
    the first step size of every method."""
    import fastmaml.rl

    experiment = create_run(name, tmp_path / "run", ["eval_tasks=2", "eval_trajectories=1",
                                                     "horizon=3", "eval_inner_steps=2",
                                                     "hidden=4,4"])
    assert experiment.eval_step_sizes() == {  # the oracle is not adapted
        **dict(zip(("maml", "pretrained", "random"), step_sizes)), "oracle": 0.0}
    scales = []
    adapt = fastmaml.rl.adapt_policy
    monkeypatch.setattr(fastmaml.rl, "adapt_policy",
                        lambda *args, **kwargs: scales.append(kwargs["lr_scale"]) or
                        adapt(*args, **kwargs))
    experiment.adaptation_returns(experiment.build_maml(2), experiment.eval_tasks())
    assert scales == [1.0, later]
    override = create_run(name, tmp_path / "override", ["eval_inner_lr=0.3"])
    assert override.eval_step_sizes() == {"maml": 0.3, "pretrained": 0.3, "random": 0.3,
                                          "oracle": 0.0}


def test_evaluation_uses_the_official_test_goals(tmp_path: Path) -> None:
    """The official test scripts drew their 40 goals after np.random.seed(1); MT19937's first
    two draws for seed 1 are 0.417022 and 0.720324, and those goals average 0.40 from the start."""
    experiment = create_run("rl-nav2d", tmp_path / "run", [])
    goals = torch.tensor(np.array([task["goal"] for task in experiment.eval_tasks()]))
    assert goals.shape == (40, 2)
    assert goals[0].tolist() == pytest.approx([0.417022 - 0.5, 0.720324 - 0.5], abs=1e-6)
    assert goals.norm(dim=1).mean().item() == pytest.approx(0.4008, abs=1e-4)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_short_training_improves_the_post_update_return(tmp_path: Path) -> None:
    """Thirty meta-iterations on 2D navigation: the adapted policy reaches goals far better than
    the same untrained policy adapted the same way, on the same fixed tasks and episode seeds."""
    torch.set_num_threads(2)  # the preset's threads=1 sets it back
    experiment = create_run("rl-nav2d", tmp_path, [*TINY_NAV, "iterations=30", "pretrained=false",
                                                   "oracle=false",
                                                   "eval_tasks=20", "eval_trajectories=10",
                                                   "eval_inner_steps=1"])
    assert isinstance(experiment, RLExperiment) and torch.get_num_threads() == 1
    untrained = experiment.adaptation_returns(experiment.build_maml(0),
                                              experiment.eval_tasks()).mean(0)
    (learner,) = experiment.learners()
    fit(learner, tmp_path, checkpoint_every=100, log_every=1, progress=False)
    trained = experiment.adaptation_returns(learner.module, experiment.eval_tasks()).mean(0)
    # measured: untrained -16.9 before and -14.2 after a step; trained -12.8 and -5.8
    assert trained[1] > untrained[1] + 4.0, (untrained, trained)
    assert trained[1] > trained[0] + 2.0, trained  # adaptation itself helps
    rows = _csv(tmp_path / "metrics-maml.csv")
    assert len(rows) == 30 and {"pre_return", "post_return", "kl", "accepted"} <= set(rows[0])
    assert all(float(r["kl"]) <= 0.01 + 1e-6 for r in rows if r["accepted"] == "1.0")
    best = max(range(30), key=lambda i: float(rows[i]["post_return"]))
    assert learner.best_iteration == best
    assert learner.best_return == pytest.approx(float(rows[best]["post_return"]))


def test_training_batch_of_steps_runs_one_environment_per_task(tmp_path: Path) -> None:
    experiment = create_run("rl-nav2d", tmp_path, [*TINY_NAV, "batch=steps", "pretrained=false",
                                                   "oracle=false"])
    (learner,) = experiment.learners()
    episodes = learner.sample(learner.tasks(0), seed=3)
    budget = 10 * 30  # trajectories x horizon
    for lengths in episodes.masks.sum(-1):
        kept = lengths[lengths > 0]
        # consecutive episodes of one environment, until they hold the budget
        assert kept.sum() >= budget and kept[:-1].sum() < budget
    metrics = learner.step(0)
    assert metrics["accepted"] == 1.0  # the TRPO step runs on these padded batches


def test_cli_train_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    tiny = ["iterations=2", "meta_batch=2", "trajectories=2", "horizon=10", "hidden=8,8",
            "eval_tasks=3", "eval_trajectories=2", "checkpoint_every=1"]
    assert main(["train", "rl-nav2d-cpu", "--out", str(out), "--no-progress", *tiny]) == 0
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"maml.pt", "pretrained.pt",
                                                                 "oracle.pt"}
    assert main(["eval", str(out), "--no-progress"]) == 0
    records = json.loads((out / "eval.json").read_text())
    assert [r["method"] for r in records] == ["maml", "pretrained", "random", "oracle"]
    for r in records:
        assert r["experiment"] == "fastmaml/Nav2D-v0" and r["k_shot"] == 2 and r["tasks"] == 3
        assert r["steps"] == [0, 1, 2, 3] and len(r["mean"]) == len(r["ci95"]) == 4
        assert all(isinstance(v, float) for v in r["mean"] + r["ci95"])
    table = (out / "results.md").read_text()
    assert "paper: maml" in table and "-40.4" in table and "paper: oracle" in table
    # eval_batch=steps (the default) samples 2 x 10 environment steps, not 2 episodes
    assert "## 2 x 10 environment steps (whole episodes) per task and gradient step" in table
    assert main(["plot", str(out)]) == 0
    assert (out / "figures" / "return_vs_steps.png").stat().st_size > 0
    assert (out / "figures" / "learning_curves.png").is_file()
    assert "fastmaml: wrote" in capsys.readouterr().out
    # horizon 10: the paper's returns (horizon 100) on an axis of their own, over the steps run
    figures = []
    monkeypatch.setattr(rl_experiment, "save_figure",
                        lambda fig, path: figures.append(fig) or path)
    two_steps = [{**r, **{key: r[key][:3] for key in ("steps", "mean", "ci95")}} for r in records]
    load_experiment(out).plot_evaluation(two_steps)
    ours, theirs = figures[0].axes
    assert theirs.get_ylabel() == "the paper's return\n(horizon 100: another scale)"
    assert {max(line.get_xdata()) for line in theirs.get_lines()} == {2}


def test_a_finished_run_adds_the_oracle_which_is_told_the_task_and_not_adapted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    tiny = ["iterations=2", "meta_batch=2", "trajectories=2", "horizon=10", "hidden=8,8",
            "eval_tasks=3", "eval_trajectories=2", "checkpoint_every=1"]
    assert main(["train", "rl-nav2d-cpu", "--out", str(out), "--no-progress", *tiny,
                 "oracle=false", "pretrained=false"]) == 0
    assert main(["eval", str(out), "--no-progress"]) == 0
    maml = checkpoint_path(out, "maml").read_bytes()
    assert not checkpoint_path(out, "oracle").exists()
    assert main(["eval", str(out), "--no-progress", "oracle=true"]) == 2  # trained, not evaluated
    assert ", not oracle: the settings of what it learned" in capsys.readouterr().err
    assert main(["train", "rl-nav2d-cpu", "--out", str(out), "--no-progress",
                 "pretrained=true"]) == 0  # (it was refused: the report needs it, for shape)
    assert main(["train", "rl-nav2d-cpu", "--out", str(out), "--no-progress", "oracle=true"]) == 0
    assert checkpoint_path(out, "maml").read_bytes() == maml  # trained alone
    assert load_checkpoint(checkpoint_path(out, "pretrained"))["iteration"] == 2
    oracle = load_checkpoint(checkpoint_path(out, "oracle"))
    assert oracle["iteration"] == 2
    assert oracle["learner"]["module"]["model.mean.0.weight"].shape == (8, 4)  # position, goal
    assert report.read_run(out).stale_evaluation == (  # the evaluation before it: said
        f"oracle trained to 2 iterations and pretrained trained to 2 iterations since the "
        f"evaluation: run `fastmaml eval {out.as_posix()}`")
    assert main(["eval", str(out), "--no-progress"]) == 0
    assert not report.read_run(out).stale_evaluation
    record = json.loads((out / "eval.json").read_text())[-1]
    assert record["method"] == "oracle" and record["inner_lr"] == 0.0 and len(record["mean"]) == 4
    assert "- oracle: told the task" in (out / "results.md").read_text()


def test_load_run_adapts_at_the_evaluations_step_size(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run evaluated at its own ``eval_inner_lr`` is adapted at it too, not at inner_lr;
    its adaptation checks for divergence on any device."""
    import fastmaml

    experiment = create_run("rl-nav2d-cpu", tmp_path, [
        "iterations=1", "meta_batch=2", "trajectories=2", "horizon=5", "hidden=8",
        "eval_inner_steps=1", "pretrained=false", "oracle=false", "inner_lr=0.5",
        "eval_inner_lr=0.05"])
    (learner,) = experiment.learners()
    fit(learner, tmp_path, checkpoint_every=1, log_every=1, progress=False)
    run = fastmaml.load_run(tmp_path)
    assert {float(lr) for lr in run.maml.inner_lrs(0).values()} == {0.05}
    engine = experiment.eval_engine(experiment.restore(experiment.learners()[0]))
    assert {float(lr) for lr in engine.inner_lrs(0).values()} == {0.05}
    other = fastmaml.load_run(tmp_path, settings=["eval_inner_lr=0.2"])  # for this adaptation
    assert {float(lr) for lr in other.maml.inner_lrs(0).values()} == {0.2}
    assert run.maml.check_finite and other.maml.check_finite

    def as_on_an_accelerator(*args: Any, **kwargs: Any) -> fastmaml.MAML:
        maml = base.build_maml(*args, **kwargs)
        maml.check_finite = False  # (training's engine there has no per-call check)
        return maml

    monkeypatch.setattr("fastmaml.experiments.rl.build_maml", as_on_an_accelerator)
    assert fastmaml.load_run(tmp_path).maml.check_finite


def test_a_policy_with_learned_inner_rates_is_evaluated_and_labelled_with_them(
        tmp_path: Path) -> None:
    """The evaluation adapts MAML with its learned rates (no eval_inner_lr), and its row and
    legend said the initial inner_lr, "maml (lr 0.1)", as if it were the step taken."""
    from fastmaml.plots import method_label

    experiment = create_run("rl-nav2d-cpu", tmp_path, [
        "iterations=1", "meta_batch=2", "trajectories=2", "horizon=5", "hidden=8",
        "eval_tasks=2", "eval_trajectories=2", "eval_inner_steps=1", "pretrained=false",
        "oracle=false", "lr_mode=per_param"])
    (learner,) = experiment.learners()
    fit(learner, tmp_path, checkpoint_every=1, log_every=1, progress=False)
    engine = experiment.eval_engine(experiment.restore(experiment.learners()[0]))
    assert engine.inner_lrs.mode == "per_param"  # its own rates, not the fixed inner_lr
    records = load_experiment(tmp_path).evaluate(progress=False)
    maml, random = records
    assert (method_label(maml), method_label(random)) == ("maml, step learned (per_param)",
                                                          "random, step 0.5")
    assert "| maml (lr learned (per_param)) | " in (tmp_path / "results.md").read_text()


def test_load_run_adapts_the_trained_policy_to_a_new_task_as_eval_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fastmaml.load_run`` of an RL run: its best policy, adapted to a task by the evaluation
    protocol (same episodes, same returns), as a policy module with the adapted parameters."""
    import fastmaml

    tiny = ["iterations=3", "meta_batch=2", "trajectories=2", "horizon=10", "hidden=8,8",
            "eval_trajectories=3", "eval_inner_steps=2", "pretrained=false", "oracle=false"]
    experiment = create_run("rl-nav2d-cpu", tmp_path, tiny)
    (learner,) = experiment.learners()
    fit(learner, tmp_path, checkpoint_every=1, log_every=1, progress=False)
    run = fastmaml.load_run(tmp_path)
    assert isinstance(run, fastmaml.TrainedPolicy) and run.steps == 2 and run.task == "rl"
    best = load_checkpoint(checkpoint_path(tmp_path, "maml"))["learner"]["best"]
    assert all(torch.equal(p, best[f"model.{n}"]) for n, p in run.maml.model.named_parameters())
    experiment = load_experiment(tmp_path)
    task = experiment.eval_tasks()[0]
    adapted = run.adapt(task, seed=EVAL_SEED)
    engine = experiment.restore(experiment.learners()[0]).evaluation_engine("best")
    expected = experiment.adaptation_returns(engine, [task])[0]
    assert adapted.returns == pytest.approx(expected.tolist(), abs=1e-12)
    _, params = experiment.adapt_tasks(engine, [task], [0], seed=EVAL_SEED)
    assert all(torch.equal(p, params[n][0]) for n, p in adapted.policy.named_parameters())
    mean, log_std = adapted.policy(torch.zeros(1, 2))
    assert mean.shape == (1, 2) and not torch.equal(mean, run.maml.model(torch.zeros(1, 2))[0])
    assert len(run.adapt(task, steps=0).returns) == 1
    (other,) = run.sample_tasks(1, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastMAMLWarning)  # a task like the training ones
        assert set(other) == {"goal"} and len(run.adapt(other, steps=1).returns) == 2
    with pytest.warns(FastMAMLWarning, match=r"goal=30.0,-0.2 is none of the tasks .* was "
                      r"meta-trained on \(goals in \[-0.5, 0.5\]\^2\): its start suits those"):
        run.adapt({"goal": np.array([30.0, -0.2])}, steps=0)
    text = run.task_text(other)  # as --task takes it, exactly
    assert np.array_equal(run.parse_task(text.split())["goal"], other["goal"])
    with pytest.raises(ConfigError, match=r"a task of fastmaml/Nav2D-v0 is a dict such as "
                                          r"\{'goal': .*got float"):
        run.adapt(0.3)
    for other in ({"velocity": 1.0}, {**task, "velocity": 1.0}):
        with pytest.raises(ConfigError, match=r"is a dict such as \{'goal': .*got \{"):
            run.adapt(other)
    for seed in (-1, 1.5, None, True):
        with pytest.raises(ConfigError, match="the seed must be an integer >= 0"):
            run.adapt(task, seed=seed)
    assert len(run.sample_tasks(np.int64(2))) == 2
    with pytest.raises(ConfigError, match="steps must be an integer >= 0"):
        run.adapt(task, steps=-1)
    with pytest.raises(ConfigError, match="is a meta-RL run: its policy adapts by sampling"):
        fastmaml.adaptation.predict_files(run, "s.csv", "q.csv")
    # the command line: the same adaptation, its returns per step
    capsys.readouterr()
    goal = ",".join(map(str, task["goal"].tolist()))
    assert main(["adapt", str(tmp_path), "--task", f"goal={goal}", "--seed", str(EVAL_SEED),
                 "--format", "json"]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["returns"] == pytest.approx(adapted.returns, abs=1e-12)
    assert document["task"] == {"goal": task["goal"].tolist()}
    assert f"fastmaml: adapted {tmp_path} to goal=" in err and " in 2 step(s): mean return " in err
    for bad in (np.array(["a", "b"]), np.array([None, 0.0]), np.array([True, False]),
                np.array([np.nan, 0.0])):  # a task's values: finite numbers
        with pytest.raises(ConfigError, match="a fastmaml/Nav2D-v0 task's goal must be finite "
                                              "numbers, got"):
            run.adapt({"goal": bad})
    for args, message in [(["--task", "goal=0.3"], r"goal takes 2 number\(s\) \(separated by "
                                                   r"commas\), got '0.3'"),
                          (["--task", "goal=0.3,0.1,0"], r"goal takes 2 number\(s\)"),
                          (["--task", "goal=1,2", "goal=1,2"], "is goal=..., got 'goal=1,2' again"),
                          (["--task", "goal=1,2", "--task", "goal=3,4"],  # both: not the last
                           "is goal=..., got 'goal=3,4' again"),
                          (["eval_tasks=7", "--task", "goal=1,2"],
                           "eval_tasks=7: an adaptation of this rl run takes only its "
                           r"evaluation settings \(eval_inner_steps, eval_trajectories, "
                           r"eval_inner_lr, eval_batch, eval_policy\)"),
                          (["--task", "goal=a,b"], "goal takes numbers"),
                          (["--task", "goal=nan,0"], "goal must be finite"),
                          (["--support", "s.csv"], r"e.g. --task goal=-?\d\.\d{1,2},-?\d\.\d{1,2} "
                                                   r"\(--support: for few-shot and regression"),
                          (["--task", "goal=1,2", "--norm", "query"],
                           r"by sampling its environment \(--norm: for few-shot"),
                          ([], "it adapts to a task by sampling its environment, e.g. --task")]:
        assert main(["adapt", str(tmp_path), *args]) == 2
        assert re.search(message, capsys.readouterr().err), args
    assert main(["eval", str(tmp_path), "inner_lr=0.3"]) == 2  # offered: not TRPO's unused
    offered = capsys.readouterr().err.split("takes only ")[1].split(", not inner_lr: ")[0]
    assert "eval_tasks" in offered.split(", ") and "path" not in offered.split(", ")


def test_no_two_seeds_and_steps_of_an_adaptation_share_episodes() -> None:
    """``adapt(seed=0, steps=150)``'s step 100 once drew seed 1's first episodes (0 * 100 + 100)."""
    from fastmaml.rl import GaussianMLPPolicy, Sampler, env_class

    sampler = Sampler("fastmaml/Nav2D-v0", horizon=10)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=(8,))
    tasks = env_class("fastmaml/Nav2D-v0").sample_tasks(2, np.random.default_rng(0))
    seeds = [episode_seed(seed, step) for seed, step in [(0, 100), (1, 0), (0, 150), (1, 50),
                                                          (0, 99), (1, 99), (1, 100)]]
    actions = [sampler.sample(policy, tasks, 2, seed).actions for seed in seeds]
    for i, first in enumerate(actions):
        assert not any(torch.equal(first, other) for other in actions[i + 1:]), seeds[i]
    assert torch.equal(sampler.sample(policy, tasks, 2, episode_seed(0, 100)).actions, actions[0])
    assert episode_seed(EVAL_SEED, 3) == EVAL_SEED * 100 + 3  # as the recorded evaluations drew


@pytest.mark.parametrize("preset", ["rl-cheetah-vel-cpu", "rl-cheetah-dir-cpu"])
def test_locomotion_runs_end_to_end(tmp_path: Path, preset: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-cheetah through the same code path, at a toy size (MuJoCo sampling, eval table)."""
    import fastmaml.rl

    experiment = create_run(preset, tmp_path,
                            ["iterations=1", "meta_batch=2", "trajectories=2", "horizon=8",
                             "hidden=8,8", "eval_tasks=4", "eval_trajectories=2",
                             "eval_inner_steps=1", "hvp=finite_difference", "oracle=false"])
    for learner in experiment.learners():
        fit(learner, tmp_path, checkpoint_every=1, log_every=1, progress=False)
    experiment = load_experiment(tmp_path)
    step_sizes = []  # the inner learning rate of each engine the evaluation adapts with
    adapt = fastmaml.rl.adapt_policy
    monkeypatch.setattr(fastmaml.rl, "adapt_policy", lambda maml, *args, **kwargs: (
        step_sizes.append(maml.inner_lrs.init) or adapt(maml, *args, **kwargs)))
    per_task, tasks_of = [], []  # each method's (tasks, steps + 1) returns and tasks, in turn
    returns_of = experiment.adaptation_returns
    experiment.adaptation_returns = lambda engine, tasks, *args, **kwargs: (
        tasks_of.append(tasks) or per_task.append(returns_of(engine, tasks, *args, **kwargs))
        or per_task[-1])
    records = experiment.evaluate(progress=False)
    assert len(tasks_of) == 3 and tasks_of[1] == tasks_of[0] == tasks_of[2]
    assert [len(r["mean"]) for r in records] == [2, 2, 2]
    text = (tmp_path / "results.md").read_text()
    assert "v5 models" in text
    assert f"Preset `{preset}`: 1 meta-iteration, meta-batch 2, 2 episodes per task" in text
    best = records[0]["best_iteration"]  # (eval_policy=best: the title said the last one)
    assert experiment.figure_title(records).endswith(
        f"MAML after 1 iteration (its best policy: iteration {best})")
    experiment.cfg = experiment.cfg.replace(iterations=3)  # as if evaluated before its end
    assert (f"Preset `{preset}`: 1 of 3 meta-iterations, meta-batch 2"
            in experiment.table(records))  # (it said "3 meta-iterations")
    # every method ran on the same tasks: maml's record holds its task-by-task differences
    maml, pretrained, random = records
    official = {"rl-cheetah-vel-cpu": [0.1, 0.02, 0.1], "rl-cheetah-dir-cpu": [0.1, 0.2, 0.5]}
    assert [r["inner_lr"] for r in records] == official[preset]
    # each method's own (maml, pretrained, random: in turn): consecutive repeats collapsed
    assert [lr for i, lr in enumerate(step_sizes) if i == 0 or step_sizes[i - 1] != lr
            ] == official[preset]
    assert "later steps take 0.5 of it" in text
    for baseline, baseline_returns in ((pretrained, per_task[1]), (random, per_task[2])):
        difference = maml["paired_difference"][baseline["method"]]
        assert difference["mean"] == pytest.approx([m - b for m, b in zip(maml["mean"],
                                                                          baseline["mean"])])
        # the interval of the task-by-task differences (not of the two means)
        assert difference["ci95"] == pytest.approx(mean_ci95(per_task[0] - baseline_returns)[1])
        assert (f"- maml minus {baseline['method']}, task by task over the same 4 tasks "
                "(paired), after 0/1 steps:") in text
    if preset == "rl-cheetah-vel-cpu":
        assert all("right_way" not in r for r in records) and "right way" not in text
        return
    # direction tasks: the share of tasks whose return shows progress the right way, per step
    returns = experiment.adaptation_returns(experiment.build_maml(2, random["inner_lr"]),
                                            experiment.eval_tasks())
    assert random["mean"] == pytest.approx(returns.mean(0).tolist())
    assert random["right_way"] == (returns > 0.0).double().mean(0).tolist()
    assert "- maml: tasks run the right way (mean return above 0) after 0/1 steps:" in text


def _train(run_dir: Path, stop_after: int | None = None) -> None:
    changed = ("iterations=4", "hidden=16,16", "meta_batch=4", "trajectories=4")
    keys = {item.split("=")[0] for item in changed}
    experiment = create_run("rl-nav2d", run_dir, [*(item for item in TINY_NAV
                                                    if item.split("=")[0] not in keys), *changed])
    for learner in experiment.learners():
        fit(learner, run_dir, checkpoint_every=100, log_every=1, progress=False,
            stop_after=stop_after)


def test_resumption_is_identical(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _train(whole)
    _train(resumed, stop_after=2)  # "interrupted" after two iterations of each learner
    assert load_checkpoint(checkpoint_path(resumed, "maml"))["iteration"] == 2
    _train(resumed)
    for name in ("maml", "pretrained", "oracle"):
        a = load_checkpoint(checkpoint_path(whole, name))
        b = load_checkpoint(checkpoint_path(resumed, name))
        assert a["iteration"] == b["iteration"] == 4
        a, b = a["learner"], b["learner"]
        assert (a["best_return"], a["best_iteration"]) == (b["best_return"], b["best_iteration"])
        for key in ("module", "best"):
            assert a[key].keys() == b[key].keys()
            for param in a[key]:
                assert torch.equal(a[key][param], b[key][param]), (name, key, param)
        timing = {"elapsed_s", "sample_s", "adapt_s", "gradient_s", "cg_s", "line_search_s"}
        rows_a, rows_b = (_csv(d / f"metrics-{name}.csv") for d in (whole, resumed))
        assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == \
               [{k: v for k, v in r.items() if k not in timing} for r in rows_b]
