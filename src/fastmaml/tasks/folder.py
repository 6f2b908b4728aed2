"""Few-shot tasks from any folder of images: a user's own data set.

Layouts of a data root (any image format Pillow reads, any number of images per class):

- ``root/<class>/*`` (``class_depth=1``) or ``root/<group>/<class>/*`` (``class_depth=2``, as
  Omniglot's alphabets; the group can be used for within-group tasks);
- ``root/train/...``, ``root/val/...`` (optional) and ``root/test/...``: explicit splits, each in
  the layout above.

Without explicit splits the classes (sorted by path) are shuffled with
``numpy.random.default_rng(seed)`` and cut by ``fractions``, so no class is ever in two splits.
Every image is decoded once in the data set's ``ImageFormat`` and cached as a uint8 ``.npy`` in
the cache directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), named after the files (path,
size and modification time) and the format, so a changed folder is decoded again.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError, FastMAMLWarning
from .download import cached_array, default_cache_dir, fingerprint
from .images import CONVERSION, ImageFormat, channels_first, is_image_file, read_images

SPLITS = ("train", "val", "test")


class ShortClassesWarning(FastMAMLWarning):
    """Classes left out of a data set because they hold too few images for a task."""


@dataclass
class FolderSplit:
    """The classes of one split: uint8 images (count, C, H, W) per class, names and groups."""

    images: list[Tensor]
    names: list[str]
    groups: Tensor  # (classes,): index of the class's group folder (all 0 with class_depth=1)

    def __len__(self) -> int:
        return len(self.names)


def class_folders(root: Path, class_depth: int) -> list[Path]:
    """The folders ``class_depth`` levels below ``root`` (hidden ones skipped), sorted."""
    if class_depth not in (1, 2):
        raise ConfigError(f"class_depth must be 1 (root/<class>/) or 2 (root/<group>/<class>/), "
                          f"got {class_depth}")
    level = [root]
    for _ in range(class_depth):
        level = [p for folder in level for p in sorted(folder.iterdir())
                 if p.is_dir() and not p.name.startswith(".")]
    return level


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def split_classes(num_classes: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Class indices of train / val / test: a seeded permutation cut by ``fractions``."""
    if (len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)):
        raise ConfigError("split_fractions must be three fractions (train, val, test) in [0, 1] "
                          f"that sum to 1, e.g. 0.7,0.15,0.15; got {tuple(fractions)}")
    train, val = (round(f * num_classes) for f in fractions[:2])
    order = np.random.default_rng(seed).permutation(num_classes)
    return np.split(order, [train, min(train + val, num_classes)])


def load_image_folder(root: str | os.PathLike[str], image_format: ImageFormat, *,
                      class_depth: int = 1,
                      fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 1,
                      min_images: int = 1, cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None) -> dict[str, FolderSplit]:
    """The splits of an image folder (see the module docstring), each class's images decoded.

    Classes with fewer than ``min_images`` images (k_shot + queries) are left out, with one
    ``ShortClassesWarning`` that says how many.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    explicit = [name for name in SPLITS if (root / name).is_dir()]
    if explicit:
        if "train" not in explicit:
            raise DataError(f"{root} has {', '.join(explicit)}/ but no train/: explicit splits "
                            "need train/ (and test/, optionally val/)")
        classes = [(name, root / name, folder) for name in explicit
                   for folder in class_folders(root / name, class_depth)]
    else:
        every = class_folders(root, class_depth)
        split_of = {int(i): name for name, index in
                    zip(SPLITS, split_classes(len(every), fractions, seed)) for i in index}
        classes = [(split_of[i], root, folder) for i, folder in enumerate(every)]
    files = [image_files(folder) for _, _, folder in classes]
    if not any(files):
        raise DataError(f"no images found in {root}: expected {root}/<class>/<image> (class_depth"
                        f"=1) or {root}/<group>/<class>/<image> (class_depth=2), optionally under "
                        "train/, val/ and test/")
    pixels = _decoded(root, [f for per_class in files for f in per_class], image_format,
                      cache_dir, workers)
    kept: dict[str, list[tuple[Tensor, str, str]]] = {name: [] for name in SPLITS}
    start, short = 0, 0
    for (name, split_root, folder), per_class in zip(classes, files):
        if len(per_class) >= min_images:
            kept[name].append((pixels[start:start + len(per_class)],
                               str(folder.relative_to(split_root)),
                               str(folder.parent.relative_to(split_root))))
        else:
            short += 1
        start += len(per_class)
    splits = {}
    for name, found in kept.items():
        group_index = {group: i for i, group in enumerate(dict.fromkeys(g for _, _, g in found))}
        splits[name] = FolderSplit([images for images, _, _ in found], [n for _, n, _ in found],
                                   torch.tensor([group_index[g] for _, _, g in found],
                                                dtype=torch.long))
    if short:
        warnings.warn(f"left out {short} of {len(classes)} classes in "
                      f"{root} with fewer than {min_images} images (k_shot + queries)",
                      ShortClassesWarning, stacklevel=2)
    return splits


def _decoded(root: Path, files: list[Path], image_format: ImageFormat,
             cache_dir: str | os.PathLike[str] | None, workers: int | None) -> Tensor:
    """Every file's pixels, uint8 (N, C, H, W), from the cache or decoded once into it."""
    stats = [(f, f.stat()) for f in files]
    key = fingerprint([f"{image_format} conversion {CONVERSION}"]
                      + [f"{f.relative_to(root)}|{s.st_size}|{s.st_mtime_ns}" for f, s in stats])
    cache = Path(cache_dir or default_cache_dir()) / f"folder-{root.name}-{key}.npy"
    pixels = cached_array(cache, lambda: channels_first(read_images(files, image_format, workers)),
                          root)
    return torch.from_numpy(pixels)
