"""Meta-training where the input shape changes from batch to batch, as where K is drawn per batch.

    python benchmarks/varying_shapes.py [--iterations 300] [--max-shots 20] [--repeats 3]

A sinusoid-sized MLP (1-40-40-1, one inner step, second order) meta-trains on ``--iterations``
meta-batches of 25 tasks, each with its own support and query sizes drawn from 1..``--max-shots``
(so up to ``max_shots**2`` shapes). Timed, in this process, on one stream of batches: the default
path search (``MAML()``), which times the candidates for the first few shapes and gives a later
one near a searched shape that shape's path; ``batched=True`` (vmap, all tasks in one chunk);
and the looped reference (``batched=False``). Printed: each one's wall time (the best of
``--repeats``, each from a new learner in a process without earlier choices) and its speed
against the loop's.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmaml.paths
from fastmaml import MAML, TaskBatch


def batches(iterations: int, max_shots: int) -> list[TaskBatch]:
    """Sinusoid meta-batches of 25 tasks whose support and query sizes are drawn per batch."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(iterations):
        support, query = torch.randint(1, max_shots + 1, (2,), generator=generator).tolist()
        amplitude = 0.1 + 4.9 * torch.rand(25, 1, 1, generator=generator)
        phase = torch.pi * torch.rand(25, 1, 1, generator=generator)
        xs, xq = (10 * torch.rand(25, n, 1, generator=generator) - 5 for n in (support, query))
        out.append(TaskBatch(xs, amplitude * torch.sin(xs + phase),
                             xq, amplitude * torch.sin(xq + phase)))
    return out


def train_seconds(stream: list[TaskBatch], batched: bool | None) -> tuple[float, str]:
    """Wall time of ``meta_backward`` and an SGD step over ``stream`` by a new learner, and the
    number of shapes it searched."""
    fastmaml.paths._PATHS_CHOSEN.clear()  # no choices of an earlier learner of this process
    fastmaml.paths._SHAPES_SEARCHED.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1))
    maml = MAML(model, F.mse_loss, inner_lr=0.01, batched=batched)
    optimizer = torch.optim.SGD(maml.parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch in stream:
        optimizer.zero_grad()
        maml.meta_backward(batch)
        optimizer.step()
    searched = sum(len(shapes) for shapes in maml.searched_shapes.values())
    return time.perf_counter() - start, f" ({searched} shapes searched)" if batched is None else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--max-shots", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stream = batches(args.iterations, args.max_shots)
    shapes = len({tuple(tuple(t.shape) for t in batch) for batch in stream})
    print(f"{args.iterations} meta-batches of 25 tasks, {shapes} shapes, "
          f"{torch.get_num_threads()} thread")
    timings = {}
    for _ in range(args.repeats):  # interleaved, so that a noisy moment hits every path alike
        for name, batched in (("looped", False), ("batched=True", True), ("default", None)):
            seconds, note = train_seconds(stream, batched)
            if seconds < timings.get(name, (float("inf"),))[0]:
                timings[name] = seconds, note
    for name, (seconds, note) in timings.items():
        print(f"{name:>13}: {seconds:7.2f} s, {timings['looped'][0] / seconds:5.2f}x the loop"
              + note, flush=True)


if __name__ == "__main__":
    main()
