"""A trained run applied to a new task: `fastmaml adapt` and `fastmaml.load_run`."""
from __future__ import annotations

import copy
import csv
import inspect
import io
import json
import shutil
import os
import pickle
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastmaml
import fastmaml.tasks.folder
from fastmaml import ConfigError
from fastmaml.cli import main
from fastmaml.experiments import load_experiment
from fastmaml.experiments.base import build_maml
from fastmaml.tasks.images import ImageFormat, as_model_input

COLORS = {f"color{c}": c for c in range(8)}  # class name -> pattern seed


def write_image(path: Path, pattern: int, noise_seed: int) -> None:
    """A 24x24 RGB image of one class: a fixed 3x3 color pattern plus a little noise."""
    rng = np.random.default_rng(pattern)
    base = np.kron(rng.integers(0, 200, (3, 3, 3)), np.ones((8, 8, 1)))
    noise = np.random.default_rng(1000 + noise_seed).integers(0, 40, base.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((base + noise).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-way 1-shot run meta-trained for a few iterations on a synthetic image folder."""
    base = tmp_path_factory.mktemp("image-run")
    for name, pattern in COLORS.items():
        for i in range(5):
            write_image(base / "data" / name / f"{i}.png", pattern, i)
    run = base / "run"
    assert main(["train", "fewshot-folder", "--out", str(run), "--data-root", str(base / "data"),
                 "n_way=3", "k_shot=1", "k_query=2", "image_size=12", "channels=3", "hidden=8",
                 "iterations=40", "meta_batch=4", "val_every=0", "log_every=20",
                 "split_fractions=0.625,0,0.375", "eval_inner_steps=5", "--no-progress"]) == 0
    return run


def task_folders(root: Path, classes: list[str], shots: int, queries: int) -> tuple[Path, Path]:
    """A new task on disk: support/<class>/ and a labelled query/<class>/ of unseen images."""
    for name in classes:
        for i in range(shots):
            write_image(root / "support" / name / f"s{i}.png", COLORS[name], 50 + i)
        for i in range(queries):
            write_image(root / "query" / name / f"q{i}.jpg", COLORS[name], 80 + i)
    return root / "support", root / "query"


def adapt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["adapt", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_adapt_an_image_run_needs_its_files_and_no_rl_task(image_run: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    code, _, err = adapt(capsys, str(image_run), "--support", "s")
    assert code == 2 and ("is a classification run: give --support (the new task's labelled "
                          "examples) and --query (the inputs to predict)") in err
    code, _, err = adapt(capsys, str(image_run), "--task", "velocity=1")
    assert code == 2 and "--task is for meta-RL runs; " in err
    code, _, err = adapt(capsys, str(image_run), "--support", "s", "--query", "q", "--seed", "3")
    assert code == 2 and "--seed is for meta-RL runs; " in err
    with pytest.raises(SystemExit):  # train's option, not taken for a key=value setting
        adapt(capsys, str(image_run), "--data-root", "d", "--support", "s", "--query", "q")
    assert ("error: unrecognized arguments: --data-root (fastmaml adapt --help lists its "
            "options)") in capsys.readouterr().err


def test_adapt_labelled_query_csv(image_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    support, query = task_folders(tmp_path, ["color5", "color6", "color7"], shots=2, queries=3)
    code, out, err = adapt(capsys, str(image_run), "--support", str(support),
                           "--query", str(query))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "prediction", "label", "p(color5)", "p(color6)", "p(color7)"]
    assert len(rows) == 9 and {Path(r["path"]).parent.name for r in rows} == {"color5", "color6",
                                                                            "color7"}
    for row in rows:
        probabilities = [float(row[f"p({c})"]) for c in ("color5", "color6", "color7")]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["prediction"] == ["color5", "color6", "color7"][int(np.argmax(probabilities))]
    correct = sum(r["prediction"] == r["label"] for r in rows)
    assert f"accuracy {100 * correct / 9:.2f}% on the labelled query" in err
    assert "in 5 step(s)" in err  # the run's evaluation setting
    code, _, err = adapt(capsys, str(image_run), "eval_inner_steps=2", "--support", str(support),
                         "--query", str(query))
    assert code == 0 and "in 2 step(s)" in err  # an evaluation setting for this adaptation
    assert fastmaml.load_run(image_run, settings=["eval_inner_steps=3"]).steps == 3
    assert fastmaml.load_run(image_run, settings="eval_inner_steps=4").steps == 4
    assert fastmaml.load_run(image_run, settings=" ").steps == 5  # none: the run's own
    assert fastmaml.load_run(image_run, settings={"eval_inner_steps": 2}).steps == 2
    with pytest.raises(fastmaml.errors.ShapeError, match="support labels must be numbers .*; "
                       "labels are the class indices 0..N-1"):
        fastmaml.load_run(image_run).adapt(torch.rand(2, 3, 12, 12), np.array(["cat", "dog"]))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fastmaml.load_run(image_run)  # builds the run's model from its seed, then restores torch's
    assert torch.equal(torch.rand(3), expected)
    code, _, err = adapt(capsys, str(image_run), "inner_lr=1", "--support", str(support),
                         "--query", str(query))
    assert code == 2 and ("inner_lr=1: an adaptation of this fewshot run takes only its "
                          "evaluation settings (eval_inner_steps)") in err
    code, _, err = adapt(capsys, str(image_run), "eval_tasks=7", "--support", str(support),
                         "--query", str(query))  # an evaluation's count of tasks: not one task's
    assert code == 2 and "eval_tasks=7: an adaptation of this fewshot run takes only" in err
    code, _, err = adapt(capsys, str(image_run), "eval_inner_lr=0.5", "--support", str(support),
                         "--query", str(query))  # a meta-RL run's: not offered here
    assert code == 2 and "eval_inner_lr=0.5: an adaptation of this fewshot run takes " in err


def test_the_accuracy_in_json_is_the_fraction_of_correct_queries(
        image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """8 of 9 right is 0.888..., as a reader computes it, not float32's 0.8888888955116272."""
    support, query = task_folders(tmp_path, ["color5", "color6", "color7"], shots=2, queries=3)
    write_image(query / "color5" / "q0.jpg", COLORS["color6"], 99)  # labelled as another class
    code, out, err = adapt(capsys, str(image_run), "--support", str(support),
                           "--query", str(query), "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    correct = sum(row["prediction"] == row["label"] for row in document["predictions"])
    assert 0 < correct < 9  # (a fraction float32 cannot hold exactly)
    assert document["accuracy"] == correct / 9
    assert "on 6 support examples (3 classes) in 5 step(s); 9 query predictions" in err


def test_a_query_class_folder_with_no_images_is_left_out_of_the_accuracy(
        image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A labelled query with no images of one class (a folder made for each support class)
    was refused as a bad class folder; its other classes' images are scored."""
    support, query = task_folders(tmp_path, ["color5", "color6", "color7"], shots=2, queries=3)
    for image in (query / "color6").iterdir():
        image.unlink()
    code, out, err = adapt(capsys, str(image_run), "--support", str(support),
                           "--query", str(query), "--format", "json")
    assert code == 0, err
    assert (f"warning: the query class folder(s) color6 in {query} hold no images: the accuracy "
            "is over the other classes' images") in err
    document = json.loads(out)
    assert {row["label"] for row in document["predictions"]} == {"color5", "color7"}
    correct = sum(row["prediction"] == row["label"] for row in document["predictions"])
    assert document["query"] == 6 and document["accuracy"] == correct / 6
    for name in ("color5", "color7"):
        shutil.rmtree(query / name)
    code, _, err = adapt(capsys, str(image_run), "--support", str(support), "--query", str(query))
    assert code == 2 and err.endswith(f"the query folder {query} holds no images (in its class "
                                      "folder(s) color6)\n")


def test_a_labelled_query_holding_support_images_is_warned_of(image_run: Path,
                                                               tmp_path: Path) -> None:
    """Its accuracy is of images the adaptation was fitted to: a copy counts as one."""
    support, query = task_folders(tmp_path, ["color0", "color1"], shots=2, queries=2)
    run = fastmaml.load_run(image_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmaml.adaptation.predict_files(run, support, query)
        fastmaml.adaptation.predict_files(run, support, query / "color0")  # unlabelled
    shutil.copy(support / "color1" / "s1.png", query / "color1" / "copy.png")
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"^1 of the 5 query images are "
                      r"support images too \(e\.g\. .*copy\.png\): the adaptation was fitted "
                      "to them, so the accuracy on them says nothing of how it does on new ones"):
        fastmaml.adaptation.predict_files(run, support, query)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="^4 of the 4 query images are "):
        fastmaml.adaptation.predict_files(run, support, support)


def test_query_classes_match_support_classes_in_either_unicode_form(
        image_run: Path, tmp_path: Path) -> None:
    """macOS writes "é" decomposed (NFD), most systems composed (NFC): the same class."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    for folder, name in (("support", composed), ("query", decomposed)):
        write_image(tmp_path / folder / name / "0.png", COLORS["color0"], 1 if folder == "support"
                    else 2)
        write_image(tmp_path / folder / "color1" / "0.png", COLORS["color1"],
                    3 if folder == "support" else 6)
    result = fastmaml.adaptation.predict_files(fastmaml.load_run(image_run),
                                               tmp_path / "support", tmp_path / "query")
    assert result.summary["classes"] == ["caf\u00e9", "color1"]
    assert sorted(row["label"] for row in result.rows) == ["caf\u00e9", "color1"]
    write_image(tmp_path / "support" / decomposed / "0.png", COLORS["color2"], 4)  # two cafés
    with pytest.raises(fastmaml.errors.DataError, match=r"the support class folders "
                       r"'cafe\\u0301' and 'caf\\xe9' in .* are one name in two Unicode forms"):
        fastmaml.adaptation.predict_files(fastmaml.load_run(image_run), tmp_path / "support",
                                          tmp_path / "query")
    flat = tmp_path / "flat"
    for name in (composed, decomposed):
        write_image(flat / f"{name}.png", COLORS["color0"], 5)
    with pytest.raises(fastmaml.errors.DataError, match="would be classes of the same name"):
        fastmaml.adaptation.support_images(flat)


def test_json_to_a_file_flat_folders_and_the_first_n_outputs(
        image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, name in enumerate(("color1", "color4")):  # flat: every image is a class of its own
        write_image(tmp_path / "support" / f"{name}.png", COLORS[name], 60 + i)
        write_image(tmp_path / "query" / f"unknown{i}.png", COLORS[name], 90 + i)
    for name in ("IMG_0001.HEIC", "logo.svg", ".DS_Store"):  # not read: the first two are named
        (tmp_path / "query" / name).write_bytes(b"not an image Pillow reads")
    (tmp_path / "query" / "moved.png").symlink_to(tmp_path / "gone.png")
    out_file = tmp_path / "out" / "predictions.json"
    code, out, err = adapt(capsys, str(image_run), "--support", str(tmp_path / "support"),
                           "--query", str(tmp_path / "query"), "--format", "json",
                           "--out", str(out_file), "--steps", "3")
    assert code == 0 and out == "", err
    assert (f"warning: skipped 2 file(s) in the query folder {tmp_path / 'query'} whose names "
            "end in no image format's suffix this Pillow reads (e.g. .png, .jpg): "
            "IMG_0001.HEIC, logo.svg\n") in err
    assert (f"warning: skipped 1 file(s) in the query folder {tmp_path / 'query'} that link to "
            "nothing (their targets were moved or deleted, or sit on a drive not mounted): "
            "moved.png\n") in err
    document = json.loads(out_file.read_text())
    assert {k: document[k] for k in ("task", "steps", "classes", "support", "query", "accuracy")} \
        == {"task": "classification", "steps": 3, "classes": ["color1", "color4"], "support": 2,
            "query": 2, "accuracy": None}
    first = document["predictions"][0]
    assert set(first) == {"path", "prediction", "probabilities"}  # unlabelled: no label
    assert list(first["probabilities"]) == ["color1", "color4"]  # 2 of the run's 3 outputs
    # one image file as the query: its prediction as in the folder (norm=each: alone)
    code, out, err = adapt(capsys, str(image_run), "--support", str(tmp_path / "support"),
                           "--query", first["path"], "--format", "json", "--steps", "3")
    assert code == 0 and "on 2 support examples (2 classes) in 3 step(s); 1 query prediction\n" \
        in err
    alone, = json.loads(out)["predictions"]
    assert alone["path"] == first["path"] and alone["prediction"] == first["prediction"]
    assert alone["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
    hidden = tmp_path / ".named.png"  # named, a hidden file is read (a folder's are skipped)
    shutil.copy(first["path"], hidden)
    code, out, err = adapt(capsys, str(image_run), "--support", str(tmp_path / "support"),
                           "--query", str(hidden), "--format", "json", "--steps", "3")
    assert code == 0, err
    assert json.loads(out)["predictions"][0]["prediction"] == first["prediction"]


def test_images_in_a_folder_inside_a_class_folder_are_said_to_be_skipped(
        image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    support, query = task_folders(tmp_path, ["color0", "color1"], shots=1, queries=1)
    write_image(support / "color0" / "more" / "s9.png", COLORS["color0"], 9)
    code, out, err = adapt(capsys, str(image_run), "--support", str(support), "--query",
                           str(query))
    assert code == 0 and len(out.splitlines()) == 3, err  # the header and 2 queries
    assert (f"warning: skipped 1 folder(s) in the support class folder {support / 'color0'} (a "
            "class's images lie directly in its folder): more\n") in err
    (support / "color1" / "nested").mkdir()  # a class whose only image lies one folder down
    (support / "color1" / "s0.png").rename(support / "color1" / "nested" / "s0.png")
    code, _, err = adapt(capsys, str(image_run), "--support", str(support), "--query",
                         str(query))
    assert code == 2 and err.endswith(f"the support class folder {support / 'color1'} holds no "
                                      "images (a class's images lie directly in its folder, not "
                                      "in nested/)\n")


def test_file_names_that_are_not_utf8_come_out_as_their_bytes(
        image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    support, _ = task_folders(tmp_path, ["color0"], shots=1, queries=0)
    latin1 = os.fsdecode(b"caf\xe9")  # a class folder named in Latin-1 (surrogates in Python)
    write_image(support / latin1 / "s.png", COLORS["color1"], 5)
    query = tmp_path / "query" / os.fsdecode(b"\xff.png")
    write_image(query, COLORS["color1"], 6)
    out_file = tmp_path / "predictions.csv"
    code, _, err = adapt(capsys, str(image_run), "--support", str(support), "--query",
                         str(query), "--out", str(out_file))
    assert code == 0, err
    assert b"\xff.png,caf\xe9," in out_file.read_bytes()  # path, prediction: as on disk
    # to stdout, whose encoding refuses such names: their bytes too, not a traceback
    result = subprocess.run([sys.executable, "-m", "fastmaml", "adapt", str(image_run),
                             "--support", str(support), "--query", str(query)],
                            capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert b"\xff.png,caf\xe9," in result.stdout


def test_first_n_outputs_adapted_as_a_plain_gradient_step(image_run: Path, tmp_path: Path) -> None:
    """One inner step on a 2-class task of unequal shots equals a hand-written step on the first
    2 logits, each class's mean cross-entropy weighing as one of the run's 3 classes."""
    run = fastmaml.load_run(image_run)
    assert (run.task, run.num_classes, run.steps) == ("classification", 3, 5)
    paths = []
    for i, name in enumerate(("color2", "color3", "color2", "color3", "color2")):
        paths.append(tmp_path / f"{i}.png")
        write_image(paths[-1], COLORS[name], 70 + i)
    x, y = run.preprocess(paths), torch.tensor([0, 1, 0, 1, 0])
    adapted = run.adapt(x, y, steps=1)

    model, maml = run.maml.model, run.maml
    params = dict(model.named_parameters())
    losses = F.cross_entropy(torch.func.functional_call(model, params, (x,))[:, :2], y,
                             reduction="none")
    loss = (losses[y == 0].mean() + losses[y == 1].mean()) / 3
    grads = torch.autograd.grad(loss, [params[n] for n in maml.adapted_names])
    lr = maml.inner_lrs(0)
    for name, grad in zip(maml.adapted_names, grads):  # float32, kernels vary by CPU (AVX2/512)
        torch.testing.assert_close(adapted.params[name], params[name] - lr[name] * grad,
                                   rtol=1e-4, atol=1e-4)
    assert run.predict(adapted, x).shape == (5, 2)
    with pytest.raises(ConfigError, match="task has 4 classes, but the run was trained 3-way"):
        run.adapt(x, torch.tensor([0, 1, 2, 3]))


def test_a_task_of_the_runs_n_way_adapts_with_the_meta_training_loss(image_run: Path,
                                                                    tmp_path: Path) -> None:
    """On a balanced task of all the run's classes, the class weighting is the plain mean
    cross-entropy of meta-training's inner loop."""
    run = fastmaml.load_run(image_run)
    paths = []
    for i, name in enumerate(["color2", "color3", "color4"] * 2):
        paths.append(tmp_path / f"{i}.png")
        write_image(paths[-1], COLORS[name], 90 + i)
    x, y = run.preprocess(paths), torch.tensor([0, 1, 2] * 2)
    adapted = run.adapt(x, y)
    engine = run.maml.adapt(x, y, run.steps)  # the engine's own loss: the run's cross-entropy
    for name, value in engine.items():
        torch.testing.assert_close(adapted.params[name], value, rtol=1e-5, atol=1e-6)


def test_a_prediction_does_not_depend_on_the_other_query_images(image_run: Path,
                                                                 tmp_path: Path) -> None:
    run = fastmaml.load_run(image_run)
    support, query = task_folders(tmp_path, ["color0", "color1", "color2"], shots=1, queries=2)
    predict = fastmaml.adaptation.predict_files
    together = predict(run, support, query)
    alone = predict(run, support, query / "color1")
    by_path = {r["path"]: r["probabilities"] for r in together.rows}
    for row in alone.rows:
        for name, p in row["probabilities"].items():
            assert p == pytest.approx(by_path[row["path"]][name], abs=1e-6)
    # the paper's protocol: the query set is one batch, so one class alone predicts otherwise
    batch = predict(run, support, query, norm="query")
    in_batch = {r["path"]: r["probabilities"] for r in batch.rows}
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="the 2 query image.* are normalised "
                      r"as one batch \(norm query, or run.predict without context\), fewer than "
                      "the task's 3 classes"):
        alone = predict(run, support, query / "color1", norm="query")
    assert batch.summary["norm"] == "query"
    assert any(row["probabilities"] != pytest.approx(in_batch[row["path"]], abs=1e-6)
               for row in alone.rows)
    with pytest.raises(ConfigError, match="norm must be one of"):
        predict(run, support, query, norm="running")


def test_predicting_a_few_images_without_context_is_warned_of_at_the_call(
        image_run: Path, tmp_path: Path) -> None:
    """Batch statistics over fewer images than classes are far from training's: from Python
    too, the warning names the remedy and points at the user's line."""
    run = fastmaml.load_run(image_run)
    support, query = task_folders(tmp_path, ["color0", "color1", "color2"], shots=1, queries=1)
    support_x = run.preprocess(sorted(support.rglob("*.png")))
    adapted = run.adapt(support_x, torch.tensor([0, 1, 2]))
    two = run.preprocess([query / "color0" / "q0.jpg", query / "color1" / "q0.jpg"])
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"the 2 query image\(s\) .* fewer "
                      "than the task's 3 classes.*or run.predict's context=support_x, suits a "
                      "few images") as warned:
        line = inspect.currentframe().f_lineno + 1
        run.predict(adapted, two)
    assert (warned[0].filename, warned[0].lineno) == (__file__, line)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.predict(adapted, two, context=support_x)
        run.predict(adapted, run.preprocess(sorted(query.rglob("*.jpg"))))  # all 3 classes' worth


def test_a_large_query_is_predicted_in_chunks_with_the_same_result(
        image_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = fastmaml.load_run(image_run)
    support, query = task_folders(tmp_path, ["color0", "color1", "color2"], shots=1, queries=3)
    x = run.preprocess(sorted(support.rglob("*.png")))
    adapted = run.adapt(x, [0, 1, 2], steps=2)  # labels as a list, as a user may give them
    queries = run.preprocess(sorted(query.rglob("*.jpg")))
    whole = run.predict(adapted, queries, context=x)
    monkeypatch.setattr(fastmaml.core, "PREDICT_BATCH", 8)  # 2 query images per chunk
    calls, forward = [], run.maml._forward
    monkeypatch.setattr(run.maml, "_forward", lambda *args: calls.append(1) or forward(*args))
    torch.testing.assert_close(run.predict(adapted, queries, context=x), whole)
    assert len(calls) == 5  # 9 query images, 2 per chunk
    with pytest.raises(fastmaml.errors.ShapeError, match="must be 0..N-1 .* got the 2 distinct "
                                                         "labels 0, 2: number them 0..1"):
        run.adapt(x, [0, 2, 2])
    with pytest.raises(fastmaml.errors.ShapeError, match="got the 2 distinct labels 0, 7"):
        run.adapt(x[:2], [0, 7])  # two classes of a 3-way run, but not numbered 0..1
    with pytest.raises(ConfigError, match="support set has one class"):
        run.adapt(x[:2], [2, 2])


def test_labels_of_any_integer_dtype_and_inputs_of_any_float_dtype(image_run: Path,
                                                                   tmp_path: Path) -> None:
    """numpy int32, torch uint8 and bool labels and float64 images adapt as int64 and float32
    do; integer images (unpreprocessed pixels) are a clear error, not torch's."""
    run = fastmaml.load_run(image_run)
    support, query = task_folders(tmp_path, ["color0", "color1"], shots=2, queries=1)
    x = run.preprocess(sorted(support.rglob("*.png")))
    queries = run.preprocess(sorted(query.rglob("*.jpg")))
    expected = run.predict(run.adapt(x, torch.tensor([0, 0, 1, 1]), steps=2), queries)
    for labels in (np.array([0, 0, 1, 1], dtype=np.int32), torch.tensor([0, 0, 1, 1]).byte(),
                   torch.tensor([False, False, True, True])):
        adapted = run.adapt(x, labels, steps=2)
        torch.testing.assert_close(run.predict(adapted, queries), expected)
    with torch.inference_mode():  # the run loaded, its inputs made and adapted under it too
        inferred = fastmaml.load_run(image_run)
        adapted = inferred.adapt(x.clone(), torch.tensor([0, 0, 1, 1]), steps=2)
        torch.testing.assert_close(inferred.predict(adapted, queries.clone()), expected)
    adapted = run.adapt(x.double().numpy(), [0, 0, 1, 1], steps=2)
    torch.testing.assert_close(run.predict(adapted, queries.double(), context=x.double()),
                               run.predict(adapted, queries, context=x))
    with pytest.raises(fastmaml.errors.ShapeError, match="support images are torch.uint8, not "
                       "floating point: run.preprocess"):
        run.adapt((x * 255).byte(), [0, 0, 1, 1])
    size = x.shape[-1]
    with pytest.raises(fastmaml.errors.ShapeError, match=rf"query images are \(1, 3, {size + 4}, "
                       rf"{size + 4}\), but this run takes \(N, 3, {size}, {size}\)"):
        run.predict(adapted, torch.rand(1, 3, size + 4, size + 4))
    with pytest.raises(fastmaml.errors.ShapeError, match="labels must be a non-empty 1-d integer"):
        run.adapt(x, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(fastmaml.errors.ShapeError, match=r"support labels must be numbers .*got "
                       r"list: .*; labels are the class indices 0..N-1: map the class names"):
        run.adapt(x, ["cat", "cat", "dog", "dog"])
    with pytest.raises(fastmaml.errors.ShapeError, match="query images must be numbers .*got "
                       "list: .*; image files and PIL images go through run.preprocess first"):
        run.predict(adapted, [queries, "photo.png"])
    with pytest.raises(fastmaml.errors.ShapeError, match="support images must be numbers .*; "
                       r"stack a list of tensors into one: torch.stack\(tensors\)"):
        run.adapt(list(x), [0, 0, 1, 1])
    with pytest.raises(fastmaml.errors.DataError, match="preprocess reads image files or PIL "
                       "images, got ndarray .*PIL.Image.fromarray"):
        run.preprocess([np.zeros((size, size, 3), dtype=np.uint8)])
    with pytest.raises(fastmaml.errors.DataError, match="preprocess reads image files or PIL "
                       "images, got int"):
        run.preprocess(3)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with pytest.raises(fastmaml.errors.DataError, match=r"the bytes of an image file as item 1, "
                       r"where it reads a path: .*PIL.Image.open\(io.BytesIO\(data\)\)"):
        run.preprocess([Image.new("RGB", (4, 4)), png.getvalue()])
    with pytest.raises(fastmaml.errors.DataError, match=r"cannot read 1 of 2 images \(replace "
                       r"or delete it\): image 0: the image is empty \(0x0 pixels\)$"):
        run.preprocess([Image.new("RGB", (0, 0)), Image.new("RGB", (4, 4))])
    with pytest.raises(fastmaml.errors.ConfigError, match="adapted must be what run.adapt "
                       r"returns, got dict \(MAML.adapt's parameters go to run.maml.predict"):
        run.predict(run.maml.adapt(x, torch.tensor([0, 0, 1, 1])), queries)
    with pytest.raises(fastmaml.errors.ConfigError, match=r"got Adapted: a run's adaptation "
                       "goes to run.predict"):
        run.maml.predict(adapted, queries)


def test_images_outside_the_runs_pixel_range_are_warned_of(image_run: Path,
                                                          tmp_path: Path) -> None:
    """Float pixels of 0..255, or standardised ones, are not what the run was trained on."""
    run = fastmaml.load_run(image_run)
    support, _ = task_folders(tmp_path, ["color0", "color1"], shots=1, queries=0)
    x, y = run.preprocess(sorted(support.rglob("*.png"))), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own input: no warning
        adapted = run.adapt(x, y)
        run.predict(adapted, x, context=x)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"support images hold values from "
                      r"\d+(\.\d+)? to \d+(\.\d+)?, but this run was trained on pixels scaled "
                      r"to \[0, 1\]"):
        run.adapt(x * 255, y)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="query images hold values from -"):
        run.predict(adapted, (x - x.mean()) / x.std(), context=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.predict(adapted, x[:0], context=x).shape == (0, 2)  # no images, no range


def test_light_strokes_on_dark_are_warned_of_where_the_run_inverts(tmp_path: Path) -> None:
    """An Omniglot-like run (invert=true) given white strokes on black, as MNIST draws them."""
    image_format = ImageFormat("L", 8, invert=True)
    strokes = np.full((8, 8), 255, np.uint8)
    strokes[2:6, 3] = 0  # a dark stroke on white
    for name, pixels in (("dark-on-light", strokes), ("light-on-dark", 255 - strokes)):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    run = fastmaml.adaptation.TrainedRun(tmp_path, None, "classification", 2, 1, image_format,
                                         torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.preprocess(tmp_path / "dark-on-light.png").mean() < 0.5
    light_on_dark = str(tmp_path / "light-on-dark.png")
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=rf"1 of the 2 images \("
                      rf"{re.escape(light_on_dark)}\) look like light strokes on a dark "
                      r"background: after this run's inversion \(invert=true\) their pixels "
                      r"average up to 0\.94 of white, .* invert them first"):
        run.preprocess([tmp_path / "dark-on-light.png", light_on_dark])


def test_blank_images_are_warned_of_as_the_training_loader_warns(tmp_path: Path) -> None:
    """White strokes on a transparent background come out all white, as a viewer shows them:
    a support set of such images would be adapted to as if nothing were wrong."""
    strokes = np.zeros((8, 8, 4), np.uint8)
    strokes[2:6, 3] = 255  # opaque white strokes, transparent elsewhere
    Image.fromarray(strokes, "RGBA").save(tmp_path / "white-on-transparent.png")
    Image.fromarray(255 - np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "drawn.png")
    run = fastmaml.adaptation.TrainedRun(tmp_path, None, "classification", 2, 1,
                                         ImageFormat("L", 8, invert=True), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.preprocess(tmp_path / "drawn.png")
    blank = str(tmp_path / "white-on-transparent.png")
    with pytest.warns(fastmaml.tasks.folder.BlankImagesWarning,
                      match=rf"^1 of 2 images are one flat colour as read \(e\.g\. "
                            rf"{re.escape(blank)}\), .* light strokes on a transparent"):
        run.preprocess([tmp_path / "drawn.png", blank])


def test_preprocessing_equals_the_training_loader_bit_for_bit(image_run: Path) -> None:
    run = fastmaml.load_run(image_run)
    experiment = load_experiment(image_run)
    data = Path(experiment.cfg.data_root)
    split = experiment.split("train")
    images = split.images[0]  # the first training class, as the sampler reads it
    files = sorted((data / split.names[0]).iterdir())
    assert torch.equal(run.preprocess(files), as_model_input(images))
    assert torch.equal(run.preprocess(str(files[0])), as_model_input(images[:1]))  # one image
    assert torch.equal(run.preprocess(bytes(files[0])), as_model_input(images[:1]))  # os.fsencode
    assert torch.equal(run.preprocess(f for f in files), as_model_input(images))  # a generator
    with Image.open(files[1]) as image:  # a PIL image, and one in another mode and size
        assert torch.equal(run.preprocess([image]), as_model_input(images[1:2]))
        assert run.preprocess([image.convert("LA").resize((40, 30))]).shape == (1, 3, 12, 12)


def test_regression_run_from_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "sine"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=50",
                 "baseline_iterations=1", "--no-progress"]) == 0
    capsys.readouterr()
    x = np.linspace(-4, 4, 10)
    (tmp_path / "support.csv").write_text("x,y\n" + "".join(f"{v},{np.sin(v)}\n" for v in x))
    (tmp_path / "query.csv").write_text("".join(f"{v},{np.sin(v)}\n" for v in (-1.667, 0.1, 2.0)))
    (tmp_path / "inputs.csv").write_text("x\n1.5\n")
    plot = tmp_path / "figure.png"
    code, out, err = adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"),
                           "--query", str(tmp_path / "query.csv"), "--plot", str(plot))
    assert code == 0 and "support points too" not in err, err
    (tmp_path / "known.csv").write_text(f"0.5,0.4\n{x[0]},{np.sin(x[0])}\n")
    assert adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"), "--query",
                 str(tmp_path / "known.csv"))[2].startswith(
        "fastmaml: warning: 1 of the 2 query points are support points too (e.g. -4,0.756802): "
        "the adaptation was fitted to them, so the MSE on them says nothing")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["x", "prediction", "y"] and len(rows) == 3
    assert [r["x"] for r in rows] == ["-1.667", "0.1", "2.0"]  # as written, not float32's noise
    mse = np.mean([(float(r["prediction"]) - float(r["y"])) ** 2 for r in rows])
    assert f"MSE {mse:.4g}" in err and plot.stat().st_size > 0
    code, out, err = adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"),
                           "--query", str(tmp_path / "inputs.csv"), "--format", "json")
    document = json.loads(out)
    assert document["mse"] is None and document["predictions"][0]["x"] == 1.5
    code, out, err = adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"),
                           "--query", str(tmp_path / "inputs.csv"), "--out",
                           str(tmp_path / "predicted.JSON"))  # the format its name says
    assert code == 0 and json.loads((tmp_path / "predicted.JSON").read_text()) == document
    code, out, err = adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"),
                           "--query", str(tmp_path / "inputs.csv"), "--norm", "query")
    assert (code, out) == (2, "") and err == (
        f"fastmaml: error: --norm query is for runs whose model has batch norm; {run}'s has "
        "none, so each query prediction is independent of the others (--norm each) anyway\n")
    assert adapt(capsys, str(run), "--support", str(tmp_path / "support.csv"), "--query",
                 str(tmp_path / "inputs.csv"), "--norm", "each")[0] == 0  # what it does anyway
    trained = fastmaml.load_run(run)
    assert trained.steps == 10 and document["steps"] == 10  # the run's eval_inner_steps
    config = (run / "config.yaml").read_text()
    assert "\niterations: 50\n" in config  # as if training to 60 were under way
    (run / "config.yaml").write_text(config.replace("\niterations: 50\n", "\niterations: 60\n"))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="trained to iteration 50 of 60"):
        fastmaml.load_run(run, "cpu")
    adapted = trained.adapt(torch.tensor(x, dtype=torch.float32)[:, None],
                            torch.tensor(np.sin(x), dtype=torch.float32))
    assert document["predictions"][0]["prediction"] == pytest.approx(
        float(trained.predict(adapted, torch.tensor([[1.5]]))), abs=1e-6)
    from_numpy = trained.adapt(x[:, None], np.sin(x))  # float64, as np.loadtxt reads a CSV
    assert float(trained.predict(from_numpy, np.array([[1.5]]))) == pytest.approx(
        float(trained.predict(adapted, torch.tensor([[1.5]]))), abs=1e-6)
    flat = trained.adapt(x, np.sin(x))  # one input feature: points may come as (N,)
    assert float(trained.predict(flat, np.array([1.5]))) == pytest.approx(
        float(trained.predict(adapted, torch.tensor([[1.5]]))), abs=1e-6)
    with pytest.raises(fastmaml.errors.ShapeError, match=r"the support values are \(2, 5, 1\), "
                       r"but a regression task's are \(N,\) or \(N, features\)"):
        trained.adapt(np.zeros((2, 5, 1)), np.zeros((2, 5, 1)))  # a batch of tasks
    with pytest.raises(fastmaml.errors.DataError, match="the support targets hold a NaN or "
                       "infinite value"):
        trained.adapt(x, np.full(len(x), np.inf))
    with pytest.raises(fastmaml.errors.DataError, match="the query inputs hold a NaN"):
        trained.predict(adapted, np.array([[np.nan]]))
    # points far off the training data's scale: the steps diverge, said as such, not NaN rows
    (tmp_path / "far.csv").write_text("x,y\n1000,500\n2000,800\n3000,1200\n")
    code, out, err = adapt(capsys, str(run), "--support", str(tmp_path / "far.csv"),
                           "--query", str(tmp_path / "inputs.csv"), "--format", "json")
    assert (code, out) == (2, "")  # (after the warning of the edited iterations above)
    assert err.splitlines()[-1].startswith("fastmaml: error: the adaptation diverged: after 10 "
                                           "inner step(s) on this support set")
    # on an accelerator training's engine has no per-call check; an adaptation checks anyway
    def as_on_an_accelerator(*args: Any, **kwargs: Any) -> fastmaml.MAML:
        maml = build_maml(*args, **kwargs)
        maml.check_finite = False
        return maml

    monkeypatch.setattr("fastmaml.experiments.sinusoid.build_maml", as_on_an_accelerator)
    with pytest.raises(fastmaml.errors.NonFiniteLossError, match=r"the adaptation diverged: "
                       r"after 10 inner step\(s\) on this support set"):
        fastmaml.load_run(run).adapt(np.array([1000.0, 2000, 3000]), np.array([500.0, 800, 1200]))


def test_outputs_never_replace_a_runs_own_files(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "sine"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=2",
                 "baseline_iterations=2", "eval_tasks=4", "eval_k_shots=5", "tensorboard=true",
                 "--no-progress"]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0 and main(["plot", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "support.csv").write_text("x,y\n0,0\n1,0.8\n2,0.9\n")
    (tmp_path / "query.csv").write_text("x\n0.5\n")
    task = ["--support", str(tmp_path / "support.csv"), "--query", str(tmp_path / "query.csv")]
    owned = sorted(path for path in run.rglob("*") if path.is_file())  # train, eval, plot's
    assert {"config.yaml", "eval.json", "eval-history.jsonl", "machine.json", "results.md",
            "metrics-maml.csv", "maml.pt"} <= {path.name for path in owned}
    (tmp_path / "link.csv").symlink_to(run / "config.yaml")  # a way in from outside
    contents = {path: path.read_bytes() for path in owned}
    for path in [*owned, tmp_path / "link.csv", run / "checkpoints" / "new.csv"]:
        code, out, err = adapt(capsys, str(run), *task, "--out", str(path))
        assert (code, out) == (2, "") and "own" in err, (path, err)
    assert adapt(capsys, str(run), *task, "--plot", str(run / "figures" / "task.png"))[0] == 2
    assert main(["report", str(run), "--out", str(run / "results.md")]) == 2
    assert capsys.readouterr().err == (f"fastmaml: error: --out {run / 'results.md'} is {run}'s "
                                       "own file, which fastmaml keeps there: write to another "
                                       "file\n")
    assert {path: path.read_bytes() for path in owned} == contents
    code, out, err = adapt(capsys, str(run), *task, "--out", str(run / "predictions.csv"))
    assert code == 0, err  # a file of its own beside the run's
    assert (run / "predictions.csv").read_text().startswith("x,prediction\n")
    code, out, err = adapt(capsys, str(run), *task, "--out", str(tmp_path / "task.png"))
    assert code == 2 and "adapt writes CSV or JSON, not what the name's .png says" in err
    assert not (tmp_path / "task.png").exists()
    code, out, err = adapt(capsys, str(run), *task, "--out", str(tmp_path / "p.dat"),
                           "--format", "csv")
    assert code == 0 and (tmp_path / "p.dat").read_text().startswith("x,prediction\n")


@pytest.mark.parametrize("case, message", [
    ("empty class", "support class folder .*empty.* holds no images"),
    ("unreadable image", r"cannot read 1 of 4 images \(replace or delete it\): .*broken.png"),
    ("no checkpoint", "has no trained model .*maml.pt is missing"),
    ("csv to an image run", "is a file, but this is an image run"),
    ("query file without suffix", "the query set .*photo is a file, but this is an image run: "
                                  "give a folder of images or one image file, its name ending "
                                  r"in a format's suffix .*\(e.g. .png or .jpg: rename it"),
    ("too many classes", "has 4 classes, but the run was trained 3-way"),
    ("unknown query class", r"color7 in .* are not support classes \(color0, color1, color2\)$"),
    ("query class of another case", r"Color1, color7 in .* are not support classes \(color0, "
                                    r"color1, color2\); only the case differs: Color1 for "
                                    "color1$"),
    ("negative steps", "steps must be an integer >= 0, got -1"),
    ("one class", "support set has one class"),
    ("twin file names", "support images a.jpg, a.png in .* would be classes of the same name"),
    ("edited config", "config.yaml sets hidden=16, but .*maml.pt was trained with hidden=8"),
    ("not a checkpoint", "cannot read the checkpoint .*maml.pt"),
    ("out is a folder", "--out .* is a folder"),
    ("figure format", r"cannot draw a figure to .*p.xyz: name a file ending in one of .*\.png"),
    ("out under a file", r"cannot write --out .*afile/p.csv: .*afile is a file, not a folder"),
    ("figure under a file", r"cannot write the figure .*afile/p.png: .*afile is a file, not a "),
])
def test_bad_input_is_one_line_and_writes_nothing(image_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  case: str, message: str) -> None:
    support, query = task_folders(tmp_path, ["color0", "color1", "color2"], shots=1, queries=1)
    run, steps, options = image_run, "2", []
    out_file = tmp_path / "predictions.csv"
    if case in ("edited config", "not a checkpoint"):
        run = tmp_path / "copy"
        (run / "checkpoints").mkdir(parents=True)
        config = (image_run / "config.yaml").read_text()
        (run / "config.yaml").write_text(config.replace("hidden: 8", "hidden: 16")
                                         if case == "edited config" else config)
        checkpoint = run / "checkpoints" / "maml.pt"
        checkpoint.write_bytes((image_run / "checkpoints" / "maml.pt").read_bytes())
        if case == "not a checkpoint":
            torch.save(torch.zeros(3), checkpoint)
    if case == "empty class":
        (support / "empty").mkdir()
    elif case == "unreadable image":
        (support / "color0" / "broken.png").write_bytes(b"\x89PNG garbage")
    elif case == "no checkpoint":
        run = tmp_path / "copy"
        run.mkdir()
        (run / "config.yaml").write_text((image_run / "config.yaml").read_text())
    elif case == "csv to an image run":
        support = tmp_path / "points.csv"
        support.write_text("x,y\n1,2\n")
    elif case == "query file without suffix":
        query = tmp_path / "photo"
        query.write_bytes(next((tmp_path / "query").rglob("*.jpg")).read_bytes())
    elif case == "too many classes":
        write_image(support / "color3" / "s.png", COLORS["color3"], 1)
    elif case in ("unknown query class", "query class of another case"):
        write_image(query / "color7" / "q.png", COLORS["color7"], 1)
        if case == "query class of another case":
            (query / "color1").rename(query / "Color1")
    elif case == "one class":
        support, query = support / "color0", query / "color0"
    elif case == "twin file names":
        support = tmp_path / "flat"
        write_image(support / "a.png", COLORS["color0"], 1)
        write_image(support / "a.jpg", COLORS["color1"], 1)
    elif case == "out is a folder":
        out_file = tmp_path / "predictions"
        out_file.mkdir()
    elif case == "figure format":
        options = ["--plot", str(tmp_path / "p.xyz")]
    elif case in ("out under a file", "figure under a file"):
        (tmp_path / "afile").write_text("")
        if case == "out under a file":
            out_file = tmp_path / "afile" / "p.csv"
        else:
            options = ["--plot", str(tmp_path / "afile" / "p.png")]
    elif case == "negative steps":
        steps = "-1"
    code, out, err = adapt(capsys, str(run), "--support", str(support), "--query", str(query),
                           "--out", str(out_file), "--steps", steps, *options)
    assert code == 2 and out == ""
    assert err.startswith("fastmaml: error:") and err.count("\n") == 1
    assert re.search(message, err), err
    assert out_file.is_dir() if case == "out is a folder" else not out_file.exists()
    assert not list(tmp_path.glob(".predictions*"))


def test_an_image_folder_given_to_a_regression_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "sine"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=2",
                 "baseline_iterations=1", "--no-progress"]) == 0
    (tmp_path / "images").mkdir()
    (tmp_path / "query.csv").write_text("x\n1\n")
    code, _, err = adapt(capsys, str(run), "--support", str(tmp_path / "images"),
                         "--query", str(tmp_path / "query.csv"))
    assert code == 2 and "is a folder, but this is a regression run" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_trained_run_adapts_on_a_cpu_with_device_cpu(image_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    run = tmp_path / "gpu-run"
    (run / "checkpoints").mkdir(parents=True)
    config = (image_run / "config.yaml").read_text()
    assert "device: auto" in config
    (run / "config.yaml").write_text(config.replace("device: auto", "device: cuda"))
    checkpoint = (image_run / "checkpoints" / "maml.pt").read_bytes()
    (run / "checkpoints" / "maml.pt").write_bytes(checkpoint)
    support, query = task_folders(tmp_path, ["color0", "color1"], shots=1, queries=1)
    code, _, err = adapt(capsys, str(run), "--support", str(support), "--query", str(query))
    assert code == 2 and "CUDA is not available here" in err and "--device cpu" in err
    code, out, err = adapt(capsys, str(run), "--support", str(support), "--query", str(query),
                           "--device", "cpu")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 2, err


def test_threads_sharing_a_run_get_each_their_own_tasks_predictions(image_run: Path) -> None:
    """adapt and predict swap parameters into the run's one model: threads take turns."""
    run = fastmaml.load_run(image_run)
    generator = torch.Generator().manual_seed(0)
    shape = (4, 3, run.image_format.size, run.image_format.size)
    tasks = [(torch.rand(shape, generator=generator), torch.tensor([0, 0, 1, 1]))
             for _ in range(8)]
    queries = torch.rand(shape, generator=generator)
    serial = [run.predict(run.adapt(x, y), queries) for x, y in tasks]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(lambda task: run.predict(run.adapt(*task), queries), tasks))
    finally:
        sys.setswitchinterval(interval)
    for one, other in zip(serial, threaded):
        torch.testing.assert_close(one, other)
    for copied in (copy.deepcopy(run), pickle.loads(pickle.dumps(run))):  # each its own turns
        torch.testing.assert_close(copied.predict(copied.adapt(*tasks[0]), queries), serial[0])


def test_a_run_trained_from_python_is_the_commands_and_comes_back_loaded(
        image_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``fastmaml.meta_train`` takes the command line's settings as keyword arguments (lists, a
    bool, a path), trains as ``fastmaml train`` (the same checkpoint, bit for bit), resumes the
    run on a second call and returns it ready to adapt, leaving torch's generator and threads
    as they were; ``progress=False`` prints nothing."""
    data = Path(load_experiment(image_run).cfg.data_root)
    settings = dict(n_way=3, k_shot=1, k_query=2, image_size=12, channels=3, hidden=8,
                    meta_batch=4, val_every=0, log_every=20, split_fractions=[0.625, 0, 0.375],
                    eval_inner_steps=5, progress=False)
    run = fastmaml.meta_train("fewshot-folder", tmp_path / "run", data_root=data, iterations=20,
                              first_order=False, **settings)
    assert isinstance(run, fastmaml.TrainedRun) and run.steps == 5
    torch.manual_seed(123)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    fastmaml.meta_train("fewshot-folder", tmp_path / "threads", data_root=data,
                        **{**settings, "iterations": 1, "threads": threads + 1})
    assert torch.equal(torch.rand(3), drawn) and torch.get_num_threads() == threads
    run = fastmaml.meta_train("fewshot-folder", tmp_path / "run", iterations=40,
                              progress=False)
    assert capsys.readouterr().out == ""
    for ours, theirs in zip(run.maml.state_dict().values(),
                            fastmaml.load_run(image_run).maml.state_dict().values()):
        assert torch.equal(ours, theirs)
    support, _ = task_folders(tmp_path / "task", ["color6", "color7"], 1, 1)
    images = sorted(support.rglob("*.png"))
    adapted = run.adapt(run.preprocess(images), torch.tensor([0, 1]))
    assert run.predict(adapted, run.preprocess(images)).shape == (2, 2)
    fastmaml.meta_train("fewshot-folder", tmp_path / "run")  # done: says so
    assert f"training fewshot-folder in {tmp_path / 'run'}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"adapt prefix\(es\) 'nowhere' match no trainable"):
        fastmaml.meta_train("fewshot-folder", tmp_path / "anil", data_root=data,
                            adapt=["nowhere", "head"], **settings)  # a list of name prefixes
    with pytest.raises(ConfigError, match="'iterations' expects int, got 'many'"):
        fastmaml.meta_train("fewshot-folder", tmp_path / "run", iterations="many")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun trains one run over the ranks: call "
                                          r"fastmaml.distributed.init_from_env\(\) first"):
        fastmaml.meta_train("fewshot-folder", tmp_path / "other", data_root=data)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not a number of processes"):
        fastmaml.meta_train("fewshot-folder", tmp_path / "other", data_root=data)
