"""Batched against looped second-order meta-gradients in float64, on a device: the normalisation
forms that ``fastmaml.norms`` runs under ``vmap``, checked where the test suite does not run
(a GPU, whose kernels differ from the CPU's). Each model adapts its norm's weight per task,
the case in which torch's fused kernels are wrong under ``vmap``; the looped path is plain
autograd, the reference.

    python benchmarks/exactness.py [--device cuda] [--json FILE]

Exits 1 when a model's batched meta-gradient differs from its looped one by more than 1e-10.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import MAML, TaskBatch
from fastmaml.models import ConvNet

TASKS, TOLERANCE = 4, 1e-10


def _conv_batch_norm() -> tuple[nn.Module, Callable, TaskBatch]:
    model = ConvNet(1, 3, hidden=8, strided=True, image_size=12, blocks=2, norm_scale=True)
    images = (TASKS, 6, 1, 12, 12)
    return model, F.cross_entropy, TaskBatch(torch.randn(images), torch.randint(0, 3, images[:2]),
                                             torch.randn(images), torch.randint(0, 3, images[:2]))


def _mlp(*middle: nn.Module) -> tuple[nn.Module, Callable, TaskBatch]:
    model = nn.Sequential(nn.Linear(3, 8), *middle, nn.Tanh(), nn.Linear(8, 1))
    points = (TASKS, 6, 3)
    return model, F.mse_loss, TaskBatch(torch.randn(points), torch.randn(*points[:2], 1),
                                        torch.randn(points), torch.randn(*points[:2], 1))


def _norm_mlp(norm: nn.Module) -> tuple[nn.Module, Callable, TaskBatch]:
    """``norm`` over 2 channels of 4 features (instance norm) or over the last 4 (layer norm)."""
    return _mlp(nn.Unflatten(-1, (2, 4)), norm, nn.Flatten())


def _eval_mode_batch_norm() -> tuple[nn.Module, Callable, TaskBatch]:
    """An MLP's batch norm (N, C) in eval mode: batch statistics still (transductive)."""
    model, loss_fn, batch = _mlp(nn.BatchNorm1d(8))
    return model.eval(), loss_fn, batch


MODELS: dict[str, Callable[[], tuple[nn.Module, Callable, TaskBatch]]] = {
    "conv + batch norm": _conv_batch_norm,
    "mlp + batch norm": _eval_mode_batch_norm,
    "layer norm": lambda: _norm_mlp(nn.LayerNorm(4)),
    "instance norm": lambda: _norm_mlp(nn.InstanceNorm1d(2, affine=True)),
}


def meta_gradient(model: nn.Module, loss_fn: Callable, batch: TaskBatch, batched: bool) -> torch.Tensor:
    maml = MAML(copy.deepcopy(model), loss_fn, 0.1, 2, batched=batched)
    loss, _ = maml.meta_loss(batch)
    params = [p for p in maml.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def check(name: str, device: torch.device) -> dict:
    """The relative difference between the batched and the looped meta-gradient of ``name``."""
    torch.manual_seed(0)
    model, loss_fn, batch = MODELS[name]()
    for module in model.modules():  # weights away from their initial ones, which hide errors
        if getattr(module, "weight", None) is not None and "Norm" in type(module).__name__:
            module.weight.data.normal_(1, 0.5)
    model = model.to(device, torch.float64)
    batch = TaskBatch(*(t.to(device, torch.float64 if t.is_floating_point() else t.dtype)
                        for t in batch))
    batched, looped = (meta_gradient(model, loss_fn, batch, path) for path in (True, False))
    difference = ((batched - looped).norm() / looped.norm()).item()
    return {"model": name, "device": str(device), "device_name": _device_name(device),
            "torch": torch.__version__, "relative_difference": difference,
            "exact": difference <= TOLERANCE}


def _device_name(device: torch.device) -> str:
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else torch.backends.cpu.get_cpu_capability())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write one record per model")
    args = parser.parse_args(argv)
    records = [check(name, torch.device(args.device)) for name in MODELS]
    for r in records:
        print(f"{r['model']:<18} {r['device']:<6} batched vs looped {r['relative_difference']:.2e}"
              f"  {'exact' if r['exact'] else 'NOT EXACT'}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0 if all(r["exact"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
