"""The training driver: identical resumption, atomic checkpoints, a kill-proof metrics log, seeds,
NaN detection."""
from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import fastmaml
from fastmaml import multi_step_loss_weights
from fastmaml.cli import main
from fastmaml.config import ConfigError
from fastmaml.errors import FastMAMLWarning, NonFiniteLossError
from fastmaml.experiments import create_run, load_experiment, prepare_run
from fastmaml.train import (GradientLearner, TrainingStopped, backpropagated, checkpoint_path,
                            check_resumable, checkpointed_mark, fit, load_checkpoint, meta_lr_at, save_atomic,
                            scalar_tag)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def maml_learner(run_dir, **overrides):
    items = [f"{k}={v}" for k, v in {"iterations": 12, "meta_batch": 4, "log_every": 2,
                                     "checkpoint_every": 3, **overrides}.items()]
    return create_run("sinusoid-demo", run_dir, items).learners()[0]


def signalled_learner(run_dir, iteration, *signums, **overrides):
    """A learner that sends itself ``signums`` in the middle of (0-based) ``iteration``."""
    learner = maml_learner(run_dir, **overrides)
    original_step = learner.step

    def step(i):
        if i == iteration:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original_step(i)

    learner.step = step
    return learner


def params(learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in learner.module.parameters()])


def rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(handle)]


def test_resume_continues_identically(tmp_path):
    straight = maml_learner(tmp_path / "straight")
    fit(straight, tmp_path / "straight", 3, 2, progress=False)

    first = maml_learner(tmp_path / "resumed")
    fit(first, tmp_path / "resumed", 3, 2, progress=False, stop_after=7)  # killed after iter 7
    assert load_checkpoint(checkpoint_path(tmp_path / "resumed", "maml"))["iteration"] == 7
    second = maml_learner(tmp_path / "resumed")  # a new process: fresh objects
    fit(second, tmp_path / "resumed", 3, 2, progress=False)

    assert torch.equal(params(straight), params(second))
    assert rows(tmp_path / "straight" / "metrics-maml.csv") == rows(tmp_path / "resumed" / "metrics-maml.csv")


def test_a_resumed_run_draws_from_torchs_generator_as_an_uninterrupted_one(tmp_path):
    """Dropout masks, or anything else a user's model or loss draws from torch's global
    generator, continue where the checkpoint left them."""
    def drawing(run_dir):  # each iteration also draws from torch's generator, as dropout does
        learner = maml_learner(run_dir)
        original_step = learner.step

        def step(i):
            metrics = original_step(i)
            with torch.no_grad():
                for p in learner.module.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            return metrics

        learner.step = step
        return learner

    straight = drawing(tmp_path / "straight")
    fit(straight, tmp_path / "straight", 3, 2, progress=False)
    fit(drawing(tmp_path / "resumed"), tmp_path / "resumed", 3, 2, progress=False, stop_after=7)
    torch.manual_seed(123)  # the new process's generator, wherever it stands
    second = drawing(tmp_path / "resumed")
    fit(second, tmp_path / "resumed", 3, 2, progress=False)
    assert torch.equal(params(straight), params(second))


class Counting:
    """A learner whose metrics are its iteration: a loss (a tensor), a running best and, at
    iteration 2, a validation figure."""

    name, iterations = "counting", 10

    def step(self, iteration):
        return {"loss": torch.tensor(float(iteration)), "best_return": float(iteration),
                **({"val_accuracy": iteration / 10} if iteration == 2 else {})}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_row_holds_each_metrics_mean_since_the_row_before(tmp_path):
    """Not one meta-batch's value: the mean over the row's interval; validation figures and
    running bests as they are at the row's iteration."""
    fit(Counting(), tmp_path, checkpoint_every=10, log_every=4, progress=False)
    logged = [{k: float(v) if v else None for k, v in row.items()}
              for row in rows(tmp_path / "metrics-counting.csv")]
    assert logged == [  # rows at 3 (validated), 4, 8 and 10 (the end); iterations count from 0
        {"iteration": 3, "loss": 1.0, "best_return": 2.0, "val_accuracy": 0.2},
        {"iteration": 4, "loss": 3.0, "best_return": 3.0, "val_accuracy": None},
        {"iteration": 8, "loss": 5.5, "best_return": 7.0, "val_accuracy": None},
        {"iteration": 10, "loss": 8.5, "best_return": 9.0, "val_accuracy": None}]


def test_a_metrics_row_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    straight = maml_learner(tmp_path / "straight")
    fit(straight, tmp_path / "straight", 3, 2, progress=False)

    first = maml_learner(tmp_path / "torn")
    fit(first, tmp_path / "torn", 3, 2, progress=False, stop_after=7)
    with open(tmp_path / "torn" / "metrics-maml.csv", "a") as handle:
        handle.write("1")  # killed while appending the row of iteration 10 ("10,...")
    fit(maml_learner(tmp_path / "torn"), tmp_path / "torn", 3, 2, progress=False)

    assert rows(tmp_path / "straight" / "metrics-maml.csv") == rows(tmp_path / "torn" / "metrics-maml.csv")


@pytest.mark.parametrize("damage", ["empty", "deleted"])
def test_a_lost_metrics_log_is_named_on_resume(tmp_path, damage):
    fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False, stop_after=7)
    log = tmp_path / "metrics-maml.csv"
    log.write_text("") if damage == "empty" else log.unlink()
    with pytest.warns(FastMAMLWarning, match="metrics-maml.csv holds no rows though maml logged "
                                             "up to iteration 6: .* its checkpoint at 7"):
        fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False)
    assert [r["iteration"] for r in rows(log)] == ["8", "10", "12"]


def test_a_log_without_rows_yet_resumes_without_a_warning(tmp_path):
    fit(maml_learner(tmp_path), tmp_path, 3, 100, progress=False, stop_after=6)  # no row due
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastMAMLWarning)
        fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False)  # log_every lowered
    assert [r["iteration"] for r in rows(tmp_path / "metrics-maml.csv")] == ["8", "10", "12"]


def test_the_multi_step_loss_anneals_then_leaves_the_last_steps_loss_alone_as_maml_plus_plus(
        tmp_path):
    """MAML++ weighs every inner step's query loss over its multi-step-loss epochs, then trains
    on the last step's alone: the weights anneal over msl_anneal_iterations, then are None."""
    learner = maml_learner(tmp_path, inner_steps=3, multi_step_loss="true",
                           msl_anneal_iterations=4, iterations=6, path="looped")  # no search
    seen, original = [], learner.module.meta_backward

    def spy(batch, step_weights=None):
        seen.append(step_weights)
        return original(batch, step_weights)
    learner.module.meta_backward = spy
    fit(learner, tmp_path, 3, 2, progress=False)
    assert [w is None for w in seen] == [False] * 4 + [True] * 2
    for iteration, weights in enumerate(seen[:4]):
        assert torch.equal(weights, multi_step_loss_weights(3, iteration / 4))


def test_the_meta_lr_schedule_and_derivative_order_follow_the_iteration_and_resume(tmp_path):
    schedules = {"meta_lr_schedule": "cosine", "meta_lr_min": 1e-4, "first_order_until": 5}
    learner = maml_learner(tmp_path / "straight", **schedules)
    seen = []
    original = learner.optimizer.step

    def spy(*args, **kwargs):  # the rate and the order each meta-update used
        seen.append((learner.optimizer.param_groups[0]["lr"], learner.module.first_order))
        return original(*args, **kwargs)
    learner.optimizer.step = spy
    fit(learner, tmp_path / "straight", 3, 2, progress=False)
    cfg = prepare_run("sinusoid-demo", tmp_path / "cfg",
                      ["iterations=12", *(f"{k}={v}" for k, v in schedules.items())]).cfg
    rates = [lr for lr, _ in seen]
    assert [order for _, order in seen] == [True] * 5 + [False] * 7
    assert rates == [meta_lr_at(cfg, i) for i in range(12)]
    assert rates[0] == cfg.meta_lr and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert all(rates[i] + rates[11 - i] == pytest.approx(cfg.meta_lr + 1e-4) for i in range(12))
    assert meta_lr_at(cfg.replace(meta_lr_schedule="constant"), 7) == cfg.meta_lr

    first = maml_learner(tmp_path / "resumed", **schedules)  # killed before the switch
    fit(first, tmp_path / "resumed", 3, 2, progress=False, stop_after=3)
    second = maml_learner(tmp_path / "resumed", **schedules)
    fit(second, tmp_path / "resumed", 3, 2, progress=False)
    assert torch.equal(params(learner), params(second))


def test_clip_grad_bounds_every_meta_gradient_element_of_a_preset_run(tmp_path):
    """A preset's ``clip_grad`` reaches the optimizer step: the gradient Adam stepped with lies
    in [-clip, clip], at the bound where the meta-gradient was larger."""
    gradients = {}
    for clip in (0, 1e-4):
        learner = maml_learner(tmp_path / str(clip), clip_grad=clip)
        learner.step(0)
        beta1 = learner.optimizer.param_groups[0]["betas"][0]  # first step: m = (1 - beta1) g
        gradients[clip] = torch.cat([learner.optimizer.state[p]["exp_avg"].flatten() / (1 - beta1)
                                     for p in learner.module.parameters()])
    assert gradients[0].abs().max() > 1e-3  # the unclipped meta-gradient exceeds the clip
    assert torch.allclose(gradients[1e-4], gradients[0].clamp(-1e-4, 1e-4), rtol=1e-6,
                          atol=1e-12)


@pytest.mark.parametrize("bad", [["meta_lr_schedule=linear"],
                                 ["meta_lr_schedule=cosine", "meta_lr_min=0.5"],
                                 ["first_order_until=-1"]])
def test_bad_schedules_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match=bad[-1].split("=")[0]):
        create_run("sinusoid-demo", tmp_path, bad)


def test_a_run_removes_what_writers_killed_mid_write_left(tmp_path):
    run = tmp_path / "run"
    common = ["--out", str(run), "baseline_iterations=2", "--no-progress"]
    assert main(["train", "sinusoid-demo", "iterations=2", *common]) == 0
    left = [run / f".{name}.4242.0badf00d.tmp" for name in ("config.yaml", "machine.json",
                                                              "metrics-maml.csv")]
    left.append(run / "checkpoints" / ".maml.pt.4242.0badf00d.tmp")
    for path in left:
        path.write_text("half")
    assert main(["train", "sinusoid-demo", "iterations=3", *common]) == 0  # resumed
    assert not any(path.exists() for path in left)


def test_an_ignored_ctrl_c_stays_ignored(tmp_path):
    """A shell starts a background job (`fastmaml train ... &`) with SIGINT ignored: a Ctrl-C
    meant for the foreground must not stop it."""
    learner = signalled_learner(tmp_path, 4, signal.SIGINT)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fit(learner, tmp_path, 3, 2, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 12


def test_a_request_during_the_last_checkpoint_write_still_stops(tmp_path):
    """Nothing is left to train, but a driver of several learners or runs must stop."""
    learner = maml_learner(tmp_path)
    original_state = learner.state_dict

    def state_dict():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being taken
        return original_state()

    learner.state_dict = state_dict
    with pytest.raises(TrainingStopped, match="at iteration 3 of 12"):
        fit(learner, tmp_path, 3, 2, progress=False, stop_after=3)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 3


def test_a_ctrl_c_whose_message_cannot_be_written_still_stops_with_a_checkpoint(tmp_path):
    """`fastmaml train ... 2>&1 | tee log`: the terminal's Ctrl-C also ends tee, so the notice
    meets a broken pipe; the stop must still be recorded and checkpointed."""
    learner = signalled_learner(tmp_path, 4, signal.SIGINT)
    reader, writer = os.pipe()
    os.close(reader)  # tee, gone
    saved = os.dup(sys.stderr.fileno())
    os.dup2(writer, sys.stderr.fileno())
    try:
        with pytest.raises(TrainingStopped):
            fit(learner, tmp_path, 3, 2, progress=False)
    finally:
        os.dup2(saved, sys.stderr.fileno())
        os.close(saved)
        os.close(writer)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 5


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    # two Ctrl-C in iteration 5: no waiting for its end
    learner = signalled_learner(tmp_path, 4, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(learner, tmp_path, 3, 2, progress=False)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 3


def dying_learner(run_dir, iteration):
    """A learner whose process dies (an exception out of ``fit``) in (0-based) ``iteration``."""
    learner = maml_learner(run_dir)
    original_step = learner.step

    def step(i):
        if i == iteration:
            raise KeyboardInterrupt
        return original_step(i)

    learner.step = step
    return learner


def test_a_kill_between_checkpoints_loses_only_the_work_since_the_last_one(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(dying_learner(tmp_path, 8), tmp_path, 3, 2, progress=False)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 6
    resumed = maml_learner(tmp_path)
    fit(resumed, tmp_path, 3, 2, progress=False)
    logged = [int(r["iteration"]) for r in rows(tmp_path / "metrics-maml.csv")]
    assert logged == [2, 4, 6, 8, 10, 12]  # no duplicated rows from the lost iterations


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_resumes_identically(tmp_path,
                                                                                   signum):
    """A scheduler's preemption (SIGTERM) or a Ctrl-C between checkpoints loses nothing: the
    iteration it lands in finishes and is checkpointed, and the handler in force before is
    restored."""
    straight = maml_learner(tmp_path / "straight")
    fit(straight, tmp_path / "straight", 3, 2, progress=False)
    # mid-iteration 5, between the checkpoints of 3 and 6
    learner = signalled_learner(tmp_path / "stopped", 4, signum)
    before = signal.getsignal(signum)
    request = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}[signum]
    with pytest.raises(TrainingStopped, match=rf"stopped on request \({request}\) at iteration 5 "
                                              "of 12") as stopped:
        fit(learner, tmp_path / "stopped", 3, 2, progress=False)
    assert stopped.value.signum == signum  # the command exits 128 + it: 143, or 130 for Ctrl-C
    assert signal.getsignal(signum) == before
    assert load_checkpoint(checkpoint_path(tmp_path / "stopped", "maml"))["iteration"] == 5
    resumed = maml_learner(tmp_path / "stopped")
    fit(resumed, tmp_path / "stopped", 3, 2, progress=False)
    assert torch.equal(params(straight), params(resumed))
    assert rows(tmp_path / "straight" / "metrics-maml.csv") == rows(
        tmp_path / "stopped" / "metrics-maml.csv")


def test_sigterm_in_the_last_iteration_still_stops_the_caller(tmp_path):
    """Else a driver would go on to train its next learner, the request forgotten."""
    learner = signalled_learner(tmp_path, 3, signal.SIGTERM, iterations=4)
    with pytest.raises(TrainingStopped, match="at iteration 4 of 4"):
        fit(learner, tmp_path, 3, 2, progress=False)
    assert load_checkpoint(checkpoint_path(tmp_path, "maml"))["iteration"] == 4


def test_a_checkpoint_temporary_left_by_a_kill_is_removed_on_resume(tmp_path):
    """kill -9 inside torch.save skips the cleanup: the next fit of that learner removes it, and
    leaves the files of another learner (which may be training meanwhile) alone."""
    folder = checkpoint_path(tmp_path, "maml").parent
    folder.mkdir(parents=True)
    (folder / ".maml.pt.4242.beef.tmp").write_bytes(b"half a checkpoint")
    (folder / ".pretrained.pt.4243.f00d.tmp").write_bytes(b"being written")
    fit(maml_learner(tmp_path, iterations=2), tmp_path, 3, 2, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".pretrained.pt.4243.f00d.tmp", "maml.pt"]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "x.pt"
    save_atomic({"iteration": 1, "learner": {}}, path)

    def crash(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"iteration": 2, "learner": {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"iteration": 1, "learner": {}}


def limited_to(size: int) -> None:
    """In a child process: files may hold ``size`` bytes, as on a full disk or past a quota (a
    write beyond it fails with EFBIG instead of killing the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_checkpoint_that_does_not_fit_on_disk_is_an_error_naming_it(tmp_path):
    train = subprocess.run(
        [sys.executable, "-m", "fastmaml", "train", "sinusoid-demo", "--out", "run",
         "iterations=3", "checkpoint_every=3", "--no-progress"], cwd=tmp_path, text=True,
        capture_output=True, preexec_fn=lambda: limited_to(8192), env=ENV)  # the log fits
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "File too large: 'run/checkpoints/maml.pt'" in train.stderr
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # and no half-written temporary
    # a tensor too large for the file fails inside torch's writer, in words that name no file
    save = subprocess.run([sys.executable, "-c", "import pathlib, torch, fastmaml.train as t; "
                           "t.save_atomic({'w': torch.zeros(30_000)}, pathlib.Path('x.pt'))"],
                          cwd=tmp_path, text=True, capture_output=True,
                          preexec_fn=lambda: limited_to(100_000), env=ENV)
    assert "OSError: could not write x.pt ([enforce fail" in save.stderr
    assert "MiB free: once there is room (a full disk, a quota)" in save.stderr
    # the writer's other errors are not the disk's: said as they were raised
    with pytest.raises(RuntimeError, match="^no pickling of it$"):
        save_atomic({"w": Unpicklable()}, tmp_path / "y.pt")


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("no pickling of it")


def test_same_seed_same_run_and_other_seed_other_run(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        learner = maml_learner(tmp_path / name, seed=seed, iterations=4)
        fit(learner, tmp_path / name, 3, 2, progress=False)
        runs[name] = params(learner)
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    model = torch.nn.Linear(1, 1)

    def loss_of(_):
        return model(torch.tensor([[float("nan")]])).sum(), {}

    learner = GradientLearner("toy", model, torch.optim.SGD(model.parameters(), 0.1),
                              backpropagated(loss_of), 5,
                              torch.Generator())
    with pytest.raises(NonFiniteLossError, match="toy: loss is nan at iteration 1"):
        fit(learner, tmp_path, 5, 1, progress=False)
    learner.module = model = torch.nn.Linear(1, 1)
    learner.optimizer = torch.optim.SGD(model.parameters(), 0.1)
    learner.backward_of = backpropagated(
        lambda i: (model(torch.tensor([[float("nan") if i == 2 else 1.0]])).sum(), {}))
    with pytest.raises(NonFiniteLossError, match=r"toy: loss is nan in iterations 1 to 4 \(their "
                                                 r"mean\)"):  # logged at 4, the NaN in 3
        fit(learner, tmp_path / "between", 5, 4, progress=False)


def test_a_run_that_diverges_after_a_checkpoint_says_where_a_change_can_go(tmp_path, capsys):
    """A diverged run keeps its checkpoint, and its resume may not change what it learns: the
    error says so, instead of advising a change that the resume would refuse."""
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=10", "meta_lr=1e6",
                 "checkpoint_every=1", "log_every=1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lower inner_lr or the meta learning rate" in err
    assert f"{run} keeps its last finite checkpoint" in err and "(another --out)" in err
    assert load_checkpoint(checkpoint_path(run, "maml"))["iteration"] >= 1


def test_a_nan_loss_is_never_checkpointed_even_between_log_points(tmp_path):
    model = torch.nn.Linear(1, 1)

    def loss_of(iteration):
        value = float("nan") if iteration >= 1 else 1.0
        return model(torch.tensor([[value]])).sum(), {}

    learner = GradientLearner("toy", model, torch.optim.SGD(model.parameters(), 0.1),
                              backpropagated(loss_of), 9, torch.Generator())
    with pytest.raises(NonFiniteLossError, match="toy: non-finite parameters .* at iteration 2; "
                       "no checkpoint was written yet: trained again"):
        fit(learner, tmp_path, checkpoint_every=2, log_every=5, progress=False)
    assert not checkpoint_path(tmp_path, "toy").exists()


def test_resuming_with_changed_settings_is_refused(tmp_path):
    fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False, stop_after=3)
    with pytest.raises(ConfigError, match="keeps the inner_lr it started with"):
        maml_learner(tmp_path, inner_lr=0.5)
    with pytest.raises(ConfigError, match=r"keeps the inner_lr it started with \(for training, "
                       r"evaluation and adapt alike\); only .*log_every.*; other settings need "
                       "a new run: train with another --out") as refused:
        maml_learner(tmp_path, inner_lr=0.5, eval_tasks=5)
    listed = str(refused.value).split("only ")[1].split(" may change")[0].split(", ")
    assert {"eval_tasks", "log_every"} <= set(listed) <= set(
        load_experiment(tmp_path).cfg.to_dict())
    with pytest.raises(ConfigError, match=r"an evaluation of .* \(eval, plot, adapt\) takes only "
                       r".*eval_tasks.*, not inner_lr: the settings of what it learned and how it "
                       "trains are its training's") as refused:
        load_experiment(tmp_path, ["inner_lr=0.5", "eval_tasks=5"])
    taken = str(refused.value).split("takes only ")[1].split(", not ")[0].split(", ")
    assert "eval_tasks" in taken and "log_every" not in taken
    assert maml_learner(tmp_path, iterations=50).iterations == 50  # extending a run is fine
    for setting in ("iterations=100000", "baseline_iterations=7", "log_every=7",
                    "tensorboard=true"):  # but not by evaluating it, nor its logs (unused)
        with pytest.raises(ConfigError, match=f", not {setting.split('=')[0]}: the settings"):
            load_experiment(tmp_path, [setting])
    cosine = tmp_path / "cosine"
    fit(maml_learner(cosine, meta_lr_schedule="cosine"), cosine, 3, 2, progress=False, stop_after=3)
    with pytest.raises(ConfigError, match="keeps the iterations it started with.*cosine meta_lr schedule"):
        maml_learner(cosine, meta_lr_schedule="cosine", iterations=50)


def test_a_run_directory_without_checkpoints_starts_afresh_with_new_settings(tmp_path):
    # e.g. a run that stopped on a bad value after writing config.yaml, before its first checkpoint
    maml_learner(tmp_path, inner_lr=0.5)
    assert not checkpoint_path(tmp_path, "maml").exists()
    learner = maml_learner(tmp_path, inner_lr=0.02)
    assert learner.module.inner_lrs.init == 0.02
    assert "inner_lr: 0.02" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="holds a 'sinusoid-demo' run, not 'sinusoid'"):
        create_run("sinusoid", tmp_path, [])  # another preset's folder is never taken over
    with pytest.raises(ConfigError, match="holds a 'sinusoid-demo' run, not 'omniglot-5w1s'"):
        create_run("omniglot-5w1s", tmp_path, [])  # nor another experiment's
    (tmp_path / "eval.json").write_text("[]")  # an evaluated run is resumed, not replaced
    with pytest.raises(ConfigError, match="keeps the inner_lr it started with"):
        maml_learner(tmp_path, inner_lr=0.5)


def test_lowering_iterations_below_the_checkpoint_is_refused(tmp_path):
    fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False, stop_after=6)
    with pytest.raises(ConfigError, match="checkpoint .* is at iteration 6, past the 4 iterations "
                                          "it is set to train; training cannot go back"):
        fit(maml_learner(tmp_path, iterations=4), tmp_path, 3, 2, progress=False)


def test_validation_rows_are_logged_even_between_log_points(tmp_path):
    model = torch.nn.Linear(1, 1)

    def loss_of(_):
        return model(torch.ones(1, 1)).sum(), {}

    learner = GradientLearner("toy", model, torch.optim.SGD(model.parameters(), 0.1),
                              backpropagated(loss_of), 6, torch.Generator(),
                              validate=lambda: {"val_accuracy": 0.5}, validate_every=2)
    fit(learner, tmp_path, checkpoint_every=6, log_every=5, progress=False)
    logged = {int(r["iteration"]): r.get("val_accuracy") for r in rows(tmp_path / "metrics-toy.csv")}
    assert logged == {2: "0.5", 4: "0.5", 5: "", 6: "0.5"}


def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(tmp_path, capsys):
    from fastmaml.cli import main
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=4",
                 "baseline_iterations=2", "--no-progress"]) == 0
    path = checkpoint_path(run, "maml")
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk
    capsys.readouterr()
    for command in (["train", "sinusoid-demo", "--out", str(run), "--no-progress"],
                    ["eval", str(run), "--no-progress"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot read the checkpoint {path}" in err
        assert f"delete it and {run / 'metrics-maml.csv'} to train that learner again" in err
    path.unlink()
    path.mkdir()  # a folder where the checkpoint was: damaged to every command alike
    for command in (["train", "sinusoid-demo", "--out", str(run), "--no-progress"],
                    ["eval", str(run), "--no-progress"], ["adapt", str(run), "--support", "s.csv"]):
        assert main(command) == 2
        assert f"cannot read the checkpoint {path}: it is damaged" in capsys.readouterr().err


def test_a_run_that_lost_its_config_or_a_checkpoint_is_refused_not_trained_afresh(tmp_path,
                                                                                  capsys):
    """Checkpoints without config.yaml were resumed under the command's new settings; a log of
    a learner whose checkpoint is gone was overwritten by training afresh. Both are refused,
    leaving every file as it was; a learner killed before its first checkpoint starts afresh."""
    from fastmaml.cli import main
    run = tmp_path / "run"
    command = ["train", "sinusoid-demo", "--out", str(run), "iterations=6", "checkpoint_every=3",
               "log_every=1", "baseline_iterations=3", "--no-progress"]
    assert main(command) == 0
    def run_files() -> dict:  # (not the locks' owner notes)
        return {p: p.read_bytes() for p in run.rglob("[!.]*") if p.is_file()}
    files = run_files()
    config = (run / "config.yaml").read_bytes()
    (run / "config.yaml").unlink()
    capsys.readouterr()
    assert main([*command, "meta_lr=0.01"]) == 2
    assert capsys.readouterr().err == (
        f"fastmaml: error: {run} holds a trained or evaluated run (checkpoints, eval.json) but "
        "no config.yaml: the settings it was trained with are unknown. Put its config.yaml "
        "back, or train in another --out\n")
    (run / "config.yaml").write_bytes(config)
    checkpoint = checkpoint_path(run, "maml")
    checkpoint.unlink()
    log = run / "metrics-maml.csv"
    assert main(command) == 2
    assert capsys.readouterr().err == (
        f"fastmaml: error: maml: {log} logged it up to iteration 6, but its checkpoint "
        f"{checkpoint} is gone: training would start afresh and overwrite that log. Put the "
        f"checkpoint back to resume, or delete {log} too to train maml again from the start\n")
    assert run_files() == {p: data for p, data in files.items() if p != checkpoint}
    assert main([*command[:5], "checkpoint_every=100", *command[6:]]) == 2  # (any setting)
    capsys.readouterr()
    checkpointed_mark(run, "maml").unlink()  # as where a kill came before the first checkpoint
    mark = checkpointed_mark(run, "pretrained")  # as in a run trained before the marks were:
    mark.unlink()  # a command that finds its checkpoint marks it
    assert main(command) == 0
    assert mark.exists()
    assert load_checkpoint(checkpoint)["iteration"] == 6
    assert [r["iteration"] for r in rows(log)] == [str(i) for i in range(1, 7)]


def test_a_setting_edited_in_config_yaml_after_training_is_refused(tmp_path, capsys):
    """The checkpoints record the run's fixed settings: an edit of config.yaml that would
    change what the run learns (it was adopted silently) is refused; a resumable one is not."""
    from fastmaml.cli import main
    run = tmp_path / "run"
    command = ["train", "sinusoid-demo", "--out", str(run), "checkpoint_every=2",
               "baseline_iterations=2", "--no-progress"]
    assert main([*command, "iterations=2"]) == 0
    config = run / "config.yaml"
    saved = config.read_text()
    assert "meta_lr: 0.001\n" in saved and "log_every: 100\n" in saved
    config.write_text(saved.replace("meta_lr: 0.001\n", "meta_lr: 0.01\n"))
    capsys.readouterr()
    assert main([*command, "iterations=4"]) == 2
    assert capsys.readouterr().err == (
        f"fastmaml: error: {config} sets meta_lr=0.01, but {checkpoint_path(run, 'maml')} was "
        "trained with meta_lr=0.001: a run's learning settings are fixed once it has trained. "
        "Put the file's values back, or train in another --out\n")
    edited = saved.replace("inner_lr: 0.01\n", "inner_lr: 0.5\n")  # an adaptation setting:
    assert edited != saved  # evaluated or adapted, it would pass for the run's own
    config.write_text(edited)
    assert main(["eval", str(run), "--no-progress"]) == 2
    assert "sets inner_lr=0.5, but " in capsys.readouterr().err
    assert not (run / "eval.json").exists()
    with pytest.raises(ConfigError, match="sets inner_lr=0.5, but .* was trained with "
                                          "inner_lr=0.01"):
        fastmaml.load_run(run)
    config.write_text(saved.replace("log_every: 100\n", "log_every: 1\n"))
    assert main([*command, "iterations=4"]) == 0
    assert load_checkpoint(checkpoint_path(run, "maml"))["iteration"] == 4
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("experiment: sinusoid\n", "experiment: bogus\n"))
    assert main([*command, "iterations=4"]) == 2
    assert capsys.readouterr().err == (
        f"fastmaml: error: {config}: experiment is 'bogus', but the sinusoid-demo preset runs "
        "the 'sinusoid' experiment: put the file's value back\n")
    cosine = tmp_path / "cosine"  # its rates span the iterations: fixed too
    assert main(["train", "sinusoid-demo", "--out", str(cosine), "iterations=2",
                 "baseline_iterations=2", "meta_lr_schedule=cosine", "--no-progress"]) == 0
    config = cosine / "config.yaml"
    config.write_text(config.read_text().replace("iterations: 2\n", "iterations: 4\n", 1))
    capsys.readouterr()
    assert main(["train", "sinusoid-demo", "--out", str(cosine), "--no-progress"]) == 2
    assert "sets iterations=4, but " in capsys.readouterr().err


def test_the_timed_path_choice_is_checkpointed_and_restored(tmp_path):
    learner = maml_learner(tmp_path)  # path=auto: the first meta-iteration times the paths
    fit(learner, tmp_path, 3, 2, progress=False, stop_after=3)
    state = load_checkpoint(checkpoint_path(tmp_path, "maml"))["learner"]
    assert state["path_choices"] and state["path_choices"] == learner.module.path_choices
    # and the shapes searched, which decide whether a new shape is searched or takes a near one's
    (setting, shapes), = state["searched_shapes"].items()
    assert shapes and shapes == learner.module.searched_shapes[setting]
    resumed = maml_learner(tmp_path)
    resumed.module.path_choices.clear()
    resumed.load_state_dict(state)
    assert resumed.module.path_choices == learner.module.path_choices
    assert resumed.module.searched_shapes == learner.module.searched_shapes


def test_damaged_run_files_are_named_in_one_line(tmp_path, capsys):
    """A metrics row, eval.json or config value edited or damaged outside fastmaml is an error
    naming the file; a damaged machine.json (a record for the report) never stops training."""
    run = tmp_path / "run"
    common = ["iterations=4", "baseline_iterations=4", "log_every=2", "eval_tasks=10",
              "eval_k_shots=5", "--no-progress"]
    assert main(["train", "sinusoid-demo", "--out", str(run), *common]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0
    capsys.readouterr()

    def refused(*command: str) -> str:
        assert main(list(command)) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastmaml: error: ") and err.count("\n") == 1
        return err

    log = run / "metrics-maml.csv"
    good = log.read_text()
    log.write_text(good + "\ngarbage,,,\n")  # after a blank line: line 5
    report = ["report", str(run), "--out", str(tmp_path / "r.md")]
    for command in (["train", "sinusoid-demo", "--out", str(run), *common], ["plot", str(run)],
                    report):
        assert f"{log} line 5 is not a row of numbers ('garbage,,,')" in refused(*command)
    for damage, message in ((bytes(range(128, 256)), "is not a text file"),
                            (b"iteration,foo\n" + good.encode().split(b"\n", 1)[1],
                             "line 1, its header, names 2 columns, but line 2 holds 5 values"),
                            (b"step,loss\n1,2\n", "line 1 is not the header of a metrics log")):
        log.write_bytes(damage)
        assert f"{log} {message}" in refused("plot", str(run))
    log.write_text(good)

    evaluation = (run / "eval.json").read_text()
    for damage, message in (('[{"experiment": "sin', "is damaged ("),
                            ('[{"method": "maml"}]', "does not hold fastmaml's evaluation records"),
                            ('[{"method": "maml", "mean": [1], "ci95": [1]}]',
                             "does not hold this experiment's evaluation records (KeyError")):
        (run / "eval.json").write_text(damage)
        for command in (["plot", str(run)], report):
            assert f"{run / 'eval.json'} {message}" in refused(*command)
    (run / "eval.json").write_text(evaluation)
    (run / "machine.json").write_text("[1, 2]")  # edited: the machine is not known
    assert main(report) == 0 and "machine: not recorded" in (tmp_path / "r.md").read_text()

    (run / "machine.json").write_text('[{"date": ')
    assert main(["train", "sinusoid-demo", "--out", str(run), *common[1:], "iterations=6"]) == 0
    assert "machine.json is damaged" in capsys.readouterr().err
    assert (run / "machine.json.damaged").read_text() == '[{"date": '
    assert len(json.loads((run / "machine.json").read_text())) == 1

    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("meta_batch: ", "meta_batch: two #"))
    for command in (["eval", str(run)], report):
        assert refused(*command).startswith(f"fastmaml: error: {run / 'config.yaml'}: "
                                            "config key 'meta_batch' expects int")


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) events in ``directory``, as TensorBoard reads them (with
    purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("first_session", ["tensorboard", "csv only"])
def test_tensorboard_scalars_mirror_the_metrics_log_through_a_kill_and_resume(tmp_path,
                                                                              first_session):
    pytest.importorskip("tensorboard")
    with pytest.raises(KeyboardInterrupt):  # rows 2..8 logged, checkpoint at 6
        fit(dying_learner(tmp_path, 8), tmp_path, 3, 2, progress=False,
            tensorboard=first_session == "tensorboard")
    fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False, tensorboard=True)
    logged = rows(tmp_path / "metrics-maml.csv")
    scalars = tensorboard_scalars(tmp_path / "tensorboard" / "maml")
    columns = [key for key in logged[0] if key not in ("iteration", "elapsed_s")]
    assert scalars.keys() == {scalar_tag(key) for key in columns} >= {"train/loss"}
    for key in columns:  # step 8 of the lost work once, as logged again
        assert scalars[scalar_tag(key)] == [
            (int(row["iteration"]), pytest.approx(float(row[key]), rel=1e-6)) for row in logged]
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]
    files = sorted((tmp_path / "tensorboard" / "maml").iterdir())
    assert len(files) == 1  # the event files of before were replaced, not added to


def test_tensorboard_turned_on_for_a_finished_learner_writes_its_whole_log(tmp_path):
    """A learner at its last iteration trains nothing, but its scalars are written afresh."""
    pytest.importorskip("tensorboard")
    directory = tmp_path / "tensorboard" / "maml"
    fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False)  # 12 iterations, no scalars
    for _ in range(2):  # written, then replaced: one set of event files
        fit(maml_learner(tmp_path), tmp_path, 3, 2, progress=False, tensorboard=True)
        assert [step for step, _ in tensorboard_scalars(directory)["train/loss"]] == [
            int(row["iteration"]) for row in rows(tmp_path / "metrics-maml.csv")
        ] == [2, 4, 6, 8, 10, 12]
        assert len(list(directory.iterdir())) == 1


def test_tensorboard_sections_group_a_logs_columns():
    """Supervised and RL columns alike: validation and bests apart from the training figures,
    timings apart from both."""
    assert [scalar_tag(column) for column in (
        "loss", "query_metric", "post_return", "kl", "val_accuracy", "best_return",
        "best_training_return", "sample_s", "line_search_s")] == [
        "train/loss", "train/query_metric", "train/post_return", "train/kl",
        "validation/val_accuracy", "best/best_return", "best/best_training_return",
        "seconds/sample_s", "seconds/line_search_s"]


def test_tensorboard_from_the_command_line_logs_every_learner(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=4", "log_every=2",
                 "baseline_iterations=2", "tensorboard=true", "--no-progress"]) == 0
    assert f"metrics in {run}/metrics-*.csv and {run}/tensorboard." in capsys.readouterr().out
    for learner, steps in (("maml", [2, 4]), ("pretrained", [2]), ("oracle", [2])):
        assert [step for step, _ in tensorboard_scalars(run / "tensorboard" / learner)["train/loss"]
                ] == steps


def test_tensorboard_without_its_package_is_refused_before_the_run_is_written(tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "run"), "iterations=2",
                 "tensorboard=true", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "fastmaml: error: tensorboard=true needs the tensorboard package: pip install "
        "tensorboard (or train with tensorboard=false)\n")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_resume_whose_checkpoint_does_not_fit_the_model_leaves_the_run_as_it_was(tmp_path,
                                                                                 capsys):
    """A model built for inputs of another shape now (an environment or data changed since)
    failed on the checkpoint only once config.yaml and machine.json had been written."""
    run = tmp_path / "run"
    command = ["train", "sinusoid-demo", "--out", str(run), "baseline_iterations=1",
               "checkpoint_every=2", "--no-progress"]
    assert main([*command, "iterations=2"]) == 0
    path = checkpoint_path(run, "maml")
    state = torch.load(path, weights_only=False)
    state["learner"]["module"]["model.0.weight"] = torch.zeros(40, 3)  # built for 3 inputs
    torch.save(state, path)
    files = {name: (run / name).read_bytes() for name in ("config.yaml", "machine.json")}
    capsys.readouterr()
    assert main([*command, "iterations=4"]) == 2
    said = capsys.readouterr().err
    assert f"the checkpoint {path} does not fit this run's model and settings" in said
    assert "do the data or the environment now give inputs of another shape" in said
    assert {name: (run / name).read_bytes() for name in files} == files
    # checking a checkpoint that fits loads it, and leaves torch's generator to fit: another
    # learner of the run, yet without a checkpoint, starts from the seeded state as before
    learner = maml_learner(tmp_path / "fits")
    fit(learner, tmp_path / "fits", 3, 2, progress=False, stop_after=3)
    resumed = maml_learner(tmp_path / "fits")  # (building it seeds torch)
    torch.manual_seed(5)
    check_resumable(resumed, tmp_path / "fits", {})
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), drawn)
