"""The few-shot classification experiment end to end on the real Omniglot."""
from __future__ import annotations

import csv
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml import experiments
from fastmaml.cli import main
from fastmaml.config import ConfigError
import fastmaml
from fastmaml.experiments import (PRESETS, create_run, experiment_class, load_experiment,
                                  preset_config, prepare_run)
from fastmaml.experiments.fewshot import FewShotConfig, FewShotExperiment
from fastmaml.tasks import download, folder
from fastmaml.tasks.images import as_model_input
from fastmaml.tasks.omniglot import load_omniglot_images, omniglot_characters
from fastmaml.tasks.splits import SPLITS


def test_presets_hold_the_paper_settings_with_the_loss_scaling_applied():
    cls = experiment_class("fewshot").config_cls
    def cfg(name):
        return cls.from_dict(PRESETS[name].values)
    five, twenty, mini = cfg("omniglot-5w1s"), cfg("omniglot-20w1s"), cfg("miniimagenet-5w1s")
    assert (five.n_way, five.meta_batch, five.inner_steps, five.iterations) == (5, 32, 1, 60000)
    assert five.inner_lr == pytest.approx(5 * 0.4) and twenty.inner_lr == pytest.approx(20 * 0.1)
    assert (twenty.meta_batch, twenty.inner_steps) == (16, 5)
    assert (mini.hidden, mini.k_query, mini.eval_queries) == (32, 15, 1)
    assert mini.inner_lr == pytest.approx(5 * 0.01) and mini.meta_batch == 4
    assert cfg("omniglot-5w1s-fo").first_order and cfg("omniglot-5w1s-cpu").iterations < 60000
    with pytest.raises(ConfigError, match="dataset must be one of"):
        cls.from_dict({"dataset": "cifar"})
    with pytest.raises(ConfigError, match="split must be one of official, vinyals, lake, got 'x'"):
        cls.from_dict({"split": "x"})
    with pytest.raises(ConfigError, match="split=lake is an Omniglot split; dataset=folder "
                                          "splits by train/ val/ test/ folders"):
        cls.from_dict({"dataset": "folder", "image_size": 8, "channels": 1, "split": "lake"})
    mini = cls.from_dict({"dataset": "miniimagenet"})
    for layout in ("class_depth=2", "split_fractions=0.8,0.1,0.1"):  # given: else unused
        with pytest.raises(ConfigError, match="class_depth and split_fractions lay out an image "
                                              "folder: dataset=miniimagenet has its own"):
            mini.with_overrides([layout])
        assert mini.with_overrides(["dataset=folder", "image_size=8", "channels=1", layout])
    assert mini.with_overrides(["split_fractions=0.7,0.15,0.15"]).dataset == "miniimagenet"
    # a run saved with them (accepted and unused before) still loads
    assert cls.from_dict({"dataset": "miniimagenet", "class_depth": 2}).class_depth == 2


@pytest.mark.parametrize("preset", ["miniimagenet-5w1s", "miniimagenet-5w5s"])
def test_the_miniimagenet_clip_is_the_official_codes_on_its_loss_scale(preset: str) -> None:
    """The official code's meta-loss is the sum of the N x 15 queries' cross-entropies / K (its
    inner loss likewise over the support): with inner_lr = N x alpha, fastmaml's mean-loss
    meta-gradient is that one's K / (N x 15), so the preset's clip clips it where the official
    +-10 clips the official gradient."""
    cfg = experiment_class("fewshot").config_cls.from_dict(PRESETS[preset].values)
    n, k, q, alpha = cfg.n_way, cfg.k_shot, cfg.k_query, cfg.inner_lr / cfg.n_way
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, n)).double()
    tasks = 3
    batch = (30 * torch.randn(tasks, n * k, 6, dtype=torch.float64),  # large: clips bind
             torch.arange(n).repeat_interleave(k).expand(tasks, -1),
             30 * torch.randn(tasks, n * q, 6, dtype=torch.float64),
             torch.arange(n).repeat_interleave(q).expand(tasks, -1))
    maml = fastmaml.MAML(model, torch.nn.functional.cross_entropy, cfg.inner_lr)
    maml.meta_backward(batch)  # as the trainer takes it
    ours = [p.grad.clone() for p in model.parameters()]

    def official_loss(x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        w1, b1, w2, b2 = params
        logits = torch.relu(x @ w1.T + b1) @ w2.T + b2
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum") / k

    params = [p.detach().requires_grad_() for p in model.parameters()]
    total = 0
    for support_x, support_y, query_x, query_y in zip(*batch):
        grads = torch.autograd.grad(official_loss(support_x, support_y, params), params,
                                    create_graph=True)
        fast = [p - alpha * g for p, g in zip(params, grads)]
        total = total + official_loss(query_x, query_y, fast) / tasks
    official = torch.autograd.grad(total, params)
    scale = n * q / k
    for mine, theirs in zip(ours, official):
        torch.testing.assert_close(mine * scale, theirs)
        torch.testing.assert_close(mine.clamp(-cfg.clip_grad, cfg.clip_grad) * scale,
                                   theirs.clamp(-10, 10))
    assert any((theirs.abs() > 10).any() for theirs in official)  # the clip binds somewhere


def test_one_minute_omniglot_training_is_clearly_above_chance(omniglot_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "omniglot-5w1s", "--out", str(run), "--data-root", str(omniglot_root),
                 "hidden=32", "meta_batch=8", "iterations=80", "log_every=20", "val_every=80",
                 "val_tasks=100", "path=batched",  # (the timed search's choice changes rounding)
                 "--no-progress"]) == 0
    with open(run / "metrics-maml.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["val_accuracy"]) > 0.4  # chance is 0.2
    assert main(["eval", str(run), "eval_tasks=100", "--no-progress"]) == 0
    assert "paper: MAML |  |  | 98.7 |" in capsys.readouterr().out
    record, = json.loads((run / "eval.json").read_text())
    assert record["method"] == "maml" and record["k_shot"] == 1 and record["tasks"] == 100
    assert record["mean"][3] > record["mean"][0] and record["mean"][3] > 0.4
    assert main(["plot", str(run)]) == 0
    assert (run / "figures" / "accuracy_vs_steps.png").exists()

    # the trained run adapts to a new task: 5 characters copied from the evaluation alphabets
    characters = omniglot_characters(omniglot_root)
    chosen = [964 + 37 * i for i in range(5)]  # evaluation characters, several alphabets
    for i in chosen:
        pngs = sorted(characters[i].glob("*.png"))
        name = f"{characters[i].parent.name}-{characters[i].name}"
        for role, files in (("support", pngs[:1]), ("query", pngs[1:6])):
            (tmp_path / role / name).mkdir(parents=True)
            for png in files:
                shutil.copy(png, tmp_path / role / name / png.name)
    capsys.readouterr()
    assert main(["adapt", str(run), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query"), "--steps", "3"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(out.splitlines()))
    assert len(rows) == 25 and sum(r["prediction"] == r["label"] for r in rows) / 25 > 0.3
    assert "accuracy" in err
    # preprocessing parity with the Omniglot training loader, bit for bit
    png = sorted(characters[chosen[2]].glob("*.png"))[4]
    expected = as_model_input(load_omniglot_images(omniglot_root)[chosen[2], 4:5])
    assert torch.equal(fastmaml.load_run(run).preprocess([png]), expected)


def test_the_mlp_variant_is_compared_with_the_papers_mlp_row(omniglot_root, tmp_path, capsys):
    run = tmp_path / "mlp"
    assert main(["train", "omniglot-5w1s-mlp", "--out", str(run), "--data-root",
                 str(omniglot_root), "meta_batch=2", "iterations=2", "val_every=0",
                 "path=looped", "--no-progress"]) == 0
    assert main(["eval", str(run), "eval_tasks=4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "paper: MAML, MLP |  |  | 89.7 |" in out and "98.7" not in out
    # Lake et al.'s figures stay in the column of the paper's steps (5) with the MLP too
    for network in ("conv", "mlp"):
        cfg = preset_config("omniglot-20w1s-lake", [f"network={network}"])
        (label, values), *_ = FewShotExperiment(cfg, tmp_path / network)._paper()[1]
        assert values == {5: 95.5}, (network, label)


def test_n_way_larger_than_the_split_is_a_clear_error(omniglot_root, tmp_path, capsys):
    assert main(["train", "omniglot-5w1s", "--out", str(tmp_path), "--data-root", str(omniglot_root),
                 "n_way=500", "iterations=1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "n_way=500 needs at least 500 classes, but the val split of" in err
    assert err.rstrip().endswith("; or train without validation: val_every=0")


@pytest.mark.parametrize("settings, named", [
    (["eval_k_query=25"], "k_shot + eval_k_query = 1 + 25 = 26"),
    (["k_shot=15"], "k_shot + eval_k_query (default k_shot) = 15 + 15 = 30")])
def test_too_few_images_for_the_evaluations_queries_name_its_setting(
        omniglot_root, tmp_path, capsys, settings, named):
    """The validation split's tasks take eval_k_query queries per class, not k_query (1 here):
    the error names the setting the user gave."""
    assert main(["train", "omniglot-5w1s", "--out", str(tmp_path), "--data-root",
                 str(omniglot_root), "iterations=1", "--no-progress", *settings]) == 2
    err = capsys.readouterr().err
    assert f"the val split of {omniglot_root}: {named} images per class needed, but a class " \
           "has only 20" in err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "omniglot-5w1s", "--out", str(tmp_path / "run"),
                 "--data-root", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fastmaml: error:" in err and "nowhere" in err


def test_miniimagenet_has_no_download_and_its_folder_may_come_from_the_environment(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FASTMAML_MINIIMAGENET", raising=False)
    monkeypatch.chdir(tmp_path)  # (no data/miniimagenet below the working folder)
    assert main(["train", "miniimagenet-5w1s", "--out", str(tmp_path / "a"), "download=true",
                 "--no-progress"]) == 2  # (no data: the warning comes first)
    assert ("warning: download=true is ignored: it fetches Omniglot's official zips, and "
            "dataset=miniimagenet has no download") in capsys.readouterr().err
    monkeypatch.setenv("FASTMAML_MINIIMAGENET", "~/mini")  # as a shell leaves it in quotes
    assert main(["train", "miniimagenet-5w1s", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"MiniImagenet train split not found in {tmp_path / 'mini'} (no such folder):" in err
    assert ("--data-root DIR (fastmaml train and eval; data_root=DIR in fastmaml.meta_train) or "
            "$FASTMAML_MINIIMAGENET" in err)


def test_miniimagenet_trains_on_its_three_splits_and_evaluates_on_its_test_split_alone(
        tmp_path, capsys):
    """The paper's MiniImagenet preset end to end, on pickles in the standard cache format
    (random pixels; one class short of images): evaluation reads only the test split, so it
    needs only that file. A split file copied over another is refused before training."""
    data, run = tmp_path / "mini", tmp_path / "run"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in SPLITS:
        images = rng.integers(0, 256, (5 * 6, 84, 84, 3), dtype=np.uint8)
        classes = {f"n{split}{c}": list(range(c * 6, c * 6 + 6 - (c == 4))) for c in range(5)}
        (data / f"mini-imagenet-cache-{split}.pkl").write_bytes(
            pickle.dumps({"image_data": images, "class_dict": classes}))
    tiny = ["hidden=4", "meta_batch=1", "k_query=1", "inner_steps=1", "eval_inner_steps=1",
            "eval_tasks=3", "--no-progress"]
    leaked = tmp_path / "leaked"
    shutil.copytree(data, leaked)
    shutil.copy(data / "mini-imagenet-cache-train.pkl", leaked / "mini-imagenet-cache-test.pkl")
    assert main(["train", "miniimagenet-5w1s", "--out", str(tmp_path / "leak"), "--data-root",
                 str(leaked), "iterations=2", "val_every=2", "val_tasks=2", *tiny]) == 2
    assert "the train and test splits share 5 class(es)" in capsys.readouterr().err
    assert main(["train", "miniimagenet-5w1s", "--out", str(run), "--data-root", str(data),
                 "iterations=2", "val_every=2", "val_tasks=2", *tiny]) == 0
    for split in ("train", "val"):
        (data / f"mini-imagenet-cache-{split}.pkl").unlink()
    assert main(["eval", str(run), "--no-progress"]) == 0
    record = json.loads((run / "eval.json").read_text())[0]
    assert (record["method"], record["tasks"], len(record["mean"])) == ("maml", 3, 2)


def test_lake_split_evaluates_random_and_within_alphabet_tasks(omniglot_root, tmp_path):
    run = tmp_path / "lake"
    assert main(["train", "omniglot-5w1s-lake", "--out", str(run), "--data-root",
                 str(omniglot_root), "hidden=8", "meta_batch=2", "iterations=2", "val_every=2",
                 "val_tasks=4", "--no-progress"]) == 0
    assert main(["eval", str(run), "eval_tasks=8", "eval_inner_steps=1", "--no-progress"]) == 0
    records = json.loads((run / "eval.json").read_text())
    assert [(r["method"], r["within_alphabet"], r["tasks"]) for r in records] == [
        ("maml", False, 8), ("maml, within alphabet", True, 8)]
    with pytest.raises(ConfigError, match="within_alphabet=true needs groups"):
        experiment_class("fewshot").config_cls.from_dict({"dataset": "miniimagenet",
                                                          "within_alphabet": True})


def write_classes(data, classes, per_class, size=8):
    """``data/classNN/I.png``: ``classes`` folders of ``per_class`` grey images, a shade each."""
    for c in range(classes):
        (data / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (size, size), 20 * c + i).save(data / f"class{c:02d}" / f"{i}.png")


def split_names(run):
    experiment = load_experiment(run)
    return {name: experiment.split(name).names for name in SPLITS}


def test_an_image_folder_run_keeps_its_class_split_when_classes_are_added(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    write_classes(data, 12, 3, size=12)
    common = ["--out", str(run), "--data-root", str(data), "n_way=2", "k_shot=1", "k_query=1",
              "eval_k_query=1", "image_size=12", "hidden=4", "meta_batch=2", "val_every=0",
              "split_fractions=0.5,0.2,0.3", "--no-progress"]
    assert main(["train", "fewshot-folder", "iterations=2", *common]) == 0
    recorded = json.loads((run / "splits.json").read_text())
    assert sorted(sum(recorded.values(), [])) == [f"class{c:02d}" for c in range(12)]
    names = split_names(run)

    shutil.copytree(data / "class00", data / "a-new-class")  # sorts first: it shifts a reshuffle
    capsys.readouterr()
    assert main(["train", "fewshot-folder", "iterations=3", *common]) == 0
    assert "left out 1 class folder(s)" in capsys.readouterr().err
    assert json.loads((run / "splits.json").read_text()) == recorded
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="a-new-class"):
        assert split_names(run) == names
    shutil.rmtree(data / "class05")  # e.g. another folder given to the same --out
    capsys.readouterr()
    assert main(["train", "fewshot-folder", "iterations=4", *common]) == 2
    err = capsys.readouterr().err
    assert "1 class folder(s) of this run are missing from" in err
    assert "or start a new run (train with another --out)" in err


@pytest.mark.parametrize("preset", ["fewshot-folder", "regression-csv"])
@pytest.mark.parametrize("out", ["runs/mine", "."])
def test_a_run_inside_its_data_folder_is_refused_and_leaves_nothing_there(
        tmp_path, capsys, monkeypatch, preset, out):
    """``cd data; fastmaml train ... --data-root .`` would read the run's files as data (a class
    folder ``runs``, or explicit splits "beside" runs/): refused before anything is written."""
    data = tmp_path / "data"
    if preset == "fewshot-folder":
        write_classes(data, 6, 2)
    else:
        data.mkdir()
        for task in range(6):
            (data / f"{task}.csv").write_text("".join(f"{i},{task}\n" for i in range(4)))
    before = sorted(data.rglob("*"))  # (the run lock's hidden files aside: the data skip them)
    monkeypatch.chdir(data)
    assert main(["train", preset, "--out", out, "--data-root", ".", "--no-progress"]) == 2
    assert (f"--out {out} is inside the data folder {data}, whose loading would read the run's "
            "own files as data: give --out a folder outside it") in capsys.readouterr().err
    assert sorted(p for p in data.rglob("*") if not p.name.startswith(".")) == before


def test_a_started_run_without_its_split_record_warns_that_the_split_is_made_again(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    write_classes(data, 6, 2)
    assert main(["train", "fewshot-folder", "--out", str(run), "--data-root", str(data),
                 "n_way=2", "k_shot=1", "k_query=1", "eval_k_query=1", "image_size=8", "hidden=4",
                 "meta_batch=2", "iterations=1", "val_every=0", "split_fractions=0.34,0.33,0.33",
                 "--no-progress"]) == 0
    recorded = json.loads((run / "splits.json").read_text())
    (run / "splits.json").unlink()  # e.g. a run copied without it
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="has no splits.json .*: the split "
                                                             "is made again from the folder"):
        assert load_experiment(run).data_split() == recorded  # (the folder is unchanged)


def test_eval_takes_the_data_folder_from_where_it_is_now(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    write_classes(data, 6, 2)
    assert main(["train", "fewshot-folder", "--out", str(run), "--data-root", str(data),
                 "n_way=2", "k_shot=1", "k_query=1", "eval_k_query=1", "image_size=8", "hidden=4",
                 "meta_batch=2", "iterations=2", "val_every=0", "split_fractions=0.34,0.33,0.33",
                 "eval_tasks=4", "--no-progress"]) == 0
    moved = data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 2
    assert f"data folder {data} not found: name the folder with --data-root DIR (fastmaml " \
           "train and eval; data_root=DIR in fastmaml.meta_train)" in capsys.readouterr().err
    assert main(["eval", str(run), "--data-root", str(moved), "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())[0]["tasks"] == 4
    assert main(["eval", str(run), "--data-root", str(moved), f"data_root={data}"]) == 2
    assert "override 'data_root' given twice" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::fastmaml.errors.FastMAMLWarning")  # the added class
def test_a_learner_beside_a_training_one_takes_the_recorded_split(tmp_path):
    """Before the first checkpoint a run starts afresh, except beside another learner of it in
    training: then its recorded split binds, though classes were added to the folder since."""
    data, run = tmp_path / "data", tmp_path / "run"
    write_classes(data, 12, 3)
    overrides = [f"data_root={data}", "n_way=2", "image_size=8", "split_fractions=0.5,0.2,0.3"]
    create_run("fewshot-folder", run, overrides)  # what the training learner recorded
    recorded = json.loads((run / "splits.json").read_text())
    shutil.copytree(data / "class00", data / "a-new-class")  # sorts first: it shifts a reshuffle
    assert prepare_run("fewshot-folder", run, overrides, in_use=True).data_split() == recorded
    assert prepare_run("fewshot-folder", run, overrides).data_split() != recorded


def test_a_folder_run_that_could_not_be_tested_is_refused_before_training(tmp_path, capsys):
    """Test classes are checked before training, not by eval after it; folders too short for a
    task take no split's share (here 3 empty ones would have been most of the test split)."""
    data, run = tmp_path / "data", tmp_path / "run"
    for c in range(10):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(2 if c < 7 else 0):
            Image.new("L", (8, 8), 20 * c + i).save(data / f"class{c}" / f"{i}.png")
    common = ["--out", str(run), "--data-root", str(data), "image_size=8", "hidden=4",
              "meta_batch=2", "val_every=0", "iterations=1", "--no-progress"]
    assert main(["train", "fewshot-folder", "n_way=2", "split_fractions=0.7,0,0.3",
                 *common]) == 0
    recorded = json.loads((run / "splits.json").read_text())
    assert len(recorded["test"]) == 2 and not {"class7", "class8", "class9"} & set(
        recorded["test"])  # 7 usable classes cut 5 / 0 / 2; the empty ones recorded in train
    shutil.rmtree(run)
    capsys.readouterr()
    assert main(["train", "fewshot-folder", "n_way=3", "split_fractions=0.7,0,0.3",
                 *common]) == 2
    # the folder's warning shows again or not, as Python's warning registry has it; then the
    # error, on one line
    *warned, err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("fastmaml: warning:") for line in warned)
    assert err.startswith("fastmaml: error:") and (
        "n_way=3 needs at least 3 classes, but the test split" in err)
    assert ("(train/val/test have 5/0/2 classes of at least 2 images: k_shot 1 + the larger of "
            "k_query 1 and the evaluation's queries 1 (eval_k_query, default k_shot)); give a new "
            "run more classes or other split_fractions (now 0.7,0.0,0.3), more images per class "
            "or fewer shots and queries") in err
    assert not (run / "checkpoints").exists()


def test_a_system_refusal_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        Image.new("L", (8, 8), c).save(tmp_path / "data" / f"c{c}" / "0.png")
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder, "read_images", None)  # refused before any decoding
    assert main(["train", "fewshot-folder", "--out", str(tmp_path / "run"), "--data-root",
                 str(tmp_path / "data"), "n_way=2", "k_query=0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"fastmaml: error: cannot write the cache directory {tmp_path / 'cache'} (File "
                   "exists): set $FASTMAML_CACHE (or cache_dir) to a writable folder\n")
    (tmp_path / "cache").unlink()
    (tmp_path / "cache").mkdir()  # there, but read-only (as os.access says: root writes anyway)
    monkeypatch.setattr(download.os, "access", lambda path, mode: False)
    assert main(["train", "fewshot-folder", "--out", str(tmp_path / "run"), "--data-root",
                 str(tmp_path / "data"), "n_way=2", "k_query=0", "--no-progress"]) == 2
    assert "(not writable): set $FASTMAML_CACHE" in capsys.readouterr().err


def test_within_group_tasks_too_few_classes_name_the_split_and_the_cut(tmp_path, capsys):
    """Groups of 4 classes, cut by split_fractions: a test split of 2-way within-group tasks
    finds no group of 2 classes, and the error says which split and why."""
    data = tmp_path / "data"
    for g in range(3):
        for c in range(4):
            folder = data / f"group{g}" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), 60 * g + 10 * c + i).save(folder / f"{i}.png")
    assert main(["train", "fewshot-folder", "--out", str(tmp_path / "run"), "--data-root",
                 str(data), "class_depth=2", "within_alphabet=true", "n_way=2",
                 "split_fractions=0.75,0,0.25", "image_size=8", "hidden=4", "meta_batch=2",
                 "iterations=1", "val_every=0", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"the test split of {data}: within-group tasks need a group of at least n_way=2" in err
    assert "split_fractions cut each group's classes over train/val/test" in err


def test_a_run_trained_from_the_environments_data_folder_says_another_data_root(tmp_path):
    """A run trained with no data_root (its data from $FASTMAML_OMNIGLOT or the default) gave
    no word when resumed with one; its evaluation may name any."""
    saved = FewShotConfig(preset="omniglot-5w1s")
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=rf"{tmp_path} trained on the data in the folder "
                      rf"its data set's environment variable or default named; it goes on with "
                      rf"{tmp_path / 'other'}"):
        experiments._resumed(saved, [f"data_root={tmp_path / 'other'}"], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experiments._resumed(saved, [f"data_root={tmp_path / 'other'}"], tmp_path,
                             training=False)
        experiments._resumed(saved, [], tmp_path)
