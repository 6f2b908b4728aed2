"""The data pipeline's share of an Omniglot meta-iteration (issue 3).

    python benchmarks/data_pipeline.py [--data-root ../shared/data/omniglot] [--repeats 20]

Times ``FewShotSampler.sample`` (meta-train tasks drawn from the in-memory image tensor, with
rotations) against one second-order fastmaml meta-iteration on the batch it returns, interleaved,
for the paper's 5-way 1-shot (meta-batch 32) and 20-way 1-shot (meta-batch 16, 5 steps) settings.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmaml import MAML
from fastmaml.models import ConvNet
from fastmaml.tasks.fewshot import FewShotSampler
from fastmaml.tasks.omniglot import load_omniglot

SETTINGS = {"omniglot-5w1s": dict(n_way=5, meta_batch=32, steps=1, lr=2.0),
            "omniglot-20w1s": dict(n_way=20, meta_batch=16, steps=5, lr=2.0)}


def main() -> None:
    default_root = os.environ.get("FASTMAML_OMNIGLOT") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    start = time.perf_counter()
    train = load_omniglot(args.data_root)["train"]
    print(f"load (cached 28x28 array): {time.perf_counter() - start:.2f} s, "
          f"{torch.get_num_threads()} threads")
    for name, s in SETTINGS.items():
        sampler = FewShotSampler(train, s["n_way"], 1, 1, rotate=True)
        torch.manual_seed(0)
        maml = MAML(ConvNet(1, s["n_way"]), F.cross_entropy, s["lr"], s["steps"], batched=True)
        generator = torch.Generator().manual_seed(0)
        sample_times, step_times = [], []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            batch = sampler.sample(s["meta_batch"], generator)
            sample_times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            maml.meta_backward(batch)
            step_times.append(time.perf_counter() - tick)
        sample, step = statistics.median(sample_times), statistics.median(step_times)
        print(f"{name}: sample {1e3 * sample:.2f} ms, meta-iteration {1e3 * step:.1f} ms, "
              f"data share {100 * sample / (sample + step):.2f}% (medians of {args.repeats})")


if __name__ == "__main__":
    main()
