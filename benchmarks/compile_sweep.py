"""A sweep of compiled learners in one process, as a researcher's hyperparameter loop runs it.

    python benchmarks/compile_sweep.py [--learners 11] [--repeats 15]

Each learner is a new ``MAML(compile=True)`` on a new sinusoid-sized MLP with its own inner
learning rate (a constant in the compiled graph, so a graph of its own). torch.compile keeps at
most ``torch._dynamo.config.recompile_limit`` (8) graphs per code object and runs the code
uncompiled beyond: where the learners share one, the ninth and later run uncompiled. Printed
per learner: its path, its first call (compiling) and the median of ``--repeats`` later calls
of ``meta_backward``, that median's ratio to the first learner's, and its meta-gradient's
largest difference from the looped (uncompiled) path's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import MAML, TaskBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    batch = TaskBatch(*(torch.randn(25, 10, 1, generator=generator) for _ in range(4)))
    first_median = None
    for learner in range(args.learners):
        inner_lr = 0.01 * (learner + 1)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        looped = MAML(model, F.mse_loss, inner_lr, batched=False)
        looped.meta_backward(batch)
        expected = [p.grad.clone() for p in looped.parameters()]
        maml = MAML(model, F.mse_loss, inner_lr, batched=True, compile=True)
        start = time.perf_counter()
        maml.zero_grad()
        maml.meta_backward(batch)
        first = time.perf_counter() - start
        difference = max((p.grad - g).abs().max().item()
                         for p, g in zip(maml.parameters(), expected))
        times = []
        for _ in range(args.repeats):
            maml.zero_grad()
            start = time.perf_counter()
            maml.meta_backward(batch)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        first_median = first_median or median
        print(f"learner {learner + 1:2d} (inner_lr {inner_lr:.2f}): {maml.path}, first call "
              f"{first:.2f} s, then {median * 1e3:.2f} ms ({median / first_median:.2f}x the "
              f"first learner's), max |grad - looped| {difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
