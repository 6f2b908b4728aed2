"""fastmaml's speed yardstick: meta-iterations per second against peers, in one process.

    python benchmarks/run.py [--workloads sinusoid,omniglot-5w1s-q5] [--orders second,first]
                             [--repeats 7] [--json FILE]

For every workload and order, each implementation runs the same meta-iteration (meta-loss,
backward) on identical shapes: fastmaml's batched engine, a naive per-task loop with
``torch.autograd.grad(create_graph=True)``, and ``higher`` / ``learn2learn`` where installed.
The implementations are interleaved and repeated, and medians are reported, because these
machines are noisy; each sample times enough back-to-back calls to last 20 ms (one call for the
conv nets, tens for the sinusoid MLP), so that a sub-millisecond step is not timed cold. Ratios
are against the naive loop from the same run; "peak" is the achieved fraction of this machine's
fp32 matmul rate, measured at start-up. On CPU the process runs with the glibc malloc settings
that ``fastmaml train`` uses (``fastmaml.allocator``; ``--malloc default`` for glibc's own).
On CUDA, ``--precision tf32`` lets matmuls and convolutions (and the peak) use TF32 tensor cores;
the default, ``fp32``, turns TF32 off, for figures comparable with the CPU's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from fastmaml import MAML, TaskBatch
from fastmaml.allocator import tune_cpu_allocator
from fastmaml.models import ConvNet, MLP, SequenceNet, is_norm_param
from fastmaml.recurrent import has_recurrent


MIN_BLOCK_S = 0.02  # each timed sample runs an implementation for at least this long


@dataclass
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    loss_fn: Callable
    tasks: int
    inner_lr: float
    steps: int
    make_batch: Callable[[torch.Generator], TaskBatch]


def _images(tasks, n_way, k_shot, queries, channels, side):
    def make(generator):
        def labels(k):
            return torch.arange(n_way).repeat_interleave(k).expand(tasks, -1).clone()
        return TaskBatch(torch.rand(tasks, n_way * k_shot, channels, side, side, generator=generator),
                         labels(k_shot),
                         torch.rand(tasks, n_way * queries, channels, side, side, generator=generator),
                         labels(queries))
    return make


def _sinusoid(generator):
    x = torch.rand(25, 20, 1, generator=generator) * 10 - 5
    y = torch.sin(x)
    return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


def _sequences(generator):
    """Sinusoid regression read as sequences: 20 samples of a task's curve, then its next value."""
    amplitude = torch.rand(16, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(16, 1, 1, generator=generator) * math.pi
    start = torch.rand(16, 20, 1, generator=generator) * 10 - 5
    curve = amplitude * torch.sin(start + torch.linspace(0, 2, 21) - phase)  # (task, example, t)
    x, y = curve[..., :20, None], curve[..., 20:]
    return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


WORKLOADS = {w.name: w for w in [
    Workload("sinusoid", lambda: MLP([1, 40, 40, 1]), F.mse_loss, 25, 0.01, 1, _sinusoid),
    Workload("omniglot-5w1s-q5", lambda: ConvNet(1, 5, 64), F.cross_entropy, 32, 0.4, 1,
             _images(32, 5, 1, 1, 1, 28)),
    Workload("omniglot-5w1s-q75", lambda: ConvNet(1, 5, 64), F.cross_entropy, 32, 0.4, 1,
             _images(32, 5, 1, 15, 1, 28)),
    Workload("omniglot-20w1s", lambda: ConvNet(1, 20, 64), F.cross_entropy, 16, 0.1, 5,
             _images(16, 20, 1, 1, 1, 28)),
    Workload("omniglot-20w5s", lambda: ConvNet(1, 20, 64), F.cross_entropy, 16, 0.1, 5,
             _images(16, 20, 5, 5, 1, 28)),
    Workload("sequence-lstm", lambda: SequenceNet(nn.LSTM(1, 40, batch_first=True), 1),
             F.mse_loss, 16, 0.01, 1, _sequences),
    Workload("miniimagenet-5w1s", lambda: ConvNet(3, 5, 32, strided=False, image_size=84),
             F.cross_entropy, 4, 0.01, 5, _images(4, 5, 1, 15, 3, 84)),
]}


# ----- the implementations; each returns a function running one meta-iteration -----

class Unsupported(Exception):
    """An implementation that cannot run a workload or order (the table says why)."""


def fastmaml_impl(model, w: Workload, first_order: bool, compile: bool = False,
                  checkpoint_steps: bool = False, batched: bool | None = True, **options):
    maml = MAML(model, w.loss_fn, w.inner_lr, w.steps, first_order, batched=batched,
                check_finite=False, compile=compile, checkpoint_steps=checkpoint_steps, **options)

    def step(batch):
        maml.meta_backward(batch)
    step.maml = maml  # the path it ran, for the record
    return step


def fastmaml_auto_impl(model, w: Workload, first_order: bool):
    """fastmaml's default: the first call times the paths for this shape and keeps the fastest."""
    return fastmaml_impl(model, w, first_order, batched=None)


def fastmaml_compiled_impl(model, w: Workload, first_order: bool):
    return fastmaml_impl(model, w, first_order, compile=True)


def fastmaml_auto_compiled_impl(model, w: Workload, first_order: bool):
    """``compile=True`` with the default path search: the compiled graph is one candidate."""
    return fastmaml_impl(model, w, first_order, compile=True, batched=None)


def fastmaml_checkpointed_impl(model, w: Workload, first_order: bool):
    return fastmaml_impl(model, w, first_order, checkpoint_steps=True)


def fastmaml_per_step_impl(model, w: Workload, first_order: bool):
    """MAML++'s per-step batch norm: the norm layers' biases outer-loop only, one set per step."""
    if w.steps < 2 or not any(is_norm_param(n, model) for n, _ in model.named_parameters()):
        raise Unsupported("per-step sets need norm layers and 2 or more inner steps")
    return fastmaml_impl(model, w, first_order, adapt=lambda n, _: not is_norm_param(n, model),
                         per_step=lambda n, _: is_norm_param(n, model))


def loop_impl(model, w: Workload, first_order: bool):
    """The naive reference: a Python loop over tasks, autograd.grad(create_graph=True)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step(batch):
        total = 0.0
        for sx, sy, qx, qy in zip(*batch):
            fast = params
            for _ in range(w.steps):
                loss = w.loss_fn(functional_call(model, fast, (sx,)), sy)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {n: p - w.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            total = total + w.loss_fn(functional_call(model, fast, (qx,)), qy)
        (total / batch.num_tasks).backward()
    return step


def higher_impl(model, w: Workload, first_order: bool):
    import higher

    if first_order:  # measured: the model's .grad stays None, so this would not be equal work
        raise Unsupported("track_higher_grads=False cuts the adapted weights off the initial "
                          "ones: no first-order meta-gradient reaches the model")
    inner_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=w.inner_lr)

    def step(batch):
        for sx, sy, qx, qy in zip(*batch):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                    fmodel, diffopt):
                for _ in range(w.steps):
                    diffopt.step(w.loss_fn(fmodel(sx), sy))
                (w.loss_fn(fmodel(qx), qy) / batch.num_tasks).backward()
    return step


def learn2learn_impl(model, w: Workload, first_order: bool):
    import learn2learn as l2l

    meta = l2l.algorithms.MAML(model, lr=w.inner_lr, first_order=first_order)

    def step(batch):
        for sx, sy, qx, qy in zip(*batch):
            learner = meta.clone()
            for _ in range(w.steps):
                learner.adapt(w.loss_fn(learner(sx), sy))
            (w.loss_fn(learner(qx), qy) / batch.num_tasks).backward()
    return step


def torchopt_impl(model, w: Workload, first_order: bool):
    """TorchOpt's object-oriented MAML (its README): MetaSGD steps the module in place, a loop
    over tasks, and the initial state restored after each task."""
    import torchopt

    if first_order:
        raise Unsupported("MetaSGD differentiates through its steps (second order only)")
    if not all(p.requires_grad for p in model.parameters()):
        raise Unsupported("MetaSGD steps every parameter; this model has frozen ones (the "
                          "paper's batch norm has no trained scale)")
    inner_opt = torchopt.MetaSGD(model, lr=w.inner_lr)
    initial = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)

    def step(batch):
        for sx, sy, qx, qy in zip(*batch):
            for _ in range(w.steps):
                inner_opt.step(w.loss_fn(model(sx), sy))
            (w.loss_fn(model(qx), qy) / batch.num_tasks).backward()
            torchopt.recover_state_dict(model, initial)
    return step


def _refuse_under_vmap(model: nn.Module) -> None:
    """Measured: a batch-norm layer that tracks running statistics fails under ``vmap`` (torch
    cannot update them in place from a batched input), in both peers' vmap paths; so does a
    recurrent layer (torch has no batching rule for ``aten::lstm`` and kin)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise Unsupported("vmap cannot update the model's batch-norm running statistics in place")
    if has_recurrent(model):
        raise Unsupported("torch has no vmap batching rule for its recurrent kernels")


def torchopt_vmap_impl(model, w: Workload, first_order: bool):
    """TorchOpt's functional optimizer (``torchopt.sgd``, ``apply_updates(inplace=False)``) with
    ``torch.func.grad`` inside ``torch.func.vmap`` over tasks."""
    import torchopt

    _refuse_under_vmap(model)
    optimizer = torchopt.sgd(lr=w.inner_lr)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def task_loss(params, sx, sy, qx, qy):
        fast, state = params, optimizer.init(params)
        for _ in range(w.steps):
            grads = torch.func.grad(lambda p: w.loss_fn(functional_call(model, p, (sx,)), sy))(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            updates, state = optimizer.update(grads, state, inplace=False)
            fast = torchopt.apply_updates(fast, updates, inplace=False)
        return w.loss_fn(functional_call(model, fast, (qx,)), qy)

    def step(batch):
        torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch).mean().backward()
    return step


class _IgnoringFlags(nn.Module):
    """``inner`` behind a forward that ignores the keyword flags parallel-metalearn passes;
    ``pool`` averages a conv net's feature maps, as ``ConvNet`` does before its head."""

    def __init__(self, inner: nn.Module, pool: bool = False):
        super().__init__()
        self.inner, self.pool = inner, pool

    def forward(self, x, **_):
        out = self.inner(x)
        return out.mean(dim=(2, 3)) if self.pool else out


def parallel_metalearn_impl(model, w: Workload, first_order: bool):
    """parallel-metalearn (its README): ``MAML_Model(backbone, head)``, a fixed-rate
    ``InnerSGD``, a loss module and ``MAML(...).step`` on one meta-batch. The workload's model
    is split into its features and its last linear layer (the same parameter tensors); the
    outer optimizer is SGD with lr 0, so a step leaves the meta-gradient in ``.grad`` and the
    weights as they were."""
    from metalearn.algorithms import MAML as ParallelMAML
    from metalearn.inner_optimizers import InnerSGD
    from metalearn.loss import CategoricalAccuracy, CrossEntropy
    from metalearn.loss.base import BaseLoss
    from metalearn.model_wrappers import MAML_Model

    class MeanSquaredError(BaseLoss):  # the library ships classification losses only
        def forward(self, out_dict, targets, model_states=None, **_):
            loss = F.mse_loss(out_dict["logits"], targets["labels"])
            return loss, loss.detach()

    _refuse_under_vmap(model)
    if isinstance(model, ConvNet):
        backbone, head = _IgnoringFlags(model.features, pool=True), _IgnoringFlags(model.head)
    else:
        backbone = _IgnoringFlags(nn.Sequential(*list(model)[:-1]))
        head = _IgnoringFlags(model[-1])
    wrapped = MAML_Model(backbone=backbone, head=head)
    inner = InnerSGD(initial_fast_weights=wrapped.get_fast_weights(), inner_lr=w.inner_lr,
                     first_order=first_order, max_inner_steps=w.steps, learn_lr=False
                     ).to(next(model.parameters()).dtype)  # its step size, in the model's dtype
    loss = (MeanSquaredError() if w.loss_fn is F.mse_loss
            else CrossEntropy(metric_fn=CategoricalAccuracy()))
    algorithm = ParallelMAML(
        model=wrapped, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        inner_optimizer=inner, support_loss_fn=loss, inner_steps=w.steps, chunk_size=w.tasks,
        device=next(model.parameters()).device)

    def step(batch):
        algorithm.step(iter([(batch.support_x, {"labels": batch.support_y},
                              batch.query_x, {"labels": batch.query_y})]))
    return step


IMPLS = {"fastmaml": (fastmaml_impl, None), "fastmaml-auto": (fastmaml_auto_impl, None),
         "fastmaml-compiled": (fastmaml_compiled_impl, None),
         "fastmaml-auto-compiled": (fastmaml_auto_compiled_impl, None),
         "fastmaml-checkpointed": (fastmaml_checkpointed_impl, None),
         "fastmaml-per-step": (fastmaml_per_step_impl, None), "loop": (loop_impl, None),
         "higher": (higher_impl, "higher"), "learn2learn": (learn2learn_impl, "learn2learn"),
         "torchopt": (torchopt_impl, "torchopt"), "torchopt-vmap": (torchopt_vmap_impl, "torchopt"),
         "parallel-metalearn": (parallel_metalearn_impl, "metalearn")}


# the engine's options, timed only where asked for (--impls)
OPTIONAL_IMPLS = ("fastmaml-checkpointed", "fastmaml-per-step")


# ----- measurement -----

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(model: nn.Module, step: Callable, batch: TaskBatch, device: torch.device) -> float:
    """Seconds of one meta-iteration from fresh gradients, synchronised on CUDA."""
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    step(batch)
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


class PeakRSS:
    """Peak resident memory above the starting level, sampled by a thread (CPU has no counter)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def count_flops(w: Workload, first_order: bool) -> int:
    """FLOPs of one meta-iteration, counted on the naive loop (the same arithmetic); for a
    recurrent model on fastmaml's batched path, whose step-by-step ops the counter sees (it
    counts nothing inside torch's fused recurrent kernels)."""
    torch.manual_seed(0)
    model = w.build_model()
    step = (fastmaml_impl if has_recurrent(model) else loop_impl)(model, w, first_order)
    with FlopCounterMode(display=False) as counter:
        step(w.make_batch(torch.Generator().manual_seed(0)))
    return counter.get_total_flops()


def measure_memory(step: Callable, batch: TaskBatch, device: torch.device) -> float:
    """Peak memory of one meta-iteration in MB: the CUDA allocator's peak, or RSS growth on CPU."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(batch)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakRSS() as rss:
        step(batch)
    return rss.mb


def conv_seconds(model: nn.Module, step: Callable, batch: TaskBatch, device: torch.device
                 ) -> tuple[float, float]:
    """CPU seconds of one meta-iteration spent inside convolution kernels (forward, backward
    and double backward), from the profiler's self times over three calls, and their share of
    those calls' wall time (both from the same calls, so a busy machine cannot skew the share).

    What the step would take if everything but the convolutions (normalisation, activations,
    the elementwise second-order terms, layout copies, dispatch) were free: a bound on what
    faster glue code could buy. The kernels run for milliseconds each, so the profiler's
    per-op overhead hardly touches them.
    """
    calls = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = sum(timed_call(model, step, batch, device) for _ in range(calls))
    conv = sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key.startswith("aten::") and "conv" in e.key) / 1e6
    return conv / calls, conv / wall


def run(workloads: list[str], orders: list[str], impls: list[str], repeats: int, warmup: int,
        device: torch.device, conv_share: bool = False, malloc_tuned: bool = False,
        precision: str = "fp32"):
    available = [i for i in impls if IMPLS[i][1] is None or importlib.util.find_spec(IMPLS[i][1])]
    for missing in sorted(set(impls) - set(available)):
        print(f"note: {missing} is not installed; skipped (pip install {missing})")
    peak = matmul_peak_gflops(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"machine: torch {torch.__version__}, {where}, "
          f"{precision} matmul peak {peak:.1f} GFLOP/s (2048^3)"
          + (", glibc malloc tuned (fastmaml.allocator)" if malloc_tuned else ""))
    records = []
    for name in workloads:
        w = WORKLOADS[name]
        for order in orders:
            first_order = order == "first"
            batch = w.make_batch(torch.Generator().manual_seed(0)).to(device)
            steps, calls = {}, {}  # calls per timed block: each block lasts at least MIN_BLOCK_S
            for impl in available:
                torch.manual_seed(0)
                model = w.build_model().to(device)
                try:
                    steps[impl] = (model, IMPLS[impl][0](model, w, first_order))
                    steps[impl][1](batch)  # first call: compiles (or searches), not timed
                except Unsupported as reason:
                    print(f"note: {impl} skipped on {name}, {order} order: {reason}")
                    steps.pop(impl, None)
                    continue
                # calibrate on the fastest of 3 calls: a compiled meta_backward picks its path on
                # the first call and compiles its gradient on the second
                fastest = min(timed_call(*steps[impl], batch, device) for _ in range(3))
                calls[impl] = max(1, math.ceil(MIN_BLOCK_S / fastest))
            ran = [impl for impl in available if impl in steps]
            times, memory = {i: [] for i in ran}, {}
            for impl in ran:  # memory: one untimed run each (the CPU sampler costs time)
                memory[impl] = measure_memory(steps[impl][1], batch, device)
            conv = {impl: conv_seconds(*steps[impl], batch, device)
                    for impl in ran} if conv_share else {}
            for round_ in range(warmup + repeats):  # interleaved timed rounds
                for impl in ran:
                    elapsed = sum(timed_call(*steps[impl], batch, device)
                                  for _ in range(calls[impl]))
                    if round_ >= warmup:
                        times[impl].append(elapsed / calls[impl])
            flops = count_flops(w, first_order)
            loop_time = statistics.median(times["loop"]) if "loop" in times else None
            for impl in ran:
                median = statistics.median(times[impl])
                records.append({"workload": name, "order": order, "impl": impl,
                                "s_per_iter": median, "peak_mem_mb": round(memory[impl], 1),
                                "iters_per_s": 1 / median,
                                "speedup_vs_loop": loop_time / median if loop_time else None,
                                "gflop_per_iter": flops / 1e9,
                                "fraction_of_matmul_peak": flops / median / 1e9 / peak,
                                "repeats": repeats, "device": str(device),
                                "malloc_tuned": malloc_tuned, "precision": precision,
                                **({"path": steps[impl][1].maml.path}
                                   if hasattr(steps[impl][1], "maml") else {}),
                                **({"conv_s_per_iter": conv[impl][0],
                                    "conv_share": conv[impl][1]} if conv else {})})
            print_table([r for r in records if r["workload"] == name and r["order"] == order])
    return records


def print_table(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{first['workload']} ({first['order']} order, {first['gflop_per_iter']:.2f} GFLOP/iter, "
          f"median of {first['repeats']})")
    conv = "conv_s_per_iter" in first
    print(f"  {'impl':<19}{'s/iter':>10}{'iter/s':>9}{'vs loop':>9}{'% peak':>8}{'peak MB':>9}"
          + (f"{'conv s':>9}{'conv %':>8}" if conv else ""))
    for r in rows:
        ratio = f"{r['speedup_vs_loop']:.2f}x" if r["speedup_vs_loop"] else "-"
        print(f"  {r['impl']:<19}{r['s_per_iter']:>10.4f}{r['iters_per_s']:>9.1f}{ratio:>9}"
              f"{100 * r['fraction_of_matmul_peak']:>7.1f}%{r['peak_mem_mb']:>9.1f}"
              + (f"{r['conv_s_per_iter']:>9.4f}{100 * r['conv_share']:>7.1f}%" if conv else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="sinusoid,omniglot-5w1s-q5",
                        help=f"comma-separated, from: {', '.join(WORKLOADS)} (or 'all')")
    parser.add_argument("--orders", default="second,first")
    parser.add_argument("--impls", default=",".join(i for i in IMPLS if i not in OPTIONAL_IMPLS),
                        help=f"comma-separated, from: {', '.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write one record per (workload, order, impl)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="CPU: the glibc malloc settings fastmaml's CLI trains with "
                             "(fastmaml.allocator), or glibc's defaults; all implementations "
                             "share the process, so they all run with the same settings")
    parser.add_argument("--precision", choices=["fp32", "tf32"], default="fp32",
                        help="CUDA: tf32 lets matmuls and convolutions use TF32 tensor cores "
                             "(torch's allow_tf32 flags, for every implementation); fp32 turns "
                             "them off")
    parser.add_argument("--conv-share", action="store_true",
                        help="also profile each step (CPU) and report the seconds it spends in "
                             "convolution kernels, and their share of the step")
    args = parser.parse_args()
    workloads = list(WORKLOADS) if args.workloads == "all" else args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS] + [
        i for i in args.impls.split(",") if i not in IMPLS]
    if unknown:
        parser.error(f"unknown workload or impl: {', '.join(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conv_share and not args.device.startswith("cpu"):
        parser.error("--conv-share profiles CPU time; run it with --device cpu")
    if args.precision == "tf32" and not args.device.startswith("cuda"):
        parser.error("--precision tf32 is a CUDA tensor-core format; run it with --device cuda")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
            args.precision == "tf32")
    device = torch.device(args.device)
    malloc_tuned = device.type == "cpu" and args.malloc == "tuned" and tune_cpu_allocator()
    records = run(workloads, args.orders.split(","), args.impls.split(","), args.repeats,
                  args.warmup, device, args.conv_share, malloc_tuned, args.precision)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
