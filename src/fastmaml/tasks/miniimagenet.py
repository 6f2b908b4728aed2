"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64 / 16 / 20 classes of
600 RGB images, 84x84 (the paper's 64/12/24 is a typo).

Three layouts of a data root are read, per split:

- ``mini-imagenet-cache-{train,val,test}.pkl`` (learn2learn's release names val
  ``validation``): a pickled dict with ``image_data`` (uint8,
  N x 84 x 84 x 3; another size is resized to 84x84 with LANCZOS) and ``class_dict`` (class
  name -> list of indices into ``image_data``), written by Python 3 or 2. Unpickling runs code
  named in the file, so only the numpy constructors that structure needs are allowed; anything
  else is refused with ``DataError``.
- ``images/`` with ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``): the
  images are decoded once (resized to 84x84 with LANCZOS if needed) and cached as a ``.npy``
  in the cache directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), named after the
  image files (names, sizes and modification times).
- ``train/``, ``val/``, ``test/``, each with one folder of images per class (e.g. ``n01532829``),
  as many conversions of the CSVs (and MAML++'s full-size release) lay it out: decoded, resized
  and cached the same way.

Loaders return a ``MiniImagenetSplit``: classes sorted by name, uint8 pixels (the sampler
scales them by 1/255). A class name in two splits is refused: its test tasks would not be new.
"""
from __future__ import annotations

import csv
import importlib
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import ConfigError, DataError, FastMAMLWarning, warn
from .download import cached_array, default_cache_dir
from .folder import decoded_images, image_files, warn_of_skipped_files
from .images import ImageFormat, fingerprint, listed_remedy, read_images
from .splits import DATA_ROOT_OPTIONS, subfolders

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
IMAGE_FORMAT = ImageFormat("RGB", IMAGE_SIZE)


class MiniImagenetSplit(NamedTuple):
    """A split's classes, sorted by name: uint8 images (classes, per_class, 3, 84, 84) where
    every class has as many (as in the data set's own files), else one (count, 3, 84, 84)
    tensor per class (``FewShotSampler`` takes either); and the classes' names."""

    images: Tensor | list[Tensor]
    names: list[str]


def _numpy_module(name: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy < 1.26 has only numpy.core
        return importlib.import_module(f"numpy.core.{name}")


_multiarray, _numeric = _numpy_module("multiarray"), _numpy_module("numeric")
# Everything a pickled dict of numpy arrays, lists and strings needs (protocols 0 to 5), under
# the module paths of numpy 1 (numpy.core) and numpy 2 (numpy._core); ``range`` for a class's
# indices.
_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): importlib.import_module("_codecs").encode,
            ("builtins", "range"): range, ("__builtin__", "xrange"): range,
            **{key: value for package in ("numpy.core", "numpy._core") for key, value in (
                ((f"{package}.multiarray", "_reconstruct"), _multiarray._reconstruct),
                ((f"{package}.multiarray", "scalar"), _multiarray.scalar),
                ((f"{package}.numeric", "_frombuffer"), _numeric._frombuffer))}}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: a MiniImagenet cache holds "
                            "only a dict of numpy arrays, lists and strings")
        return _ALLOWED[(module, name)]


def read_pickle_cache(path: str | os.PathLike[str]) -> MiniImagenetSplit:
    """A ``mini-imagenet-cache-*.pkl`` file's classes."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            # latin1: a Python 2 pickle's str holds bytes (numpy's pixels among them)
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError, OverflowError) as error:
        raise DataError(f"{path} is not a readable MiniImagenet pickle: {error}") from error
    except MemoryError:  # a corrupt length, or a file larger than this machine's memory
        raise DataError(f"{path} is not a readable MiniImagenet pickle: it asks for more memory "
                        "than this machine has (a corrupt file?)") from None
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        raise DataError(f"{path} must hold a dict with keys 'image_data' and 'class_dict'")
    images, class_dict = data["image_data"], data["class_dict"]
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8
            or images.ndim != 4 or images.shape[3] != 3 or 0 in images.shape):
        raise DataError(f"{path}: image_data must be a uint8 array of (N, H, W, 3) RGB images "
                        "(84x84 in MiniImagenet's own files), got "
                        f"{getattr(images, 'dtype', type(images).__name__)} "
                        f"{getattr(images, 'shape', '')}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: class_dict must be a non-empty dict of class -> indices")
    if min(images.shape[1:3]) < IMAGE_SIZE:  # (larger ones lose no detail in the resize)
        warn_of_upscaling(path, (images.shape[2], images.shape[1]))
    indices, owner = {}, {}  # class -> its indices; image index -> its class
    for name, index in class_dict.items():
        if not isinstance(name, str):
            raise DataError(f"{path}: class_dict's keys must be class names (strings), got "
                            f"{name!r} ({type(name).__name__})")
        index = np.asarray(index)
        if (index.ndim != 1 or index.dtype.kind not in "iu"
                or index.size == 0 or index.min() < 0 or index.max() >= len(images)):
            raise DataError(f"{path}: class_dict[{name!r}] must be a list of indices into the "
                            f"{len(images)} images")
        for i in index.tolist():  # one image twice: a support example could be its own query
            if i in owner:
                raise DataError(f"{path}: image {i} is listed twice in class_dict (under "
                                f"{owner[i]!r} and {name!r}); each image belongs to one class "
                                "once")
            owner[i] = name
        indices[name] = index
    return _by_class(indices, images)


def read_image_folder(root: str | os.PathLike[str], split: str,
                      cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None) -> MiniImagenetSplit:
    """``root/images`` listed by ``root/<split>.csv``, class by class."""
    root = Path(root)
    table = root / f"{split}.csv"
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:  # with or without a BOM
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {table}: {error}") from error
    if header != ["filename", "label"] or not rows or any(len(row) != 2 for row in rows):
        raise DataError(f"{table} must be a CSV with the header 'filename,label' and one "
                        "'filename,label' row per image")
    repeated = next((name for name, count in Counter(name for name, _ in rows).items()
                     if count > 1), None)
    if repeated is not None:  # one image twice: a support example could be its own query
        raise DataError(f"{table} lists the image {repeated} more than once; list each image once")
    files = [root / "images" / name for name, _ in rows]
    key = fingerprint(root, files, IMAGE_FORMAT, listed_in=table)
    cache = Path(cache_dir or default_cache_dir()) / f"miniimagenet-{split}-{key}.npy"
    images = cached_array(cache, lambda: read_images(
        files, IMAGE_FORMAT, workers, remedy=listed_remedy(table),
        upscaled=partial(warn_of_upscaling, table, verb="lists")), root)
    label_of = np.array([label for _, label in rows])
    return _by_class({str(label): np.flatnonzero(label_of == label) for label in set(label_of)},
                     images)


def read_class_folders(root: str | os.PathLike[str], split: str,
                       cache_dir: str | os.PathLike[str] | None = None,
                       workers: int | None = None) -> MiniImagenetSplit:
    """``root/<split>/<class>/*``, class by class."""
    split_root = Path(root) / split
    folders = subfolders(split_root)  # sorted
    classes = {folder.name: image_files(folder) for folder in folders}
    warn_of_skipped_files(split_root, folders, list(classes.values()), class_depth=1)
    if not any(classes.values()):
        raise DataError(f"{split_root} holds no class folders of images (expected "
                        f"{split_root}/<class>/<image>)")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"{split_root}: class folder(s) {', '.join(empty[:10])} hold no images; "
                        "give each class images, or remove its folder")
    pixels = decoded_images(split_root, [f for files in classes.values() for f in files],
                            IMAGE_FORMAT, cache_dir, workers,
                            upscaled=partial(warn_of_upscaling, split_root))
    return _split(pixels, list(classes), [len(files) for files in classes.values()])


def warn_of_upscaling(source: Path, smallest: tuple[int, int], verb: str = "holds") -> None:
    """Warn that ``source`` (a pickle, a split's folder or CSV) ``verb`` images as small as
    ``smallest`` (width, height), enlarged to 84x84: results on them are not the paper's.
    Image files are said when decoded, not on the loads from their cache."""
    warn(f"{source} {verb} {smallest[0]}x{smallest[1]} images, smaller in a side than "
         f"MiniImagenet's {IMAGE_SIZE}x{IMAGE_SIZE}: they are upscaled to it, and accuracies "
         "are those of the smaller copy, not comparable with the paper's", FastMAMLWarning)


def load_miniimagenet(root: str | os.PathLike[str], splits: Sequence[str] = SPLITS, *,
                      cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None) -> dict[str, MiniImagenetSplit]:
    """Each split's classes, from a pickle cache if ``root`` has one for that split, else from
    ``images/`` and the split's CSV, else from ``root/<split>/``'s class folders."""
    root = Path(root)
    result = {}
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"unknown MiniImagenet split {split!r}; known: {', '.join(SPLITS)}")
        layout = _layout(root, split)
        if layout == "pickle":
            result[split] = read_pickle_cache(_pickle_file(root, split))
        elif layout == "csv":
            result[split] = read_image_folder(root, split, cache_dir, workers)
        elif layout == "class folders":
            result[split] = read_class_folders(root, split, cache_dir, workers)
        else:
            what = "" if root.is_dir() else " (a file)" if root.exists() else " (no such folder)"
            raise DataError(
                f"MiniImagenet {split} split not found in {root}{what}: expected "
                f"{' or '.join(_pickle_names(split))} "
                f"(a pickled dict of image_data and class_dict), an images/ folder with "
                f"{split}.csv (Ravi & Larochelle, header 'filename,label') or a {split}/ folder "
                f"of class folders{_where_it_may_be(root, split)}. Name the folder that holds "
                f"them with {DATA_ROOT_OPTIONS} or $FASTMAML_MINIIMAGENET (every command, "
                "reproduce too)")
    check_disjoint(root, {split: part.names for split, part in result.items()})
    return result


def _pickle_names(split: str) -> list[str]:
    """The names a split's pickle has in the releases (learn2learn's val is ``validation``)."""
    return [f"mini-imagenet-cache-{name}.pkl"
            for name in (split, *(("validation",) if split == "val" else ()))]


def _pickle_file(root: Path, split: str) -> Path | None:
    """``split``'s pickle in ``root`` under any of its names, else None."""
    return next((root / name for name in _pickle_names(split) if (root / name).is_file()), None)


def _layout(root: Path, split: str) -> str | None:
    """Which of the three layouts ``root`` holds ``split`` in (the first, where several)."""
    if _pickle_file(root, split):
        return "pickle"
    if (root / "images").is_dir() and (root / f"{split}.csv").is_file():
        return "csv"
    return "class folders" if (root / split).is_dir() else None


def _where_it_may_be(root: Path, split: str) -> str:
    """Where ``split`` is instead, as a hint: a folder one level down that holds it, or a
    split folder of another spelling (``Val/``, ``validation/``)."""
    if not root.is_dir():
        return ""
    if (root / "images" / f"{split}.csv").is_file():
        return f" (images/{split}.csv: the CSVs go beside images/, not in it)"
    folders = subfolders(root)
    below = [sub for sub in folders if _layout(sub, split)]
    if below:
        return f" (it is one level down: give the data folder as {below[0]})"
    spellings = {split, *(("validation", "valid") if split == "val" else ())}
    other = [sub.name for sub in folders if sub.name.lower() in spellings]
    return f" (found {other[0]}/: name it {split}/)" if other else ""


def check_disjoint(root: Path, names: dict[str, list[str]]) -> None:
    """Refuse a class in two splits (a split file copied over another): a test task of classes
    seen in meta-training measures memory, not adaptation."""
    seen: dict[str, str] = {}  # class -> its first split
    for split, classes in names.items():
        shared = [name for name in classes if name in seen]
        if shared:
            raise DataError(f"MiniImagenet in {root}: the {seen[shared[0]]} and {split} splits "
                            f"share {len(shared)} class(es) ({', '.join(shared[:5])}); each "
                            "class belongs to one split")
        seen.update(dict.fromkeys(classes, split))


def _by_class(indices: dict[str, np.ndarray], images: np.ndarray) -> MiniImagenetSplit:
    """The classes of (N, H, W, 3) ``images`` by per-class index arrays, sorted by name, at
    84x84; filled class by class to keep the peak memory low."""
    names = sorted(indices)
    out = np.empty((sum(len(index) for index in indices.values()), 3, IMAGE_SIZE, IMAGE_SIZE),
                   dtype=np.uint8)
    start = 0
    for name in names:
        count = len(indices[name])
        out[start:start + count] = _resized(images[indices[name]]).transpose(0, 3, 1, 2)
        start += count
    return _split(torch.from_numpy(out), names, [len(indices[name]) for name in names])


def _resized(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 at 84x84, resized as image files are (LANCZOS) where another size."""
    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return np.stack([IMAGE_FORMAT.convert(Image.fromarray(image)) for image in images])


def _split(pixels: Tensor, names: list[str], counts: list[int]) -> MiniImagenetSplit:
    """(total, 3, 84, 84) ``pixels`` of classes of ``counts`` images each, in order: one 5-d
    tensor where every class has as many, else views of each class."""
    if len(set(counts)) == 1:
        return MiniImagenetSplit(pixels.reshape(len(counts), counts[0], *pixels.shape[1:]), names)
    return MiniImagenetSplit(list(pixels.split(counts)), names)
