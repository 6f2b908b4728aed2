"""Sinusoid regression (paper section 5.1, Table 2, Figure 2) with its two baselines.

- ``maml``: MLP 1-40-40-1 meta-trained with K = 10 support and 10 query points per task.
- ``pretrained``: the same network trained with Adam on the plain MSE over random sinusoids,
  fine-tuned at test time with a step size tuned on separate validation tasks.
- ``oracle``: the network given the amplitude and phase as extra inputs (it needs no adaptation,
  so its record repeats one value at every step).

Evaluation: 600 fixed test tasks for each K in 5, 10, 20; the query set is ``eval_query`` points
drawn uniformly from [-5, 5], so each task's MSE is measured over the whole input range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config
from ..core import MAML
from ..distributed import rank_share
from ..errors import ConfigError, FastMAMLWarning, warn
from ..models import MLP, initialise
from ..paper import SINUSOID as PAPER
from ..plots import new_figure, plot_step_curves, save_figure, steps_label
from ..tasks.sinusoid import (AMPLITUDE, X_RANGE, sample_sinusoid_tasks, sinusoid,
                              with_task_parameters)
from ..train import GradientLearner, backpropagated, checkpoints_dir, meta_learner
from .base import Experiment, build_maml, eval_record, evaluate_tasks, maml_method, results_table

EVAL_SEED, TUNE_SEED = 20170, 20171  # fixed: every run is evaluated on the same tasks

@dataclass
class SinusoidConfig(Config):
    experiment: str = "sinusoid"
    iterations: int = 70000
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    k_shot: int = 10  # support points per task in meta-training (K)
    k_query: int = 10  # query points per task in meta-training
    hidden: tuple[int, ...] = (40, 40)  # the MLP's hidden widths
    eval_k_shots: tuple[int, ...] = (5, 10, 20)  # the K values evaluated
    eval_query: int = 100  # query points per test task
    baseline_iterations: int = 0  # 0: as many as MAML's iterations
    # the pretrained baseline's fine-tuning step sizes, the best on tune_tasks tasks kept
    baseline_lrs: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    tune_tasks: int = 100  # tasks (not the test tasks) that choose the baseline's step size
    threads: int = 1  # a 40-unit MLP: one thread is fastest, and immune to a busy second core

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_at_least(hidden=1, baseline_iterations=0, tune_tasks=1, baseline_lrs=0)
        if not all(map(math.isfinite, self.baseline_lrs)):
            raise ConfigError(f"baseline_lrs must be finite, got {self.baseline_lrs}")
        if not self.eval_k_shots:
            raise ConfigError("eval_k_shots needs at least one K, e.g. eval_k_shots=5,10,20")
        for name, value in (("k_shot", self.k_shot), ("k_query", self.k_query),
                            ("eval_query", self.eval_query),
                            *(("eval_k_shots", k) for k in self.eval_k_shots)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1 (points per task), got {value}")


class SinusoidExperiment(Experiment):
    name = "sinusoid"
    config_cls = SinusoidConfig
    curve_keys = {"loss": "training MSE (MAML's: its meta-loss)"}  # (multi_step_loss: over the steps)
    cfg: SinusoidConfig

    def value_ranges(self) -> tuple[tuple[float, float], ...]:
        """The task distribution's: x in X_RANGE, y within the largest amplitude."""
        return X_RANGE, (-AMPLITUDE[1], AMPLITUDE[1])

    def _network(self, inputs: int, seed_offset: int) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed + seed_offset)
        return initialise(MLP([inputs, *self.cfg.hidden, 1]), self.cfg.init).to(self.device)

    def _generator(self, seed_offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed + seed_offset)

    def build_maml(self) -> MAML:
        return build_maml(self._network(1, 0), F.mse_loss, self.cfg)

    def learners(self) -> list[GradientLearner]:
        cfg = self.cfg
        maml = self.build_maml()

        def sample(generator: torch.Generator):
            return sample_sinusoid_tasks(cfg.meta_batch, cfg.k_shot, cfg.k_query,
                                         generator).batch.to(self.device)

        return [meta_learner(maml, cfg, sample, self._generator(0)),
                self._baseline("pretrained", oracle=False),
                self._baseline("oracle", oracle=True)]

    def _baseline(self, name: str, oracle: bool) -> GradientLearner:
        """Plain supervised training over random sinusoids, with the same data per iteration."""
        cfg = self.cfg
        offset = 2 if oracle else 1
        model = self._network(3 if oracle else 1, offset)
        generator = self._generator(offset)

        def loss_of(_: int):
            tasks = sample_sinusoid_tasks(cfg.meta_batch, cfg.k_shot + cfg.k_query, 0, generator)
            x, y = tasks.batch.support_x, tasks.batch.support_y
            if oracle:
                x = with_task_parameters(x, tasks.amplitude, tasks.phase)
            mine, share = rank_share(cfg.meta_batch)  # under torchrun, this rank's tasks
            return share * F.mse_loss(model(x[mine].to(self.device)), y[mine].to(self.device)), {}

        return GradientLearner(name, model, torch.optim.Adam(model.parameters(), cfg.meta_lr),
                               backpropagated(loss_of), cfg.baseline_iterations or cfg.iterations, generator)

    def _trained(self) -> tuple[MAML, torch.nn.Module, torch.nn.Module]:
        trained = self.restore_all(self.learners())
        maml, pretrained, oracle = (learner.module for learner in trained)
        return maml, pretrained, oracle

    def _tune_pretrained_lr(self, model: torch.nn.Module, k_shot: int) -> float:
        """The fine-tuning step size with the lowest mean MSE over steps 1..N on validation tasks."""
        tasks = sample_sinusoid_tasks(self.cfg.tune_tasks, k_shot, self.cfg.eval_query,
                                      torch.Generator().manual_seed(TUNE_SEED + k_shot))
        batch = tasks.batch.to(self.device)
        steps = self.cfg.eval_inner_steps  # evaluate_tasks: split across torchrun's ranks
        scores = {lr: evaluate_tasks(MAML(model, F.mse_loss, lr), [batch], steps, False,
                                     "tuning")[:, 1:].mean().item()
                  for lr in self.cfg.baseline_lrs}
        return min(scores, key=scores.get)

    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        maml, pretrained, oracle = self._trained()
        method, learned = maml_method(cfg)
        records = []
        for k_shot in cfg.eval_k_shots:
            tasks = sample_sinusoid_tasks(cfg.eval_tasks, k_shot, cfg.eval_query,
                                          torch.Generator().manual_seed(EVAL_SEED + k_shot))
            batch = tasks.batch.to(self.device)
            steps = cfg.eval_inner_steps
            chunks = batch.split(cfg.eval_chunk)
            records.append(eval_record("sinusoid", method, k_shot, evaluate_tasks(
                maml, chunks, steps, progress, f"maml K={k_shot}"), **learned))
            # (no step to tune where it takes none)
            lr = self._tune_pretrained_lr(pretrained, k_shot) if steps else 0.0
            records.append(eval_record("sinusoid", "pretrained", k_shot, evaluate_tasks(
                MAML(pretrained, F.mse_loss, lr), chunks, steps, progress,
                f"pretrained K={k_shot}"), **({"inner_lr": lr} if steps else {})))
            with torch.no_grad():
                x = with_task_parameters(batch.query_x, tasks.amplitude.to(self.device),
                                         tasks.phase.to(self.device))
                mse = (oracle(x) - batch.query_y).pow(2).mean(dim=(1, 2))
            records.append(eval_record("sinusoid", "oracle", k_shot,
                                       mse[:, None].expand(-1, steps + 1),
                                       note="no adaptation: the same value at every step"))
        show = sorted({0, 1, *(s for _, values in PAPER[5] for s in values), cfg.inner_steps,
                       cfg.eval_inner_steps})
        table = results_table("Sinusoid regression: query MSE after N inner steps", records,
                              show_steps=show, paper=PAPER, run_dir=self.run_dir)
        self.write_eval(records, table)
        return records

    def plot_evaluation(self, records: list[dict[str, Any]]) -> list[Path]:
        out = self.figures_dir()
        paths = [plot_step_curves(records, "query MSE", out / "mse_vs_steps.png",
                                  self.figure_title(records), log_scale=True, paper=PAPER)]
        lrs = {r["k_shot"]: r["inner_lr"] for r in records
               if r["method"] == "pretrained" and "inner_lr" in r}  # (none: evaluated at 0 steps)
        if not any(k in lrs for k in (5, 10)):
            return paths
        try:
            maml, pretrained, _ = self._trained()
        except ConfigError as error:  # (a run kept without its checkpoints)
            warn(f"the adaptation figures (the paper's Figure 2) draw the trained models, and "
                 f"{error}: drawn without them", FastMAMLWarning)
            return paths
        maml.check_finite = False  # a diverged curve is drawn as far as it is finite
        last = len(records[0]["mean"]) - 1  # the evaluation's inner steps
        paths += [self._plot_adaptation(
            maml, MAML(pretrained, F.mse_loss, lrs[k], check_finite=False), k, last, out)
            for k in (5, 10) if k in lrs]
        return paths

    def evaluation_inputs(self) -> dict[str, list[Path]]:
        models = sorted(checkpoints_dir(self.run_dir).glob("*.pt"))  # Figure 2's, adapted
        return {f"adaptation_k{k}.png": models for k in (5, 10)}

    def _plot_adaptation(self, maml: MAML, pretrained: MAML, k_shot: int, last: int,
                         out: Path) -> Path:
        """Paper Figure 2: one test task, its K points, predictions before and after 1 and
        ``last`` steps (the evaluation's; the paper's 10)."""
        drawn = sorted({0, 1, last})
        tasks = sample_sinusoid_tasks(1, k_shot, 0, torch.Generator().manual_seed(EVAL_SEED + k_shot))
        support_x, support_y = (t[0].to(self.device) for t in tasks.batch[:2])
        grid = torch.linspace(*X_RANGE, 200, device=self.device)[:, None]
        truth = sinusoid(grid[None].cpu(), tasks.amplitude, tasks.phase)[0, :, 0]
        fig = new_figure(10, 3.8)
        axes = fig.subplots(1, 2, sharey=True)
        pretrained_title = f"pretrained, step {pretrained.inner_lrs.init:g}"
        for ax, (title, engine) in zip(axes, [("MAML", maml), (pretrained_title, pretrained)]):
            ax.plot(grid.cpu(), truth, color="red", label="ground truth")
            for shade, (steps, style) in enumerate(zip(drawn, (":", "--", "-"))):
                with torch.no_grad():
                    prediction = engine.predict(engine.adapt(support_x, support_y, steps), grid)
                diverged = "" if torch.isfinite(prediction).all() else " (diverged)"
                ax.plot(grid.cpu(), prediction.cpu(), style, color="tab:green",
                        alpha=0.5 + shade / 4, label=f"after {steps_label(steps)}{diverged}")
            ax.scatter(support_x.cpu(), support_y.cpu(), marker="^", color="purple", zorder=3,
                       label=f"{k_shot} points used for the gradient")
            ax.set(title=f"{title}, K={k_shot}", xlabel="x")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("y")
        fig.suptitle(self.figure_title(), fontsize=9, wrap=True)
        return save_figure(fig, out / f"adaptation_k{k_shot}.png")
