"""How far float32 rounding takes a trained few-shot run's meta-gradient, eager and compiled, from
float64.

    python benchmarks/compiled_rounding.py RUN_DIR [--batches 16] [--seed 123]

Near a minimum the mean meta-gradient is small beside the per-task terms it sums, so rounding
that is negligible at initialisation grows large beside it. For each of ``--batches`` of the
run's meta-training batches, at its last checkpoint, the meta-gradient is computed by the
uncompiled batched path (``meta_loss`` and autograd) in float32 and in float64, and by the
compiled graph in float32 and in float64: the last tells rounding from a wrong graph. The
learner's own check of the graph is turned off here (an infinite tolerance), so that every
compiled call is the graph's. The figures size ``COMPILED_TOLERANCE`` and ``COMPILED_CHECKS``
(``fastmaml.paths``).
"""
from __future__ import annotations

import argparse
import math
import statistics
import warnings
from pathlib import Path

import torch

import fastmaml.paths
from fastmaml import MAML, TaskBatch
from fastmaml.experiments import load_experiment
from fastmaml.experiments.base import Experiment


def trained(run_dir: Path, compile: bool) -> tuple[MAML, Experiment]:
    """The run's learner at its checkpoint, on the batched path, and its experiment."""
    experiment = load_experiment(run_dir, [f"compile={str(compile).lower()}", "path=batched"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "restored ... used as it is now" and the like
        return experiment.restore(experiment.learners()[0]).module, experiment


def gradient(maml: MAML, batch: TaskBatch) -> tuple[torch.Tensor, float]:
    """The meta-gradient, flattened in float64, and the meta-loss."""
    maml.zero_grad(set_to_none=True)
    loss, _ = maml.meta_backward(batch)
    return torch.cat([p.grad.flatten() for p in maml.parameters()
                      if p.grad is not None]).double(), loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=123, help="draws the batches")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastmaml.paths.COMPILED_TOLERANCE = math.inf  # every compiled call is the graph's own
    compiled, experiment = trained(args.run_dir, compile=True)
    sampler = experiment.sampler("train", experiment.cfg.k_query)
    eager, _ = trained(args.run_dir, compile=False)
    exact, _ = trained(args.run_dir, compile=False)
    exact_graph, _ = trained(args.run_dir, compile=True)
    exact.double(), exact_graph.double()
    generator = torch.Generator().manual_seed(args.seed)
    columns = ("compiled-eager", "compiled-fp64", "eager-fp64", "compiled64-fp64")
    rows = []
    print(f"{'batch':>5}{'loss':>9}{'|grad|':>10}" + "".join(f"{c:>17}" for c in columns))
    for index in range(args.batches):
        batch = sampler.sample(experiment.cfg.meta_batch, generator)
        graph, loss = gradient(compiled, batch)
        plain, _ = gradient(eager, batch)
        batch64 = TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch))
        reference, _ = gradient(exact, batch64)
        graph64, _ = gradient(exact_graph, batch64)
        row = [(graph - plain).norm() / plain.norm(), *((g - reference).norm() / reference.norm()
                                                        for g in (graph, plain, graph64))]
        rows.append([r.item() for r in row])
        print(f"{index:>5}{loss:>9.4f}{reference.norm().item():>10.2e}"
              + "".join(f"{r:>17.2e}" for r in rows[-1]), flush=True)
    for name, summary in (("median", statistics.median), ("max", max)):
        print(f"{name:>24}" + "".join(f"{summary(col):>17.2e}" for col in zip(*rows)))


if __name__ == "__main__":
    main()
