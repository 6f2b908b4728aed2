"""One command at a time in a run directory, tested with real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

import fastmaml.experiments as experiments
import fastmaml.runlock as runlock
from fastmaml.cli import main
from fastmaml.config import load_config_dict
from fastmaml.errors import ConfigError
from fastmaml.experiments import train_run
from fastmaml.runlock import OWNER_NAME, START_LOCK_NAME, locked_run_dir


def fastmaml(*args: str) -> subprocess.Popen[str]:
    """A fastmaml command in a process of its own. It starts with Ctrl-C's default action,
    even where pytest was started with SIGINT ignored: the suite's ``process_state`` fixture
    handles SIGINT, and a handled signal is reset to its default in a new program."""
    return subprocess.Popen([sys.executable, "-m", "fastmaml", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def joined(thread: threading.Thread, timeout: float = 120) -> None:
    """Join ``thread`` (a daemon: one stuck does not keep the test process alive), or fail."""
    thread.join(timeout)
    assert not thread.is_alive(), f"{thread.name} is stuck"


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_train_is_refused_and_a_killed_one_blocks_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = fastmaml("train", "sinusoid-demo", "--out", str(run), "iterations=1000000",
                     "checkpoint_every=100000000",  # no checkpoint: the third starts afresh
                     "--no-progress")
    try:
        wait_for(run / "metrics-maml.csv", first)  # training, the lock held
        second = fastmaml("train", "sinusoid-demo", "--out", str(run), "--no-progress")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and out == ""
        assert err.count("\n") == 1 and f"is in use by process {first.pid} on" in err
        assert "sinusoid-demo" in err  # names the other command too
        rows = (run / "metrics-maml.csv").read_text().splitlines()
        assert len(rows) == len(set(rows))  # no interleaved duplicate rows
        for lock in run.glob(".fastmaml*.lock"):  # removed by hand: the owner is still known
            lock.unlink()
        second = fastmaml("train", "sinusoid-demo", "--out", str(run), "--no-progress")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and err.count("\n") == 1
        assert f"is in use by process {first.pid} on" in err and "was removed" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / OWNER_NAME).exists()  # the killed process left its lock files behind
    third = fastmaml("train", "sinusoid-demo", "--out", str(run), "iterations=3",
                     "baseline_iterations=3", "--no-progress")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert "maml: 3 iterations done" in out


def test_a_run_left_by_a_process_that_still_runs_is_not_refused(tmp_path: Path) -> None:
    """The owner note outlives the lock (a notebook that trained and goes on, a --learner
    command about to exit): a lock released in the same file is taken, though its last owner
    runs; only a lock file removed under a running owner is refused."""
    run = tmp_path / "run"
    run.mkdir()  # (a folder the command made would go again with it)
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fastmaml.runlock import locked_run_dir\n"
         "with locked_run_dir(Path(sys.argv[1])): pass\nprint('released', flush=True)\n"
         "time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "released\n"
        assert f'"pid": {owner.pid}' in (run / OWNER_NAME).read_text()
        with locked_run_dir(run):
            pass
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("signum, said", [(signal.SIGTERM, "SIGTERM"),
                                          (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_checkpoints_the_current_iteration_and_frees_the_run(
        tmp_path: Path, signum: int, said: str) -> None:
    """SIGTERM, or a Ctrl-C, exits as the signal would (143, 130) after a checkpoint."""
    run = tmp_path / "run"
    first = fastmaml("train", "sinusoid-demo", "--out", str(run), "iterations=1000000",
                     "checkpoint_every=100000000", "log_every=10", "--no-progress")
    log = run / "metrics-maml.csv"
    try:
        wait_for(log, first)
        deadline = time.monotonic() + 120
        while log.read_text().count("\n") < 2:  # a logged row: the loop (and its handler) runs
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no row logged in 120 s"
            time.sleep(0.1)
        first.send_signal(signum)
        _, err = first.communicate(timeout=120)
    finally:  # (not left training a million iterations where the test failed)
        first.kill()
        first.wait()
    assert first.returncode == 128 + signum, err
    stopped = int(err.split(f"({said}) at iteration ")[1].split()[0])
    checkpoint = torch.load(run / "checkpoints" / "maml.pt", weights_only=False)
    assert checkpoint["iteration"] == stopped >= 1  # though no checkpoint was due
    again = fastmaml("train", "sinusoid-demo", "--out", str(run), f"iterations={stopped + 2}",
                     "baseline_iterations=1", "--no-progress")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err  # the lock is free, and the run resumes where it stopped
    assert f"maml: {stopped + 2} iterations done" in out


def test_a_refused_command_leaves_no_new_folder(tmp_path: Path) -> None:
    run = tmp_path / "new"
    assert main(["train", "sinusoid-demo", "--out", str(run), "eval_k_shots=", "--no-progress"]) == 2
    assert not run.exists()


def test_a_run_directory_that_is_a_file_is_named(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes").write_text("not a run")
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "notes"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"fastmaml: error: --out {tmp_path / 'notes'} is a file, "
                                       "not a folder\n")
    with pytest.raises(ConfigError, match=f"the run directory {tmp_path / 'notes'} is a file: "
                       r"give --out a folder \(new or a run's\)"):  # from Python too
        train_run("sinusoid-demo", tmp_path / "notes", [], progress=False)


def test_a_folder_of_other_files_is_trained_into_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / ".DS_Store").write_text("")  # hidden: not counted
    command = ["train", "sinusoid-demo", "--out", str(tmp_path), "iterations=1",
               "baseline_iterations=1", "--no-progress"]
    assert main(command) == 0
    out, err = capsys.readouterr()
    assert (f"fastmaml: warning: {tmp_path} is not a run's folder and holds 1 other entry (e.g. "
            "notes.txt)") in err and "resuming" not in out
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    assert main(command) == 0  # now a run's folder: resumed without a warning
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert "; resuming maml, pretrained, oracle from the last checkpoint" in out


def test_a_meta_batch_smaller_than_the_processes_is_refused_before_any_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("fastmaml.distributed.world", lambda: (0, 4))  # as if under torchrun
    monkeypatch.setattr(experiments, "gather_ranks", lambda mine: [mine] * 4)  # (no group here)
    run = tmp_path / "new"
    assert main(["train", "sinusoid-demo", "--out", str(run), "meta_batch=3", "--no-progress"]) == 2
    assert "meta_batch 3 is smaller than the 4 processes" in capsys.readouterr().err
    assert not run.exists()


def test_two_learners_of_one_run_train_side_by_side(tmp_path: Path) -> None:
    run = tmp_path / "run"
    long = ["iterations=1000000", "baseline_iterations=3", "checkpoint_every=100000000"]
    first = fastmaml("train", "sinusoid-demo", "--out", str(run), *long, "--learner", "maml",
                     "--no-progress")
    try:
        wait_for(run / "metrics-maml.csv", first)  # training maml, its lock held
        # before maml's first checkpoint, another learner may not change the run's settings
        other = fastmaml("train", "sinusoid-demo", "--out", str(run), *long, "hidden=16",
                         "--learner", "pretrained", "--no-progress")
        out, err = other.communicate(timeout=300)
        assert other.returncode == 2 and f"{run} keeps the hidden it started with" in err
        other = fastmaml("train", "sinusoid-demo", "--out", str(run), *long, "--learner",
                         "pretrained", "--no-progress")
        out, err = other.communicate(timeout=300)
        assert other.returncode == 0, err
        assert "learner pretrained" in out and "pretrained: 3 iterations done" in out
        assert "oracle" not in out and not (run / "metrics-oracle.csv").exists()
        for refused in (["--learner", "maml"], []):  # the same learner, or the whole run
            second = fastmaml("train", "sinusoid-demo", "--out", str(run), *long, *refused,
                              "--no-progress")
            out, err = second.communicate(timeout=120)
            assert second.returncode == 2 and out == ""
            assert f"learner 'maml' of {run} is in use by process {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_learner_is_refused_while_a_command_holds_the_whole_run(tmp_path: Path) -> None:
    """Before that command holds each of its learners (it knows them once loaded), only the
    whole run's lock tells a --learner command that the run is in use."""
    run = tmp_path / "run"
    with locked_run_dir(run):
        with pytest.raises(ConfigError, match=f"{run} is in use by process {os.getpid()}"):
            with locked_run_dir(run, learner="maml"):
                pass
    with locked_run_dir(run, learner="maml"):  # free again
        pass


def test_an_unknown_learner_is_a_clear_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "new"
    assert main(["train", "sinusoid-demo", "--out", str(run), "--learner", "maml++",
                 "--no-progress"]) == 2
    assert ("--learner 'maml++' (did you mean maml?): runs of the sinusoid-demo preset have "
            "the learners maml, pretrained, oracle") in capsys.readouterr().err
    assert not run.exists()


def test_a_learner_starting_while_another_checks_the_run_is_not_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``--learner`` command checks that no command holds the whole run for an instant, and
    leaves the run's owner file alone: a slow disk (writing that file) never makes another
    learner starting meanwhile look refused by a whole-run command."""
    write = runlock.write_text_atomic
    checking = threading.Event()

    def slow_for_the_run(text: str, path: Path) -> None:
        if path.name == OWNER_NAME:
            checking.set()
            time.sleep(4 * runlock.LOCK_WAIT_S)
        write(text, path)

    monkeypatch.setattr(runlock, "write_text_atomic", slow_for_the_run)
    run, inside, done = tmp_path / "run", threading.Event(), threading.Event()

    def first_learner() -> None:
        with runlock.locked_run_dir(run, "maml"):
            inside.set()
            done.wait()

    thread = threading.Thread(target=first_learner, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (inside.is_set() or checking.is_set()):
            assert thread.is_alive() and time.monotonic() < deadline, "the first never started"
            time.sleep(0.01)
        with runlock.locked_run_dir(run, "pretrained"):  # not refused
            assert not (run / OWNER_NAME).exists()
    finally:
        done.set()
        joined(thread)
    assert not checking.is_set()


def test_learners_starting_together_each_record_their_machine(tmp_path, monkeypatch):
    """Two ``--learner`` commands of one run append to its machine.json at once; the lock keeps
    one from writing over the other's entry (the write is slowed to widen the window)."""
    write = experiments.write_text_atomic
    monkeypatch.setattr(experiments, "write_text_atomic",
                        lambda text, path: time.sleep(0.3) or write(text, path))
    starts = [threading.Thread(target=experiments._record_machine, args=(tmp_path, "cpu", 1),
                               daemon=True) for _ in range(2)]
    for thread in starts:
        thread.start()
    for thread in starts:
        joined(thread)
    assert len(json.loads((tmp_path / "machine.json").read_text())) == 2


def held(path: Path) -> bool:
    probe = FileLock(path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def wait_until_held(path: Path, timeout: float = 60,
                    unless: threading.Event | None = None) -> None:
    """Until ``path`` is held (or ``unless`` is set: its holder-to-be has ended)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and held(path)) and not (unless and unless.is_set()):
        assert time.monotonic() < deadline, f"{path} was never held"
        time.sleep(0.02)


def start_together(monkeypatch, run: Path, first: tuple[str, list[str]],
                   second: tuple[str, list[str]]) -> dict[str, object]:
    """Train two learners (name, overrides) of a new run in two threads, as two ``--learner``
    commands: the first loads its data until the second holds its learner's lock and is
    starting. Each one's Experiment, or what it raised."""
    prepare = experiments.prepare_run
    ended = threading.Event()  # the second's command, refused or done: the first goes on

    def slow_for_the_first(*args, **kwargs):
        experiment = prepare(*args, **kwargs)
        if threading.current_thread().name == first[0]:
            load = experiment.learners

            def slow_load():
                wait_until_held(run / f".fastmaml-{second[0]}.lock", unless=ended)
                time.sleep(0.5)  # the second goes on to start meanwhile
                return load()

            experiment.learners = slow_load
        return experiment

    monkeypatch.setattr(experiments, "prepare_run", slow_for_the_first)
    outcome: dict[str, object] = {}

    def train(learner: str, overrides: list[str]) -> None:
        try:
            outcome[learner] = train_run("sinusoid-demo", run, ["iterations=2",
                                                                 "baseline_iterations=2",
                                                                 *overrides],
                                         progress=False, learner=learner)
        except Exception as error:  # noqa: BLE001 (the test reads it)
            outcome[learner] = error
        finally:
            if learner == second[0]:
                ended.set()

    threads = [threading.Thread(target=train, name=name, args=(name, overrides), daemon=True)
               for name, overrides in (first, second)]
    threads[0].start()
    # the first is starting (it holds the start lock, which it takes after its learner's):
    # the second, started before that, could take the start lock first and start alone
    wait_until_held(run / START_LOCK_NAME)
    threads[1].start()
    for thread in threads:
        joined(thread)
    return outcome


def test_a_learner_starting_while_another_loads_takes_its_settings(tmp_path, monkeypatch):
    """The second waits while the first loads its data, and then trains with the settings the
    first wrote, not with its own."""
    run = tmp_path / "run"
    outcome = start_together(monkeypatch, run, ("maml", ["hidden=16"]), ("pretrained", []))
    # without the wait, pretrained trains (40, 40) and writes its config over maml's
    assert {name: experiment.cfg.hidden for name, experiment in outcome.items()} == {
        "maml": (16,), "pretrained": (16,)}
    assert load_config_dict(run / "config.yaml")["hidden"] == [16]


def test_a_learner_that_stops_while_another_starts_leaves_it_its_run(tmp_path, monkeypatch):
    """The first stops on a bad value after loading, in the folder it made: the second, waiting
    to start, keeps the folder and its locks (not removed as the refused command's trace)."""
    run = tmp_path / "run"
    outcome = start_together(monkeypatch, run, ("typo", []), ("maml", []))
    assert isinstance(outcome["typo"], ConfigError)
    assert "--learner 'typo'" in str(outcome["typo"])
    assert outcome["maml"].cfg.iterations == 2, outcome["maml"]  # trained, no error
    assert (run / "config.yaml").is_file() and (run / ".fastmaml-maml.lock").is_file()


def test_under_torchrun_every_rank_takes_the_settings_rank_0_takes(tmp_path, monkeypatch):
    """Rank 0 alone can tell that another learner of the run trains (its locks): a --learner
    command's other ranks take the run's saved settings because it does, not their own."""
    run = tmp_path / "run"
    experiments.create_run("sinusoid-demo", run, ["hidden=16"])  # saved, not started
    monkeypatch.setattr("fastmaml.distributed.world", lambda: (1, 2))  # as rank 1 of 2
    monkeypatch.setattr(experiments.base, "barrier", lambda: None)  # (rank 0 is not here)
    monkeypatch.setattr(experiments, "gather_ranks", lambda mine: [True, mine])  # rank 0: in use
    experiment, _ = experiments._start("sinusoid-demo", run, [], "pretrained", False, ExitStack())
    assert experiment.cfg.hidden == (16,)  # not the preset's (40, 40)
