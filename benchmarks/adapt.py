"""Adapting a trained run to a new task: time after the model is loaded, and the BN choice.

    python benchmarks/adapt.py [--run results/omniglot-20w1s-lake] [--repeats 20] [--bn-tasks 200]
        [--loss-tasks 200 --ways 2,5 [--unbalanced]] [--no-timing]

Builds a 20-way 1-shot task of real Omniglot evaluation characters on disk (one support and one
query image per class, as ``fastmaml adapt`` reads them) and times ``predict_files``: reading
and preprocessing the 40 PNGs, adapting for the run's evaluation steps and predicting the 20
query images. Prints the median and the range over ``--repeats`` calls, the split into the three
parts, and the time of the whole ``fastmaml adapt`` command (a new process: imports and model
loading included).

``--bn-tasks N`` compares, on N fixed meta-test tasks of the run, the accuracy of the paper's
protocol (batch norm over the whole query batch) with ``adapt``'s (each query image normalised
together with the support set alone).

``--ways 2,5`` (with ``--loss-tasks N``) adapts to the first 2 and 5 classes of N fixed
meta-test tasks, and ``--unbalanced`` to tasks whose class 0 keeps all its shots and the other
classes one each: ``adapt``'s inner loss (each class weighing as one of the run's n_way) against
a plain mean cross-entropy over the task's examples, both with the two batch-norm choices.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmaml import load_run
from fastmaml.adaptation import Adapted, predict_files
from fastmaml.experiments import load_experiment
from fastmaml.tasks.omniglot import omniglot_characters

REPO = Path(__file__).resolve().parents[1]


def write_task(data_root: Path, folder: Path, n_way: int) -> None:
    """support/<character>/ and query/<character>/ with one PNG each, from n_way evaluation
    characters spread over the alphabets."""
    characters = [c for c in omniglot_characters(data_root) if c.parts[-3] == "images_evaluation"]
    for character in characters[::len(characters) // n_way][:n_way]:
        pngs = sorted(character.glob("*.png"))
        name = f"{character.parent.name}-{character.name}"
        for role, png in (("support", pngs[0]), ("query", pngs[1])):
            (folder / role / name).mkdir(parents=True)
            shutil.copy(png, folder / role / name / png.name)


def time_parts(run, folder: Path) -> dict[str, float]:  # noqa: ANN001 (a TrainedRun)
    """Seconds of preprocessing, adaptation and prediction of one task, each on its own."""
    support = sorted((folder / "support").glob("*/*.png"))
    query = sorted((folder / "query").glob("*/*.png"))
    start = time.perf_counter()
    support_x, query_x = run.preprocess(support), run.preprocess(query)
    read = time.perf_counter()
    adapted = run.adapt(support_x, torch.arange(len(support)))
    adapt = time.perf_counter()
    run.predict(adapted, query_x, context=support_x)
    done = time.perf_counter()
    return {"preprocess": read - start, "adapt": adapt - read, "predict": done - adapt}


def meta_test_tasks(run_dir: Path, tasks: int):  # noqa: ANN201 (run, task iterator)
    """The run loaded for adaptation, and ``tasks`` fixed meta-test tasks of it, one by one:
    (support x, support labels, query x, query labels)."""
    experiment = load_experiment(run_dir, ["threads=0", "tune_malloc=false"])
    sampler = experiment.sampler("test", experiment.cfg.eval_queries)
    return load_run(run_dir), ([t[0] for t in batch]
                               for batch in sampler.fixed_tasks(tasks, 2017, chunk=1))


def accuracies(run, adapted: Adapted, sx: torch.Tensor, qx: torch.Tensor,  # noqa: ANN001
               qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query accuracy with batch norm over the query batch, and over each image beside sx."""
    return tuple((run.predict(adapted, qx, context).argmax(-1) == qy).float().mean()
                 for context in (None, sx))


def print_accuracies(label: str, values: list[torch.Tensor], steps: int) -> None:
    values = torch.stack(values)
    ci = 1.96 * values.std(unbiased=False) / len(values) ** 0.5
    print(f"  {label}: {100 * values.mean():.2f} +- {100 * ci:.2f}% after {steps} steps")


def compare_batch_norm(run_dir: Path, tasks: int) -> None:
    run, task_iterator = meta_test_tasks(run_dir, tasks)
    pairs = [accuracies(run, run.adapt(sx, sy), sx, qx, qy) for sx, sy, qx, qy in task_iterator]
    for column, label in enumerate(("--norm query: the query batch (the paper's protocol)",
                                    "--norm each: each query image with the support set")):
        print_accuracies(label, [pair[column] for pair in pairs], run.steps)


def compare_inner_losses(run_dir: Path, tasks: int, ways: list[int], unbalanced: bool) -> None:
    """``adapt``'s class-weighted inner loss against a plain mean, on the first ``n`` classes of
    the run's meta-test tasks for each ``n`` in ``ways`` (and with unequal shots)."""
    run, task_iterator = meta_test_tasks(run_dir, tasks)
    task_list = list(task_iterator)
    cases = [(f"{n}-way tasks", n, False) for n in ways]
    if unbalanced:
        cases.append((f"{run.num_classes}-way tasks whose class 0 keeps all its shots and the "
                      "others one", run.num_classes, True))
    for name, n, uneven in cases:
        results: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            "adapt (each class as one of n_way)": [], "plain mean cross-entropy": []}
        for sx, sy, qx, qy in task_list:
            keep = sy < n
            if uneven:  # the first example of each class, and every one of class 0
                first = (sy[:, None] == sy).int().argmax(1)  # each example's class's first
                keep &= (sy == 0) | (torch.arange(len(sy), device=sy.device) == first)
            sx_n, sy_n, queries = sx[keep], sy[keep], qy < n
            plain = run.maml.adapt(sx_n, sy_n, run.steps,
                                   loss_fn=lambda logits, y: F.cross_entropy(logits[..., :n], y))
            for label, adapted in zip(results, (run.adapt(sx_n, sy_n), Adapted(plain, n))):
                results[label].append(accuracies(run, adapted, sx_n, qx[queries], qy[queries]))
        print(f"{name} ({tasks} meta-test tasks):")
        for label, pairs in results.items():
            for column, norm in enumerate(("query", "each")):
                print_accuracies(f"{label}, --norm {norm}", [p[column] for p in pairs],
                                 run.steps)


def time_adaptation(run_dir: Path, data_root: Path, repeats: int) -> None:
    """Time ``predict_files`` and its parts on a task of real Omniglot PNGs, and the command."""
    start = time.perf_counter()
    run = load_run(run_dir)
    print(f"run {run_dir}: {run.num_classes}-way, {run.steps} adaptation steps; loaded in "
          f"{time.perf_counter() - start:.2f} s; {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(data_root, folder, run.num_classes)
        totals = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict_files(run, folder / "support", folder / "query")
            totals.append(time.perf_counter() - start)
        parts = [time_parts(run, folder) for _ in range(repeats)]
        print(f"adapt + predict a {run.num_classes}-way 1-shot task, {run.num_classes} query "
              f"images (predict_files): median {statistics.median(totals):.3f} s, "
              f"range {min(totals):.3f}-{max(totals):.3f} s over {repeats} calls")
        print("  parts (median s): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in parts):.3f}" for k in parts[0]))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastmaml", "adapt", str(run_dir), "--support",
                        str(folder / "support"), "--query", str(folder / "query"),
                        "--out", str(folder / "out.csv")], check=True)
        print(f"the whole `fastmaml adapt` command (new process): "
              f"{time.perf_counter() - start:.2f} s")


def main() -> None:
    default_root = os.environ.get("FASTMAML_OMNIGLOT") or str(REPO.parent / "shared" / "data" / "omniglot")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "results" / "omniglot-20w1s-lake"))
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bn-tasks", type=int, default=0)
    parser.add_argument("--loss-tasks", type=int, default=0)
    parser.add_argument("--ways", default="", help="comma-separated class counts, e.g. 2,5")
    parser.add_argument("--unbalanced", action="store_true")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    args = parser.parse_args()
    if args.loss_tasks and not (args.ways or args.unbalanced):
        parser.error("--loss-tasks needs --ways or --unbalanced: the tasks to compare on")
    run_dir = Path(args.run)
    if not args.no_timing:
        time_adaptation(run_dir, Path(args.data_root), args.repeats)
    if args.bn_tasks:
        print(f"batch-norm statistics at prediction, {args.bn_tasks} meta-test tasks:")
        compare_batch_norm(run_dir, args.bn_tasks)
    if args.loss_tasks:
        compare_inner_losses(run_dir, args.loss_tasks,
                             [int(n) for n in args.ways.split(",") if n], args.unbalanced)


if __name__ == "__main__":
    main()
