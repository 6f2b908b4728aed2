"""Peak memory of one second-order meta-iteration against the number of inner steps.

    python benchmarks/memory.py [--workload omniglot-5w1s-q5] [--steps 1,2,3,5] [--device cpu]

Each configuration runs in a fresh process. On CPU the peak is the growth of the process's
maximum resident memory over the meta-iteration (ru_maxrss); on CUDA it is the allocator's peak.
Second-order MAML keeps every inner step's activations for the outer backward, so memory grows
about linearly with the steps; ``checkpoint_steps=True`` keeps one step's at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource

import torch

from run import WORKLOADS, fastmaml_impl, measure_memory


def peak_mb(workload_name: str, steps: int, first_order: bool, checkpoint_steps: bool,
            device_name: str) -> float:
    """Peak memory of one meta-iteration, measured in this (fresh) process."""
    device = torch.device(device_name)
    workload = dataclasses.replace(WORKLOADS[workload_name], steps=steps)
    batch = workload.make_batch(torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    step = fastmaml_impl(workload.build_model().to(device), workload, first_order,
                         checkpoint_steps=checkpoint_steps)
    if device.type == "cuda":
        return measure_memory(step, batch, device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


VARIANTS = [("second order", False, False), ("first order", True, False),
            ("second order, checkpoint_steps", False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="omniglot-5w1s-q5", choices=list(WORKLOADS))
    parser.add_argument("--steps", default="1,2,3,5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{args.workload} on {args.device}: peak memory of one meta-iteration")
    context = multiprocessing.get_context("spawn")
    for steps in map(int, args.steps.split(",")):
        for label, first_order, checkpoint in VARIANTS:
            with context.Pool(1) as pool:
                mb = pool.apply(peak_mb, (args.workload, steps, first_order, checkpoint, args.device))
            print(f"  {steps} inner step(s), {label}: {mb:8.1f} MB")


if __name__ == "__main__":
    main()
