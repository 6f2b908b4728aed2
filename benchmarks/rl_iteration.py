"""Cost split of one meta-RL iteration (MAML + TRPO) at the CPU-budget batch, per environment.

    python benchmarks/rl_iteration.py [--envs nav2d,cheetah-vel,ant-vel] [--iterations 3]
                                      [--hvp gauss_newton,exact]

Runs a few meta-iterations of the experiment's own MAML learner (20 tasks x 10 episodes x
horizon 100 for the cheetahs, 200 for the ants; the paper's 20 x 20 x 100 for 2D navigation) on
one thread and prints
the median seconds of each part: sampling (support and query episodes), the inner step, the
meta-objective and its gradient, conjugate gradient (10 Hessian-vector products) and the line
search, plus the sampler's environment steps per second, counted as full-length episodes (an
upper bound where episodes end early: the ant when it falls, 2D navigation at the goal).
``--hvp`` lists the Hessian-vector product methods to compare, one row each.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from fastmaml.experiments import create_run
from fastmaml.rl import default_horizon

PRESETS = {"nav2d": "rl-nav2d-cpu", "cheetah-vel": "rl-cheetah-vel-cpu",
           "cheetah-dir": "rl-cheetah-dir-cpu", "ant-vel": "rl-ant-vel-cpu",
           "ant-dir": "rl-ant-dir-cpu"}
PARTS = ("sample_s", "adapt_s", "gradient_s", "cg_s", "line_search_s")


def cost_split(preset: str, iterations: int, hvp: str) -> dict[str, float]:
    """Median seconds per part over ``iterations`` meta-iterations (after one warm-up)."""
    with tempfile.TemporaryDirectory() as run_dir:
        experiment = create_run(preset, Path(run_dir),
                                ["pretrained=false", "oracle=false", f"hvp={hvp}"])
        learner = experiment.learners()[0]
        rows = [learner.step(i) for i in range(iterations + 1)][1:]
        cfg = experiment.cfg
    split = {part: statistics.median(row[part] for row in rows) for part in PARTS}
    horizon = cfg.horizon or default_horizon(cfg.env)
    env_steps = 2 * cfg.meta_batch * cfg.trajectories * horizon  # support + query episodes
    split["env_steps_per_s"] = env_steps / split["sample_s"]
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="nav2d,cheetah-vel,ant-vel",
                        help=f"comma-separated, from: {', '.join(PRESETS)}")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--hvp", default="gauss_newton",
                        help="comma-separated: gauss_newton, exact, finite_difference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.envs.split(",")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown env: {', '.join(unknown)}")
    header = ["env", "hvp", *(p.removesuffix("_s") for p in PARTS), "total", "env steps/s<="]
    row = "{:<12}{:<18}" + "{:>14}" * (len(header) - 2)
    print(row.format(*header))
    for name in names:
        for hvp in args.hvp.split(","):
            split = cost_split(PRESETS[name], args.iterations, hvp)
            total = sum(split[p] for p in PARTS)
            cells = [f"{split[p]:.2f}s {100 * split[p] / total:3.0f}%" for p in PARTS]
            print(row.format(name, hvp, *cells, f"{total:.2f}s",
                             f"{split['env_steps_per_s']:,.0f}"))


if __name__ == "__main__":
    main()
