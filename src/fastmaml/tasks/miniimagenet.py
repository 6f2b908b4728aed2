"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64 / 16 / 20 classes of
600 RGB images, 84x84 (the paper's 64/12/24 is a typo).

Three layouts of a data root are read, per split:

- ``mini-imagenet-cache-{train,val,test}.pkl``: a pickled dict with ``image_data`` (uint8,
  N x 84 x 84 x 3) and ``class_dict`` (class name -> list of indices into ``image_data``).
  Unpickling runs code named in the file, so only the numpy constructors that structure needs
  are allowed; anything else is refused with ``DataError``.
- ``images/`` with ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``): the
  images are decoded once (resized to 84x84 with LANCZOS if needed) and cached as a ``.npy``
  in the cache directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), named after the
  image files (names, sizes and modification times).
- ``train/``, ``val/``, ``test/``, each with one folder of images per class (e.g. ``n01532829``),
  as many conversions of the CSVs (and MAML++'s full-size release) lay it out: decoded, resized
  and cached the same way.

Loaders return uint8 (classes, per_class, 3, 84, 84), classes sorted by name; the sampler
scales pixels by 1/255.
"""
from __future__ import annotations

import csv
import importlib
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .download import cached_array, default_cache_dir
from .folder import decoded_images, image_files
from .images import ImageFormat, fingerprint, read_images
from .splits import subfolders

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
IMAGE_FORMAT = ImageFormat("RGB", IMAGE_SIZE)


def _numpy_module(name: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy < 1.26 has only numpy.core
        return importlib.import_module(f"numpy.core.{name}")


_multiarray, _numeric = _numpy_module("multiarray"), _numpy_module("numeric")
# Everything a pickled dict of numpy arrays, lists and strings needs (protocols 2 to 5), under
# the module paths of numpy 1 (numpy.core) and numpy 2 (numpy._core).
_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): importlib.import_module("_codecs").encode,
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


def read_pickle_cache(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``mini-imagenet-cache-*.pkl`` file as uint8 (classes, per_class, 3, 84, 84)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError) as error:
        raise DataError(f"{path} is not a readable MiniImagenet pickle: {error}") from error
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        raise DataError(f"{path} must hold a dict with keys 'image_data' and 'class_dict'")
    images, class_dict = data["image_data"], data["class_dict"]
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8
            or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)):
        raise DataError(f"{path}: image_data must be a uint8 array of (N, 84, 84, 3), got "
                        f"{getattr(images, 'dtype', type(images).__name__)} "
                        f"{getattr(images, 'shape', '')}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: class_dict must be a non-empty dict of class -> indices")
    indices, owner = {}, {}  # class -> its indices; image index -> its class
    for name, index in class_dict.items():
        index = np.asarray(index)
        if (not isinstance(name, str) or index.ndim != 1 or index.dtype.kind not in "iu"
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
    return _by_class(path, indices, images)


def read_image_folder(root: str | os.PathLike[str], split: str,
                      cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None) -> np.ndarray:
    """``root/images`` listed by ``root/<split>.csv`` as uint8 (classes, per_class, 3, 84, 84)."""
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
    key = fingerprint(root, files, IMAGE_FORMAT)
    cache = Path(cache_dir or default_cache_dir()) / f"miniimagenet-{split}-{key}.npy"
    images = cached_array(cache, lambda: read_images(files, IMAGE_FORMAT, workers), root)
    label_of = np.array([label for _, label in rows])
    return _by_class(table, {label: np.flatnonzero(label_of == label) for label in set(label_of)},
                     images)


def read_class_folders(root: str | os.PathLike[str], split: str,
                       cache_dir: str | os.PathLike[str] | None = None,
                       workers: int | None = None) -> np.ndarray:
    """``root/<split>/<class>/*`` as uint8 (classes, per_class, 3, 84, 84)."""
    split_root = Path(root) / split
    classes = {folder.name: image_files(folder) for folder in subfolders(split_root)}  # sorted
    if not any(classes.values()):
        raise DataError(f"{split_root} holds no class folders of images (expected "
                        f"{split_root}/<class>/<image>)")
    per_class = _class_size(split_root, {name: len(files) for name, files in classes.items()})
    pixels = decoded_images(split_root, [f for files in classes.values() for f in files],
                            IMAGE_FORMAT, cache_dir, workers)
    return pixels.numpy().reshape(len(classes), per_class, *pixels.shape[1:])


def load_miniimagenet(root: str | os.PathLike[str], splits: Sequence[str] = SPLITS, *,
                      cache_dir: str | os.PathLike[str] | None = None,
                      workers: int | None = None) -> dict[str, Tensor]:
    """Each split as uint8 (classes, per_class, 3, 84, 84), from a pickle cache if ``root`` has
    one for that split, else from ``images/`` and the split's CSV, else from ``root/<split>/``'s
    class folders."""
    root = Path(root)
    result = {}
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"unknown MiniImagenet split {split!r}; known: {', '.join(SPLITS)}")
        pickled = root / f"mini-imagenet-cache-{split}.pkl"
        if pickled.is_file():
            images = read_pickle_cache(pickled)
        elif (root / "images").is_dir() and (root / f"{split}.csv").is_file():
            images = read_image_folder(root, split, cache_dir, workers)
        elif (root / split).is_dir():
            images = read_class_folders(root, split, cache_dir, workers)
        else:
            raise DataError(
                f"MiniImagenet {split} split not found in {root}: expected {pickled.name} (a "
                f"pickled dict of image_data and class_dict), an images/ folder with "
                f"{split}.csv (Ravi & Larochelle, header 'filename,label') or a {split}/ folder "
                "of class folders. Name the folder that holds them with --data-root DIR (fastmaml "
                "train and eval) or $FASTMAML_MINIIMAGENET (every command, reproduce too)")
        result[split] = torch.from_numpy(images)
    return result


def _class_size(source: Path, sizes: dict[str, int]) -> int:
    """The one number of images every class (name: its images) has (the sampler draws from a
    rectangle)."""
    fewest, most = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    if sizes[fewest] != sizes[most]:
        raise DataError(f"{source}: every class needs the same number of images, got "
                        f"{sizes[fewest]} (class {fewest}) to {sizes[most]} (class {most})")
    return sizes[most]


def _by_class(source: Path, indices: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Channels-first (classes, per_class, 3, H, W) from (N, H, W, 3) ``images`` and per-class
    index arrays, classes sorted by name; filled class by class to keep the peak memory low."""
    per_class = _class_size(source, {name: len(index) for name, index in indices.items()})
    _, height, width, channels = images.shape
    out = np.empty((len(indices), per_class, channels, height, width), dtype=images.dtype)
    for i, name in enumerate(sorted(indices)):
        out[i] = images[indices[name]].transpose(0, 3, 1, 2)
    return out
