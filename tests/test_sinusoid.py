"""Sinusoid tasks and the end-to-end CLI: train, eval, plot."""
from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

import fastmaml
from fastmaml import cli
from fastmaml.cli import main
from fastmaml.core import MAML
from fastmaml.errors import FastMAMLWarning
from fastmaml.experiments import load_experiment
from fastmaml.plots import stale_figures
from fastmaml.tasks.sinusoid import sample_sinusoid_tasks


def test_tasks_follow_the_paper_distribution():
    tasks = sample_sinusoid_tasks(2000, 5, 7, torch.Generator().manual_seed(0))
    b = tasks.batch
    assert b.support_x.shape == (2000, 5, 1) and b.query_x.shape == (2000, 7, 1)
    assert 0.1 <= tasks.amplitude.min() and tasks.amplitude.max() <= 5.0
    assert 0.0 <= tasks.phase.min() and tasks.phase.max() <= math.pi
    x = torch.cat([b.support_x, b.query_x], 1)
    assert -5 <= x.min() and x.max() <= 5 and x.min() < -4.9 and x.max() > 4.9
    y = torch.cat([b.support_y, b.query_y], 1)
    expected = tasks.amplitude[:, None, None] * torch.sin(x - tasks.phase[:, None, None])
    assert torch.allclose(y, expected)


def test_cli_trains_evaluates_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--out", str(run), "iterations=60", "log_every=20", "checkpoint_every=30",
            "eval_tasks=40", "tune_tasks=20", "eval_query=20", "--no-progress"]
    assert main(["train", "sinusoid-demo", *args]) == 0
    out = capsys.readouterr().out  # the path the search chose for this shape is named
    assert re.search(r"maml: 60 iterations done \((batched, chunk \d+|looped) path\)", out), out
    assert main(["plot", str(run)]) == 0  # before the evaluation: the learning curves only
    assert f"fastmaml eval {run}" in capsys.readouterr().err
    assert [path.name for path in (run / "figures").glob("*.png")] == ["learning_curves.png"]
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["plot", str(untrained)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["eval", str(run), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| method | 0 steps | 1 step | 5 steps | 10 steps |" in table
    assert "| paper: MAML |  | 0.67 | 0.38 | 0.35 |" in table
    assert (run / "results.md").read_text() in table  # the table printed is the one written
    records = json.loads((run / "eval.json").read_text())
    assert {(r["method"], r["k_shot"]) for r in records} == {
        (m, k) for m in ("maml", "pretrained", "oracle") for k in (5, 10, 20)}
    for r in records:
        assert set(r) >= {"experiment", "method", "k_shot", "tasks", "steps", "mean", "ci95"}
        assert r["steps"] == list(range(11)) and len(r["mean"]) == len(r["ci95"]) == 11
        assert r["tasks"] == 40
        assert all(c > 0 for c in r["ci95"]) and all(m > 0 for m in r["mean"])
    assert main(["plot", str(run)]) == 0
    for name in ("mse_vs_steps", "learning_curves", "adaptation_k5", "adaptation_k10"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 10_000


def test_the_adaptation_figures_follow_the_models_they_draw(tmp_path, capsys):
    """Figure 2 draws the trained models: more training makes it stale (it was counted
    current); a diverged baseline is drawn as far as it is finite (plot failed, leaving the
    figures half replaced); a K the evaluation no longer holds loses its figure (it stayed
    stale for good); a run kept without its checkpoints draws the rest."""
    run = tmp_path / "run"
    settings = ["eval_tasks=20", "tune_tasks=5", "--no-progress"]
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=30", *settings]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert main(["plot", str(run)]) == 0
    figures = run / "figures"
    assert stale_figures(figures) == {}
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=40", *settings]) == 0
    assert stale_figures(figures) == {
        name: "checkpoints/maml.pt, checkpoints/oracle.pt, checkpoints/pretrained.pt changed "
              "since it was drawn" for name in ("adaptation_k5.png", "adaptation_k10.png")} | {
        "learning_curves.png": "metrics-maml.csv, metrics-oracle.csv, metrics-pretrained.csv "
                               "changed since it was drawn"}  # (mse_vs_steps: eval.json's)
    assert main(["eval", str(run), "baseline_lrs=1000", "--no-progress"]) == 0
    assert None in next(r["mean"] for r in json.loads((run / "eval.json").read_text())
                        if r["method"] == "pretrained")  # diverged
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert stale_figures(figures) == {}
    assert main(["eval", str(run), "eval_k_shots=20", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert "removed " + str(figures / "adaptation_k5.png") in capsys.readouterr().out
    assert sorted(p.name for p in figures.glob("*.png")) == ["learning_curves.png",
                                                             "mse_vs_steps.png"]
    assert stale_figures(figures) == {}
    assert main(["eval", str(run), "--no-progress"]) == 0  # K=5 and 10 again
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        checkpoint.unlink()
    with pytest.warns(FastMAMLWarning, match=r"the adaptation figures \(the paper's Figure 2\) "
                                             r"draw the trained models, and no maml, "):
        assert sorted(load_experiment(run).plot()) == [
            figures / name for name in ("learning_curves.png", "mse_vs_steps.png")]


def test_an_evaluation_names_the_variant_and_shows_the_steps_it_took(tmp_path, capsys):
    """A first-order Meta-SGD run was recorded as plain "maml"; its table had fixed columns
    (0, 1, 5, 10: step 2 was in no column); at 0 steps the pretrained baseline was given the
    first candidate step size of an all-NaN tuning; Figure 2 adapted 10 steps regardless."""
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=5", "first_order=true",
                 "lr_mode=per_param", "--no-progress"]) == 0
    evaluate = ["eval", str(run), "eval_tasks=10", "tune_tasks=5", "eval_k_shots=5",
                "--no-progress"]
    assert main([*evaluate, "eval_inner_steps=2"]) == 0
    table = capsys.readouterr().out
    assert "| method | 0 steps | 1 step | 2 steps | 5 steps | 10 steps |" in table
    assert "| first-order maml (lr learned (per_param)) |" in table
    records = json.loads((run / "eval.json").read_text())
    assert [(r["method"], r.get("lr_mode")) for r in records] == [
        ("first-order maml", "per_param"), ("pretrained", None), ("oracle", None)]
    drawn = []
    original = MAML.adapt
    def counting_adapt(self, support_x, support_y, steps=None, loss_fn=None):
        drawn.append(steps)
        return original(self, support_x, support_y, steps, loss_fn)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MAML, "adapt", counting_adapt)
        assert main(["plot", str(run)]) == 0
    assert drawn == [0, 1, 2] * 2  # Figure 2, MAML and pretrained: to the evaluation's steps
    assert main([*evaluate, "eval_inner_steps=0"]) == 0
    pretrained = next(r for r in json.loads((run / "eval.json").read_text())
                      if r["method"] == "pretrained")
    assert "inner_lr" not in pretrained and len(pretrained["mean"]) == 1
    assert "| pretrained |" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0


def test_ctrl_c_before_the_training_loop_says_what_running_again_does(tmp_path, capsys,
                                                                     monkeypatch):
    """Ctrl-C while the data loads (a download, a decode) promised a resume from a checkpoint
    that was never written."""
    run = tmp_path / "run"
    command = ["train", "sinusoid-demo", "--out", str(run), "iterations=2", "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(cli, "train_run", lambda *args, **kwargs: signal.default_int_handler(
            signal.SIGINT, None))
        assert main(command) == 128 + signal.SIGINT
    assert capsys.readouterr().err == ("fastmaml: interrupted; nothing was trained yet: the "
                                       "same command starts again\n")
    assert main([*command, "--learner", "maml"]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(cli, "train_run", lambda *args, **kwargs: signal.default_int_handler(
            signal.SIGINT, None))
        assert main([*command, "--learner", "oracle"]) == 128 + signal.SIGINT
        assert "nothing was trained yet" in capsys.readouterr().err  # (maml's is not its)
        assert main(command) == 128 + signal.SIGINT
    assert capsys.readouterr().err == ("fastmaml: interrupted; the same command resumes from "
                                       "the last checkpoint\n")


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["train", "nope"]) == 2
    assert "fastmaml: error: unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path), "inner_lr=fast"]) == 2
    assert "'inner_lr' expects float, got 'fast'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert f"the run directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "points.csv").write_text("1,2\n")
    assert main(["adapt", str(tmp_path / "points.csv"), "--support", "s", "--query", "q"]) == 2
    assert f"{tmp_path / 'points.csv'} is a file, not a run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2  # (the refused train wrote nothing)
    assert f"no config file at {tmp_path / 'config.yaml'}" in capsys.readouterr().err


def test_out_of_device_memory_is_one_line_with_what_to_lower(tmp_path, capsys, monkeypatch):
    def exhausted(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr("fastmaml.cli.train_run", exhausted)
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Tried to allocate 2.00 GiB" in err and "meta_batch" in err


@pytest.mark.parametrize("size, shown", [(4 * 10**12, "3,725.3 GiB"), (50 * 2**20, "50.0 MiB")])
def test_the_cpus_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, size, shown):
    def refused(*_, **__):  # the CPU allocator's refusal is a plain RuntimeError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           f"can't allocate memory: you tried to allocate {size} bytes. Error "
                           "code 12 (Cannot allocate memory)")

    monkeypatch.setattr("fastmaml.experiments.sinusoid.sample_sinusoid_tasks", refused)
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.endswith(
        f"fastmaml: error: out of memory (tried to allocate {shown}): lower meta_batch, "
        "chunk_size or eval_chunk, or set checkpoint_steps=true; a training run keeps its last "
        "checkpoint\n")


def test_a_run_whose_compile_fails_trains_uncompiled_and_says_so_once(tmp_path, capsys,
                                                                       monkeypatch):
    from torch._inductor.exc import InductorError

    def no_cxx_compiler(*_, **__):
        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"),
                            None)
    monkeypatch.setattr(torch, "compile", lambda function, **_: no_cxx_compiler)
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path), "compile=true",
                 "iterations=4", "meta_batch=4", "log_every=2", "tune_tasks=4",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "\nfastmaml: compile=true: the first iteration compiles the batched path" in out
    said = [line for line in err.splitlines() if "torch.compile" in line]
    assert said == ["fastmaml: warning: torch.compile failed (RuntimeError: InvalidCxxCompiler: "
                    "No working C++ compiler found); running uncompiled"]
    assert (tmp_path / "checkpoints" / "maml.pt").exists()


def test_an_evaluation_that_diverges_is_said_and_stays_json(tmp_path, capsys):
    """An inner learning rate too large for 10 steps: the MSE overflows at evaluation. The run
    says so, eval.json holds null there (JSON has no NaN), and the report reads it back."""
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=5", "inner_lr=2",
                 "baseline_iterations=2", "eval_tasks=10", "eval_k_shots=5",
                 "--no-progress"]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert re.search(r"warning: maml's evaluation is not finite from \d+ steps? on \(null in "
                     r"eval.json\): its adaptation diverges", capsys.readouterr().err)

    def refuse(constant):
        raise AssertionError(f"{constant} in eval.json")

    records = json.loads((run / "eval.json").read_text(), parse_constant=refuse)
    assert None in records[0]["mean"] and records[0]["mean"][0] is not None
    assert main(["report", str(run), "--out", str(tmp_path / "REPORT.md")]) == 0
    assert "not finite (the adaptation diverges)" in (tmp_path / "REPORT.md").read_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    expected = f"fastmaml {fastmaml.__version__}, torch {torch.__version__}\n"
    assert capsys.readouterr().out == expected


def test_eval_and_adapt_help_show_their_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert capsys.readouterr().out.startswith(
        "usage: fastmaml eval [-h] [--no-progress] [--data-root DIR] run_dir [key=value ...]\n")
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.startswith("usage: fastmaml adapt [-h] [--support SUPPORT]")
    assert usage.endswith(" run_dir [key=value ...]") and "--norm {each,query}" in usage


def test_a_refused_train_command_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    run = ["train", "sinusoid-demo", "--out", str(tmp_path), "--no-progress"]
    assert main([*run, "iterations=6", "meta_batch=4", "checkpoint_every=3", "log_every=3",
                 "tune_tasks=4"]) == 0
    config = (tmp_path / "config.yaml").read_text()
    for refused, message in (("iterations=4", "at iteration 6, past the 4 iterations"),
                             ("device=tpu", "device must be auto, cpu, cuda or cuda:N")):
        capsys.readouterr()
        assert main([*run, refused]) == 2
        assert message in capsys.readouterr().err
        assert (tmp_path / "config.yaml").read_text() == config
    assert main([*run, "iterations=8"]) == 0  # the same run, extended
    (tmp_path / "kept").mkdir()
    new = tmp_path / "kept" / "p" / "a" / "b"  # a new run, and the folders above it, refused
    assert main(["train", "sinusoid-demo", "--out", str(new), "meta_batch=abc"]) == 2
    assert list((tmp_path / "kept").iterdir()) == []


def test_presets_are_listed(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "sinusoid-demo" in out and "70,000 iterations" in out
    assert out.endswith("\n\n`fastmaml presets NAME` shows a preset's settings, which `fastmaml "
                        "train NAME key=value ...` changes\n")


def test_a_sinusoid_run_warns_of_x_beyond_its_tasks_range(tmp_path: Path, capsys) -> None:
    """The sinusoid's tasks draw x from [-5, 5] and amplitudes up to 5: x = 50 is beyond."""
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "  pretrained: 1 iteration done; last: loss " in out
    assert "compile" not in out  # compile=auto: not for a run this short
    trained = fastmaml.load_run(run)
    x = torch.linspace(-5, 5, 10)[:, None]
    adapted = trained.adapt(x, 5 * torch.sin(x))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"the query values run beyond the "
                      r"run's training tasks: x from 50 to 50 \(training: -5 to 5\)"):
        trained.predict(adapted, torch.full((1, 1), 50.0))


def test_anil_on_the_mlp_adapts_its_output_layer_and_odd_settings_are_said(tmp_path, capsys):
    """``adapt=head`` on fastmaml's MLP (numbered layers, no module named head) adapts its last
    layer, and ``per_step=head`` gives it a set per step; settings that train otherwise than
    meant are warned of when training starts;
    per_step=norm on a model without norm layers is refused by name."""
    run = tmp_path / "anil"
    assert main(["train", "sinusoid-demo", "--out", str(run), "--learner", "maml", "adapt=head",
                 "first_order=true", "first_order_until=5", "iterations=2", "meta_batch=2",
                 "--no-progress"]) == 0
    assert ("warning: first_order_until=5 has no effect: first_order=true trains first order "
            "throughout") in capsys.readouterr().err
    assert fastmaml.load_run(run).maml.adapted_names == ["4.weight", "4.bias"]
    per_step = tmp_path / "per-step-head"  # per_step=head: the last layer too
    assert main(["train", "sinusoid-demo", "--out", str(per_step), "--learner", "maml",
                 "adapt=0,2", "per_step=head", "inner_steps=2", "iterations=1", "meta_batch=2",
                 "--no-progress"]) == 0
    assert sorted(dict(fastmaml.load_run(per_step).maml.per_step.named_parameters())) == \
        ["copies.4__bias", "copies.4__weight"]
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "norm"), "per_step=norm",
                 "inner_steps=2", "--no-progress"]) == 2
    assert ("per_step=norm gives the norm layers a set per inner step, and this model has none"
            in capsys.readouterr().err)


def test_a_presets_settings_are_shown_with_their_notes_and_what_the_preset_changed(capsys):
    assert main(["presets", "omniglot-20w5s", "rl-nav2d"]) == 0
    out = capsys.readouterr().out
    fewshot, rl = out.split("\n\nrl-nav2d ")
    assert fewshot.startswith("omniglot-20w5s [fewshot experiment]: paper: Omniglot 20-way 5-shot")
    assert re.search(r"\n  n_way: 20 +# \[omniglot-20w5s; default 5\] classes per task \(N\)\n",
                     fewshot)
    assert re.search(r"\n  seed: 0 +# the run's random seed", fewshot)  # unchanged: no marker
    # another dataset's settings are named apart, not listed as this preset's
    assert "\n  image_size:" not in fewshot and "\n  split_fractions:" not in fewshot
    assert fewshot.endswith("\nunused here, only with dataset=folder: image_size, channels, "
                            "invert, class_depth, split_fractions")
    assert "\n  experiment:" not in fewshot and "\n  preset:" not in fewshot
    assert re.search(r"\n  action_scale: 0.1 +# \[rl-nav2d; default 1.0\] 2D navigation only", rl)
    for unused in ("meta_lr", "compile", "per_step"):  # TRPO's outer loop; a policy's layers
        assert f"\n  {unused}:" not in rl
    assert main(["presets", "fewshot-folder", "miniimagenet-5w1s"]) == 0
    folder, miniimagenet = capsys.readouterr().out.split("\n\nminiimagenet-5w1s ")
    assert re.search(r"\n  split_fractions: 0.7,0.15,0.15 +# ", folder)  # as key=value takes it
    assert "\n  split:" not in folder
    assert folder.endswith("only with dataset=omniglot: download, split")
    assert ("only with dataset=omniglot or dataset=folder: split_seed, within_alphabet\n"
            in miniimagenet)
    assert main(["presets", "omniglot-20w5z"]) == 2
    assert "unknown preset 'omniglot-20w5z' (did you mean omniglot-20w5s" in capsys.readouterr().err
