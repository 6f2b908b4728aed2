"""Few-shot image classification (paper section 5.2, Table 1): Omniglot and MiniImagenet.

The loss is the *mean* cross-entropy over a task's examples. The official code uses the sum over
examples divided by K, which is N times the mean, so the paper's alpha corresponds to an inner_lr
of N x alpha here; the presets hold the converted values (Omniglot 5-way 0.4 -> 2.0, 20-way
0.1 -> 2.0, MiniImagenet 0.01 -> 0.05). The outer loss scale does not matter to Adam.

Evaluation: 600 fixed meta-test tasks, accuracy after 0..eval_inner_steps inner steps.

``dataset=folder`` meta-trains on any folder of images (``fastmaml.tasks.folder``), converted by
the run's ``ImageFormat`` (``image_size``, ``channels``, ``invert``), which ``fastmaml adapt``
applies to a new task's images too.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config
from ..core import MAML
from ..errors import ConfigError, DataError, FastMAMLWarning, warn
from ..models import MLP, ConvNet, initialise
from ..paper import LAKE, PaperValues, at_step, fewshot_paper
from ..plots import plot_step_curves
from ..tasks.fewshot import FewShotSampler
from ..tasks.folder import assign_classes, load_image_folder
from ..tasks.splits import SPLITS, Assignment, has_explicit_splits
from ..tasks.images import MODES, ImageFormat
from ..tasks.omniglot import SPLIT_NAMES as OMNIGLOT_SPLITS
from ..train import GradientLearner, meta_learner
from .base import (TEST_SEED, VAL_SEED, Experiment, build_maml, eval_record, evaluate_tasks,
                   maml_method, results_table, validation_of)

DATA_ENV = {"omniglot": "FASTMAML_OMNIGLOT", "miniimagenet": "FASTMAML_MINIIMAGENET",
            "folder": ""}

ROTATE = ("auto", "all", "train", "none")

# the settings that only some datasets use, and those datasets
DATASET_SETTINGS = {"download": ("omniglot",), "split": ("omniglot",),
                    "split_seed": ("omniglot", "folder"), "within_alphabet": ("omniglot", "folder"),
                    **dict.fromkeys(("image_size", "channels", "invert", "class_depth",
                                     "split_fractions"), ("folder",))}


def default_data_root(dataset: str) -> Path:
    """Where a run of ``dataset`` without ``data_root`` reads it: its environment variable's
    folder (``DATA_ENV``), else ``data/<dataset>``."""
    from_env = os.path.expanduser(os.environ.get(DATA_ENV[dataset], ""))
    return Path(from_env or Path("data") / dataset)


@dataclass
class FewShotConfig(Config):
    experiment: str = "fewshot"
    dataset: str = "omniglot"  # omniglot | miniimagenet | folder (any image folder)
    data_root: str = ""  # default: $FASTMAML_OMNIGLOT / $FASTMAML_MINIIMAGENET, else data/<dataset>
    download: bool = False  # Omniglot: fetch it from the official URLs into data_root
    split: str = "official"  # Omniglot only: official (1100/100/423) | vinyals (1200/0/423) | lake
    split_seed: int = 1  # Omniglot's and the folders' class shuffle (the official code's seed)
    within_alphabet: bool = False  # all classes of a task from one alphabet (folder: group)
    image_size: int = 0  # folder: square side in pixels (Omniglot 28, MiniImagenet 84)
    channels: int = 0  # folder: 1 (grayscale) or 3 (RGB)
    invert: bool = False  # folder: 255 - pixel (dark strokes on white become 1.0 on 0.0)
    class_depth: int = 1  # folder: DIR/<class>/ (1) or DIR/<group>/<class>/ (2)
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)  # folder without train/ val/ test/
    rotate: str = "auto"  # auto (Omniglot: all; other data: none) | all | train (meta-train) | none
    n_way: int = 5  # classes per task (N)
    k_shot: int = 1  # labelled support examples per class (K)
    k_query: int = 1  # query examples per class during meta-training
    # query examples per class at evaluation (0: k_shot, as the paper); fixed when the run
    # starts, as it decides which classes a folder run can use
    eval_k_query: int = 0
    network: str = "conv"  # conv | mlp (the paper's 256-128-64-64 MLP variant)
    hidden: int = 64  # conv: filters per layer (the paper: 64 Omniglot, 32 MiniImagenet)
    norm_scale: bool = False  # learn batch norm's scale too (MAML++); the paper fixes it at 1
    iterations: int = 60000
    meta_batch: int = 32
    inner_lr: float = 2.0
    inner_steps: int = 1
    adapt: str = "no_norm"
    val_every: int = 500  # iterations between meta-validations (0: none)
    val_tasks: int = 100  # meta-validation tasks

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_at_least(hidden=1, val_every=0, val_tasks=1, eval_k_query=0,
                              split_seed=0)  # numpy's generators take no negative seed
        if self.dataset not in DATA_ENV:
            raise ConfigError(f"dataset must be one of {', '.join(DATA_ENV)}, got {self.dataset!r}")
        if self.network not in ("conv", "mlp"):
            raise ConfigError(f"network must be conv or mlp, got {self.network!r}")
        if self.network == "mlp" and self.hidden != FewShotConfig.hidden:
            raise ConfigError(f"hidden={self.hidden} sets the conv net's filters; network=mlp is "
                              "the paper's fixed 256-128-64-64 MLP (leave hidden out)")
        if self.rotate not in ROTATE:
            raise ConfigError(f"rotate must be one of {', '.join(ROTATE)}, got {self.rotate!r}")
        if self.within_alphabet and self.dataset != "omniglot" and self.class_depth != 2:
            raise ConfigError("within_alphabet=true needs groups of classes: dataset=omniglot "
                              "(alphabets) or dataset=folder with class_depth=2")
        folder = self.dataset == "folder"
        if folder and (self.channels not in MODES or self.image_size < 1):
            raise ConfigError("dataset=folder needs image_size >= 1 and channels 1 or 3, got "
                              f"image_size={self.image_size} channels={self.channels}")
        if self.split not in OMNIGLOT_SPLITS:
            raise ConfigError(f"split must be one of {', '.join(OMNIGLOT_SPLITS)}, got "
                              f"{self.split!r}")
        if self.dataset != "omniglot" and self.split != "official":
            raise ConfigError(f"split={self.split} is an Omniglot split; dataset={self.dataset}"
                              + (" splits by train/ val/ test/ folders, else by split_fractions"
                                 if folder else " has its own files per split")
                              + " (leave split at official)")
        if not folder and (self.image_size or self.channels or self.invert):
            raise ConfigError(f"image_size, channels and invert are set by dataset="
                              f"{self.dataset}; they apply to dataset=folder")
        if self.n_way < 2:
            raise ConfigError(f"n_way must be >= 2 (a 1-way task has nothing to tell apart), "
                              f"got {self.n_way}")
        if self.data_root:  # absolute, so that the saved run evaluates from any directory
            self.data_root = os.path.abspath(os.path.expanduser(self.data_root))

    def refuse_given(self, given: set[str]) -> None:
        """Also a folder's layout given for another dataset (where it is unused)."""
        super().refuse_given(given)
        if self.dataset != "folder" and {"class_depth", "split_fractions"} & given and (
                self.class_depth, tuple(self.split_fractions)) != (
                FewShotConfig.class_depth, FewShotConfig.split_fractions):
            raise ConfigError(f"class_depth and split_fractions lay out an image folder: "
                              f"dataset={self.dataset} has its own layout and splits (they "
                              "apply to dataset=folder)")

    def settings_apart(self) -> dict[str, tuple[str, ...]]:
        uses: dict[str, tuple[str, ...]] = {}
        for key, datasets in DATASET_SETTINGS.items():
            if self.dataset not in datasets:
                user = " or ".join(f"dataset={name}" for name in datasets)
                uses[user] = uses.get(user, ()) + (key,)
        return uses

    @property
    def eval_queries(self) -> int:
        return self.eval_k_query or self.k_shot

    def image_format(self) -> ImageFormat:
        """How an image file becomes this run's model input (also for ``fastmaml adapt``)."""
        if self.dataset == "omniglot":
            from ..tasks.omniglot import IMAGE_FORMAT
            return IMAGE_FORMAT
        if self.dataset == "miniimagenet":
            from ..tasks.miniimagenet import IMAGE_FORMAT
            return IMAGE_FORMAT
        return ImageFormat(MODES[self.channels], self.image_size, self.invert)


class Split(NamedTuple):
    """A split's images (a 5-d tensor, or one tensor per class), its classes' groups and (for
    an image folder and MiniImagenet) their names."""

    images: Tensor | list[Tensor]
    groups: Tensor | None
    names: list[str] | None = None


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean()


class FewShotExperiment(Experiment):
    name = "fewshot"
    config_cls = FewShotConfig
    curve_keys = {"query_metric": "training query accuracy (%)",
                  "val_accuracy": "validation accuracy (%)"}
    curve_scale = 100.0
    cfg: FewShotConfig

    def __init__(self, cfg: FewShotConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        self._splits: dict[str, Split] = {}

    def data_root(self) -> Path:
        if self.cfg.dataset == "folder" and not self.cfg.data_root:
            raise ConfigError("dataset=folder needs the image folder: --data-root DIR")
        return Path(self.cfg.data_root) if self.cfg.data_root else default_data_root(
            self.cfg.dataset)

    def split(self, name: str) -> Split:
        """Meta-train/val/test split ``name``: its images, class by class (loaded once, from the
        compact cache), and the group of each class (Omniglot's alphabets) where there are any.
        MiniImagenet's splits load one at a time (an evaluation reads only its test split, a
        quarter of the data); Omniglot's and a folder's, which are split on loading, together."""
        if name not in self._splits:
            self._splits.update(self._load(name))
        return self._splits[name]

    def _load(self, name: str) -> dict[str, Split]:
        cfg, root = self.cfg, self.data_root()
        if cfg.download and cfg.dataset != "omniglot" and not self._splits:
            # (not refused: saved runs hold it)
            warn(f"download=true is ignored: it fetches Omniglot's official zips, "
                 f"and dataset={cfg.dataset} has no download; name its folder with "
                 "data_root", FastMAMLWarning)
        if cfg.dataset == "omniglot":
            from ..tasks.omniglot import load_omniglot, load_omniglot_alphabets
            images = load_omniglot(root, cfg.split, download=cfg.download, seed=cfg.split_seed)
            groups = load_omniglot_alphabets(root, cfg.split, seed=cfg.split_seed)
            return {split: Split(images[split], groups[split]) for split in images}
        if cfg.dataset == "miniimagenet":
            from ..tasks.miniimagenet import check_disjoint, load_miniimagenet
            part = load_miniimagenet(root, [name])[name]
            check_disjoint(root, {**{split: loaded.names for split, loaded in self._splits.items()},
                                  name: part.names})
            return {name: Split(part.images, None, part.names)}
        folders = load_image_folder(root, cfg.image_format(), class_depth=cfg.class_depth,
                                    min_images=self.min_images(), assignment=self.data_split())
        return {split: Split(part.images, part.groups, part.names)
                for split, part in folders.items()}

    def assign_split(self) -> Assignment | None:
        cfg = self.cfg
        if cfg.dataset != "folder":
            return None
        return assign_classes(self.data_root(), cfg.class_depth, cfg.split_fractions,
                              cfg.split_seed, self.min_images())

    def min_images(self) -> int:
        """The images a class needs to take part in tasks: support and query, in training and
        evaluation."""
        return self.cfg.k_shot + max(self.cfg.k_query, self.cfg.eval_queries)

    def rotates(self, split: str) -> bool:
        """Whether tasks of ``split`` turn each class by a random multiple of 90 degrees."""
        mode = self.cfg.rotate
        if mode == "auto":
            mode = "all" if self.cfg.dataset == "omniglot" else "none"
        return mode == "all" or (mode == "train" and split == "train")

    def sampler(self, split: str, queries: int, within_alphabet: bool | None = None,
                on_device: bool = True) -> FewShotSampler:
        """Tasks of ``split``; its images on the run's device (``on_device``), or where they
        are, for a sampler that only checks the split can give tasks."""
        within = self.cfg.within_alphabet if within_alphabet is None else within_alphabet
        images, groups, names = self.split(split)
        if len(images) < self.cfg.n_way:
            raise DataError(f"n_way={self.cfg.n_way} needs at least {self.cfg.n_way} classes, but "
                            f"the {split} split of {self.data_root()} has only {len(images)}"
                            + (self._more_classes_hint() if self.cfg.dataset == "folder" else "")
                            + ("; or train without validation: val_every=0" if split == "val"
                               else ""))
        try:
            return FewShotSampler(images, self.cfg.n_way, self.cfg.k_shot, queries,
                                  rotate=self.rotates(split),
                                  device=self.device if on_device else None, groups=groups,
                                  within_group=within, names=names,
                                  query_name="k_query" if split == "train" else self._eval_name())
        except DataError as error:  # named with its split
            groups_too_small = (within and groups is not None and self.cfg.n_way
                                > int(groups.unique(return_counts=True)[1].max()))
            cut = (groups_too_small and self.cfg.dataset == "folder"
                   and not has_explicit_splits(self.data_root()))
            raise DataError(f"the {split} split of {self.data_root()}: {error}" + (
                "; split_fractions cut each group's classes over train/val/test, so give "
                "explicit train/, val/ and test/ folders of whole groups" if cut else "")
                ) from None

    def _eval_name(self) -> str:
        """The setting of the evaluation's queries per class (validation and test tasks)."""
        return "eval_k_query" + ("" if self.cfg.eval_k_query else " (default k_shot)")

    def _more_classes_hint(self) -> str:
        sizes = "/".join(str(len(self.split(name).images)) for name in SPLITS)
        other = ("" if has_explicit_splits(self.data_root()) else
                 f" or other split_fractions (now {','.join(map(str, self.cfg.split_fractions))})")
        cfg = self.cfg
        need = (f"k_shot {cfg.k_shot} + the larger of k_query {cfg.k_query} and the evaluation's "
                f"queries {cfg.eval_queries} (eval_k_query, default k_shot)")
        return (f" (train/val/test have {sizes} classes of at least {self.min_images()} images: "
                f"{need}); give a new run more classes{other}, more images per class or fewer "
                "shots and queries: a run keeps the classes it started with")

    def test_kinds(self) -> tuple[bool, ...]:
        """Whether each kind of test task is within an alphabet. Lake et al.'s protocol: random
        classes and classes of one alphabet, on novel alphabets."""
        return (False, True) if self.cfg.split == "lake" else (self.cfg.within_alphabet,)

    def build_maml(self) -> MAML:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        image = cfg.image_format()
        channels, side = image.channels, image.size
        if cfg.network == "conv":
            # the paper: stride-2 convolutions for Omniglot's 28x28, max-pools for 84x84
            model = ConvNet(channels, cfg.n_way, cfg.hidden, strided=side <= 32, image_size=side,
                            norm_scale=cfg.norm_scale)
        else:
            model = MLP([channels * side * side, 256, 128, 64, 64, cfg.n_way], batch_norm=True,
                        flatten=True, norm_scale=cfg.norm_scale)
        return build_maml(initialise(model, cfg.init).to(self.device), F.cross_entropy, cfg,
                          metric_fn=accuracy)

    def learners(self) -> list[GradientLearner]:
        cfg = self.cfg
        maml = self.build_maml()
        train = self.sampler("train", cfg.k_query)
        validation = {}
        if cfg.val_every and len(self.split("val").images):  # e.g. the vinyals split has none
            val = self.sampler("val", cfg.eval_queries)
            validation = validation_of(
                maml, lambda: val.fixed_tasks(cfg.val_tasks, VAL_SEED, cfg.eval_chunk),
                cfg.inner_steps, cfg.val_every, "val_accuracy", "metric")
        for within in self.test_kinds():  # refuse, before training, a run that cannot be tested
            self.sampler("test", cfg.eval_queries, within_alphabet=within, on_device=False)
        return [self._meta_learner(maml, lambda: train, **validation)]

    def _meta_learner(self, maml: MAML, train: Callable[[], FewShotSampler],
                      **validation: Any) -> GradientLearner:
        """MAML's learner, drawing its meta-batches from the sampler ``train()`` gives."""
        cfg = self.cfg
        return meta_learner(maml, cfg, lambda generator: train().sample(cfg.meta_batch, generator),
                            torch.Generator().manual_seed(cfg.seed), **validation)

    def evaluate(self, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        # the trained learner, not trained further: only the test split is read (MiniImagenet's
        # train split alone is 800 MB)
        maml = self.restore(self._meta_learner(
            self.build_maml(), lambda: self.sampler("train", cfg.k_query))).module
        method, learned = maml_method(cfg)
        records = []
        for within in self.test_kinds():
            test = self.sampler("test", cfg.eval_queries, within_alphabet=within)
            curve = evaluate_tasks(maml, test.fixed_tasks(cfg.eval_tasks, TEST_SEED,
                                                          cfg.eval_chunk),
                                   cfg.eval_inner_steps, progress, "meta-test", "metric")
            records.append(eval_record(cfg.dataset, method + (", within alphabet" if within else ""),
                                       cfg.k_shot, curve, n_way=cfg.n_way, metric="accuracy",
                                       preset=cfg.preset, within_alphabet=within, **learned))
        paper = self._paper()
        show = sorted({0, 1, *(s for _, values in paper[cfg.k_shot] for s in values),
                       cfg.inner_steps, cfg.eval_inner_steps})
        table = results_table(f"{cfg.dataset} {cfg.n_way}-way {cfg.k_shot}-shot: test accuracy (%) "
                              "after N inner steps", records, show_steps=show, paper=paper,
                              run_dir=self.run_dir, scale=100, digits=2)
        self.write_eval(records, table)
        return records

    def _paper(self) -> dict[int, PaperValues]:
        """The published accuracies (%) this run's tasks compare with, at their steps (Lake et
        al.'s, of people and other methods, in the table's column of the paper's steps)."""
        cfg = self.cfg
        if cfg.split == "lake":  # another protocol than the paper's Table 1, in its steps' column
            paper_steps = fewshot_paper(cfg.dataset, cfg.n_way, cfg.k_shot)[0]
            paper_rows = LAKE.get((cfg.n_way, cfg.k_shot), [])
        else:
            paper_steps, paper_rows = fewshot_paper(cfg.dataset, cfg.n_way, cfg.k_shot,
                                                    cfg.network)
        return {cfg.k_shot: at_step(paper_steps, paper_rows)}

    def plot_evaluation(self, records: list[dict[str, Any]]) -> list[Path]:
        cfg = self.cfg
        lake = cfg.split == "lake"  # Lake et al.'s figures have no gradient steps: lines
        return [plot_step_curves(
            records, "test accuracy (%)", self.figures_dir() / "accuracy_vs_steps.png",
            self.figure_title(records), scale=100, paper=None if lake else self._paper(),
            zoom=True, limits=(0.0, 100.0),
            references={cfg.k_shot: LAKE.get((cfg.n_way, cfg.k_shot), [])} if lake else None)]
