"""torchrun with 2 gloo processes on 127.0.0.1 reproduces the single-process run."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastmaml import cli
from fastmaml.cli import main
from fastmaml.train import checkpoint_path, load_checkpoint, read_metrics

SETTINGS = ["iterations=4", "log_every=2", "checkpoint_every=2", "--no-progress"]


def train_one_and_two_processes(tmp_path, preset: str, settings: list[str],
                                machines: int = 1) -> str:
    """Train ``preset`` in one process (``tmp_path/one``) and under torchrun with two
    (``tmp_path/two``): on one machine (``--standalone``), or one process on each of two
    machines that meet at a c10d rendezvous endpoint (the README's several-machines command;
    two nodes on loopback here). Returns what the processes printed."""
    assert main(["train", preset, "--out", str(tmp_path / "one"), *settings]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run"] + (
        ["--standalone", "--nproc_per_node=2"] if machines == 1 else
        ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-machines"])
    command = [*launcher, "-m", "fastmaml", "train", preset, "--out", str(tmp_path / "two"),
               *settings]
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(machines)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:  # none outlives a failed test
            node.kill()
    assert [node.returncode for node in nodes] == [0] * machines, [e[-3000:] for _, e in outputs]
    assert sum("2 processes" in out for out, _ in outputs) == 1  # said by the main rank only
    return "".join(out for out, _ in outputs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_learners(tmp_path, learners: tuple[str, ...], rtol: float = 1e-6,
                         atol: float = 1e-7) -> None:
    for learner in learners:
        one = load_checkpoint(checkpoint_path(tmp_path / "one", learner))["learner"]["module"]
        two = load_checkpoint(checkpoint_path(tmp_path / "two", learner))["learner"]["module"]
        for name, value in one.items():
            assert torch.allclose(value, two[name], rtol=rtol, atol=atol), (learner, name)


def run_script(tmp_path, script_text: str, *args: str, ranks: int = 2,
               out: str = "out") -> subprocess.CompletedProcess[str]:
    """Run ``script_text`` with ``args`` and then ``tmp_path/out`` (where it writes its results)
    as its arguments: in one process (``ranks=1``) or under torchrun with ``ranks``. Fails on a
    non-zero exit."""
    script = tmp_path / f"{out}.py"
    script.write_text(script_text)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={ranks}"]
    result = subprocess.run([sys.executable, *launcher, str(script), *args, str(tmp_path / out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_on_two_ranks(tmp_path, script_text: str) -> list[dict]:
    """``run_script`` under torchrun with 2 processes, each writing JSON to ``<argv[-1]>.<rank>``:
    the two ranks' JSON."""
    run_script(tmp_path, script_text)
    return [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("meta_batch", [8, 25])  # 4 + 4 tasks, and the paper's 25 as 12 + 13
def test_two_processes_match_one(tmp_path, meta_batch):
    said = train_one_and_two_processes(tmp_path, "sinusoid-demo",
                                       [*SETTINGS, f"meta_batch={meta_batch}"])
    assert said.count("maml: 4 iterations done (rank 0's path: ") == 1  # (12 + 13 may differ)
    assert_same_learners(tmp_path, ("maml", "pretrained", "oracle"))
    for learner in ("maml", "pretrained", "oracle"):  # the baselines' tasks split too
        one_log, two_log = (read_metrics(tmp_path / run / f"metrics-{learner}.csv")
                            for run in ("one", "two"))
        assert len(one_log) == len(two_log) == 2
        for one_row, two_row in zip(one_log, two_log):  # each a mean over every task, also
            for key, value in one_row.items():         # where the ranks' shares differ
                if key != "elapsed_s":
                    assert float(two_row[key]) == pytest.approx(float(value), rel=1e-5), key
    # the ranks searched their paths together: every rank's shape is recorded (so a resumed run
    # has both), and both took one path (sinusoid tasks fit one chunk: all tasks, one, or looped)
    choices = load_checkpoint(checkpoint_path(tmp_path / "two", "maml"))["learner"]["path_choices"]
    tasks = {int(key[2:key.index(",")]): choice for key, choice in choices.items()}
    assert set(tasks) == {meta_batch // 2, (meta_batch + 1) // 2}
    roles = {(path, chunk if chunk in (None, 1) else "all") for path, chunk in tasks.values()}
    assert len(roles) == 1


META_TRAIN = """
import sys

import fastmaml
from fastmaml.distributed import init_from_env, shutdown

if __name__ == "__main__":
    init_from_env()  # (nothing in one process)
    fastmaml.meta_train("sinusoid-demo", sys.argv[-1], progress=False, iterations=4,
                        meta_batch=5, log_every=2)
    shutdown()
"""


def test_meta_train_in_a_process_group_trains_one_run_over_the_ranks(tmp_path):
    run_script(tmp_path, META_TRAIN, ranks=1, out="one")
    run_script(tmp_path, META_TRAIN, out="two")  # 2 + 3 tasks
    assert json.loads((tmp_path / "two" / "machine.json").read_text())[0]["processes"] == 2
    assert_same_learners(tmp_path, ("maml", "pretrained", "oracle"))


def test_two_machines_that_meet_by_rendezvous_train_as_one_process(tmp_path):
    """The README's several-machines command trains the run a single process trains."""
    train_one_and_two_processes(tmp_path, "sinusoid-demo", [*SETTINGS, "meta_batch=8"],
                                machines=2)
    assert_same_learners(tmp_path, ("maml", "pretrained", "oracle"))


TRPO_OVER_RANKS = """
import sys
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector
from fastmaml import MAML
from fastmaml.distributed import init_from_env, mean_over_ranks, task_range
from fastmaml.rl import (Episodes, GaussianMLPPolicy, Sampler, adapt_policy, env_class,
                         reinforce_loss, trpo_meta_step)

torch.set_default_dtype(torch.float64)
init_from_env()
torch.manual_seed(0)
maml = MAML(GaussianMLPPolicy(2, 2, hidden=(16, 16)), reinforce_loss, inner_lr=0.1)
tasks = env_class("fastmaml/Nav2D-v0").sample_tasks(3, np.random.default_rng(0))
mine = task_range(len(tasks))  # the whole list in one process
sampler = Sampler("fastmaml/Nav2D-v0", horizon=20)
support = sampler.sample(maml.model, [tasks[i] for i in mine], 4, seed=0, task_ids=mine)
with torch.no_grad():
    adapted = adapt_policy(maml, support)
query = sampler.sample(maml.model, [tasks[i] for i in mine], 4, seed=1, params=adapted,
                       task_ids=mine)
stats = trpo_meta_step(maml, support, query, over_tasks=mean_over_ranks(len(mine) / len(tasks)))
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({"params": parameters_to_vector(maml.parameters()), "stats": stats._asdict()},
               sys.argv[1])
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_trpo_meta_step_over_two_processes_equals_one_in_float64(tmp_path):
    """The distributed TRPO meta-step (gradient, conjugate gradient's curvature products, line
    search) on 3 tasks split 1 + 2 takes the single process's step, to rounding."""
    for ranks, out in ((1, "one"), (2, "two")):
        run_script(tmp_path, TRPO_OVER_RANKS, ranks=ranks, out=out)
    one, two = torch.load(tmp_path / "one"), torch.load(tmp_path / "two")
    assert one["stats"]["accepted"] and one["stats"]["backtracks"] == two["stats"]["backtracks"]
    moved = (one["params"] - two["params"]).abs().max()
    assert moved <= 1e-10 * one["params"].abs().max(), moved
    for key in ("loss_before", "loss_after", "kl"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-9, abs=1e-14), key


PATHS_OVER_RANKS = """
import datetime
import json
import sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import fastmaml.paths
from fastmaml import MAML, TaskBatch
from fastmaml.distributed import average_gradients, gather_ranks, shard

torch.set_num_threads(1)
# imported before the group, as init_from_env does: imported after it (by torch.func's first
# call), its functions keep the group's gloo threads alive to race the exit (SIGABRT)
import torch.distributed.nn.functional  # noqa: E402,F401
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # (fails fast)
rank = dist.get_rank()
eager_difference = fastmaml.paths._relative_difference


def train(case):  # the driver's step: meta_backward, this rank's share, all-reduce, Adam
    fastmaml.paths._PATHS_CHOSEN.clear()  # a fresh process
    fastmaml.paths._SHAPES_SEARCHED.clear()
    fastmaml.paths._relative_difference = eager_difference
    torch.manual_seed(0)
    maml = MAML(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)), F.mse_loss, 0.1, 1)
    maml.gather_ranks = gather_ranks
    if case.startswith("compile"):  # eager stand-ins of the compiled graphs
        maml._compiled_batched, maml._compiled_gradient = maml._batched, maml._gradient
    if case == "compile fails here" and rank == 1:
        def fails(*args):
            raise torch._dynamo.exc.TorchDynamoException("inductor failed on this rank")
        maml._compiled_gradient = fails
    if case == "compile is off here":  # the compiled path chosen (from a checkpoint) ...
        for maml.first_order in (True, False):
            for tasks in (12, 13):
                shapes = TaskBatch(*(torch.zeros(tasks, 5, 1) for _ in range(4)))
                maml.path_choices[maml._path_key(shapes)] = ("compiled", tasks)
        if rank == 1:  # ... but off by 100% at every check on this rank
            fastmaml.paths._relative_difference = lambda grads, reference: 1.0
    if case == "vmap fails here" and rank == 1:
        batched = maml._batched
        def fails_at_13(*args):
            if args[-1].shape[0] == 13:
                raise RuntimeError("out of memory (stand-in)")
            return batched(*args)
        maml._batched = fails_at_13
    optimizer = torch.optim.Adam(maml.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(10):
        maml.first_order = step < 3  # first_order_until=3
        batch, share = shard(TaskBatch(*(torch.randn(25, 5, 1, generator=generator)
                                         for _ in range(4))))
        optimizer.zero_grad()
        maml.meta_backward(batch)
        for p in maml.parameters():
            p.grad.mul_(share)
        average_gradients(maml)
        optimizer.step()
    return {"path": maml.path, "compiled": maml._compiled_gradient is not None,
            "parameters": [p.sum().item() for p in maml.parameters()]}


cases = ["as is", "compile fails here", "compile is off here", "vmap fails here"]
with open(f"{sys.argv[1]}.{rank}", "w") as out:
    json.dump({case: train(case) for case in cases}, out)
dist.destroy_process_group()
"""


def test_ranks_whose_compiling_or_vmap_falls_back_alone_go_on_training(tmp_path):
    """Two ranks (12 + 13 tasks) search their paths together at the first call in each order;
    where one rank's compiling fails or turns off, or its vmap fails, alone, the ranks must
    still make the same collective calls (a search that gathered there would wait forever)."""
    ranks = run_on_two_ranks(tmp_path, PATHS_OVER_RANKS)
    for case, (zero, one) in {case: (ranks[0][case], ranks[1][case]) for case in ranks[0]}.items():
        assert zero["parameters"] == one["parameters"], case  # the same steps on both
    assert ranks[1]["compile fails here"]["compiled"] is False
    assert ranks[1]["compile is off here"]["compiled"] is False
    assert ranks[0]["compile is off here"]["compiled"] is True
    assert ranks[1]["vmap fails here"]["path"] == "looped"


GLOO_THREADS_AFTER_LEAVING = """
import os
import sys
import torch
import torch.distributed as dist
from fastmaml.cli import main
from fastmaml.distributed import init_from_env, shutdown

if sys.argv[1] == "shutdown":
    init_from_env()
    torch.func.grad(lambda x: (x ** 2).sum())(torch.ones(3))  # first torch.func call, after init
    total = torch.ones(3)
    dist.all_reduce(total)
    shutdown()
else:  # this rank's error: main leaves the group without waiting for the others
    assert main(["train", "sinusoid-demo", "--out", sys.argv[2], "meta_batch=1",
                 "--no-progress"]) == 2
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = [name for name in threads if "gloo" in name]
assert not left, f"gloo threads outlive the group: {left}"
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
@pytest.mark.parametrize("how", ["shutdown", "error"])
def test_no_gloo_thread_outlives_the_group(tmp_path, how):
    """The process group ``init_from_env`` makes is gone after ``shutdown`` (even once torch.func
    has imported ``torch.distributed.nn``, whose defaults would hold it) and after a rank's error
    in ``main``: a group left alive has gloo threads that race interpreter exit and abort the
    rank now and then (SIGABRT instead of its exit status)."""
    result = run_script(tmp_path, GLOO_THREADS_AFTER_LEAVING, how, out="run")
    if how == "error":  # both ranks refused the same command line; one of them says so
        assert result.stderr.count("fastmaml: error: meta_batch 1 is smaller than the 2 "
                                   "processes") == 1, result.stderr[-3000:]


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_config_error_is_said_once_a_machine_and_others_name_their_rank(
        tmp_path, capsys, monkeypatch, rank):
    monkeypatch.setattr(cli, "world", lambda: (rank, 2))
    monkeypatch.setenv("LOCAL_RANK", str(rank))  # one machine
    assert main(["train", "no-such-preset", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    said = capsys.readouterr().err
    if rank == 0:
        assert said.startswith("fastmaml: error: unknown preset 'no-such-preset'")
    else:
        assert said == ""
    assert main(["train", "omniglot-5w1s", "--out", str(tmp_path / "b"),
                 "--data-root", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"fastmaml: error (rank {rank} of 2): ") and "nowhere" in said
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 1 the first of a second machine: it says it
    assert main(["train", "no-such-preset", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("fastmaml: error: unknown preset")


@pytest.mark.parametrize("rank, local_rank", [("0", "0"), ("1", "1"), ("2", "0")])
def test_under_torchrun_a_warning_is_said_once_a_machine_but_a_ranks_path_by_each(
        capsys, monkeypatch, rank, local_rank):
    """The ranks of a machine read the same files: one of them warns of a stray file. A rank
    whose vmap or compiling fell back says so itself."""
    from fastmaml.errors import FastMAMLWarning, PathWarning

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    where = "" if rank == "0" else f" (rank {rank})"
    cli._show_warning("skipped 1 file(s)", FastMAMLWarning, "user.py", 1)
    assert capsys.readouterr().err == (f"fastmaml: warning{where}: skipped 1 file(s)\n"
                                       if local_rank == "0" else "")
    cli._show_warning("vmap could not run this model", PathWarning, "user.py", 1)
    assert capsys.readouterr().err == f"fastmaml: warning{where}: vmap could not run this model\n"


@pytest.mark.parametrize("batch", ["episodes", "steps"])
def test_rl_tasks_split_across_two_processes_match_one(tmp_path, batch):
    """``fastmaml train`` of an RL preset under torchrun: each rank samples its slice of the
    meta-batch (3 tasks: 1 + 2), and TRPO averages over every task, so after a meta-iteration
    the policies (MAML's and the pretrained baseline's) and the logged returns and KL are the
    single process's. In float32 a sum over ranks rounds differently, and conjugate gradient
    amplifies that by the curvature's condition: 60 steps of data cannot fill the 116
    parameters' Fisher matrix, so the damping is raised, and one iteration is compared (the
    next episodes depend on the step). The log-std, near 0 after a step of ~5e-3, is then off
    by up to 1.8e-6 on an AVX-512 CPU (atol 1e-5, 0.2% of that step)."""
    settings = ["iterations=1", "log_every=1", "meta_batch=3", "trajectories=2", "horizon=10",
                "hidden=8,8", "cg_damping=0.1", f"batch={batch}", "--no-progress"]
    train_one_and_two_processes(tmp_path, "rl-nav2d-cpu", settings)
    assert_same_learners(tmp_path, ("maml", "pretrained"), rtol=1e-4, atol=1e-5)
    for learner in ("maml", "pretrained"):
        one, two = ((tmp_path / run / f"metrics-{learner}.csv").read_text().splitlines()
                    for run in ("one", "two"))
        assert two[0] == one[0] and len(one) == len(two) == 2
        header = one[0].split(",")
        for column in ("pre_return", "best_return", "kl", "accepted", "surrogate_after"):
            a, b = (float(row[1].split(",")[header.index(column)]) for row in (one, two))
            assert b == pytest.approx(a, rel=1e-4, abs=1e-7), (learner, column)


VALIDATION_OVER_RANKS = """
import json
import sys
import torch
import torch.distributed as dist
from fastmaml import TaskBatch
from fastmaml.distributed import init_from_env
from fastmaml.experiments.base import validation_of


class Recording:  # stands in for MAML: a task's value is its number, held in its support_x
    seen = []

    def evaluate(self, chunk, steps):
        self.seen += chunk.support_x[:, 0].tolist()
        return {"loss": chunk.support_x.repeat(1, steps + 1)}


def chunks():  # of 1, 2 and 3 tasks, numbered 0 .. 5
    numbers = torch.arange(6.0)[:, None]
    return (TaskBatch(*[numbers[start:stop]] * 4) for start, stop in ((0, 1), (1, 3), (3, 6)))


init_from_env()
maml = Recording()
value = validation_of(maml, chunks, 1, 1, "val_loss")["validate"]()
with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as out:
    json.dump({"seen": maml.seen, "value": value}, out)
dist.destroy_process_group()
"""


def test_validation_splits_the_tasks_of_each_chunk_across_ranks(tmp_path):
    """Each of 2 ranks adapts its slice of every chunk (tasks 0; 1, 2; 3, 4, 5: rank 0 gets
    none of the first), and both log the mean over all 6 tasks."""
    ranks = run_on_two_ranks(tmp_path, VALIDATION_OVER_RANKS)
    assert [r["seen"] for r in ranks] == [[1.0, 3.0], [0.0, 2.0, 4.0, 5.0]]
    assert ranks[0]["value"] == ranks[1]["value"] == {"val_loss": pytest.approx(2.5)}


INTERVAL_OVER_RANKS = """
import json, sys
import torch
import torch.distributed as dist
from fastmaml.distributed import average_metrics, init_from_env, world
from fastmaml.train import IntervalMeans
init_from_env()
rank = world()[0]
before = IntervalMeans()
before.add({"loss": torch.tensor(float(rank)), "val_loss": 7.0})  # iteration 1: loss 0 and 1
state = before.state()  # checkpointed at 1, inside the interval of the row at 2
after = IntervalMeans(state)  # resumed
after.add({"loss": torch.tensor(10.0 + rank)})  # iteration 2: loss 10 and 11
row = average_metrics(after.row({"loss": 0.0}))
with open(f"{sys.argv[1]}.{rank}", "w") as out:
    json.dump({"state": state, "row": row}, out)
dist.destroy_process_group()
"""


def test_a_checkpoint_inside_a_log_interval_keeps_the_ranks_mean(tmp_path):
    """Each rank sums its own metrics over a row's interval; a checkpoint inside it keeps one
    state, the sums averaged over the ranks (every rank resumes from it), and the row after
    the resume is still the mean over every rank and iteration: (0 + 1 + 10 + 11) / 4."""
    ranks = run_on_two_ranks(tmp_path, INTERVAL_OVER_RANKS)
    assert ranks[0]["state"] == ranks[1]["state"] == {"sums": {"loss": 0.5},
                                                      "counts": {"loss": 1}}
    assert ranks[0]["row"] == ranks[1]["row"] == {"loss": 5.5}


def test_validation_is_split_across_two_processes(tmp_path, omniglot_root):
    """``fastmaml train`` with validation under torchrun (one chunk of 3 tasks: 1 + 2): the
    logged accuracy is the single process's."""
    settings = ["--data-root", str(omniglot_root), "hidden=8", "meta_batch=2", "iterations=2",
                "log_every=1", "val_every=1", "val_tasks=3", "compile=false", "--no-progress"]
    train_one_and_two_processes(tmp_path, "omniglot-5w1s", settings)
    one, two = ((tmp_path / run / "metrics-maml.csv").read_text().splitlines()
                for run in ("one", "two"))
    column = one[0].split(",").index("val_accuracy")
    validated = [[float(row.split(",")[column]) for row in log[1:]] for log in (one, two)]
    assert len(validated[0]) == 2 and validated[1] == pytest.approx(validated[0], abs=1e-6)


@pytest.mark.parametrize("preset", ["omniglot-5w1s", "rl-nav2d-cpu"])
def test_eval_under_torchrun_splits_the_test_tasks_and_matches_one_process(tmp_path, preset,
                                                                            omniglot_root):
    """Each rank adapts its share of the test tasks (Omniglot: chunks of 2 and 1 tasks, split
    1 + 1 and 0 + 1; navigation: 3 tasks, 1 + 2, every method); rank 0 writes the single
    process's eval.json."""
    settings = (["--data-root", str(omniglot_root), "hidden=8", "meta_batch=2", "iterations=2",
                 "val_every=0", "eval_tasks=3", "eval_chunk=2", "eval_inner_steps=2",
                 "compile=false"] if preset.startswith("omniglot") else
                ["iterations=1", "meta_batch=2", "trajectories=2", "horizon=10", "hidden=8,8",
                 "eval_tasks=3", "eval_trajectories=2", "eval_batch=episodes"])
    run_dir = tmp_path / "run"
    assert main(["train", preset, "--out", str(run_dir), *settings, "--no-progress"]) == 0
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    one = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "eval.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastmaml", "eval", str(run_dir), "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fastmaml: wrote") == 1  # rank 0 alone writes and says so
    two = json.loads((run_dir / "eval.json").read_text())
    assert [r["method"] for r in two] == [r["method"] for r in one]
    for a, b in zip(one, two):
        assert b["tasks"] == a["tasks"] == 3
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-6, abs=1e-9), a["method"]
        assert b["ci95"] == pytest.approx(a["ci95"], rel=1e-5, abs=1e-9), a["method"]


EVAL_OVER_RANKS = """
import json
import sys
from pathlib import Path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fastmaml import MAML, TaskBatch
from fastmaml.distributed import init_from_env
from fastmaml.experiments.base import evaluate_tasks
from fastmaml.models import MLP

init_from_env()
torch.manual_seed(0)
maml = MAML(MLP([1, 8, 1]), F.mse_loss, 0.1, 1, batched=True)
chunks = [TaskBatch(*(torch.randn(tasks, 4, 1) for _ in range(4))) for tasks in (2, 1)]
sizes = []
evaluate = maml.evaluate
maml.evaluate = lambda part, steps: sizes.append(part.num_tasks) or evaluate(part, steps)
values = evaluate_tasks(maml, chunks, 2, False, "test")
rank = dist.get_rank() if dist.is_initialized() else 0
Path(f"{sys.argv[1]}.{rank}").write_text(json.dumps({"sizes": sizes, "values": values.tolist()}))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_evaluation_adapts_each_ranks_slice_of_every_chunk(tmp_path):
    """Chunks of 2 and 1 tasks on two ranks: rank 0 adapts 1 + 0 tasks, rank 1 1 + 1, and both
    return the single process's rows in order."""
    for ranks, out in ((1, "one"), (2, "two")):
        run_script(tmp_path, EVAL_OVER_RANKS, ranks=ranks, out=out)
    one = json.loads((tmp_path / "one.0").read_text())
    ranks = [json.loads((tmp_path / f"two.{rank}").read_text()) for rank in (0, 1)]
    assert one["sizes"] == [2, 1] and [r["sizes"] for r in ranks] == [[1], [1, 1]]
    for rank in ranks:
        assert len(rank["values"]) == 3
        assert torch.allclose(torch.tensor(rank["values"]), torch.tensor(one["values"]),
                              rtol=1e-6)


RL_EVAL_OVER_RANKS = """
import json
import sys
from pathlib import Path
import torch.distributed as dist
import fastmaml.experiments.rl as rl_experiment
from fastmaml.distributed import init_from_env
from fastmaml.experiments import load_experiment

init_from_env()
sampled = []
sample_batch = rl_experiment._sample_batch
rl_experiment._sample_batch = lambda *args, **kwargs: (sampled.append(list(args[-1]))
                                                     or sample_batch(*args, **kwargs))
experiment = load_experiment(Path(sys.argv[1]))
engine = experiment.build_maml()
returns = experiment.adaptation_returns(engine, experiment.eval_tasks()[:int(sys.argv[2])])
rank = dist.get_rank() if dist.is_initialized() else 0
Path(f"{sys.argv[3]}.{rank}").write_text(json.dumps({"sampled": sampled,
                                                    "returns": returns.tolist()}))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_rl_evaluation_adapts_each_ranks_slice_of_the_test_tasks(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "rl-nav2d-cpu", "--out", str(run_dir), "iterations=1", "meta_batch=2",
                 "trajectories=2", "horizon=10", "hidden=8,8", "eval_tasks=3",
                 "eval_trajectories=2", "eval_batch=episodes", "eval_inner_steps=1",
                 "--no-progress"]) == 0
    for ranks, out, tasks in ((1, "one", 3), (2, "two", 3), (2, "few", 1)):
        run_script(tmp_path, RL_EVAL_OVER_RANKS, str(run_dir), str(tasks), ranks=ranks, out=out)
    one = json.loads((tmp_path / "one.0").read_text())
    ranks = [json.loads((tmp_path / f"two.{rank}").read_text()) for rank in (0, 1)]
    assert one["sampled"] == [[0, 1, 2]] * 2  # before and after the step
    assert [r["sampled"] for r in ranks] == [[[0]] * 2, [[1, 2]] * 2]
    for rank in ranks:
        assert torch.allclose(torch.tensor(rank["returns"]), torch.tensor(one["returns"]),
                              rtol=1e-6)
    # fewer tasks than ranks: rank 0 idles, and both return the task's row
    few = [json.loads((tmp_path / f"few.{rank}").read_text()) for rank in (0, 1)]
    assert [r["sampled"] for r in few] == [[], [[0]] * 2]
    for rank in few:
        assert torch.allclose(torch.tensor(rank["returns"]), torch.tensor(one["returns"][:1]),
                              rtol=1e-6)


def test_reproduce_under_torchrun_trains_evaluates_and_reports_as_one_process(tmp_path):
    """``torchrun ... fastmaml reproduce``: the ranks split the training and the test tasks,
    rank 0 alone plots and writes the report, and the figures are the single process's."""
    command = ["reproduce", "sinusoid", "--budget", "tiny", "--no-progress"]
    assert main([*command, "--root", str(tmp_path / "one")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastmaml", *command, "--root", str(tmp_path / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fastmaml: wrote") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "sinusoid" / "figures").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "sinusoid" / "figures").iterdir())
    one, two = (json.loads((tmp_path / run / "sinusoid" / "eval.json").read_text())
                for run in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert (b["method"], b["k_shot"]) == (a["method"], a["k_shot"])
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-4), (a["method"], a["k_shot"])
    assert "Sinusoid regression" in (tmp_path / "two" / "REPORT.md").read_text()


def test_the_process_group_waits_longer_than_torchs_default(monkeypatch):
    """A rank may wait at a collective for more than torch's 30 minutes while rank 0 alone waits
    for another learner's start: the group ``init_from_env`` makes allows hours."""
    from datetime import timedelta

    from fastmaml import distributed

    # (no LOCAL_RANK: launchers of one process per machine, Kubeflow's, leave it out)
    calls = groups_made(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                      "MASTER_PORT": "29500"})
    distributed.init_from_env()
    assert len(calls) == 1
    assert calls[0]["timeout"] >= timedelta(hours=2)


def test_a_process_whose_peers_never_start_says_that_it_waits_and_then_why_it_stopped(
        monkeypatch, capsys):
    """One process of two started by hand: it says where it waits, and at the group's timeout a
    ``GroupError`` says in one line that the processes did not meet (was torch's traceback, after
    a silent wait)."""
    import socket
    from datetime import timedelta

    from fastmaml import ConfigError, distributed
    from fastmaml.errors import GroupError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "JOIN_NOTICE_S", 0.5)
    monkeypatch.delenv("FASTMAML_GROUP_TIMEOUT", raising=False)
    assert distributed.group_timeout() == timedelta(hours=6)
    for bad in ("0", "0.5", "-1", "6h", "nan", "inf", "1e20"):
        monkeypatch.setenv("FASTMAML_GROUP_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="FASTMAML_GROUP_TIMEOUT must be a number "
                           f"of seconds from 1 to 1e9, got '{bad}'"):
            distributed.init_from_env()
    monkeypatch.setenv("FASTMAML_GROUP_TIMEOUT", "3")  # (default 6 h)
    with pytest.raises(GroupError) as stopped:
        distributed.init_from_env()
    need = ("each of the 2 processes must be started, with the same MASTER_ADDR and MASTER_PORT "
            "(torchrun starts them all)")
    assert str(stopped.value).startswith(f"the processes did not meet at 127.0.0.1:{port} (")
    assert str(stopped.value).endswith(f"): {need}") and "\n" not in str(stopped.value)
    assert capsys.readouterr().err == (f"fastmaml: rank 0 is waiting at 127.0.0.1:{port} for the "
                                       f"other processes, for up to 3 s: {need}\n")
    assert distributed.world() == (0, 1)
    with socket.socket() as holder:  # the port taken by another program: said so
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(GroupError, match=r"EADDRINUSE.*\): another program holds that "
                           "port: give the processes another MASTER_PORT"):
            distributed.init_from_env()


def groups_made(monkeypatch, environment: dict[str, str]) -> list[dict]:
    """Set torchrun's ``environment`` and stand in for torch's process group: the options of
    each ``init_process_group`` call (``init_from_env``'s), in order."""
    import torch.distributed as dist

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    calls: list[dict] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **options: calls.append(options))
    return calls


DIES_ONCE = """
import os, signal, sys, time

from fastmaml import train
from fastmaml.cli import main

step = train.GradientLearner.step
if (os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]) == ("1", "1"):
    time.sleep(3)  # the restarted rank 0 looks up rank 1's address before rank 1 publishes it


def step_or_die(self, iteration):
    # rank 1 of torchrun's first attempt dies in the second learner's iteration 5, after its
    # checkpoint of 4
    if (os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"], self.name,
            iteration) == ("1", "0", "pretrained", 5):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, iteration)


train.GradientLearner.step = step_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_that_torchrun_restarts_after_a_process_died_resumes_as_if_uninterrupted(tmp_path):
    """torchrun --max-restarts: the surviving rank says what failed, and the restarted
    processes meet again (torch's shared store held the first attempt's addresses: they waited
    hours) and resume from the last checkpoint to the uninterrupted run's parameters."""
    settings = ["iterations=8", "log_every=2", "checkpoint_every=4", "--no-progress"]
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "one"), *settings]) == 0
    script = tmp_path / "dies_once.py"
    script.write_text(DIES_ONCE)
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", str(script), "train", "sinusoid-demo", "--out",
         str(tmp_path / "two"), *settings], env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = torchrun.communicate(timeout=300)
    finally:  # no process of a failed test lives on (a group that cannot meet waits for hours)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(torchrun.pid, signal.SIGKILL)
    assert torchrun.returncode == 0, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("fastmaml: error")]
    assert len(said) == 1 and said[0].startswith(
        "fastmaml: error (rank 0 of 2): all_reduce across the processes failed ("), stderr[-3000:]
    assert said[0].endswith("where another process of this run stopped, its own message or "
                            "torchrun's summary says why")
    assert "by peer" in said[0]  # gloo's words ("closed by peer", "reset by peer"), no more:
    assert "pair.cc" not in said[0] and "This is typically" not in said[0]
    assert "Traceback" not in stderr.split("failed (exitcode: -9)")[0]
    assert "resuming maml, pretrained from the last checkpoint" in stdout
    assert_same_learners(tmp_path, ("maml", "pretrained", "oracle"))


def test_torchrun_restarts_across_machines_need_their_own_store(monkeypatch):
    """Across machines the restart counts may differ, so restarted processes cannot meet in the
    shared store: where restarts are allowed, torchrun must make a new store each attempt."""
    from fastmaml import distributed
    from fastmaml.errors import ConfigError

    calls = groups_made(monkeypatch, {
        "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500", "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"})
    with pytest.raises(ConfigError, match="--max-restarts across several machines needs the c10d "
                                          "rendezvous .*TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.init_from_env()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the remedy: torch's own store
    distributed.init_from_env()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the shared store serves
    distributed.init_from_env()
    assert len(calls) == 2 and not any("store" in options for options in calls)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_a_process_group_refused_before_it_exists_is_said_once_a_machine(
        tmp_path, capsys, monkeypatch, local_rank):
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": local_rank,
                        "LOCAL_RANK": local_rank, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "TORCHELASTIC_MAX_RESTARTS": "3",
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    said = capsys.readouterr().err
    if local_rank == "0":
        assert said.startswith("fastmaml: error: torchrun --max-restarts across several machines")
    else:
        assert said == ""


def test_restarted_processes_on_one_machine_meet_under_their_attempts_keys(monkeypatch):
    """torchrun's shared store still holds the first attempt's addresses; a restarted attempt's
    processes (one machine: one restart count) use keys of their own in it, with the rank and
    world size torch's own rendezvous gives."""
    import torch.distributed as dist

    from fastmaml import distributed

    port = free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    calls = groups_made(monkeypatch, {
        "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "TORCHELASTIC_MAX_RESTARTS": "1",
        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"})
    distributed.init_from_env()  # the first attempt: torch's own
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    distributed.init_from_env()
    assert "store" not in calls[0]
    restarted = calls[1]
    assert (restarted["rank"], restarted["world_size"]) == (1, 2)
    restarted["store"].set("rank_1", "address")
    assert agent_store.get("fastmaml/attempt1/rank_1") == b"address"
    assert not agent_store.check(["rank_1"])


@pytest.mark.parametrize("environment, said", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but not RANK, MASTER_ADDR, MASTER_PORT: launch "
                          "the processes with torchrun (which sets them all), or unset "
                          "WORLD_SIZE to run one process"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number of processes")])
def test_a_process_group_environment_torchrun_did_not_make_is_named(
        tmp_path, capsys, monkeypatch, environment, said):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fastmaml: error: {said}\n"


def test_under_torchrun_a_command_that_runs_in_one_process_runs_on_rank_0_alone(tmp_path):
    """adapt and plot under torchrun ran whole on every rank: adapt's ranks took each other for
    another command holding the run, and plot drew every figure twice."""
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "run"), "iterations=2",
                 "baseline_iterations=2", "eval_tasks=2", "--no-progress"]) == 0
    (tmp_path / "s.csv").write_text("x,y\n0.5,1.0\n1.0,0.5\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "fastmaml", "adapt", str(tmp_path / "run"),
               "--support", str(tmp_path / "s.csv"), "--query", str(tmp_path / "s.csv"),
               "--out", str(tmp_path / "run" / "predictions.csv")]  # (inside: under its lock)
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fastmaml: adapted") == 1, result.stderr[-3000:]
    assert (tmp_path / "run" / "predictions.csv").read_text().count("\n") == 3


def test_a_one_process_command_runs_on_each_process_another_launcher_started(capsys,
                                                                             monkeypatch):
    """Only torchrun's ranks past the first leave such a command to rank 0: a process that
    another launcher started with WORLD_SIZE and RANK set (Kubeflow's, one per machine) runs it."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["presets"]) == 0 and "omniglot-5w1s" in capsys.readouterr().out
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # as torchrun sets it
    assert main(["presets"]) == 0 and capsys.readouterr() == ("", "")


def test_a_run_another_command_holds_is_refused_by_every_rank_in_one_line(tmp_path):
    """Rank 0 holds the run's lock: its refusal reaches every rank (none waits for rank 0 at a
    collective and then reports the group's failure), and one line says it."""
    from fastmaml.runlock import locked_run_dir

    run = tmp_path / "run"
    with locked_run_dir(run):  # another command holds the run
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "fastmaml", "train", "sinusoid-demo", "--out", str(run), "--no-progress"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300)
    said = [line for line in result.stderr.splitlines() if line.startswith("fastmaml: error")]
    assert result.returncode != 0
    assert len(said) == 1 and " is in use by process " in said[0], result.stderr[-3000:]
