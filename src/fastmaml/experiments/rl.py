"""Meta-reinforcement learning (paper section 5.3, Figure 5): 2D navigation and locomotion.

Learners (each checkpointed by ``fit``, each keeps the policy with the best training return):

- ``maml``: MAML with a REINFORCE inner step and TRPO meta-updates. Each meta-iteration samples
  ``meta_batch`` tasks, ``trajectories`` episodes per task with the pre-update policy (support),
  adapts on them, samples as many with the adapted policies (query), and takes one TRPO step on
  the post-update surrogate (``fastmaml.rl.trpo_meta_step``). Its training return is the mean
  post-update (query) return. With ``batch=steps`` a batch is instead ``trajectories x horizon``
  environment steps per task, gathered by environments that run episode after episode
  (``Sampler.sample_steps``, as the official test scripts sampled one task): more, shorter
  episodes where episodes end early. (The official training sampler counted the steps over all
  the meta-batch's tasks together, so one task's share could differ.)
- ``pretrained``: the same policy, the same tasks and episodes per iteration, trained by TRPO on
  the returns of the policy itself across tasks, without adaptation (per-task linear baselines
  and standardised advantages, the same KL bound): a policy "pretrained on all tasks". The
  official code's ``use_maml=False`` baseline optimised the same vanilla policy-gradient loss
  over the pre-update episodes, but with Adam (one epoch, lr 1e-3) instead of TRPO. Its
  training return is the mean return of its own episodes.
- ``oracle`` (``oracle=true``; the paper presets): trained as ``pretrained``, but told the task:
  its observations end with the task's values (``fastmaml.rl.TaskInputs``), as the official
  code's oracle environments appended the goal. It is evaluated without adapting (step size 0),
  the paper's upper reference.

At each iteration the return of the policy that sampled the episodes is compared with the best
so far; the best one (its parameters before that iteration's update) is kept in the learner's
checkpoint, and evaluation uses it, as the paper evaluates its best checkpoint
(``eval_policy=last`` uses the final parameters instead).

Randomness: the tasks and the episode seeds of iteration i are functions of (seed, i) only, and
the TRPO update is deterministic, so a resumed run repeats an uninterrupted one exactly.

Evaluation (``fastmaml eval``) follows the official test scripts (cbfinn/maml_rl,
``maml_examples/test_maml_*.py``; ``fastmaml.rl.OfficialTest``): ``eval_tasks`` (40) tasks drawn
as they drew them (``fastmaml.rl.official_test_tasks``: numpy's legacy generator seeded with 1,
2 for the ant direction, then one draw of the goals; for 2D navigation the paper's 40 goals,
whose mean distance from the start is 0.40, so a policy that stays put scores -40); for each of
MAML, pretrained and a randomly initialised policy, ``eval_trajectories`` episodes per task are
sampled, the policy takes one plain policy-gradient step per task (REINFORCE), fresh episodes
are sampled, and so on for ``eval_inner_steps`` (3) steps. The value at step k is the mean
undiscounted return of the episodes sampled after k steps. All methods see the same tasks and
the same episode seeds. Step sizes are the scripts' for each method: MAML its training
``inner_lr``; the pretrained and random policies 0.02 and 0.1 (cheetah velocity), 0.2 and 0.5
(cheetah direction), 0.2 and 1.0 (ants), MAML's (2D navigation: 0.5 for every method); later
steps take half of the first step's (ant direction: 0.01 of it). ``eval_inner_lr`` > 0 sets
one first step size for every method. For goal-direction tasks the record
also holds ``right_way``: per step, the share of tasks whose mean return exceeds
``right_way_threshold`` (net progress in the goal direction beyond the costs): the paper's
"from the wrong way to the right way", read without the return scale, which differs from rllab's.

Evaluation batches (``eval_batch``): ``steps`` (default) samples as the official test did, the
paper's "40 trajectories (4000 samples)" (the scripts' 4,000 environment steps per task and
step: 40 episodes of navigation's 100 steps, 20 of locomotion's 200; 8,000 for the ant
direction, so its paper preset evaluates 40, its -cpu preset 20): ``eval_trajectories``
environments per task run episode after episode until the finished episodes hold
``eval_trajectories x horizon`` steps (``Sampler.sample_steps``); the update uses all of them
and the value is the mean return over them, which favours short episodes where episodes end
early (2D navigation at the goal, a fallen ant), as the paper's numbers do. ``episodes`` samples
exactly ``eval_trajectories`` episodes per task: the unbiased mean return. Without early
termination they are the same.

2D navigation and the action scale: the paper's text says actions are velocities clipped to
[-0.1, 0.1] and alpha = 0.1. The official code wrapped the environment in rllab's ``normalize``,
so the velocity was clip(0.1 * a, -0.1, 0.1), and its 2D-navigation checkpoint used alpha = 0.5;
the paper's numbers come from that checkpoint. The presets follow the official code
(``action_scale=0.1``, ``inner_lr=0.5``); ``action_scale=1 inner_lr=0.1`` gives the paper's text.
Measured (40 meta-iterations each, paper-scale batches, 40 evaluation tasks of the earlier
``default_rng(20172)`` draw, returns after 0/1/2/3 steps): official scale and alpha
-31.1 / -11.4 / -5.3 / -5.2 (random init -68.6 ... -54.2);
the paper's text -31.3 / -13.5 / -9.9 / -9.0 (random init -88.5 ... -83.4); the paper reports
-40.4 / -11.7 / -3.3 / -3.2 (random -82.7 ... -46.8). The official setting adapts further.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..core import MAML
from ..distributed import gather_in_order, is_main, mean_over_ranks, rank_slice, task_range
from ..errors import ConfigError
from ..paper import LOCOMOTION, NAV, PAPER_ENVS, rl_paper
from ..paper import RL as PAPER
from ..plots import ci_band, colors_for, counted, method_label, new_figure, save_figure
from .base import Experiment, build_maml, eval_record, mean_ci95, results_table

if TYPE_CHECKING:
    from ..rl import Episodes, OfficialTest, Sampler
    from ..rl.sampler import SeedKey

EVAL_SEED = 20172  # fixed: every run is evaluated with the same episode seeds

METHODS = ("maml", "pretrained", "random")  # the methods that adapt; then the oracle


# Config's settings of the supervised outer loop (Adam on the meta-gradient: its rate, schedule,
# clipping, multi-step loss, derivative order annealing, execution path), which TRPO does not use
GRADIENT_OUTER_LOOP = ("meta_lr", "meta_lr_schedule", "meta_lr_min", "first_order_until",
                       "multi_step_loss", "msl_anneal_iterations", "clip_grad", "path",
                       "chunk_size", "checkpoint_steps")


@dataclass
class RLConfig(Config):
    unused_settings = (*GRADIENT_OUTER_LOOP, "compile", "per_step")
    experiment: str = "rl"
    env: str = NAV  # a fastmaml/... id (fastmaml.rl.ENVS) or your own: module:YourEnv-v0
    # steps per episode (0: the paper's, 100 navigation / 200 locomotion; your own
    # environment's max_episode_steps)
    horizon: int = 0
    action_scale: float = 1.0  # 2D navigation only: velocity = clip(action_scale * a, +-0.1)
    iterations: int = 500  # meta-iterations
    baseline_iterations: int = 0  # pretrained baseline iterations (0: as many as MAML's)
    pretrained: bool = True  # also train the pretrained baseline (a finished run may add it)
    # also train the oracle: a policy told the task (its values appended to the observation),
    # trained on all tasks as the pretrained one and evaluated without adapting (the paper's
    # oracle); a finished run may add it (oracle=true trains it alone)
    oracle: bool = False
    meta_batch: int = 20  # tasks per meta-iteration
    trajectories: int = 20  # episodes per task, for the inner step and for the meta-update
    batch: str = "episodes"  # or steps: trajectories x horizon steps per task (official sampler)
    inner_lr: float = 0.1
    inner_steps: int = 1  # >1: more steps on the same support episodes
    hidden: tuple[int, ...] = (100, 100)  # the policy MLP's hidden widths
    init_std: float = 1.0  # the Gaussian policy's initial action standard deviation
    gamma: float = 0.99  # discount
    gae_lambda: float = 1.0  # generalised advantage estimation's lambda
    max_kl: float = 0.01  # TRPO KL bound delta
    cg_iters: int = 10  # TRPO's conjugate-gradient iterations
    cg_damping: float = 1e-5  # TRPO's damping of the curvature products
    backtrack_ratio: float = 0.8  # TRPO's line search: each try shrinks the step by this
    max_backtracks: int = 15  # TRPO's line search: tries before it keeps the old policy
    hvp: str = "gauss_newton"  # gauss_newton | exact (both exact) | finite_difference (paper's)
    workers: int = 0  # sampler worker processes (0: sample in the training process)
    eval_tasks: int = 40
    eval_inner_steps: int = 3
    eval_trajectories: int = 40  # episodes per task and gradient step at evaluation
    eval_batch: str = "steps"  # steps: eval_trajectories x horizon steps (official) | episodes
    eval_inner_lr: float = 0.0  # first step size at evaluation, every method (0: the official)
    eval_policy: str = "best"  # best (highest training return, as the paper) | last
    eval_chunk: int = 40  # tasks whose environments step together at evaluation (memory)
    threads: int = 1  # small graphs: a second intra-op thread is much slower on a busy box
    checkpoint_every: int = 10
    log_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_at_least(trajectories=1, eval_trajectories=1, inner_steps=1, cg_iters=1,
                              max_backtracks=1, hidden=1, horizon=0, seed=0, workers=0,
                              eval_inner_lr=0, baseline_iterations=0, cg_damping=0)
        if not (self.max_kl > 0 and self.init_std > 0 and 0 < self.backtrack_ratio < 1
                and 0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1):  # NaN fails too
            raise ConfigError("need max_kl > 0, init_std > 0, 0 < backtrack_ratio < 1, "
                              "0 < gamma <= 1 and 0 <= gae_lambda <= 1; got "
                              f"max_kl={self.max_kl}, init_std={self.init_std}, backtrack_ratio="
                              f"{self.backtrack_ratio}, gamma={self.gamma} and gae_lambda="
                              f"{self.gae_lambda}")
        if self.hvp not in ("gauss_newton", "exact", "finite_difference"):
            raise ConfigError("hvp must be gauss_newton, exact or finite_difference, got "
                              f"{self.hvp!r}")
        if self.batch not in ("steps", "episodes") or self.eval_batch not in ("steps", "episodes"):
            raise ConfigError("batch and eval_batch must be steps or episodes, got "
                              f"{self.batch!r} and {self.eval_batch!r}")
        if self.eval_policy not in ("best", "last"):
            raise ConfigError(f"eval_policy must be best or last, got {self.eval_policy!r}")
        inert = [name for name in GRADIENT_OUTER_LOOP
                 if getattr(self, name) != Config.__dataclass_fields__[name].default]
        inert += ["compile"] if self.compile == "true" else []  # (false: saved runs hold it)
        if inert:
            raise ConfigError(f"{', '.join(inert)}: settings of the gradient-based outer loop, "
                              "which meta-RL does not run: its outer loop is TRPO (max_kl, "
                              "cg_iters, cg_damping, backtrack_ratio, max_backtracks, hvp), and "
                              "its inner steps adapt task by task")
        if self.init != "default":
            raise ConfigError(f"init={self.init}: the policy is always initialised as maml_rl's "
                              "(Xavier-uniform weights, zero biases); init is for the "
                              "supervised experiments' networks")
        if self.per_step != "none":
            raise ConfigError(f"per_step={self.per_step}: per-step parameter sets are for the "
                              "supervised experiments; meta-RL's evaluation adapts one "
                              "policy-gradient step at a time, from the last step's parameters")
        if self.lr_mode == "per_layer_step" and self.inner_steps > 1:
            raise ConfigError(f"lr_mode=per_layer_step with inner_steps={self.inner_steps}: "
                              "meta-RL's evaluation adapts one policy-gradient step at a time, "
                              "on fresh episodes, so every step would take the first step's "
                              "learned rates; use inner_steps=1, or lr_mode=per_param or scalar")
        if self.env:  # ("": rl-env, until it is given)
            self.env = _rl().canonical_env_id(self.env)
        if self.env and self.env not in PAPER_ENVS:
            _rl().env_class(self.env)  # a user's environment: registered, with the task API
        if not 0 < self.action_scale < math.inf:
            raise ConfigError(f"action_scale must be > 0 and finite, got {self.action_scale}")
        if self.action_scale != 1.0 and self.env != NAV:
            raise ConfigError(f"action_scale is a 2D-navigation setting ({NAV}), not {self.env}")


def _rl() -> Any:
    """``fastmaml.rl``, imported on demand (it needs the ``rl`` extra: gymnasium, mujoco)."""
    try:
        from .. import rl
    except ImportError as error:
        raise ConfigError(f"the meta-RL experiments need gymnasium and mujoco ({error}); "
                          "install them with `pip install -e .[rl]`") from error
    return rl


def _sample_batch(sampler: Sampler, policy: torch.nn.Module, tasks: list[dict[str, Any]],
                  kind: str, episodes: int, envs: int, seed: SeedKey,
                  params: dict[str, Tensor] | None = None,
                  tasks_per_rollout: int | None = None,
                  task_ids: Sequence[int] | None = None, task_inputs: bool = False) -> Episodes:
    """One batch per task as the config's ``batch`` / ``eval_batch`` says: ``episodes``, exactly
    ``episodes`` episodes; ``steps``, the ``episodes x horizon`` environment steps that ``envs``
    environments running episode after episode gather (``Sampler.sample_steps``, the official
    sampler). ``task_ids``: the tasks' positions in the meta-batch (their seeds);
    ``task_inputs``: the oracle's observations, which end with the task's values."""
    if kind == "steps":
        return sampler.sample_steps(policy, tasks, envs, episodes * sampler.horizon, seed, params,
                                    tasks_per_rollout, task_ids, task_inputs)
    return sampler.sample(policy, tasks, episodes, seed, params, tasks_per_rollout,
                          task_ids=task_ids, task_inputs=task_inputs)


def episode_seed(seed: int, step: int) -> SeedKey:
    """The sampler seed of the episodes after ``step`` adaptation steps of an evaluation (or an
    ``adapt``) under ``seed``: ``seed * 100 + step``, as every recorded evaluation drew them,
    and from step 100 on, where that number is another seed's early step, a tuple of its own
    (the sampler's five-number key, which no integer seed's three numbers meet)."""
    return seed * 100 + step if step < 100 else (seed, step, 100)


def _seed(cfg: RLConfig, iteration: int, phase: int) -> int:
    """The sampler seed of ``phase`` (0 support, 1 query) of ``iteration``; no shared state."""
    return ((cfg.seed * 10_000_000 + iteration) * 4 + phase)


class MetaRLLearner:
    """One TRPO learner of the RL experiment: ``maml`` (adapt=True), ``pretrained`` or
    ``oracle`` (``task_inputs``: its observations end with the task's values).

    Metrics per iteration: ``pre_return`` (mean return of the pre-update policy's episodes),
    ``post_return`` (after the inner step; maml only), ``best_return`` (the best training return
    so far), ``kl`` and ``accepted`` (of the TRPO step), ``backtracks``, ``surrogate_before`` /
    ``surrogate_after``, and the cost split in seconds: sampling (``sample_s``), the inner
    step (``adapt_s``), the meta-objective and its gradient (``gradient_s``, which includes
    building the objective), conjugate gradient (``cg_s``) and the line search
    (``line_search_s``).
    """

    def __init__(self, name: str, maml: MAML, sampler: Sampler, cfg: RLConfig, adapt: bool,
                 iterations: int, task_inputs: bool = False):
        self.name, self.module, self.sampler, self.cfg = name, maml, sampler, cfg
        self.adapt, self.iterations, self.task_inputs = adapt, iterations, task_inputs
        self.best_return, self.best_iteration = -math.inf, 0
        self.best: dict[str, Tensor] | None = None

    @property
    def policy(self) -> torch.nn.Module:
        return self.module.model

    def tasks(self, iteration: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng([self.cfg.seed, 1, iteration])
        return _rl().sample_tasks(self.cfg.env, self.cfg.meta_batch, rng)

    def sample(self, tasks: list[dict[str, Any]], seed: int,
               params: dict[str, Tensor] | None = None,
               task_ids: Sequence[int] | None = None) -> Episodes:
        """A training batch: ``trajectories`` episodes per task, or with ``batch=steps``
        ``trajectories x horizon`` steps per task, gathered by one environment per task running
        episode after episode (the official sampler's total, counted per task). ``task_ids``:
        the tasks' positions in the meta-batch (default: ``tasks`` is all of it)."""
        return _sample_batch(self.sampler, self.policy, tasks, self.cfg.batch,
                             self.cfg.trajectories, 1, seed, params, task_ids=task_ids,
                             task_inputs=self.task_inputs)

    def step(self, iteration: int) -> dict[str, float]:
        """One meta-iteration. Under torchrun each rank samples and adapts its slice of the
        tasks (their episodes seeded by their positions, as in one process), and TRPO's
        gradient, curvature products and line search average over every rank's tasks."""
        rl, cfg = _rl(), self.cfg
        tick = time.perf_counter()
        every_task = self.tasks(iteration)
        mine = task_range(len(every_task))
        tasks = [every_task[i] for i in mine]
        over_tasks = mean_over_ranks(len(mine) / len(every_task))
        support = self.sample(tasks, _seed(cfg, iteration, 0), task_ids=mine)
        metrics = {"pre_return": over_tasks(support.mean_returns().mean()).item()}
        sample_s = time.perf_counter() - tick
        if self.adapt:
            tock = time.perf_counter()
            with torch.no_grad():
                adapted = rl.adapt_policy(self.module, support, gamma=cfg.gamma,
                                          gae_lambda=cfg.gae_lambda)
            adapt_s = time.perf_counter() - tock
            tock = time.perf_counter()
            query = self.sample(tasks, _seed(cfg, iteration, 1), adapted, mine)
            sample_s += time.perf_counter() - tock
            metrics["post_return"] = over_tasks(query.mean_returns().mean()).item()
            training_return = metrics["post_return"]
        else:
            adapt_s = 0.0
            training_return = metrics["pre_return"]
        if training_return > self.best_return:  # the parameters that sampled these episodes
            self.best_return, self.best_iteration = training_return, iteration
            self.best = copy.deepcopy(self.module.state_dict())
        tock = time.perf_counter()  # the objective's set-up counts as gradient time
        if self.adapt:
            stats = rl.trpo_meta_step(
                self.module, support, query, max_kl=cfg.max_kl, cg_iters=cfg.cg_iters,
                damping=cfg.cg_damping, backtrack_ratio=cfg.backtrack_ratio,
                max_backtracks=cfg.max_backtracks, hvp_method=cfg.hvp, gamma=cfg.gamma,
                gae_lambda=cfg.gae_lambda, over_tasks=over_tasks)
        else:
            stats = rl.trpo_step(
                [p for p in self.module.parameters() if p.requires_grad],
                rl.policy_objective(self.policy, support, cfg.gamma, cfg.gae_lambda), cfg.max_kl,
                cfg.cg_iters, cfg.cg_damping, cfg.backtrack_ratio, cfg.max_backtracks, cfg.hvp,
                over_tasks)
        gradient_s = time.perf_counter() - tock - stats.cg_s - stats.line_search_s
        return {**metrics, "best_return": self.best_return, "kl": stats.kl,
                "accepted": float(stats.accepted), "backtracks": float(stats.backtracks),
                "surrogate_before": stats.loss_before, "surrogate_after": stats.loss_after,
                "sample_s": sample_s, "adapt_s": adapt_s, "gradient_s": gradient_s,
                "cg_s": stats.cg_s, "line_search_s": stats.line_search_s}

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "best": self.best,
                "best_return": self.best_return, "best_iteration": self.best_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.best = state["best"]
        self.best_return, self.best_iteration = state["best_return"], state["best_iteration"]

    def evaluation_engine(self, which: str) -> MAML:
        """A copy of the engine with the ``best`` (or ``last``) parameters loaded."""
        engine = copy.deepcopy(self.module)
        if which == "best" and self.best is not None:
            engine.load_state_dict(self.best)
        return engine


class RLExperiment(Experiment):
    name = "rl"
    config_cls = RLConfig
    curve_keys = {"pre_return": "return before adaptation",
                  "post_return": "return after adaptation"}
    cfg: RLConfig

    def __init__(self, cfg: RLConfig, run_dir: Path):
        if not cfg.env:
            raise ConfigError("name the environment to meta-train on: env=your_module:YourEnv-v0 "
                              "(its gymnasium id, the module that registers it first)")
        super().__init__(cfg, run_dir)
        if self.device.type != "cpu":  # the sampler and environments are CPU code
            self.device = torch.device("cpu")
        self._sampler: Sampler | None = None

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return {"action_scale": self.cfg.action_scale} if self.cfg.env == NAV else {}

    def sampler(self) -> Sampler:
        if self._sampler is None:
            cfg = self.cfg
            self._sampler = _rl().Sampler(cfg.env, cfg.horizon or None, cfg.workers,
                                          **self.env_kwargs)
        return self._sampler

    def build_maml(self, seed_offset: int = 0, inner_lr: float | None = None,
                   oracle: bool = False) -> MAML:
        """A fresh policy (seeded) inside a MAML engine with the REINFORCE inner loss; an
        ``oracle`` policy takes the task's values after the observation."""
        rl, cfg = _rl(), self.cfg
        sampler = self.sampler()
        torch.manual_seed(cfg.seed + seed_offset)
        inputs = sampler.obs_dim + (sampler.task_dim if oracle else 0)
        policy = rl.GaussianMLPPolicy(inputs, sampler.act_dim, cfg.hidden, cfg.init_std)
        engine_cfg = cfg if inner_lr is None else cfg.replace(inner_lr=inner_lr, lr_mode="fixed")
        return build_maml(policy, rl.reinforce_loss, engine_cfg)

    def learners(self) -> list[MetaRLLearner]:
        cfg = self.cfg
        learners = [MetaRLLearner("maml", self.build_maml(0), self.sampler(), cfg, True,
                                  cfg.iterations)]
        for name, wanted, seed_offset, oracle in (("pretrained", cfg.pretrained, 1, False),
                                                  ("oracle", cfg.oracle, 3, True)):
            if wanted:  # trained on all tasks without adapting
                learners.append(MetaRLLearner(
                    name, self.build_maml(seed_offset, oracle=oracle), self.sampler(), cfg, False,
                    cfg.baseline_iterations or cfg.iterations, task_inputs=oracle))
        return learners

    # ----- evaluation -----
    def eval_tasks(self) -> list[dict[str, Any]]:
        """The official test script's tasks (``fastmaml.rl.official_test_tasks``)."""
        return _rl().official_test_tasks(self.cfg.env, self.cfg.eval_tasks)

    def eval_step_sizes(self) -> dict[str, float]:
        """Each method's first fine-tuning step size: ``eval_inner_lr`` for all when set, else
        the official test script's (MAML: its training ``inner_lr``); the oracle's is 0."""
        cfg = self.cfg
        official = self.official_test()
        adapting = (dict.fromkeys(METHODS, cfg.eval_inner_lr) if cfg.eval_inner_lr else
                    {"maml": cfg.inner_lr, "pretrained": official.pretrained_lr or cfg.inner_lr,
                     "random": official.random_lr or cfg.inner_lr})
        return {**adapting, "oracle": 0.0}  # told the task, it does not adapt

    def official_test(self) -> OfficialTest:
        """How the official test script of this run's task family fine-tuned the methods."""
        return _rl().official_test(self.cfg.env)

    def adaptation_returns(self, maml: MAML, tasks: list[dict[str, Any]], progress: bool = False,
                           desc: str = "", oracle: bool = False) -> Tensor:
        """Per-task mean returns after 0..eval_inner_steps policy-gradient steps: (tasks, steps+1).

        Under torchrun each rank adapts its slice of the tasks (``adapt_tasks``; none where the
        ranks outnumber them), and every rank returns all the rows.
        """
        mine, parts = rank_slice(len(tasks)), []
        if len(mine):
            curve, _ = self.adapt_tasks(maml, [tasks[i] for i in mine], mine, progress=progress,
                                        desc=desc, oracle=oracle)
            parts.append(((mine.start,), curve))
        return torch.cat(gather_in_order(parts))

    def adapt_tasks(self, maml: MAML, tasks: list[dict[str, Any]], task_ids: Sequence[int],
                    steps: int | None = None, seed: int = EVAL_SEED, progress: bool = False,
                    desc: str = "", oracle: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The evaluation protocol on ``tasks``: per-task mean returns after 0..steps (default
        ``eval_inner_steps``) policy-gradient steps, (tasks, steps+1), and the adapted
        parameters, stacked over tasks.

        Step 1 uses the engine's inner learning rate, the later ones the official test script's
        share of it (``later_lr_scale``). Episode seeds depend on ``seed``, the step and the
        task's position (``task_ids``) only, so every method sees the same noise and reset
        states, and no two (seed, step) pairs share episodes (``episode_seed``). An ``oracle``
        policy is sampled with the task's values in its observations.
        """
        from tqdm.auto import tqdm

        rl, cfg = _rl(), self.cfg
        steps = cfg.eval_inner_steps if steps is None else steps
        later_lr_scale = self.official_test().later_lr_scale
        params, curve = None, []
        for step in tqdm(range(steps + 1), desc=desc, unit="step", leave=False,
                         disable=None if progress and is_main() else True):
            episodes = _sample_batch(self.sampler(), maml.model, tasks, cfg.eval_batch,
                                     cfg.eval_trajectories, cfg.eval_trajectories,
                                     episode_seed(seed, step), params, cfg.eval_chunk,
                                     task_ids, task_inputs=oracle)
            curve.append(episodes.mean_returns().double())
            if step < steps:
                with torch.no_grad():
                    params = rl.adapt_policy(maml, episodes, start=params, steps=1,
                                             lr_scale=1.0 if step == 0 else later_lr_scale,
                                             gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)
        return torch.stack(curve, dim=1), params or {}

    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        trained = {learner.name: learner for learner in self.restore_all(self.learners())}
        tasks, step_sizes = self.eval_tasks(), self.eval_step_sizes()
        engines: dict[str, tuple[MAML, dict[str, Any]]] = {}
        for name, learner in trained.items():
            info = {"policy": cfg.eval_policy, "best_iteration": learner.best_iteration + 1,
                    "best_training_return": learner.best_return}
            if name == "maml" and cfg.lr_mode != "fixed" and not cfg.eval_inner_lr:
                info["lr_mode"] = cfg.lr_mode  # it adapts with its learned rates (eval_engine)
            engines[name] = (self.eval_engine(learner), info)
        engines["random"] = (self.build_maml(2, step_sizes["random"]), {"policy": "random init"})
        threshold = _rl().right_way_threshold(cfg.env, self.sampler().horizon)
        records, returns = [], {}
        for name in (*METHODS, "oracle"):
            if name not in engines:
                continue
            engine, info = engines[name]
            returns[name] = self.adaptation_returns(engine, tasks, progress, f"eval {name}",
                                                    oracle=name == "oracle")
            if threshold is not None:  # direction tasks: the share of tasks run the right way
                info["right_way"] = (returns[name] > threshold).double().mean(0).tolist()
            records.append(eval_record(cfg.env, name, cfg.eval_trajectories, returns[name],
                                       inner_lr=step_sizes[name], preset=cfg.preset, **info))
        if "maml" in returns:  # every method ran on the same tasks: compare them task by task
            records[0]["paired_difference"] = {  # records[0] is maml's, METHODS' first
                name: dict(zip(("mean", "ci95"), mean_ci95(returns["maml"] - values)))
                for name, values in returns.items() if name != "maml"}
        self.write_eval(records, self.table(records))
        return records

    def eval_engine(self, learner: MetaRLLearner) -> MAML:
        """The engine that the evaluation protocol adapts ``learner`` with: its ``eval_policy``
        parameters at its first step size (``eval_step_sizes``; MAML without ``eval_inner_lr``
        keeps its own, possibly learned, rates)."""
        engine = learner.evaluation_engine(self.cfg.eval_policy)
        if self.cfg.eval_inner_lr or learner.name != "maml":
            engine = self._with_lr(engine, self.eval_step_sizes()[learner.name],
                                   oracle=learner.task_inputs)
        return engine

    def _with_lr(self, engine: MAML, lr: float, oracle: bool = False) -> MAML:
        fresh = self.build_maml(0, lr, oracle)
        fresh.model.load_state_dict(engine.model.state_dict())
        return fresh

    def table(self, records: list[dict[str, Any]]) -> str:
        cfg = self.cfg
        rows = rl_paper(cfg.env, cfg.eval_inner_steps)
        title = f"{cfg.env}: mean return after N policy-gradient steps"
        text = results_table(title, records, list(range(cfg.eval_inner_steps + 1)),
                             {cfg.eval_trajectories: rows}, self.run_dir, digits=1)
        horizon = cfg.horizon or _rl().default_horizon(cfg.env)
        official = self.official_test()
        per_step = (counted(cfg.eval_trajectories, "episode") if cfg.eval_batch == "episodes" else
                    f"{cfg.eval_trajectories} x {horizon} environment steps (whole episodes)")
        text = text.replace(f"## {cfg.eval_trajectories}-shot",
                            f"## {per_step} per task and gradient step")
        schedule = counted(cfg.iterations, "meta-iteration")
        reached = self.restored_iterations.get("maml", cfg.iterations)  # (an early evaluation)
        trained = schedule if reached >= cfg.iterations else f"{reached:,} of {schedule}"
        notes = [f"Preset `{cfg.preset}`: {trained}, meta-batch "
                 f"{cfg.meta_batch}, {counted(cfg.trajectories, 'episode')} per task, "
                 f"horizon {horizon}, inner lr {cfg.inner_lr:g}"
                 + (f", action scale {cfg.action_scale:g}" if cfg.env == NAV else "") + ".",
                 f"Evaluation: {counted(cfg.eval_tasks, 'task')} ("
                 + ("the official test script's" if cfg.env in PAPER_ENVS else
                    "sample_tasks'") + f" draw, seed {official.seed}), {per_step} per task and "
                 f"step; each method's first step size is in its row (lr), later steps take "
                 f"{official.later_lr_scale:g} of it; "
                 f"the `{cfg.eval_policy}` policy of each learner."]
        if any(r["method"] == "oracle" for r in records):
            notes.append("- oracle: told the task (its values appended to the observation) and "
                         "not adapted (step size 0): each step's value is of fresh episodes.")
        for r in records:
            if "best_iteration" in r:
                notes.append(f"- {r['method']}: best training return {r['best_training_return']:.2f}"
                             f" at iteration {r['best_iteration']}"
                             + (" (the last policy was evaluated)." if cfg.eval_policy == "last"
                                else "."))
        threshold = _rl().right_way_threshold(cfg.env, horizon)
        steps = "/".join(str(step) for step in records[0]["steps"])  # every method's
        for r in (r for r in records if "right_way" in r):
            shares = " / ".join(f"{share:.0%}" for share in r["right_way"])
            notes.append(f"- {r['method']}: tasks run the right way (mean return above "
                         f"{threshold:g}) after {steps} steps: {shares}.")
        for r in (r for r in records if "paired_difference" in r):
            for name, difference in r["paired_difference"].items():
                values = " / ".join(f"{m:+.1f} +- {c:.1f}"
                                    for m, c in zip(difference["mean"], difference["ci95"]))
                notes.append(f"- {r['method']} minus {name}, task by task over the same "
                             f"{counted(r['tasks'], 'task')} (paired), after {steps} steps: "
                             f"{values}.")
        if cfg.env in PAPER_ENVS and horizon != _rl().default_horizon(cfg.env):
            notes.append(f"This run's episodes have {horizon} steps, the paper's "
                         f"{_rl().default_horizon(cfg.env)}: its returns are on another scale.")
        if cfg.env in LOCOMOTION:
            notes.append("Locomotion returns use gymnasium's v5 models, which differ from the "
                         "paper's rllab models: compare shapes, not numbers.")
        return text + "\n" + "\n".join(notes) + "\n"

    # ----- figures -----
    def plot_evaluation(self, records: list[dict[str, Any]]) -> list[Path]:
        """Return against steps, each method beside the paper's curve of it over the steps
        evaluated. The paper's returns are on an axis of their own where they are on another
        scale: the locomotion tasks' (rllab's models), and any run's of another horizon."""
        cfg = self.cfg
        paper = PAPER.get(cfg.env, {})
        colors = colors_for([r["method"] for r in records])
        fig = new_figure(5.6, 5.0)
        ax = fig.subplots()
        paper_horizon = _rl().default_horizon(cfg.env) if cfg.env in PAPER_ENVS else None
        other_horizon = (paper_horizon is not None
                         and (cfg.horizon or paper_horizon) != paper_horizon)
        paper_ax = ax.twinx() if cfg.env in LOCOMOTION or other_horizon else ax
        last = max(records[0]["steps"])
        for r in records:
            mean, low, high = ci_band(r)
            color = colors[r["method"]]
            ax.plot(r["steps"], mean, marker="o", ms=4, color=color, label=method_label(r))
            ax.fill_between(r["steps"], low, high, color=color, alpha=0.2)
            if r["method"] in paper and r["method"] != "oracle":  # (its line: below)
                values = paper[r["method"]][:last + 1]
                paper_ax.plot(range(len(values)), values, ls="--", marker="x", ms=4, alpha=0.6,
                              color=color, label=f"paper: {r['method']}")
        if "oracle" in paper:  # a line over the steps, so that the axis takes it in
            paper_ax.plot(records[0]["steps"], paper["oracle"] * len(records[0]["steps"]),
                          color="gray", ls=":", label="paper: oracle")
        ax.set(title=f"{cfg.env.split('/')[-1]} ({counted(records[0]['tasks'], 'task')})",
               xlabel="number of gradient steps", ylabel="average return")
        if paper_ax is not ax:
            why = ((["rllab's models"] if cfg.env in LOCOMOTION else [])
                   + ([f"horizon {paper_horizon}"] if other_horizon else []))
            paper_ax.set_ylabel(f"the paper's return\n({', '.join(why)}: another scale)")
        ax.set_xticks(records[0]["steps"])
        ax.grid(alpha=0.3)
        handles = [h for axis in dict.fromkeys([ax, paper_ax])
                   for h in axis.get_legend_handles_labels()[0]]
        # below the axes, where it hides no curve (the axis drawn last: over both)
        paper_ax.legend(handles=handles, fontsize=7, ncol=2, loc="upper center",
                        bbox_to_anchor=(0.5, -0.13))
        fig.suptitle(self.figure_title(records), fontsize=9, wrap=True)
        return [save_figure(fig, self.figures_dir() / "return_vs_steps.png")]
