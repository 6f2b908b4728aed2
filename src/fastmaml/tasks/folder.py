"""Few-shot tasks from any folder of images: a user's own data set.

Layouts of a data root (any image format Pillow reads, any number of images per class):

- ``root/<class>/*`` (``class_depth=1``) or ``root/<group>/<class>/*`` (``class_depth=2``, as
  Omniglot's alphabets; the group can be used for within-group tasks);
- ``root/train/...``, ``root/val/...`` (optional) and ``root/test/...``: explicit splits, each in
  the layout above (no class name in two of them, and no other folder beside them).

Without explicit splits the classes (sorted by path) are shuffled with
``numpy.random.default_rng(seed)`` and cut by ``fractions``, so no class is ever in two splits.
``assign_classes`` gives that assignment, which a run records when it starts (``splits.json``):
classes added to the folder later would otherwise move others between the splits.
Every image is decoded once in the data set's ``ImageFormat`` and cached as a uint8 ``.npy`` in
the cache directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), named after the files (path,
size and modification time) and the format, so a changed folder is decoded again.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic import write_text_atomic
from ..errors import ConfigError, DataError, FastMAMLWarning
from .download import cached_array, default_cache_dir, fingerprint
from .images import CONVERSION, ImageFormat, channels_first, is_image_file, read_images

SPLITS = ("train", "val", "test")
JUNK_FOLDERS = {"__MACOSX"}  # resource forks that macOS zips add beside the real folders
Assignment = dict[str, list[str]]  # split -> its class folders, relative to the data root


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
        level = [p for folder in level for p in _subfolders(folder)]
    return level


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder``, sorted, without hidden ones and ``JUNK_FOLDERS``."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in JUNK_FOLDERS)


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


def has_explicit_splits(root: Path) -> bool:
    """Whether ``root`` holds train/ and test/ (and optionally val/) and nothing else."""
    folders = [p.name for p in _subfolders(root)]
    explicit = [name for name in SPLITS if name in folders]
    if not explicit:
        return False
    missing = [f"{name}/" for name in ("train", "test") if name not in explicit]
    if missing:
        raise DataError(f"{root} has {', '.join(n + '/' for n in explicit)} but no "
                        f"{' or '.join(missing)}: explicit splits need train/ and test/ "
                        "(val/ is optional)")
    others = [name for name in folders if name not in SPLITS]
    if others:
        raise DataError(f"{root} has explicit splits and also {', '.join(n + '/' for n in others)}"
                        ", which would be left unread: only train/, val/ and test/ are read "
                        "(rename validation/ to val/; move other folders out)")
    return True


def _found_classes(root: Path, class_depth: int) -> list[tuple[str | None, Path]]:
    """Every class folder of ``root``, with its explicit split (None without explicit splits)."""
    if has_explicit_splits(root):
        return [(name, folder) for name in SPLITS if (root / name).is_dir()
                for folder in class_folders(root / name, class_depth)]
    return [(None, folder) for folder in class_folders(root, class_depth)]


def assign_classes(root: str | os.PathLike[str], class_depth: int = 1,
                   fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 1) -> Assignment:
    """Each split's class folders, relative to ``root``: the explicit splits, or the classes
    shuffled with ``seed`` and cut by ``fractions`` (see the module docstring)."""
    root = _data_root(root)
    found = _found_classes(root, class_depth)
    if found and found[0][0] is not None:
        names: dict[str, str] = {}
        for split, folder in found:
            name = folder.relative_to(root / split).as_posix()
            if name in names:
                raise DataError(f"class {name} is in both {names[name]}/ and {split}/ of {root}: "
                                "a class in two splits would be tested on what it trained on")
            names[name] = split
        return {name: [f.relative_to(root).as_posix() for s, f in found if s == name]
                for name in SPLITS}
    cut = split_classes(len(found), fractions, seed)
    return {name: [found[i][1].relative_to(root).as_posix() for i in sorted(index)]
            for name, index in zip(SPLITS, cut)}


def save_assignment(assignment: Assignment, path: Path) -> None:
    """Record a run's class split (``splits.json``), atomically."""
    write_text_atomic(json.dumps(assignment, indent=1), path)


def read_assignment(path: Path) -> Assignment:
    """A class split recorded by ``save_assignment``; a damaged record is a ``ConfigError``."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the run's class split {path}: {error}") from None
    if not (isinstance(value, dict) and set(value) == set(SPLITS)
            and all(isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                    for keys in value.values())):
        raise ConfigError(f"{path} is not a record of a run's class split (train, val and test "
                          "lists of class folders)")
    return value


def _data_root(root: str | os.PathLike[str]) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found" + (" (it is a file)" if root.exists()
                                                            else ""))
    return root


def load_image_folder(root: str | os.PathLike[str], image_format: ImageFormat, *,
                      class_depth: int = 1,
                      fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 1,
                      min_images: int = 1, cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None,
                      assignment: Assignment | None = None) -> dict[str, FolderSplit]:
    """The splits of an image folder (see the module docstring), each class's images decoded.

    ``assignment`` (a run's record of ``assign_classes``) fixes the classes of each split:
    folders not in it are left out with a warning, and one of it that is missing is an error.
    Classes with fewer than ``min_images`` images (k_shot + queries) are left out, with one
    ``ShortClassesWarning`` that says how many.
    """
    root = _data_root(root)
    if assignment is None:
        assignment = assign_classes(root, class_depth, fractions, seed)
    split_of = {key: name for name, keys in assignment.items() for key in keys}
    found = _found_classes(root, class_depth)
    explicit = bool(found) and found[0][0] is not None
    folders = [(folder.relative_to(root).as_posix(), folder) for _, folder in found]
    missing = sorted(set(split_of) - {key for key, _ in folders})
    if missing:
        raise DataError(f"{len(missing)} class folder(s) of this run are missing from {root} "
                        f"(e.g. {missing[0]}): a run keeps the classes it started with (its "
                        "splits.json); restore them, or start a new run")
    added = [key for key, _ in folders if key not in split_of]
    if added:
        warnings.warn(f"left out {len(added)} class folder(s) of {root} that are not in this "
                      f"run's splits (added after it started, e.g. {added[0]})", FastMAMLWarning,
                      stacklevel=2)
    classes = [(split_of[key], root / key.split("/")[0] if explicit else root, folder)
               for key, folder in folders if key in split_of]
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
