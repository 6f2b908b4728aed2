"""Few-shot image classification (paper section 5.2, Table 1): Omniglot and MiniImagenet.

The loss is the *mean* cross-entropy over a task's examples. The official code uses the sum over
examples divided by K, which is N times the mean, so the paper's alpha corresponds to an inner_lr
of N x alpha here; the presets hold the converted values (Omniglot 5-way 0.4 -> 2.0, 20-way
0.1 -> 2.0, MiniImagenet 0.01 -> 0.05). The outer loss scale does not matter to Adam.

Evaluation: 600 fixed meta-test tasks, accuracy after 0..eval_inner_steps inner steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config
from ..core import MAML
from ..errors import ConfigError
from ..models import MLP, ConvNet
from ..plots import plot_learning_curves, plot_step_curves
from ..tasks.fewshot import FewShotSampler
from ..train import GradientLearner, meta_learner
from .base import (Experiment, build_maml, eval_record, evaluate_tasks, read_eval, results_table,
                   write_eval)

VAL_SEED, TEST_SEED = 31, 2017  # fixed: every run sees the same validation and test tasks
DATA_ENV = {"omniglot": "FASTMAML_OMNIGLOT", "miniimagenet": "FASTMAML_MINIIMAGENET"}

# Paper Table 1 and the MiniImagenet results, at the number of test steps the paper used.
PAPER: dict[tuple[str, int, int], tuple[int, list[tuple[str, float]]]] = {
    ("omniglot", 5, 1): (3, [("paper: MAML", 98.7), ("paper: MAML++", 99.47)]),
    ("omniglot", 5, 5): (3, [("paper: MAML", 99.9), ("paper: MAML++", 99.85)]),
    ("omniglot", 20, 1): (5, [("paper: MAML", 95.8), ("paper: MAML++", 97.65)]),
    ("omniglot", 20, 5): (5, [("paper: MAML", 98.9), ("paper: MAML++", 99.33)]),
    ("miniimagenet", 5, 1): (10, [("paper: MAML", 48.70), ("paper: first-order MAML", 48.07),
                                  ("paper: MAML++", 52.15)]),
    ("miniimagenet", 5, 5): (10, [("paper: MAML", 63.11), ("paper: first-order MAML", 63.15),
                                  ("paper: MAML++", 68.32)]),
}
# Lake et al.'s protocol (split=lake): 20-way one-shot within an alphabet, published as error
# rates (Lake et al. 2015; Koch et al. 2015 for the siamese nets), here as accuracies.
LAKE: dict[tuple[int, int], list[tuple[str, float]]] = {
    (20, 1): [("Lake et al.: people, within alphabet", 95.5),
              ("Lake et al.: Bayesian program learning, within alphabet", 96.7),
              ("Koch et al.: siamese nets, within alphabet", 92.0)],
}
ROTATE = ("auto", "all", "train", "none")


@dataclass
class FewShotConfig(Config):
    experiment: str = "fewshot"
    dataset: str = "omniglot"  # omniglot | miniimagenet
    data_root: str = ""  # default: $FASTMAML_OMNIGLOT / $FASTMAML_MINIIMAGENET, else data/<dataset>
    download: bool = False
    split: str = "official"  # Omniglot: official (1100/100/423) | vinyals (1200/0/423) | lake
    within_alphabet: bool = False  # Omniglot: all classes of a task from one alphabet
    rotate: str = "auto"  # auto (Omniglot: all) | all | train (meta-train only) | none
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 1  # query examples per class during meta-training
    eval_k_query: int = 0  # query examples per class at evaluation (0: k_shot, as the paper)
    network: str = "conv"  # conv | mlp (the paper's 256-128-64-64 MLP variant)
    hidden: int = 64
    iterations: int = 60000
    meta_batch: int = 32
    inner_lr: float = 2.0
    inner_steps: int = 1
    adapt: str = "no_norm"
    val_every: int = 500
    val_tasks: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATA_ENV:
            raise ConfigError(f"dataset must be one of {', '.join(DATA_ENV)}, got {self.dataset!r}")
        if self.network not in ("conv", "mlp"):
            raise ConfigError(f"network must be conv or mlp, got {self.network!r}")
        if self.rotate not in ROTATE:
            raise ConfigError(f"rotate must be one of {', '.join(ROTATE)}, got {self.rotate!r}")
        if self.within_alphabet and self.dataset != "omniglot":
            raise ConfigError("within_alphabet=true needs dataset=omniglot (its alphabets)")
        if self.n_way < 2:
            raise ConfigError(f"n_way must be >= 2 (a 1-way task has nothing to tell apart), "
                              f"got {self.n_way}")
        if self.data_root:  # absolute, so that the saved run evaluates from any directory
            self.data_root = os.path.abspath(os.path.expanduser(self.data_root))

    @property
    def eval_queries(self) -> int:
        return self.eval_k_query or self.k_shot


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean()


class FewShotExperiment(Experiment):
    name = "fewshot"
    config_cls = FewShotConfig
    cfg: FewShotConfig

    def __init__(self, cfg: FewShotConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        self._splits: dict[str, Tensor] | None = None

    def data_root(self) -> Path:
        return Path(self.cfg.data_root or os.environ.get(DATA_ENV[self.cfg.dataset])
                    or Path("data") / self.cfg.dataset)

    def splits(self) -> dict[str, Tensor]:
        """The meta-train/val/test image tensors (loaded once, from the compact cache)."""
        if self._splits is None:
            if self.cfg.dataset == "omniglot":
                from ..tasks.omniglot import load_omniglot
                self._splits = load_omniglot(self.data_root(), self.cfg.split,
                                             download=self.cfg.download)
            else:
                from ..tasks.miniimagenet import load_miniimagenet
                self._splits = load_miniimagenet(self.data_root())
        return self._splits

    def rotates(self, split: str) -> bool:
        """Whether tasks of ``split`` turn each class by a random multiple of 90 degrees."""
        mode = self.cfg.rotate
        if mode == "auto":
            mode = "all" if self.cfg.dataset == "omniglot" else "none"
        return mode == "all" or (mode == "train" and split == "train")

    def sampler(self, split: str, queries: int, within_alphabet: bool | None = None
                ) -> FewShotSampler:
        within = self.cfg.within_alphabet if within_alphabet is None else within_alphabet
        groups = None
        if within:
            from ..tasks.omniglot import load_omniglot_alphabets
            groups = load_omniglot_alphabets(self.data_root(), self.cfg.split)[split]
        return FewShotSampler(self.splits()[split], self.cfg.n_way, self.cfg.k_shot, queries,
                              rotate=self.rotates(split), device=self.device, groups=groups,
                              within_group=within)

    def build_maml(self) -> MAML:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        channels, side = (1, 28) if cfg.dataset == "omniglot" else (3, 84)
        if cfg.network == "conv":
            model = ConvNet(channels, cfg.n_way, cfg.hidden, strided=cfg.dataset == "omniglot",
                            image_size=side)
        else:
            model = MLP([channels * side * side, 256, 128, 64, 64, cfg.n_way], batch_norm=True,
                        flatten=True)
        return build_maml(model.to(self.device), F.cross_entropy, cfg, metric_fn=accuracy)

    def learners(self) -> list[GradientLearner]:
        cfg = self.cfg
        maml = self.build_maml()
        train = self.sampler("train", cfg.k_query)
        validation = {}
        if cfg.val_every and len(self.splits()["val"]):  # the vinyals split has no meta-val
            val = self.sampler("val", cfg.eval_queries)

            def validate() -> dict[str, float]:
                accuracies = evaluate_tasks(maml, val.fixed_tasks(cfg.val_tasks, VAL_SEED, cfg.eval_chunk),
                                            cfg.inner_steps, False, "validation", "metric")
                return {"val_accuracy": accuracies[:, -1].mean().item()}

            validation = {"validate": validate, "validate_every": cfg.val_every}
        return [meta_learner(maml, torch.optim.Adam(maml.parameters(), cfg.meta_lr),
                             lambda generator: train.sample(cfg.meta_batch, generator),
                             torch.Generator().manual_seed(cfg.seed), cfg.iterations,
                             cfg.clip_grad, cfg.multi_step_loss, cfg.msl_anneal_iterations,
                             **validation)]

    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        maml = self.restore(self.learners()[0]).module
        method = "first-order maml" if cfg.first_order else "maml"
        # Lake et al.'s protocol: random classes and classes of one alphabet, on novel alphabets
        kinds = (False, True) if cfg.split == "lake" else (cfg.within_alphabet,)
        records = []
        for within in kinds:
            test = self.sampler("test", cfg.eval_queries, within_alphabet=within)
            curve = evaluate_tasks(maml, test.fixed_tasks(cfg.eval_tasks, TEST_SEED,
                                                          cfg.eval_chunk),
                                   cfg.eval_inner_steps, progress, "meta-test", "metric")
            records.append(eval_record(cfg.dataset, method + (", within alphabet" if within else ""),
                                       cfg.k_shot, curve, n_way=cfg.n_way, metric="accuracy",
                                       preset=cfg.preset, within_alphabet=within))
        paper_steps, paper_rows = PAPER.get((cfg.dataset, cfg.n_way, cfg.k_shot), (0, []))
        if cfg.split == "lake":  # another protocol than the paper's Table 1
            paper_rows = LAKE.get((cfg.n_way, cfg.k_shot), [])
        show = sorted({0, 1, paper_steps, cfg.inner_steps, cfg.eval_inner_steps})
        table = results_table(f"{cfg.dataset} {cfg.n_way}-way {cfg.k_shot}-shot: test accuracy (%) "
                              "after N inner steps", records, show_steps=show,
                              paper={cfg.k_shot: [(label, {paper_steps: value})
                                                  for label, value in paper_rows]},
                              run_dir=self.run_dir, scale=100, digits=2)
        write_eval(self.run_dir, records, table)
        return records

    def plot(self) -> list[Path]:
        out = self.figures_dir()
        return [plot_step_curves(read_eval(self.run_dir), "test accuracy",
                                 out / "accuracy_vs_steps.png"),
                plot_learning_curves([self.run_dir / "metrics-maml.csv"],
                                     ["query_metric", "val_accuracy"], out / "learning_curves.png")]
