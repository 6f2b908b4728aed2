"""Few-shot tasks from any folder of images: a user's own data set.

Layouts of a data root (any image format Pillow reads, any number of images per class):

- ``root/<class>/*`` (``class_depth=1``) or ``root/<group>/<class>/*`` (``class_depth=2``, as
  Omniglot's alphabets; the group can be used for within-group tasks);
- ``root/train/...``, ``root/val/...`` (optional) and ``root/test/...``: explicit splits, each in
  the layout above (no class name in two of them).

Without explicit splits the classes are shuffled and cut by ``fractions`` (``splits``), so no
class is ever in two splits; a run records the assignment when it starts (``splits.json``).
Every image is decoded once in the data set's ``ImageFormat`` and cached as a uint8 ``.npy`` in
the cache directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), named after the files (path,
size and modification time) and the format, so a changed folder is decoded again.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError, FastMAMLWarning, warn
from .download import cached_array, default_cache_dir
from .images import ImageFormat, channels_first, fingerprint, is_image_file, read_images
from .splits import (SPLITS, Assignment, assign_items, assigned_items, composed, data_root,
                     files_below, found_items, has_explicit_splits, links_to_nothing,
                     skipped_files_warning, subfolders, unread_files)


# why a file was skipped (by its suffix: a format this Pillow cannot read, e.g. HEIC, or none)
NOT_IMAGES = "whose names end in no image format's suffix this Pillow reads (e.g. .png, .jpg)"


class ShortClassesWarning(FastMAMLWarning):
    """Classes left out of a data set because they hold too few images for a task."""


class BlankImagesWarning(FastMAMLWarning):
    """Images that come out one flat colour, from which a model learns nothing."""


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
        level = [p for folder in level for p in subfolders(folder)]
    return level


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def misplaced_images(root: Path, folders: Sequence[Path], class_depth: int) -> list[Path]:
    """The images under ``root`` that no class of ``folders`` reads: in a folder inside a class
    folder, or above the class level (at the root, in a split folder or a group folder, even
    one that holds no class folder: ``val/*.png`` with ``class_depth=1``); and the links to
    nothing above the class level (a class folder on a drive not mounted)."""
    inside = [p for folder in folders for sub in subfolders(folder) if not sub.is_symlink()
              for p in files_below(sub, is_image_file)]
    level = ([root / name for name in SPLITS if (root / name).is_dir()]
             if has_explicit_splits(root) else [root])
    above = {root, *level}
    for _ in range(class_depth - 1):
        level = [p for folder in level for p in subfolders(folder)]
        above.update(level)
    return inside + [p for parent in sorted(above) for p in sorted(parent.iterdir())
                     if is_image_file(p) or links_to_nothing(p) and not p.name.startswith(".")]


def warn_of_skipped_files(root: Path, folders: Sequence[Path], files: Sequence[Sequence[Path]],
                          class_depth: int) -> None:
    """Warn of the files under ``root`` that no class reads: files of the class ``folders``
    that are not their image ``files``, and images outside them."""
    skipped_files_warning([p for folder, images in zip(folders, files)
                           for p in unread_files(folder, images)], f"the class folders of {root}",
                          root, NOT_IMAGES)
    skipped_files_warning(misplaced_images(root, folders, class_depth), str(root), root,
                          f"outside the class folders (a class's images go directly in its "
                          f"folder, {class_depth} level(s) below the root or a split folder)")


def assign_classes(root: str | os.PathLike[str], class_depth: int = 1,
                   fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 1,
                   min_images: int = 1) -> Assignment:
    """Each split's class folders, relative to ``root`` (``splits.assign_items``); with explicit
    splits, a class name in two of them is an error.

    Without explicit splits the folders of fewer than ``min_images`` image files (too short for
    a task) take no split's share.
    """
    root = data_root(root)
    found = found_items(root, partial(class_folders, class_depth=class_depth))
    real: dict[Path, Path] = {}
    for _, folder in found:  # e.g. a link to another class folder
        twin = real.setdefault(folder.resolve(), folder)
        if twin != folder:
            raise DataError(f"class folders {twin.relative_to(root)} and "
                            f"{folder.relative_to(root)} of {root} are one folder (a link): it "
                            "would be two classes, perhaps in two splits; remove the link")
    return assign_items(root, found, fractions, seed, "class", _class_name,
                        lambda folder: len(image_files(folder)) < min_images)


def _class_name(split_root: Path, folder: Path) -> str:
    """A class's identity: its name within its split (e.g. cat in train/ and test/), in
    composed Unicode form (café copied back from macOS into test/ is train/'s café)."""
    return f"named {composed(folder.relative_to(split_root).as_posix())}"


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
    ``ShortClassesWarning`` that says how many and names the first three.
    """
    root = data_root(root)
    if assignment is None:
        assignment = assign_classes(root, class_depth, fractions, seed, min_images)
    found = found_items(root, partial(class_folders, class_depth=class_depth))
    classes = assigned_items(root, found, assignment, "class folder")
    files = [image_files(folder) for _, _, folder in classes]
    warn_of_skipped_files(root, [folder for _, _, folder in classes], files, class_depth)
    if not any(files):
        raise DataError(f"no images found in {root}: expected {root}/<class>/<image> (class_depth"
                        f"=1) or {root}/<group>/<class>/<image> (class_depth=2), optionally under "
                        "train/, val/ and test/" + _depth_hint(root, class_depth))
    flat_files = [f for per_class in files for f in per_class]
    pixels = decoded_images(root, flat_files, image_format, cache_dir, workers)
    warn_of_featureless_images(pixels, [f.relative_to(root).as_posix() for f in flat_files],
                               f"in {root}")
    kept: dict[str, list[tuple[Tensor, str, str]]] = {name: [] for name in SPLITS}
    start, short = 0, []
    for (name, split_root, folder), per_class in zip(classes, files):
        if len(per_class) >= min_images:
            kept[name].append((pixels[start:start + len(per_class)],
                               str(folder.relative_to(split_root)),
                               str(folder.parent.relative_to(split_root))))
        else:
            short.append(folder.relative_to(root).as_posix())
        start += len(per_class)
    splits = {}
    for name, entries in kept.items():
        group_index = {group: i for i, group in enumerate(dict.fromkeys(g for _, _, g in entries))}
        splits[name] = FolderSplit([images for images, _, _ in entries], [n for _, n, _ in entries],
                                   torch.tensor([group_index[g] for _, _, g in entries],
                                                dtype=torch.long))
    if short:
        warn(f"left out {len(short)} of {len(classes)} classes in "
             f"{root} with fewer than {min_images} images (k_shot + queries): "
             + ", ".join(short[:3]) + (", ..." if len(short) > 3 else ""), ShortClassesWarning)
    return splits


FAINT_SPAN = 16  # of 255 levels: all that 12-bit pixels (0..4095) keep of a 16-bit file's range


def warn_of_featureless_images(pixels: Tensor | np.ndarray, names: Sequence[str],
                               where: str = "") -> None:
    """Warn of images that come out one flat colour: a model learns nothing from them (light
    strokes on a transparent background, composited onto white as a viewer shows it); and of
    images that come out nearly so, as 16-bit files of a 10- or 12-bit camera's pixels do.
    ``names`` name the images (``pixels``' rows) ``where`` they are (e.g. "in <folder>")."""
    flat = torch.as_tensor(pixels).flatten(1)
    span = flat.amax(1).int() - flat.amin(1).int()
    blank = (span == 0).nonzero().flatten().tolist()
    faint = ((span > 0) & (span <= FAINT_SPAN)).nonzero().flatten().tolist()
    images = f"{len(names)} images{' ' + where if where else ''}"
    if faint:
        warn(f"{len(faint)} of {images} span at most {FAINT_SPAN} of 255 levels as read (e.g. "
             f"{names[faint[0]]}), nearly one colour, from which a model learns little; if "
             "they are 16-bit files of a 10- or 12-bit camera (0..4095, which read as 0..16: "
             "16-bit pixels are scaled by 255/65535, as a viewer shows them), stretch them to "
             "the full range or save them as 8-bit", BlankImagesWarning)
    if blank:
        warn(f"{len(blank)} of {images} are one flat colour as read (e.g. {names[blank[0]]}), "
             "from which a model learns nothing: blank images, or light strokes on a "
             "transparent background (transparent pixels count as white, so save such images "
             "on an opaque background)", BlankImagesWarning)


def _depth_hint(root: Path, class_depth: int) -> str:
    """Why no class folder held images when the other ``class_depth``'s would: that fix."""
    other = 3 - class_depth
    for _, folder in found_items(root, partial(class_folders, class_depth=other)):
        if image_files(folder):
            return (f"; its images are {other} folder level{'s' if other > 1 else ''} down "
                    f"(e.g. {folder.relative_to(root).as_posix()}/), so set class_depth={other}")
    return ""


def decoded_images(root: Path, files: list[Path], image_format: ImageFormat,
                   cache_dir: str | os.PathLike[str] | None, workers: int | None,
                   upscaled: Callable[[tuple[int, int]], None] | None = None) -> Tensor:
    """Every file's pixels, uint8 (N, C, H, W), from the cache or decoded once into it; when
    decoding, ``upscaled`` gets the smallest size of images enlarged (``read_images``)."""
    key = fingerprint(root, files, image_format)
    cache = Path(cache_dir or default_cache_dir()) / f"folder-{root.name}-{key}.npy"
    pixels = cached_array(cache, lambda: channels_first(
        read_images(files, image_format, workers, upscaled=upscaled)), root)
    return torch.from_numpy(pixels)
