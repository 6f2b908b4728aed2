"""Adapting a trained run to a new task: time after the model is loaded, and the BN choice.

    python benchmarks/adapt.py [--run results/omniglot-20w1s-lake] [--repeats 20] [--bn-tasks 200]

Builds a 20-way 1-shot task of real Omniglot evaluation characters on disk (one support and one
query image per class, as ``fastmaml adapt`` reads them) and times ``predict_files``: reading
and preprocessing the 40 PNGs, adapting for the run's evaluation steps and predicting the 20
query images. Prints the median and the range over ``--repeats`` calls, the split into the three
parts, and the time of the whole ``fastmaml adapt`` command (a new process: imports and model
loading included).

``--bn-tasks N`` compares, on N fixed meta-test tasks of the run, the accuracy of the paper's
protocol (batch norm over the whole query batch) with ``adapt``'s (each query image normalised
together with the support set alone).
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

from fastmaml import load_run
from fastmaml.adaptation import predict_files
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


def compare_batch_norm(run_dir: Path, tasks: int) -> None:
    experiment = load_experiment(run_dir, ["threads=0", "tune_malloc=false"])
    run = load_run(run_dir)
    cfg = experiment.cfg
    sampler = experiment.sampler("test", cfg.eval_queries)
    whole, alone = [], []
    for batch in sampler.fixed_tasks(tasks, 2017, chunk=1):
        sx, sy, qx, qy = (t[0] for t in batch)
        adapted = run.adapt(sx, sy)
        whole.append((run.predict(adapted, qx).argmax(-1) == qy).float().mean())
        alone.append((run.predict(adapted, qx, context=sx).argmax(-1) == qy).float().mean())
    for label, values in (("--norm query: the query batch (the paper's protocol)", whole),
                          ("--norm each: each query image with the support set", alone)):
        values = torch.stack(values)
        ci = 1.96 * values.std(unbiased=False) / len(values) ** 0.5
        print(f"  {label}: {100 * values.mean():.2f} +- {100 * ci:.2f}% after {run.steps} steps")


def main() -> None:
    default_root = os.environ.get("FASTMAML_OMNIGLOT") or str(REPO.parent / "shared" / "data" / "omniglot")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "results" / "omniglot-20w1s-lake"))
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bn-tasks", type=int, default=0)
    args = parser.parse_args()
    run_dir = Path(args.run)
    start = time.perf_counter()
    run = load_run(run_dir)
    print(f"run {run_dir}: {run.num_classes}-way, {run.steps} adaptation steps; loaded in "
          f"{time.perf_counter() - start:.2f} s; {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(Path(args.data_root), folder, run.num_classes)
        totals = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predict_files(run, folder / "support", folder / "query")
            totals.append(time.perf_counter() - start)
        parts = [time_parts(run, folder) for _ in range(args.repeats)]
        print(f"adapt + predict a {run.num_classes}-way 1-shot task, {run.num_classes} query "
              f"images (predict_files): median {statistics.median(totals):.3f} s, "
              f"range {min(totals):.3f}-{max(totals):.3f} s over {args.repeats} calls")
        print("  parts (median s): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in parts):.3f}" for k in parts[0]))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastmaml", "adapt", str(run_dir), "--support",
                        str(folder / "support"), "--query", str(folder / "query"),
                        "--out", str(folder / "out.csv")], check=True)
        print(f"the whole `fastmaml adapt` command (new process): "
              f"{time.perf_counter() - start:.2f} s")
    if args.bn_tasks:
        print(f"batch-norm statistics at prediction, {args.bn_tasks} meta-test tasks:")
        compare_batch_norm(run_dir, args.bn_tasks)


if __name__ == "__main__":
    main()
