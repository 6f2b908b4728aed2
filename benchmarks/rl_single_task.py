"""Plain TRPO on one fixed locomotion task: does the policy and environment setup learn at all?

    python benchmarks/rl_single_task.py --env fastmaml/AntVel-v0 --task 1.5 \
        [--episodes 50] [--iterations 100] [--horizon 200] [--workers 0] [--csv FILE]

A diagnosis for the meta-RL runs (issue 16): if a single policy cannot learn one task with the
same policy, sampler, advantages and TRPO step as the ``pretrained`` learner, MAML cannot learn
to adapt to many. ``--task`` is the goal velocity (``...Vel``) or direction (+1 / -1, ``...Dir``).
Each iteration prints the mean return, mean episode length and mean reward per step of its
own episodes (sampled before the update) and the seconds it took. Where rewards are negative a
return also rises when episodes end sooner; the reward per step tells the two apart. The last
line compares the first and last ten iterations; the first is the random initial policy's.
"""
from __future__ import annotations

import argparse
import csv
import time

import torch

from fastmaml.rl import GaussianMLPPolicy, Sampler, env_class, policy_objective, trpo_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="fastmaml/AntVel-v0")
    parser.add_argument("--task", type=float, default=1.5,
                        help="goal velocity, or direction +1 / -1")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per iteration")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--horizon", type=int, default=0, help="0: the paper's (200)")
    parser.add_argument("--max-kl", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=0, help="sampler worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", help="write the per-iteration figures here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    key = "direction" if "Dir" in env_class(args.env).__name__ else "velocity"
    task = {key: args.task}
    rows = []
    with Sampler(args.env, args.horizon or None, args.workers) as sampler:
        torch.manual_seed(args.seed)
        policy = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim)
        params = [p for p in policy.parameters() if p.requires_grad]
        print(f"{args.env} {task}: {args.episodes} episodes x {sampler.horizon} steps per "
              "iteration, TRPO")
        for iteration in range(args.iterations):
            start = time.perf_counter()
            episodes = sampler.sample(policy, [task], args.episodes, seed=args.seed * 100_000
                                      + iteration)
            stats = trpo_step(params, policy_objective(policy, episodes), args.max_kl)
            row = {"iteration": iteration, "return": episodes.mean_returns().item(),
                   "length": episodes.masks.sum(-1).mean().item(),
                   "per_step": (episodes.rewards.sum() / episodes.masks.sum()).item(),
                   "kl": stats.kl,
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"{iteration:4d}  return {row['return']:9.2f}  length {row['length']:6.1f}  "
                  f"reward per step {row['per_step']:7.3f}  kl {row['kl']:.4f}  "
                  f"{row['seconds']:.1f} s", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    first, last = rows[:10], rows[-10:]
    print(f"mean return, first {len(first)} iterations: "
          f"{sum(r['return'] for r in first) / len(first):.2f}; last {len(last)}: "
          f"{sum(r['return'] for r in last) / len(last):.2f}")


if __name__ == "__main__":
    main()
