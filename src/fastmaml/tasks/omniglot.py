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
from .download import cached_array, default_cache_dir, fetch_missing_zip
from .images import ImageFormat, fingerprint, read_images
from .splits import DATA_ROOT_OPTIONS, subfolders

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
                "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
FOLDERS = tuple(OMNIGLOT_MD5)
CHARACTERS = {"images_background": 964, "images_evaluation": 659}  # the splits are drawn over all
IMAGES_PER_CHARACTER = 20
IMAGE_SIZE = 28
IMAGE_FORMAT = ImageFormat("L", IMAGE_SIZE, invert=True)
# (meta-train, meta-val) characters; meta-test is the rest (423 of 1623).
# official: cbfinn/maml's data generator. vinyals: the paper's 1200 train / rest test, no val.
SPLITS = {"official": (1100, 100), "vinyals": (1200, 0)}
# lake: Lake et al.'s one-shot protocol, background alphabets to learn and evaluation alphabets
# to test; whole background alphabets of at least this many characters are held out for meta-val.
LAKE_VAL_CHARACTERS = 100
SPLIT_NAMES = (*SPLITS, "lake")
SPLIT_SEED = 1


def download_omniglot(root: str | os.PathLike[str], base_url: str | None = None,
                      md5: Mapping[str, str] = OMNIGLOT_MD5) -> None:
    """Fetch ``<base_url>/<folder>.zip`` for each folder in ``md5`` missing from ``root`` (once,
    where several processes ask together). ``base_url`` defaults to ``$FASTMAML_OMNIGLOT_URL``
    (a mirror of the official files, e.g. on a cluster without internet: a URL or a folder),
    else the official address; the official checksums hold either way."""
    base_url = base_url or os.environ.get("FASTMAML_OMNIGLOT_URL") or OMNIGLOT_URL
    if "://" not in base_url:  # a folder (a shared file system's mirror)
        base_url = Path(base_url).expanduser().absolute().as_uri()
    for folder, checksum in md5.items():
        fetch_missing_zip(f"{base_url.rstrip('/')}/{folder}.zip", checksum, Path(root), folder)


def omniglot_characters(root: str | os.PathLike[str]) -> list[Path]:
    """Every character folder under ``root``, background then evaluation, sorted by name."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"the Omniglot data root {root} is a file: name the folder that holds "
                        "(or, with download=true, will hold) images_background/ and "
                        "images_evaluation/")
    missing = [folder for folder in FOLDERS if not (root / folder).is_dir()]
    if len(missing) == len(FOLDERS) and root.name in FOLDERS:  # given one of the two
        raise DataError(f"the Omniglot data root {root} is one of its two folders: give the "
                        f"folder that holds both images_background/ and images_evaluation/, "
                        f"--data-root {root.parent}")
    if missing:
        raise DataError(
            f"Omniglot not found in {root}: missing {', '.join(missing)}"
            f"{_where_it_may_be(root, missing)}. Expected the official "
            f"layout {root}/images_background/<Alphabet>/characterNN/*.png and the same under "
            f"images_evaluation/ (the official zips, extracted). Name the folder that holds them "
            f"with {DATA_ROOT_OPTIONS} or $FASTMAML_OMNIGLOT (every command, reproduce too); to "
            "fetch them into this folder, add download=true to fastmaml train, or call "
            "fastmaml.tasks.omniglot.load_omniglot(root, download=True).")
    nested = next((root / folder / folder for folder in FOLDERS
                   if (root / folder / folder).is_dir()), None)
    if nested is not None:  # (its alphabets would be read as characters of no PNG image)
        raise DataError(f"{nested.parent} holds another {nested.name}/ (the zip extracted into "
                        f"a folder of its own name): move the alphabets in {nested} up into "
                        f"{nested.parent}")
    return [character for folder in FOLDERS
            for alphabet in subfolders(root / folder) for character in subfolders(alphabet)]


def _where_it_may_be(root: Path, missing: list[str]) -> str:
    """Where the ``missing`` folders are instead, as a hint: their official zips unextracted
    in ``root``, or a folder one level down that holds them (torchvision's ``omniglot-py/``)."""
    if not root.is_dir():
        return ""
    zips = [f"{folder}.zip" for folder in missing if (root / f"{folder}.zip").is_file()]
    if zips:
        return f" (found {' and '.join(zips)}: extract {'it' if len(zips) == 1 else 'them'} here)"
    below = [sub for sub in subfolders(root) if any(_is_folder(sub / name) for name in missing)]
    return f" (it is one level down: give the data folder as {below[0]})" if below else ""


def _is_folder(path: Path) -> bool:
    """``path.is_dir()``, False where a folder on its way cannot be read (``lost+found``)."""
    try:
        return path.is_dir()
    except PermissionError:
        return False


# what to do about images of the official folders that cannot be read ("{it}": "it" or "them")
RESTORE_OFFICIAL = ("restore {it} from the official zip, or remove the images_background/ or "
                    "images_evaluation/ folder that holds {it}, and download=true fetches it again")


def load_omniglot_images(root: str | os.PathLike[str],
                         cache_dir: str | os.PathLike[str] | None = None,
                         workers: int | None = None) -> Tensor:
    """Every character of ``root``, in ``omniglot_characters`` order: uint8 (characters, 20, 1,
    28, 28).

    The first call decodes every PNG (with ``workers`` processes, default one per core) and
    writes the cache; later calls only read the cache. The cache file is named after the image
    files (names, sizes and times), so another data root or a changed one gets its own cache.
    """
    root = Path(root)
    files = []
    for character in omniglot_characters(root):
        pngs = sorted(p for p in character.glob("*.png")  # (not macOS's ._ files beside them)
                      if not p.name.startswith("."))
        if len(pngs) != IMAGES_PER_CHARACTER:
            folder = character.parent.parent
            raise DataError(f"{character} has {len(pngs)} PNG images; every Omniglot character "
                            f"has {IMAGES_PER_CHARACTER}: restore the character from the official "
                            f"{folder.name}.zip, or remove {folder}, and download=true fetches it "
                            "again")
        files += pngs
    if not files:
        raise DataError(f"no Omniglot characters found under {root}")
    shape = (len(files) // IMAGES_PER_CHARACTER, IMAGES_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE)
    key = fingerprint(root, files, IMAGE_FORMAT)
    cache = Path(cache_dir or default_cache_dir()) / f"omniglot-{IMAGE_SIZE}-{key}.npy"

    def build() -> np.ndarray:
        return read_images(files, IMAGE_FORMAT, workers, remedy=RESTORE_OFFICIAL).reshape(shape)

    images = cached_array(cache, build, root)
    if images.shape != shape or images.dtype != np.uint8:
        raise DataError(f"the cache {cache} holds {images.dtype} {images.shape}, expected uint8 "
                        f"{shape}; delete it to rebuild")
    return torch.from_numpy(images)[:, :, None]


def omniglot_alphabets(characters: list[Path]) -> tuple[Tensor, int]:
    """(alphabet index of each character, number of background alphabets), for characters in
    ``omniglot_characters`` order: background alphabets first, each with its own index."""
    names = [(c.parent.parent.name, c.parent.name) for c in characters]
    index = {name: i for i, name in enumerate(dict.fromkeys(names))}
    background = len({name for name in names if name[0] == FOLDERS[0]})
    return torch.tensor([index[name] for name in names]), background


def split_characters(num_characters: int, split: str = "official", seed: int = SPLIT_SEED,
                     alphabets: tuple[Tensor, int] | None = None) -> dict[str, Tensor]:
    """Character indices of meta-train, meta-val and meta-test.

    The characters (in ``omniglot_characters`` order) are shuffled with
    ``numpy.random.default_rng(seed).permutation``; ``official`` takes the first 1100 for
    meta-train, the next 100 for meta-val and the rest (423) for meta-test; ``vinyals`` takes
    the first 1200 for meta-train, none for meta-val and the same 423 for meta-test.

    ``lake`` (needs ``alphabets``, from ``omniglot_alphabets``) meta-tests on every character of
    the evaluation alphabets, and meta-trains on the background alphabets but for whole ones
    held out for meta-val: the first in the order of ``default_rng(seed).permutation`` of the
    background alphabets, until they hold ``LAKE_VAL_CHARACTERS`` characters.
    """
    if split == "lake":
        if alphabets is None:
            raise ConfigError("the lake split needs the alphabet of every character")
        return _lake_split(*alphabets, seed)
    if split not in SPLITS:
        raise ConfigError(f"unknown Omniglot split {split!r}; known: {', '.join(SPLIT_NAMES)}")
    num_train, num_val = SPLITS[split]
    if num_characters <= num_train + num_val:
        raise DataError(f"the {split} split needs more than {num_train + num_val} characters, "
                        f"found {num_characters}; is the data root complete?")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_characters))
    train, val, test = order.split([num_train, num_val, num_characters - num_train - num_val])
    return {"train": train, "val": val, "test": test}


def _lake_split(alphabet_of: Tensor, background: int, seed: int) -> dict[str, Tensor]:
    order = np.random.default_rng(seed).permutation(background)
    sizes = torch.bincount(alphabet_of, minlength=background)[:background]
    held_out = order[:int(np.searchsorted(np.cumsum(sizes[order].numpy()), LAKE_VAL_CHARACTERS)) + 1]
    in_val = torch.isin(alphabet_of, torch.from_numpy(held_out))
    in_background = alphabet_of < background
    if in_background.all() or (in_background & ~in_val).sum() == 0:
        raise DataError("the lake split needs background and evaluation alphabets with "
                        "characters outside the meta-val ones; is the data root complete?")
    return {"train": (in_background & ~in_val).nonzero()[:, 0], "val": in_val.nonzero()[:, 0],
            "test": (~in_background).nonzero()[:, 0]}


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
    return {name: images[index] for name, index in _split_index(root, split, seed)[0].items()}


def load_omniglot_alphabets(root: str | os.PathLike[str], split: str = "official",
                            seed: int = SPLIT_SEED) -> dict[str, Tensor]:
    """The alphabet index of every character of each split of ``load_omniglot`` (the same
    order): ``FewShotSampler``'s ``groups`` for within-alphabet tasks."""
    index, alphabet_of = _split_index(root, split, seed)
    return {name: alphabet_of[characters] for name, characters in index.items()}


def _split_index(root: str | os.PathLike[str], split: str, seed: int
                 ) -> tuple[dict[str, Tensor], Tensor]:
    """(each split's character indices, the alphabet index of every character), of the complete
    data set only: a split is a shuffle of every character, so one missing or added (an
    alphabet left out, a changed copy) moves others between meta-train and meta-test, and a
    run trained on the complete set would be tested on characters it trained on."""
    characters = omniglot_characters(root)
    found = [sum(c.parent.parent.name == folder for c in characters) for folder in FOLDERS]
    if found != list(CHARACTERS.values()):
        raise DataError(f"{root} holds {found[0]} background and {found[1]} evaluation "
                        f"characters, not Omniglot's {CHARACTERS[FOLDERS[0]]} and "
                        f"{CHARACTERS[FOLDERS[1]]}: the {split} split is drawn over the complete "
                        "set (a character missing or added moves others between meta-train and "
                        "meta-test). Restore the official folders (remove them, and download=true "
                        "fetches them again), or train on character folders of your own with "
                        "dataset=folder")
    alphabets = omniglot_alphabets(characters)
    return split_characters(len(alphabets[0]), split, seed, alphabets), alphabets[0]

