"""What a metric costs a meta-iteration: fastmaml's ``meta_backward`` with ``metric_fn`` (the
accuracy ``fastmaml train`` takes for few-shot classification; ``F.l1_loss`` for regression)
against without one, on the looped and the batched path, timed interleaved in one process.

    python benchmarks/metric_cost.py [--workloads omniglot-5w1s-q75,omniglot-20w1s]
                                     [--repeats 7] [--json FILE]

The metric is taken of the query loss's own predictions, so the ratio should be near 1: until
session 56 it ran a second forward pass of the query set, which made a second-order step with
75 queries per task 1.22-1.40x slower (Omniglot 5-way 1-shot, MiniImagenet; docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmaml import MAML
from fastmaml.experiments.fewshot import accuracy

from run import WORKLOADS, timed_call


def measure(name: str, repeats: int, device: torch.device) -> list[dict]:
    """One record per path: median seconds per second-order meta-iteration without and with the
    metric, and their ratio."""
    workload = WORKLOADS[name]
    metric = accuracy if workload.loss_fn is F.cross_entropy else F.l1_loss
    batch = workload.make_batch(torch.Generator().manual_seed(0)).to(device)
    records = []
    for batched in (False, True):
        learners = {}
        for metric_fn in (None, metric):
            torch.manual_seed(0)
            model = workload.build_model().to(device)
            maml = MAML(model, workload.loss_fn, workload.inner_lr, workload.steps,
                        metric_fn=metric_fn, batched=batched, check_finite=False)
            learners["with" if metric_fn else "without"] = (model, maml.meta_backward)
            timed_call(model, maml.meta_backward, batch, device)  # the first call probes
        times: dict[str, list[float]] = {key: [] for key in learners}
        for _ in range(repeats):
            for key, (model, step) in learners.items():
                times[key].append(timed_call(model, step, batch, device))
        without, with_ = (statistics.median(times[key]) for key in ("without", "with"))
        records.append({"workload": name, "path": "batched" if batched else "looped",
                        "metric": metric.__name__, "s_per_iter_without": without,
                        "s_per_iter_with": with_, "with_over_without": with_ / without,
                        "repeats": repeats, "device": str(device)})
        print(f"{name:<20}{records[-1]['path']:<9}without {without:.4f} s   with "
              f"{metric.__name__} {with_:.4f} s   ratio {with_ / without:.3f}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="omniglot-5w1s-q75,omniglot-20w1s",
                        help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write one record per (workload, path)")
    args = parser.parse_args()
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload: {', '.join(unknown)}")
    device = torch.device(args.device)
    records = [r for name in args.workloads.split(",") for r in measure(name, args.repeats, device)]
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
