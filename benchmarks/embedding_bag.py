"""First-order MAML on a bag-of-words text model (``nn.EmbeddingBag``): fastmaml's composed bag
(``fastmaml.embeddings``) batched, looped and on the path its default search picks, against
torch's own kernel, batched (``vmap`` has no batching rule for it: a per-task fallback) and
looped. Medians of interleaved repeats, in one process.
Second order has no torch reference: torch's kernel has no second derivative.

    python benchmarks/embedding_bag.py [--repeats 7]    # 16 tasks, 5-way, 5 + 15 bags of 40 tokens
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fastmaml.probe
from fastmaml import MAML, TaskBatch

VOCABULARY, WIDTH, WAYS, TASKS, SHOTS, QUERIES, TOKENS = 5000, 64, 5, 16, 5, 15, 40


class BagOfWords(nn.Module):
    """Token bags (padding 0) -> class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCABULARY, WIDTH, mode="mean", padding_idx=0)
        self.head = nn.Linear(WIDTH, WAYS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bag(tokens)))


def task_batch() -> TaskBatch:
    generator = torch.Generator().manual_seed(0)

    def tokens(bags: int) -> torch.Tensor:
        return torch.randint(0, VOCABULARY, (TASKS, bags, TOKENS), generator=generator)

    def labels(bags: int) -> torch.Tensor:
        return torch.randint(0, WAYS, (TASKS, bags), generator=generator)
    return TaskBatch(tokens(SHOTS), labels(SHOTS), tokens(QUERIES), labels(QUERIES))


PATHS = {"batched": True, "looped": False, "default": None}


def learner(kind: str, batch: TaskBatch) -> MAML:
    """``composed-<path>`` (fastmaml's form), or torch's kernel ``torch-<path>`` (the probe told
    that the model calls no embedding bag), after one warm-up call (the default's path search)."""
    form, path = kind.split("-")
    composes = fastmaml.probe.composes_bag
    if form == "torch":
        fastmaml.probe.composes_bag = lambda *args, **kwargs: False
    try:
        torch.manual_seed(0)
        maml = MAML(BagOfWords(), F.cross_entropy, 0.4, 1, first_order=True,
                    batched=PATHS[path])
        maml.meta_backward(batch)
    finally:
        fastmaml.probe.composes_bag = composes
    return maml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # vmap's fallback warns at every call
    batch = task_batch()
    learners = {kind: learner(kind, batch) for kind in (
        "composed-default", "composed-batched", "composed-looped", "torch-batched",
        "torch-looped")}
    times: dict[str, list[float]] = {kind: [] for kind in learners}
    for _ in range(args.repeats):
        for kind, maml in learners.items():
            maml.zero_grad()
            start = time.perf_counter()
            maml.meta_backward(batch)
            times[kind].append(time.perf_counter() - start)
    reference = statistics.median(times["torch-looped"])
    for kind, samples in times.items():
        median = statistics.median(samples)
        path = f" ({learners[kind].path})" if kind.endswith("default") else ""
        print(f"{kind + path:34s} median {median * 1e3:8.1f} ms per meta-iteration, "
              f"x{reference / median:.2f} against torch's kernel looped")


if __name__ == "__main__":
    main()
