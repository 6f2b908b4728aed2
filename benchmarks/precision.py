"""Reduced precision as a speed lever: time and meta-gradient error against float64.

    python benchmarks/precision.py [--workloads omniglot-5w1s-q5] [--device cpu] [--json FILE]

For each workload, fastmaml's eager engine takes one second-order meta-iteration in each
precision: strict ``fp32``; ``bf16``, under ``torch.autocast`` (matmuls and convolutions in
bfloat16, and what follows them in the dtype they produce); and on CUDA ``tf32`` (TF32 tensor cores for fp32 matmuls and
convolutions). The meta-gradient of each is compared with the same step in float64, and the
steps are timed interleaved (medians). A faster step is only a gain if its meta-gradient still
points where the exact one does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmaml import TaskBatch

from run import WORKLOADS, fastmaml_impl, timed_call


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """Run the block in ``mode``: fp32 (TF32 off), tf32 (CUDA only) or bf16 autocast."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measure(name: str, device: torch.device, modes: list[str], repeats: int) -> list[dict]:
    """One record per mode: median seconds per meta-iteration and meta-gradient error."""
    workload = WORKLOADS[name]
    batch = workload.make_batch(torch.Generator().manual_seed(0)).to(device)
    steps, gradients = {}, {}
    for mode in ["fp64", *modes]:
        dtype = torch.float64 if mode == "fp64" else torch.float32
        torch.manual_seed(0)
        model = workload.build_model().to(device, dtype)
        step = fastmaml_impl(model, workload, first_order=False)
        data = TaskBatch(*(t.to(dtype) if t.is_floating_point() else t for t in batch))
        with precision(mode, device):
            timed_call(model, step, data, device)
        gradients[mode] = torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.grad is not None]).double().cpu()
        steps[mode] = (model, step, data)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            with precision(mode, device):
                times[mode].append(timed_call(*steps[mode], device))
    exact, fp32_time = gradients["fp64"], statistics.median(times["fp32"])
    return [{"workload": name, "precision": mode, "device": str(device),
             "s_per_iter": statistics.median(times[mode]),
             "speedup_vs_fp32": fp32_time / statistics.median(times[mode]),
             "grad_rel_error": ((gradients[mode] - exact).norm() / exact.norm()).item(),
             "grad_cosine": F.cosine_similarity(gradients[mode], exact, dim=0).item(),
             "repeats": repeats} for mode in modes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="omniglot-5w1s-q5",
                        help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", type=Path, help="write one record per (workload, precision)")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload: {', '.join(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = ["fp32", "bf16", *(["tf32"] if device.type == "cuda" else [])]
    records = []
    print(f"{'workload':<20}{'precision':>10}{'s/iter':>10}{'vs fp32':>9}"
          f"{'grad rel err':>14}{'cosine':>9}")
    for name in workloads:
        for r in measure(name, device, modes, args.repeats):
            print(f"{name:<20}{r['precision']:>10}{r['s_per_iter']:>10.4f}"
                  f"{r['speedup_vs_fp32']:>8.2f}x{r['grad_rel_error']:>14.2e}{r['grad_cosine']:>9.4f}")
            records.append(r)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
