"""Scale-out with ``torch.distributed``: the meta-batch is split across ranks (torchrun).

Every rank draws the *whole* meta-batch from the same seeded generator and keeps its own slice
(the slices differ by at most one task: 25 tasks on 2 ranks are 12 + 13), so the union of the
tasks is exactly the single-process meta-batch. Each rank's loss is the mean over its slice;
weighting each rank's gradient by its share of the tasks, then averaging (all-reduce), gives the
single-process meta-gradient. Only rank 0 writes files. Backends: nccl for GPU tensors, gloo
for CPU ones.
"""
from __future__ import annotations

import math
import os
import re
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .inputs import TaskBatch
from .errors import ConfigError, GroupError, first_line, is_out_of_memory

T = TypeVar("T")

# How long a rank waits at a collective for the others, unless FASTMAML_GROUP_TIMEOUT says
# (``group_timeout``). torch's default (30 min) ends the job when rank 0 alone waits longer: for
# another learner's start (its data load and path search), or a first compile. A rank that dies
# ends the job through torchrun whatever this is.
GROUP_TIMEOUT = timedelta(hours=6)
# How long a process waits for the others to join the group before it says that it waits.
JOIN_NOTICE_S = 60.0


def init_from_env() -> None:
    """Join the process group that torchrun describes in the environment (no-op without it, or
    where a group exists); a ``ConfigError`` for an environment torchrun would not make."""
    if not dist.is_initialized() and _world_size_of_env() > 1:
        # torch.func's first call imports this module, whose functions default to
        # ``group=group.WORLD``: imported once the group exists, they keep it alive past
        # ``destroy_process_group``, and its gloo threads then race interpreter exit (a rank dies
        # with SIGABRT, "terminate called without an active exception"). Imported first, their
        # default is None.
        import torch.distributed.nn.functional  # noqa: F401
        backend = "gloo"  # CPU tensors (small flags and metrics; a run on device=cpu)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"  # GPU tensors (gradients) through nccl
        _join_group(backend)


def group_timeout() -> timedelta:
    """How long a rank waits at a collective (and to join) for the others: the
    ``FASTMAML_GROUP_TIMEOUT`` environment variable's seconds, else ``GROUP_TIMEOUT`` (6 h). A
    machine lost without closing its connections is noticed only after it."""
    text = os.environ.get("FASTMAML_GROUP_TIMEOUT")
    if text is None:
        return GROUP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 1 <= seconds <= 1e9):
        raise ConfigError(f"FASTMAML_GROUP_TIMEOUT must be a number of seconds from 1 to 1e9, "
                          f"got {text!r}")
    return timedelta(seconds=seconds)


def _duration(seconds: float) -> str:
    """``seconds`` as hours from an hour on (``6 h``), else seconds (``30 s``)."""
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def _join_group(backend: str) -> None:
    """``init_process_group``; where the other processes are slow to join (one started by hand,
    a machine not yet started), each waiting process says so after ``JOIN_NOTICE_S``, and where
    they have not joined within the group's timeout, a ``GroupError`` says it in one line."""
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout = group_timeout()
    need = (f"each of the {os.environ['WORLD_SIZE']} processes must be started, with the same "
            "MASTER_ADDR and MASTER_PORT (torchrun starts them all)")
    notice = threading.Timer(JOIN_NOTICE_S, print, [
        f"fastmaml: rank {os.environ['RANK']} is waiting at {where} for the other processes, for "
        f"up to {_duration(timeout.total_seconds())}: {need}"],
        {"file": sys.stderr, "flush": True})
    notice.daemon = True
    notice.start()
    try:
        dist.init_process_group(backend, timeout=timeout, **_store_of_this_attempt(timeout))
    except dist.DistError as error:
        said = _transport_error(error)
        if "EADDRINUSE" in said:  # rank 0 could not serve the group's store at the port
            need = ("another program holds that port: give the processes another MASTER_PORT "
                    "(torchrun: --master-port, or the port of --rdzv-endpoint)")
        raise GroupError(f"the processes did not meet at {where} ({said}): {need}") from error
    finally:
        notice.cancel()


def world_size_asked() -> int:
    """The number of processes ``WORLD_SIZE`` asks for (1 where unset); a ``ConfigError`` where
    it is not a number."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number of processes") from None


def _world_size_of_env() -> int:
    """``world_size_asked()``; a ``ConfigError`` where the other variables a process group needs
    are missing (torchrun sets them all, and ``LOCAL_RANK``, which launchers of one process per
    machine leave out: 0)."""
    size = world_size_asked()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if size > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={size} is set but not {', '.join(missing)}: launch the "
                          "processes with torchrun (which sets them all), or unset WORLD_SIZE "
                          "to run one process")
    return size


def _store_of_this_attempt(timeout: timedelta) -> dict[str, Any]:
    """``init_process_group``'s store, rank and world size where torchrun restarted the processes
    (``--max-restarts``; its rendezvous waits ``timeout``), else nothing (torch's own). torch
    2.13 gives every attempt its agent's store, which still holds the addresses the last
    attempt's processes published: the restarted group waited on them for the group's timeout
    or failed to connect (pytorch issue 135712).
    On one machine, whose processes share its agent's restart count, each attempt's keys get a
    prefix of their own. Across machines the counts may differ (an agent that restarts for
    another machine's failure may count no restart), so there the processes need a new store
    each attempt (the c10d rendezvous with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): else
    ``--max-restarts`` is a ``ConfigError`` from the start. A run started on one machine of an
    elastic range cannot know that others may join: the README says what it needs."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):  # several machines
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            raise ConfigError("torchrun --max-restarts across several machines needs the c10d "
                              "rendezvous (--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT) with "
                              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on "
                              "every machine: torch's shared store keeps a stopped attempt's "
                              "addresses, so restarted processes could not meet (pytorch issue "
                              "135712)")
        return {}
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return {}
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"fastmaml/attempt{attempt}", store), "rank": rank,
            "world_size": size}


def shutdown() -> None:
    """Leave the process group once every rank is done."""
    if dist.is_available() and dist.is_initialized():
        _collective(dist.barrier)
        leave()


def leave() -> None:
    """Leave the process group now, without waiting for the other ranks (this rank stops on an
    error or a signal): a gloo group still alive when the interpreter exits can abort the
    process (SIGABRT) instead of letting it exit with its own status."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        _collective(dist.barrier)


def require_a_task_per_rank(num_tasks: int, setting: str = "meta_batch") -> None:
    """A ``ConfigError`` when the ranks outnumber the tasks (``setting``'s value)."""
    size = world()[1]
    if num_tasks < size:
        raise ConfigError(f"{setting} {num_tasks} is smaller than the {size} processes: "
                          "every process needs at least one task")


def rank_slice(num_tasks: int) -> range:
    """The positions of this rank's tasks among ``num_tasks`` (all of them in one process):
    consecutive slices that differ by at most one task (empty where the ranks outnumber the
    tasks)."""
    rank, size = world()
    return range(num_tasks * rank // size, num_tasks * (rank + 1) // size)


def task_range(num_tasks: int, setting: str = "meta_batch") -> range:
    """``rank_slice``, refusing (naming ``setting``) where a rank would get no task."""
    require_a_task_per_rank(num_tasks, setting)
    return rank_slice(num_tasks)


def rank_share(num_tasks: int) -> tuple[slice, float]:
    """This rank's tasks among ``num_tasks`` and its weight: its tasks times the world size over
    all tasks (1 for an even split), so that the ranks' mean (``average_gradients``,
    ``average_metrics``) of weighted means over each rank's tasks is the mean over every task."""
    mine = task_range(num_tasks)
    return slice(mine.start, mine.stop), len(mine) * world()[1] / num_tasks


def shard(batch: TaskBatch) -> tuple[TaskBatch, float]:
    """This rank's slice of the meta-batch, and its weight (``rank_share``)."""
    mine, share = rank_share(batch.num_tasks)
    if world()[1] == 1:
        return batch, share
    return TaskBatch(*(t[mine] for t in batch)), share


def mean_over_ranks(share: float) -> Callable[[Tensor], Tensor]:
    """``t -> `` the sum over the ranks of ``share * t``: with ``t`` a mean over this rank's
    tasks and ``share`` its fraction of all tasks, the mean over every task (a loss, a gradient,
    a Hessian-vector product), the same on every rank. The identity in one process."""
    if world()[1] == 1:
        return lambda t: t

    def reduced(t: Tensor) -> Tensor:
        total = t.detach() * share
        _collective(dist.all_reduce, total)
        return total
    return reduced


def gather_ranks(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` in one process)."""
    if world()[1] == 1:
        return [value]
    everyone: list[T | None] = [None] * world()[1]
    _collective(dist.all_gather_object, everyone, value)
    return everyone


def gather_in_order(parts: list[tuple[tuple[int, ...], T]]) -> list[T]:
    """Every rank's ``(position, part)`` pairs, as one list ordered by position, on every rank
    (this rank's parts in one process)."""
    return [part for _, part in sorted((pair for ranks in gather_ranks(parts) for pair in ranks),
                                       key=lambda pair: pair[0])]


def average_gradients(module: nn.Module) -> None:
    """All-reduce the gradients of ``module`` to their mean over the ranks."""
    _, size = world()
    if size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    _collective(dist.all_reduce, flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _collective(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, a collective of every rank; its failure a ``GroupError`` in one
    line (most often another rank stopped, or the connection broke: gloo's bare error at the
    call, with its source location and advice)."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise
        said = _transport_error(error)
        raise GroupError(f"{call.__name__} across the processes failed ({said}): where another "
                         "process of this run stopped, its own message or torchrun's summary "
                         "says why") from error


def _transport_error(error: RuntimeError) -> str:
    """gloo's error in a few words ("Connection closed by peer [127.0.0.1]:63155"), without its
    source location and its advice to read the other process's log."""
    said = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first_line(error))
    return said.split(". This is typically caused by")[0]


def _collective_device() -> str:
    """Where small tensors for a collective go: CPU when the group has gloo for it (as
    ``init_from_env`` makes it), else the GPU (a group a user made with nccl alone)."""
    return "cpu" if "gloo" in str(dist.get_backend()) else "cuda"


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    if world()[1] == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=_collective_device())
    _collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_metrics(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged metric over the ranks (same keys on every rank)."""
    _, size = world()
    if size == 1 or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64,
                          device=_collective_device())
    _collective(dist.all_reduce, tensor)
    return dict(zip(values, (tensor / size).tolist()))
