"""Meta-train / val / test splits of a user's data folder, shared by image folders and CSV tasks.

A folder's items (class folders of images, or task files of points) are split either by the
folder itself (``root/train/``, ``root/val/`` (optional) and ``root/test/``: explicit splits),
or by shuffling them, sorted by path, with ``numpy.random.default_rng(seed)`` and cutting by
``fractions``, so that no item is ever in two splits. A run records its assignment when it
starts (``save_assignment``) and keeps it: items added to the folder later would otherwise move
others from one split to another, and a model would be tested on what it trained on.
"""
from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import ConfigError, DataError, FastMAMLWarning, warn

SPLITS = ("train", "val", "test")
# what systems add beside the real folders: a macOS zip's resource forks, a Synology NAS's
# thumbnails, Windows' recycle bin and volume records
JUNK_FOLDERS = {"__macosx", "@eadir", "$recycle.bin", "system volume information"}  # any case
Assignment = dict[str, list[str]]  # split -> its items, as paths relative to the data root
ListItems = Callable[[Path], list[Path]]  # a folder -> the items in it, sorted
# (a split's folder, an item in it) -> what makes two items one (a copy), in words: two of
# different explicit splits are an error, and a shuffled split keeps them together
ItemIdentity = Callable[[Path, Path], str]


def subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder``, sorted, without hidden ones and ``JUNK_FOLDERS``."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and p.name.lower() not in JUNK_FOLDERS)


def files_below(folder: Path, wanted: Callable[[Path], bool]) -> list[Path]:
    """The files anywhere below ``folder`` that ``wanted`` takes, sorted folder by folder, not
    through hidden, system (``JUNK_FOLDERS``: a NAS's thumbnail folder in every folder) or
    linked folders."""
    try:
        found = [p for p in sorted(folder.iterdir()) if wanted(p)]
        below = [sub for sub in subfolders(folder) if not sub.is_symlink()]
    except OSError:  # a folder this user may not list or enter (rglob skipped it too)
        return []
    return found + [p for sub in below for p in files_below(sub, wanted)]


# why ``skipped_files_warning`` skips a symbolic link whose target is missing
BROKEN_LINKS = ("that link to nothing (their targets were moved or deleted, or sit on a drive "
                "not mounted)")

# how a user names a data folder, in the commands and in Python
DATA_ROOT_OPTIONS = ("--data-root DIR (fastmaml train and eval; data_root=DIR in "
                     "fastmaml.meta_train)")


def data_root(root: str | os.PathLike[str]) -> Path:
    """``root`` as a path, or a ``DataError`` when it is not a folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} not found" + (" (it is a file)" if root.exists()
                                                           else "")
                        + f": name the folder with {DATA_ROOT_OPTIONS}")
    return root


def split_indices(count: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Item indices of train / val / test: a seeded permutation cut by ``fractions``, at the
    rounded cumulative fractions (so no split's rounding takes its share from the last one)."""
    if (len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)):
        raise ConfigError("split_fractions must be three fractions (train, val, test) in [0, 1] "
                          f"that sum to 1, e.g. 0.7,0.15,0.15; got {tuple(fractions)}")
    train = round(fractions[0] * count)
    train_and_val = round((fractions[0] + fractions[1]) * count)
    order = np.random.default_rng(seed).permutation(count)
    return np.split(order, [train, min(train_and_val, count)])


# other names of split folders: beside them a lone train/ or test/ is a misnamed split
SPLIT_LIKE = {"training", "testing", "validation", "valid", "dev", "eval", "evaluation"}


def has_explicit_splits(root: Path) -> bool:
    """Whether ``root`` holds train/ and test/ (and optionally val/) and nothing else. One of
    them without the other (or val/) beside other folders, none named as a split
    (``training/``), is a class named so (COCO's ``train``), with a warning."""
    folders = [p.name for p in subfolders(root)]
    explicit = [name for name in SPLITS if name in folders]
    cased = [name for name in folders if name.lower() in SPLITS and name not in SPLITS]
    if cased and (explicit or {"train", "test"} <= {name.lower() for name in cased}):
        raise DataError(f"{root} has {', '.join(n + '/' for n in cased)}: explicit split "
                        "folders are named in lower case (train/, val/, test/); rename "
                        + ", ".join(f"{n}/ to {n.lower()}/" for n in cased))
    if not explicit:
        return False
    missing = [f"{name}/" for name in ("train", "test") if name not in explicit]
    others = [name for name in folders if name not in SPLITS]
    if missing and others and "val" not in explicit and not SPLIT_LIKE & {
            name.lower() for name in others}:
        warn(f"{root} has {', '.join(n + '/' for n in explicit)} but no {' or '.join(missing)}, "
             f"beside {len(others)} other folder(s): read as one folder per class, "
             f"{explicit[0]}/ being one of them, not a split (explicit splits need "
             "train/ and test/, and nothing beside them)", FastMAMLWarning)
        return False
    if missing:
        raise DataError(f"{root} has {', '.join(n + '/' for n in explicit)} but no "
                        f"{' or '.join(missing)}: explicit splits need train/ and test/ "
                        "(val/ is optional)")
    if others:
        raise DataError(f"{root} has explicit splits and also {', '.join(n + '/' for n in others)}"
                        ", which would be left unread: only train/, val/ and test/ are read "
                        "(rename validation/ to val/; move other folders out; or, where "
                        "train/ and test/ are classes of one folder per class, rename them)")
    return True


def found_items(root: Path, list_items: ListItems) -> list[tuple[str | None, Path]]:
    """Every item of ``root``, with its explicit split (None without explicit splits)."""
    if has_explicit_splits(root):
        return [(folder.name, item) for folder in item_folders(root)
                for item in list_items(folder)]
    return [(None, item) for item in list_items(root)]


def item_folders(root: Path) -> list[Path]:
    """The folders ``found_items`` lists: the explicit split folders, else ``root``."""
    if has_explicit_splits(root):
        return [root / name for name in SPLITS if (root / name).is_dir()]
    return [root]


def assign_items(root: Path, found: list[tuple[str | None, Path]], fractions: Sequence[float],
                 seed: int, kind: str, identity: ItemIdentity,
                 too_short: Callable[[Path], bool] = lambda _: False) -> Assignment:
    """Each split's items (``found_items``), relative to ``root``: the explicit splits, or the
    items shuffled with ``seed`` and cut by ``fractions``. With explicit splits, two items of
    different splits with one ``identity`` are one ``kind`` in two splits: an error.

    Without explicit splits only the items not ``too_short`` for a task are cut, so that those
    left out when loaded take no split's share; they are recorded in train, which they join if
    they fill up later. Items of one ``identity`` (copies) are cut as one, into one split.
    """
    if found and found[0][0] is not None:
        seen: dict[str, tuple[str, Path]] = {}
        for split, item in found:
            key = identity(root / str(split), item)
            first_split, first = seen.setdefault(key, (str(split), item))
            if first_split != split and not too_short(item):  # (short ones are never used)
                raise DataError(f"{first.relative_to(root).as_posix()} and "
                                f"{item.relative_to(root).as_posix()} of {root} are one {kind} "
                                f"({key}) in two splits: it would be tested on what it trained on")
        return {name: [item.relative_to(root).as_posix() for split, item in found if split == name]
                for name in SPLITS}
    short = {item for _, item in found if too_short(item)}
    copies: dict[str, list[Path]] = {}  # the items of each identity, in found order
    for _, item in found:
        if item not in short:
            copies.setdefault(identity(root, item), []).append(item)
    groups = list(copies.values())
    cut = split_indices(len(groups), fractions, seed)
    order = {item: position for position, (_, item) in enumerate(found)}
    assignment = {name: [item.relative_to(root).as_posix() for item in
                         sorted((item for i in index for item in groups[i]), key=order.get)]
                  for name, index in zip(SPLITS, cut)}
    assignment["train"] += sorted(item.relative_to(root).as_posix() for item in short)
    return assignment


def assigned_items(root: Path, found: list[tuple[str | None, Path]], assignment: Assignment,
                   kind: str) -> list[tuple[str, Path, Path]]:
    """(split, the split's root, item) for the ``found`` items in ``assignment``, in found order.

    An item of ``assignment`` that is missing from the folder is a ``DataError``; an item the
    folder has beyond it (added after the run started) is left out with a warning.
    """
    # names compared in composed Unicode form: a folder copied from macOS (or a zip) may come
    # back decomposed, "café" in other bytes, and is the same class
    twins = unicode_twins([item.relative_to(root).as_posix() for _, item in found])
    if twins:  # (first: a new run's assignment, made from the folder, has them too)
        raise DataError(f"the {kind}s {' and '.join(map(ascii, twins))} of {root} are one name "
                        f"in {UNICODE_FORMS}: one {kind} twice; merge or rename them")
    recorded = [key for keys in assignment.values() for key in keys]
    twins = unicode_twins(recorded)
    if twins:  # (recorded before names were compared so: two items then)
        raise DataError(f"this run's split record (splits.json) names the {kind}s "
                        f"{' and '.join(map(ascii, twins))}, one name in {UNICODE_FORMS}: "
                        f"restore both under names of their own, or start a new run (train "
                        "with another --out)")
    split_of = {composed(key): name for name, keys in assignment.items() for key in keys}
    keyed = [(composed(item.relative_to(root).as_posix()), explicit, item)
             for explicit, item in found]
    missing = sorted(set(split_of) - {key for key, _, _ in keyed})
    if missing:
        raise DataError(f"{len(missing)} {kind}(s) of this run are missing from {root} (e.g. "
                        f"{missing[0]}): a run keeps the {kind}s it started with (its "
                        "splits.json); restore them, or start a new run (train with another "
                        "--out)")
    added = [key for key, _, _ in keyed if key not in split_of]
    if added:
        warn(f"left out {len(added)} {kind}(s) of {root} that are not in this run's "
             f"splits (added after it started, e.g. {added[0]})", FastMAMLWarning)
    return [(split_of[key], root / explicit if explicit else root, item)
            for key, explicit, item in keyed if key in split_of]


UNICODE_FORMS = "two Unicode forms (composed, and decomposed as macOS writes it)"


def composed(name: str) -> str:
    """``name`` in Unicode's composed form (NFC), in which names are compared."""
    return unicodedata.normalize("NFC", name)


def unicode_twins(names: Sequence[str]) -> list[str]:
    """The ``names`` that are another's in composed form but other strings, sorted."""
    forms: dict[str, set[str]] = {}
    for name in names:
        forms.setdefault(composed(name), set()).add(name)
    return sorted(name for alike in forms.values() if len(alike) > 1 for name in alike)


def save_assignment(assignment: Assignment, path: Path) -> None:
    """Record a run's split (``splits.json``), atomically."""
    write_text_atomic(json.dumps(assignment, indent=1), path)


def read_assignment(path: Path) -> Assignment:
    """A split recorded by ``save_assignment``; a damaged record is a ``ConfigError``."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the run's split {path}: {error}") from None
    if not (isinstance(value, dict) and set(value) == set(SPLITS)
            and all(isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                    for keys in value.values())):
        raise ConfigError(f"{path} is not a record of a run's split (train, val and test lists "
                          "of paths)")
    return value


def skipped_files_warning(unread: Sequence[Path], where: str, root: Path, why: str) -> None:
    """A warning that names the first few ``unread`` files (relative to ``root``) and says
    ``why`` they were skipped; links to nothing among them get one of their own."""
    broken = [p for p in unread if links_to_nothing(p)]
    others = [p for p in unread if not links_to_nothing(p)]
    for files, reason in ((broken, BROKEN_LINKS), (others, why)):
        if files:
            names = [p.relative_to(root).as_posix() for p in files]
            warn(f"skipped {len(names)} file(s) in {where} {reason}: {', '.join(names[:3])}"
                 + (", ..." if len(names) > 3 else ""), FastMAMLWarning)


def unread_files(folder: Path, items: Sequence[Path]) -> list[Path]:
    """The visible files in ``folder`` that are not among its ``items`` (images, task files):
    formats this Pillow cannot read (e.g. HEIC), no data at all, or links whose targets are
    gone. Said in a warning where a user would otherwise wonder why a file was never used."""
    return sorted(p for p in set(folder.iterdir()) - set(items)
                  if (p.is_file() or links_to_nothing(p)) and not p.name.startswith("."))


def links_to_nothing(path: Path) -> bool:
    return path.is_symlink() and not path.exists()
