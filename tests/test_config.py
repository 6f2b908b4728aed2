"""Typed key=value overrides and preset lookup."""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

from fastmaml.cli import main
from fastmaml.config import COMPILE_FROM_ITERATIONS, Config, ConfigError, load_config_dict
from fastmaml.errors import FastMAMLWarning
from fastmaml.experiments import (EXPERIMENTS, PRESETS, create_run, experiment_class,
                                  load_experiment, preset)
from fastmaml.experiments.base import build_maml, resolve_device
from fastmaml.experiments.fewshot import FewShotConfig
from fastmaml.experiments.sinusoid import SinusoidConfig
from fastmaml.models import MLP


def test_overrides_are_typed_by_the_config_fields():
    cfg = SinusoidConfig().with_overrides(["iterations=2_000", "inner_lr=0.05", "first_order=true",
                                           "eval_k_shots=5,20", "lr_mode=per_param"])
    assert cfg.iterations == 2000 and cfg.inner_lr == 0.05 and cfg.first_order is True
    assert cfg.eval_k_shots == (5, 20) and cfg.lr_mode == "per_param"


def test_a_key_given_twice_with_two_values_is_refused_and_with_one_is_taken():
    with pytest.raises(ConfigError, match=r"override 'iterations' given twice \(iterations=10, "
                                          r"then iterations=20\): give it once"):
        SinusoidConfig().with_overrides(["iterations=10", "inner_lr=0.1", " iterations = 20"])
    assert SinusoidConfig().with_overrides(["iterations=10", "iterations=10"]).iterations == 10


def test_a_list_may_come_in_brackets_as_yaml_and_python_write_it() -> None:
    assert SinusoidConfig().with_overrides(["eval_k_shots=[5, 10]"]).eval_k_shots == (5, 10)
    assert SinusoidConfig().with_overrides(["eval_k_shots=(20,)"]).eval_k_shots == (20,)
    regression = experiment_class("regression").config_cls()
    assert regression.with_overrides(["features=2", "x_names=[force (N), mass]"]).x_names == (
        "force (N)", "mass")


@pytest.mark.parametrize("item,message", [
    ("inner_steps=two", "'inner_steps' expects int, got 'two'"),
    ("first_order=maybe", "'first_order' expects bool"),
    ("learning_rate=0.1", r"unknown config key\(s\) learning_rate for SinusoidConfig; valid"),
    ("metabatch=4", r"unknown config key\(s\) metabatch for .* \(metabatch: did you mean "
                    r"meta_batch\?\); valid keys"),
    ("size=4", r"\(size: did you mean chunk_size\?\)"),  # a part of a name (image_size too)
    ("eval_k_shots=5;10", r"'eval_k_shots' expects comma-separated int values \(e.g. "
                          r"eval_k_shots=1,2\), got '5;10'"),
    ("n_way=5", r"unknown config key\(s\) n_way for SinusoidConfig \(n_way is a setting of "
                r"the fewshot experiment\); valid keys"),
    ("iterations", "not of the form key=value"),
    ("iterations=0", "iterations must be >= 1"),
    ("inner_steps=-1", "inner_steps must be >= 0"),
    ("path=gpu", "path must be auto, batched or looped"),
    ("compile=sometimes", "compile must be auto, true or false, got 'sometimes'"),
    ("inner_lr=-1", "inner_lr must be >= 0 and meta_lr > 0"),
    ("meta_lr=0", "inner_lr must be >= 0 and meta_lr > 0"),
    ("inner_lr=nan", "inner_lr must be >= 0 and meta_lr > 0"),
    ("inner_lr=inf", "inner_lr must be >= 0 and meta_lr > 0"),
    ("meta_lr=inf", "inner_lr must be >= 0 and meta_lr > 0"),
    ("eval_k_shots=", "eval_k_shots needs at least one K"),
    ("k_shot=0", "k_shot must be >= 1"),
    ("eval_k_shots=5,0", "eval_k_shots must be >= 1"),
    ("hidden=-4", r"hidden must be >= 1, got \(-4,\)"),
    ("hidden=40,0", "hidden must be >= 1"),
    ("hidden=", r"hidden must be >= 1, got \(\) \(give one or more values\)"),
    ("baseline_iterations=-3", "baseline_iterations must be >= 0"),
    ("baseline_lrs=0.01,-1", r"baseline_lrs must be >= 0, got \(0.01, -1.0\)"),
    ("baseline_lrs=nan", "baseline_lrs must be >= 0"),
    ("baseline_lrs=inf", "baseline_lrs must be finite"),
    ("preset=foo", "preset is set by the preset a run is trained from, not by an override"),
    ("experiment=fewshot", "experiment is set by the preset"),
    ("clip_grad=-1", "clip_grad must be >= 0"),
    ("clip_grad=nan", "clip_grad must be >= 0"),
    ("chunk_size=-1", "chunk_size must be >= 0"),
    ("msl_anneal_iterations=0", "msl_anneal_iterations must be >= 1"),
    ("eval_tasks=1", r"eval_tasks must be >= 2: the evaluation gives the mean over the test "
                     r"tasks and its 95% confidence interval, which one task cannot"),
    ("eval_tasks=0", "eval_tasks must be >= 1, got 0"),
    ("init=xavier", "init must be one of default, official, got 'xavier'"),
    (f"seed={-2 ** 63 - 1}", r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    (f"seed={2 ** 63}", r"seed must be an integer in \[-2\*\*63, 2\*\*63\), got 9223"),
])
def test_bad_overrides_are_named(item, message):
    with pytest.raises(ConfigError, match=message):
        SinusoidConfig().with_overrides([item])


def test_combinations_and_experiment_settings_are_checked():
    with pytest.raises(ConfigError, match="multi_step_loss .* needs inner_steps >= 1"):
        SinusoidConfig().with_overrides(["multi_step_loss=true", "inner_steps=0"])
    with pytest.raises(ConfigError, match="lr_mode=per_param learns the inner learning rates "
                                          "through the inner steps: it needs inner_steps >= 1"):
        SinusoidConfig().with_overrides(["lr_mode=per_param", "inner_steps=0"])
    with pytest.raises(ConfigError, match="need meta_lr_min <= meta_lr"):
        SinusoidConfig().with_overrides(["meta_lr_schedule=cosine", "meta_lr=1e-6"])
    assert SinusoidConfig().with_overrides(["meta_lr=1e-6"]).meta_lr == 1e-6  # constant: no min
    for bad, message in (("val_every=-5", "val_every must be >= 0"),
                         ("val_tasks=0", "val_tasks must be >= 1"),
                         ("hidden=0", "hidden must be >= 1"),
                         ("eval_k_query=-1", "eval_k_query must be >= 0"),
                         ("split_seed=-1", "split_seed must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            FewShotConfig().with_overrides([bad])
    with pytest.raises(ConfigError, match="hidden=8 sets the conv net's filters; network=mlp is "
                                          "the paper's fixed 256-128-64-64 MLP"):
        FewShotConfig().with_overrides(["network=mlp", "hidden=8"])  # was silently unused
    assert FewShotConfig().with_overrides(["network=mlp"]).hidden == 64


@pytest.mark.parametrize("overrides, said", [
    (["first_order=true", "first_order_until=5"], ["first_order_until=5 has no effect"]),
    (["first_order_until=100", "iterations=100"],
     ["first_order_until=100 is not below iterations=100: the run trains first order throughout"]),
    (["first_order=true", "per_step=norm", "inner_steps=2"],
     ["per_step=norm with first-order MAML and no multi_step_loss: only the last inner step's "
      "set gets a meta-gradient"]),
    (["first_order=true", "per_step=norm", "inner_steps=2", "multi_step_loss=true",
      "msl_anneal_iterations=100", "iterations=100"], []),
    (["first_order=true", "per_step=norm", "inner_steps=2", "multi_step_loss=true",
      "msl_anneal_iterations=100", "iterations=101"],
     ["per_step=norm with first-order MAML throughout: the multi-step loss ends after "
      "msl_anneal_iterations=100"]),
    (["first_order_until=100", "iterations=101", "per_step=norm", "inner_steps=2"], []),
    (["msl_anneal_iterations=50"],
     ["msl_anneal_iterations=50 has no effect without multi_step_loss=true"]),
    (["meta_lr_min=0.0005"], ["meta_lr_min=0.0005 has no effect with a constant meta learning "
                              "rate: meta_lr_schedule=cosine anneals to it"]),
    (["meta_lr_min=0.0005", "meta_lr_schedule=cosine", "msl_anneal_iterations=50",
      "multi_step_loss=true", "inner_steps=2"], []),
])
def test_settings_that_train_otherwise_than_meant_are_said(overrides: list[str],
                                                           said: list[str]) -> None:
    warnings = FewShotConfig().with_overrides(overrides).training_warnings()
    assert len(warnings) == len(said)
    assert all(warning.startswith(start) for warning, start in zip(warnings, said))


def test_few_shot_config_refuses_one_way_tasks_and_keeps_an_absolute_data_root(tmp_path,
                                                                               monkeypatch):
    with pytest.raises(ConfigError, match="n_way must be >= 2"):
        FewShotConfig().with_overrides(["n_way=1"])
    monkeypatch.chdir(tmp_path)
    cfg = FewShotConfig().with_overrides(["data_root=data/omniglot"])
    assert cfg.data_root == str(tmp_path / "data" / "omniglot")


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "xpu:0", "cuda:", "cuda:x", " cpu"])
def test_an_unknown_device_is_a_config_error(name):
    """Names torch parses but fastmaml is not built for (mps, meta, xpu) as well as nonsense."""
    with pytest.raises(ConfigError, match=f"device must be auto, cpu, cuda or cuda:N, got "
                       f"'{name}'"):
        SinusoidConfig(device=name)


def test_a_device_the_machine_lacks_is_a_config_error():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda:1 but CUDA is not available here"):
            resolve_device("cuda:1")
    else:  # one past the machine's devices
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"this machine has {count} CUDA device"):
            resolve_device(f"cuda:{count}")


def test_a_bad_device_in_a_runs_config_yaml_names_the_file(tmp_path, capsys):
    """The same name given on the command line is the command's, not the file's."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**SinusoidConfig().to_dict(),
                                                          "device": "gpu"}))
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"fastmaml: error: {tmp_path / 'config.yaml'}: device "
                                       "must be auto, cpu, cuda or cuda:N, got 'gpu'\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SinusoidConfig().to_dict()))
    assert main(["eval", str(tmp_path), "device=gpu"]) == 2
    assert capsys.readouterr().err == ("fastmaml: error: device must be auto, cpu, cuda or "
                                       "cuda:N, got 'gpu'\n")


def test_every_preset_builds_its_config():
    for name, chosen in PRESETS.items():
        cls = experiment_class(chosen.experiment).config_cls
        cfg = cls.from_dict({**chosen.values, "preset": name})
        assert cfg.experiment == chosen.experiment


def test_sinusoid_preset_holds_the_paper_settings():
    cfg = SinusoidConfig.from_dict(preset("sinusoid").values)
    assert (cfg.iterations, cfg.meta_batch, cfg.inner_lr, cfg.inner_steps, cfg.meta_lr) == (
        70000, 25, 0.01, 1, 1e-3)
    assert cfg.hidden == (40, 40) and cfg.k_shot == 10 and cfg.eval_k_shots == (5, 10, 20)


def test_the_fast_recipe_starts_first_order_only_where_tasks_take_several_inner_steps():
    for name in ("omniglot-5w5s-fast", "omniglot-20w1s-fast", "omniglot-20w5s-fast"):
        cfg = FewShotConfig.from_dict(preset(name).values)
        assert cfg.lr_mode == "per_layer_step" and cfg.meta_lr_schedule == "cosine"
        assert cfg.first_order_until == (0 if cfg.inner_steps == 1 else 2000)
        order = "second order throughout" if cfg.inner_steps == 1 else "first order for the first"
        assert order in preset(name).description


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'omniglot-99w'"):
        preset("omniglot-99w")


@pytest.mark.parametrize("given, meant", [("omniglot-5w1", "omniglot-5w1s"),  # a typo
                                          ("folder", "fewshot-folder")])  # a part of the name
def test_a_mistyped_preset_is_answered_with_the_one_meant(given: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown preset '{given}' \(did you mean {meant}\?\)"):
        preset(given)


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("n_way: [5\nk_shot: 1\n")
    with pytest.raises(ConfigError, match=r"config.yaml is not valid YAML \(.*line"):
        load_config_dict(tmp_path / "config.yaml")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfen_way: 5\n")
    with pytest.raises(ConfigError, match=r"config.yaml is not valid YAML"):
        load_config_dict(tmp_path / "config.yaml")


@pytest.mark.parametrize("experiment, said", [("sinus", "unknown experiment 'sinus' (did you "
                                                 "mean sinusoid?)"),
                                                (None, "unknown experiment ''")])
def test_a_run_config_naming_no_known_experiment_names_its_file(tmp_path, capsys, experiment,
                                                                said):
    values = SinusoidConfig().to_dict()
    if experiment is None:
        del values["experiment"]
    else:
        values["experiment"] = experiment
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    assert main(["eval", str(tmp_path)]) == 2
    assert f"fastmaml: error: {tmp_path / 'config.yaml'}: {said}" in capsys.readouterr().err


def test_a_run_config_key_that_yaml_reads_as_no_name_is_named(tmp_path, capsys):
    """``1: 2`` or ``null: 3`` edited into config.yaml: YAML's keys 1 and None (a TypeError from
    sorting them with the names before)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SinusoidConfig().to_dict())
                                          + "1: 2\nnull: 3\nfoo: 4\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"fastmaml: error: {tmp_path / 'config.yaml'}: config key(s) 1, None are not names (a "
        "number, true/false or null to YAML); valid keys: experiment, ")


@pytest.mark.parametrize("value,expected", [("AUTO", "auto"), ("TRUE", "true"), ("yes", "true"),
                                            (True, "true"), (False, "false"), ("0", "false")])
def test_compile_reads_auto_or_a_switch_as_yaml_or_the_command_line_writes_it(value, expected):
    """Runs saved before ``auto`` hold YAML booleans; they load as they trained."""
    assert SinusoidConfig.from_dict({"compile": value}).compile == expected


@pytest.mark.parametrize("compile,iterations,compiles", [
    ("auto", COMPILE_FROM_ITERATIONS, True), ("auto", COMPILE_FROM_ITERATIONS - 1, False),
    ("true", 10, True), ("false", 70_000, False)])
def test_compile_auto_compiles_only_runs_long_enough_to_repay_it(compile, iterations, compiles):
    cfg = SinusoidConfig(compile=compile, iterations=iterations)
    assert cfg.compiles() is compiles
    maml = build_maml(MLP([1, 4, 1]), F.mse_loss, cfg)
    assert (maml._compiled_gradient is not None) is compiles


def test_evaluation_and_adapt_of_a_run_compile_only_when_asked(tmp_path):
    """A run's ``compile`` was for its training; ``eval DIR compile=true`` asks for it again."""
    for setting in ("auto", "true"):
        trained = create_run("sinusoid", tmp_path / setting, [f"compile={setting}"])
        assert trained.cfg.compiles()  # 70,000 iterations
        assert not load_experiment(tmp_path / setting).cfg.compiles()
        assert load_experiment(tmp_path / setting, [" compile = true"]).cfg.compiles()


def test_more_threads_than_cpus_run_as_many_as_there_are_with_a_warning(tmp_path):
    """threads=100000 (a typo) crashed torch's thread pool with a segmentation fault."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        with pytest.warns(FastMAMLWarning, match=rf"threads=100000 is more than the {cpus} CPU"):
            create_run("sinusoid-demo", tmp_path / "run", ["threads=100000"])
        assert torch.get_num_threads() == cpus
        assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 100000
        (tmp_path / "run" / "metrics-maml.csv").write_text("iteration,elapsed_s,loss\n1,0.5,2.0\n")
        with warnings.catch_warnings():  # drawing its curves runs no model: nothing to warn of
            warnings.simplefilter("error", FastMAMLWarning)
            assert main(["plot", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(before)


def test_the_command_line_run_from_python_gives_the_callers_warning_display_back(
        tmp_path, capsys, monkeypatch):
    """fastmaml's warnings are one line each during ``main``, and other warnings go to the
    caller's own display (a notebook's, say); afterwards that display and the filters are
    theirs again."""
    import fastmaml.experiments.base as base

    others = []

    def display(message, *_) -> None:  # noqa: ANN001
        others.append(str(message))

    monkeypatch.setattr(warnings, "showwarning", display)
    threads = base.usable_threads  # (called as training starts)
    monkeypatch.setattr(base, "usable_threads", lambda wanted: warnings.warn(
        "another library's warning") or threads(wanted))
    filters = list(warnings.filters)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "run"), "threads=100000",
                     "iterations=1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    assert f"fastmaml: warning: threads=100000 is more than the {cpus} CPU" in \
        capsys.readouterr().err
    assert others == ["another library's warning"]
    assert warnings.showwarning is display and warnings.filters == filters


def test_an_edited_config_yamls_fractional_count_is_refused_not_truncated():
    """``iterations: 2.5`` trained 2 (the command line's int("2.5") refuses it already); a
    whole number written as a float is taken."""
    with pytest.raises(ConfigError, match="config key 'iterations' expects int, got 2.5"):
        SinusoidConfig.from_dict({"iterations": 2.5})
    assert SinusoidConfig.from_dict({"iterations": 2.0}).iterations == 2


@pytest.mark.parametrize("key", ["iterations", "inner_lr"])
def test_a_yaml_boolean_where_a_number_goes_is_refused_not_read_as_1(key):
    """``iterations: yes`` in an edited config.yaml trained 1 iteration (True is an int)."""
    with pytest.raises(ConfigError, match=rf"config key '{key}' expects (int|float), got True"):
        SinusoidConfig.from_dict({key: True})


def test_every_setting_of_every_experiment_has_a_note_from_its_source():
    """``fastmaml presets NAME`` documents each setting by its comment in the config class: a
    setting added without one would be shown bare."""
    for name in EXPERIMENTS:
        config_cls = experiment_class(name).config_cls
        notes = config_cls.field_notes()
        bare = set(config_cls.field_types()) - set(notes) - {"experiment", "preset"}
        assert not bare, f"{name}: settings without a comment: {sorted(bare)}"
    rl_notes = experiment_class("rl").config_cls.field_notes()
    assert rl_notes["horizon"].startswith("steps per episode (0: the paper's")  # from above it
    assert rl_notes["horizon"].endswith("max_episode_steps)")  # its two lines, joined
    assert rl_notes["action_scale"].startswith("2D navigation only")  # not horizon's
    assert rl_notes["inner_steps"].startswith(">1: more steps")  # the subclass's own, not Config's
    assert Config.field_notes()["inner_steps"] == "inner gradient steps per task in meta-training"


def test_a_config_class_without_source_has_no_notes():
    made = dataclasses.make_dataclass("Made", [("extra", int, 0)], bases=(Config,))
    assert "extra" not in made.field_notes()
    assert made.field_notes()["seed"] == Config.field_notes()["seed"]  # its bases' still read


def test_adapt_no_norm_on_a_model_without_norm_layers_is_warned_of():
    """A policy (or any MLP without norm layers) given adapt=no_norm adapted everything, unsaid."""
    from fastmaml.experiments.base import adapt_selection

    plain = MLP([1, 4, 1])
    with pytest.warns(FastMAMLWarning, match="adapt=no_norm leaves the norm layers' parameters "
                                             "to the outer loop, and this model has none"):
        select = adapt_selection("no_norm", plain)
    assert all(select(name, p) for name, p in plain.named_parameters())
    with warnings.catch_warnings(action="error"):
        select = adapt_selection("no_norm", MLP([1, 4, 1], batch_norm=True))
    assert not select("1.weight", None)  # (the batch norm's)


def test_a_run_saved_with_one_eval_task_still_loads_and_takes_another(tmp_path):
    """eval_tasks=1 (no confidence interval) is refused where it is given, not in a run
    saved with it before the refusal: that run loads, and an override replaces it."""
    run = tmp_path / "run"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=2",
                 "baseline_iterations=1", "--no-progress"]) == 0
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("eval_tasks: 600", "eval_tasks: 1"))
    assert load_experiment(run).cfg.eval_tasks == 1
    assert load_experiment(run, ["eval_tasks=5"]).cfg.eval_tasks == 5
    with pytest.raises(ConfigError, match="eval_tasks must be >= 2"):
        load_experiment(run, ["eval_tasks=1"])
