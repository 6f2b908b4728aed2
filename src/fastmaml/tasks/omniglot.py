"""Omniglot (Lake et al. 2015) as in the MAML paper: 1623 characters x 20 images, 28x28.

Layout of a data root, as inside the official zips::

    root/images_background/<Alphabet>/characterNN/*.png   (30 alphabets, 964 characters)
    root/images_evaluation/<Alphabet>/characterNN/*.png   (20 alphabets, 659 characters)

Preprocessing: each 105x105 image is converted to grayscale, resized to 28x28 with LANCZOS and
inverted, so strokes are 255 and the background 0 (1.0 and 0.0 once the sampler scales by
1/255). The official resize script called LANCZOS on the 1-bit PNGs, for which Pillow falls
back to nearest neighbour and keeps the images binary; converting to grayscale first makes the
LANCZOS filter actually apply, so edges here are anti-aliased.

The decoded images are cached once as a uint8 ``.npy`` of (1623, 20, 28, 28) in a cache
directory (``$FASTMAML_CACHE`` or ``~/.cache/fastmaml``), never inside the data root.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .download import cached_array, default_cache_dir, fetch_zip, fingerprint, read_images

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
                "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
FOLDERS = tuple(OMNIGLOT_MD5)
IMAGES_PER_CHARACTER = 20
IMAGE_SIZE = 28
# (meta-train, meta-val) characters; meta-test is the rest (423 of 1623).
# official: cbfinn/maml's data generator. vinyals: the paper's 1200 train / rest test, no val.
SPLITS = {"official": (1100, 100), "vinyals": (1200, 0)}
SPLIT_SEED = 1


def download_omniglot(root: str | os.PathLike[str], base_url: str = OMNIGLOT_URL,
                      md5: Mapping[str, str] = OMNIGLOT_MD5) -> None:
    """Fetch ``<base_url>/<folder>.zip`` for each folder in ``md5`` missing from ``root``."""
    root = Path(root)
    for folder, checksum in md5.items():
        if not (root / folder).is_dir():
            fetch_zip(f"{base_url}/{folder}.zip", checksum, root, folder)


def omniglot_characters(root: str | os.PathLike[str]) -> list[Path]:
    """Every character folder under ``root``, background then evaluation, sorted by name."""
    root = Path(root)
    missing = [folder for folder in FOLDERS if not (root / folder).is_dir()]
    if missing:
        raise DataError(
            f"Omniglot not found in {root}: missing {', '.join(missing)}. Expected the official "
            f"layout {root}/images_background/<Alphabet>/characterNN/*.png and the same under "
            f"images_evaluation/ (the official zips, extracted). To fetch them into this folder, "
            "add download=true to the fastmaml command, or call load_omniglot(root, "
            "download=True).")
    return [character for folder in FOLDERS
            for alphabet in _subfolders(root / folder) for character in _subfolders(alphabet)]


def load_omniglot_images(root: str | os.PathLike[str],
                         cache_dir: str | os.PathLike[str] | None = None,
                         workers: int | None = None) -> Tensor:
    """Every character of ``root``, in ``omniglot_characters`` order: uint8 (characters, 20, 1,
    28, 28).

    The first call decodes every PNG (with ``workers`` processes, default one per core) and
    writes the cache; later calls only read the cache. The cache file is named after the list
    of image files, so another data root or a changed one gets its own cache.
    """
    root = Path(root)
    files = []
    for character in omniglot_characters(root):
        pngs = sorted(character.glob("*.png"))
        if len(pngs) != IMAGES_PER_CHARACTER:
            raise DataError(f"{character} has {len(pngs)} PNG images; every Omniglot character "
                            f"has {IMAGES_PER_CHARACTER}")
        files += pngs
    if not files:
        raise DataError(f"no Omniglot characters found under {root}")
    shape = (len(files) // IMAGES_PER_CHARACTER, IMAGES_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE)
    key = fingerprint([str(f.relative_to(root)) for f in files])
    cache = Path(cache_dir or default_cache_dir()) / f"omniglot-{IMAGE_SIZE}-{key}.npy"

    def build() -> np.ndarray:
        return (255 - read_images(files, "L", IMAGE_SIZE, workers)).reshape(shape)

    images = cached_array(cache, build, root)
    if images.shape != shape or images.dtype != np.uint8:
        raise DataError(f"the cache {cache} holds {images.dtype} {images.shape}, expected uint8 "
                        f"{shape}; delete it to rebuild")
    return torch.from_numpy(images)[:, :, None]


def split_characters(num_characters: int, split: str = "official",
                     seed: int = SPLIT_SEED) -> dict[str, Tensor]:
    """Character indices of meta-train, meta-val and meta-test.

    The characters (in ``omniglot_characters`` order) are shuffled with
    ``numpy.random.default_rng(seed).permutation``; ``official`` takes the first 1100 for
    meta-train, the next 100 for meta-val and the rest (423) for meta-test; ``vinyals`` takes
    the first 1200 for meta-train, none for meta-val and the same 423 for meta-test.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown Omniglot split {split!r}; known: {', '.join(SPLITS)}")
    num_train, num_val = SPLITS[split]
    if num_characters <= num_train + num_val:
        raise DataError(f"the {split} split needs more than {num_train + num_val} characters, "
                        f"found {num_characters}; is the data root complete?")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_characters))
    train, val, test = order.split([num_train, num_val, num_characters - num_train - num_val])
    return {"train": train, "val": val, "test": test}


def load_omniglot(root: str | os.PathLike[str], split: str = "official", *,
                  download: bool = False, cache_dir: str | os.PathLike[str] | None = None,
                  seed: int = SPLIT_SEED, workers: int | None = None) -> dict[str, Tensor]:
    """Omniglot split into ``train``/``val``/``test`` uint8 tensors of (characters, 20, 1, 28, 28).

    ``root`` holds the extracted official folders; ``download=True`` fetches missing ones
    first. Feed each split to ``FewShotSampler(..., rotate=True)``.
    """
    if download:
        download_omniglot(root)
    images = load_omniglot_images(root, cache_dir, workers)
    splits = split_characters(len(images), split, seed)
    return {name: images[index] for name, index in splits.items()}


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())
