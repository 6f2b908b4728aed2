"""torchrun with 2 gloo processes on 127.0.0.1 reproduces the single-process run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastmaml.cli import main
from fastmaml.train import checkpoint_path, load_checkpoint

SETTINGS = ["iterations=4", "log_every=2", "checkpoint_every=2", "--no-progress"]


@pytest.mark.parametrize("meta_batch", [8, 25])  # 4 + 4 tasks, and the paper's 25 as 12 + 13
def test_two_processes_match_one(tmp_path, meta_batch):
    settings = [*SETTINGS, f"meta_batch={meta_batch}"]
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "one"), *settings]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # --standalone: rendezvous on localhost
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastmaml", "train", "sinusoid-demo",
         "--out", str(tmp_path / "two"), *settings],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    for learner in ("maml", "pretrained", "oracle"):
        one = load_checkpoint(checkpoint_path(tmp_path / "one", learner))["learner"]["module"]
        two = load_checkpoint(checkpoint_path(tmp_path / "two", learner))["learner"]["module"]
        for name, value in one.items():
            assert torch.allclose(value, two[name], rtol=1e-6, atol=1e-7), (learner, name)
    one_log = (tmp_path / "one" / "metrics-maml.csv").read_text().splitlines()
    two_log = (tmp_path / "two" / "metrics-maml.csv").read_text().splitlines()
    assert len(one_log) == len(two_log) == 3
