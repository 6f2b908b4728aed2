"""Regression tasks from a user's own data: one CSV of ``x,y`` points per task (or of
``x1,...,xd,y``: every task's points have the same number of x values).

Layouts of a data root: ``root/*.csv`` (the tasks are split by ``splits``), or explicit
``root/train/*.csv``, ``root/val/*.csv`` (optional) and ``root/test/*.csv``. A task's support
and query points are drawn from its file without replacement, so a file needs at least
``k_shot + k_query`` points; shorter files are left out with one warning.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..inputs import TaskBatch
from ..errors import DataError, FastMAMLWarning, warn
from .splits import (SPLITS, Assignment, assign_items, assigned_items, data_root, files_below,
                     found_items, item_folders, skipped_files_warning, subfolders, unread_files)


class ShortTasksWarning(FastMAMLWarning):
    """Task files left out because they hold too few points for a task."""


class ColumnNamesWarning(FastMAMLWarning):
    """A CSV names its x columns otherwise than the run's (or the first headed task file's)."""


# a cell a spreadsheet could not compute (#N/A, #DIV/0!, #NAME?, Google's #ERROR!, ...),
# then the line's next field or its end: a bad value, not a comment
EXCEL_ERROR = re.compile(r"#((?i:N/A)|GETTING_DATA|[A-Z][A-Z0-9/]*[!?])\s*(,|$)")
DECIMAL_COMMA = re.compile(r"\s*-?\d+,\d+\s*")  # a whole number, a comma, digits: 0,5 or 12,25
# a line 1 that names the separator, as programs write for Excel (which reads it)
EXCEL_SEPARATOR = re.compile(r'"?sep=."?', re.IGNORECASE)
# a name in a header comment (not free text): x1, temp_c, x-pos, x (m), power [W]
COLUMN_NAME = re.compile(r"[A-Za-z_][\w.\-]*( ?[(\[][^()\[\]]*[)\]])?")


class Points(NamedTuple):
    """A CSV's points: x (N, features) and y (N, 1) or None, as float64 tensors, and the names
    its header gives the x columns and the target (None without a header, or without y)."""

    x: Tensor
    y: Tensor | None
    x_names: list[str] | None
    y_name: str | None = None


def read_points(path: str | os.PathLike[str], role: str, need_y: bool,
                features: int | None = None, x_names: Sequence[str] = ()) -> Points:
    """A regression CSV of one row per point: its ``features`` x values (None: every column but
    y; 1 where y may be left out), then y, which a row may leave out where ``need_y`` is False.
    Lines starting with ``#`` are comments. A header line (a first line with no number in it,
    one name per column; else the comment line just before the first point, where it is one:
    ``numpy.savetxt(..., header="x,y")`` writes ``# x,y``) is optional; a
    column it names ``y`` is the target wherever it stands (``y,x``), and so is the one column
    it names beside all of ``x_names`` (a run's x columns: ``price,sqft,rooms`` for a run on
    ``sqft,rooms``); the others name the x columns. A bad line is a ``DataError`` that names
    it; a task file of no points (empty, or a header alone) reads as none, too short for a
    task."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"the {role} set {path} is a folder, but this is a regression run: give "
                        "a CSV of x,y points (one row per point)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # with or without a BOM
            texts = list(enumerate(handle, start=1))
        # comments go before the fields are parsed: a quote in one would swallow lines after it;
        # so does Excel's line 1 naming the separator ("sep=,"; another is then named as such)
        commented = [_is_comment(text) for _, text in texts]
        if texts and EXCEL_SEPARATOR.fullmatch(texts[0][1].rstrip("\r\n")):
            texts, commented = texts[1:], commented[1:]  # (no comment: it names no column)
        first = next((i for i, (comment, (_, text)) in enumerate(zip(commented, texts))
                      if not comment and text.strip()), len(texts))
        # the comment closest above the first line of fields (blank lines between)
        leading = [text for comment, (_, text) in zip(commented[:first], texts) if comment]
        last_comment = leading[-1] if leading else ""
        lines = [(number, row) for (number, text), comment in zip(texts, commented)
                 if not comment for row in csv.reader([text], skipinitialspace=True)  # "1", "2"
                 if any(c.strip() for c in row)]
    except UnicodeDecodeError as error:
        raise DataError(f"cannot read the {role} CSV {path}: it is not UTF-8 text ({error}): "
                        "save it as CSV UTF-8") from None
    except (OSError, csv.Error) as error:
        raise DataError(f"cannot read the {role} CSV {path}: {error}") from None
    # another separator in line 1 (header or not; "0,5;1,2" with decimal commas): not
    # comma-separated, and one field holding it is no header
    other = next((mark for mark in (";", "\t", "|") if lines and any(
        len([part for part in cell.split(mark) if part.strip()]) > 1 for cell in lines[0][1])),
        None)  # (between two values: not a stray trailing tab)
    hint = f" (its fields look separated by {other!r}: save it with commas)" if other else ""
    one_field = bool(other) and len(lines[0][1]) == 1
    if features is None and not need_y:
        features = 1
    names: list[str] = []
    if lines and not one_field and not any(_is_number(cell) or EXCEL_ERROR.match(cell.strip())
                                           for cell in lines[0][1]):  # a header
        names = [name.strip() for name in lines[0][1]]
        if len(names) > 1 and not names[0]:
            named = [name.lower() for name in names[1:]]
            if "y" in named and len(named) - 1 < (features or 1):  # ",y": x left unnamed
                unnamed = [name for name in x_names if name.lower() not in named]  # the run's
                first = (unnamed or ["x" if (features or 1) == 1 else "x1"])[0]
                raise DataError(f"the header of the {role} CSV {path} leaves its first column "
                                f"unnamed: name it ({first}, as the points' first value)")
            raise DataError(f"the {role} CSV {path} starts with a column its header leaves "
                            "unnamed, as pandas writes a row index: save it with "
                            "to_csv(index=False), or delete that column")
        lines = lines[1:]
    elif lines and last_comment:  # numpy.savetxt(..., header="x,y") writes it as "# x,y"
        names = _commented_header(last_comment, width=len(lines[0][1]), path=path)
    expected = _row_form(features, need_y)
    if not lines and role == "task":  # a task too short for any task: left out as such
        return Points(torch.empty(0, 0), torch.empty(0, 1), None)
    if not lines:
        raise DataError(f"the {role} CSV {path} holds no points: it needs one row per point, "
                        f"{expected}")
    width = len(lines[0][1])
    allowed = _fits(width, features, need_y)
    # every line ends in an empty field: a trailing comma, as a spreadsheet writes an empty
    # last column (one line's empty last field is a value left out)
    trailing = ("" if width == 1 or any(row[-1].strip() for _, row in lines) else
                " (each line ends in a comma, as a spreadsheet writes an empty last column: "
                "delete them)")
    for number, row in lines:
        if len(row) != width or not allowed:
            raise DataError(f"line {number} of the {role} CSV {path} has {len(row)} field(s): it "
                            f"must hold one row per point, {expected}, all alike{hint}"
                            + (trailing if _fits(width - 1, features, need_y) else ""))
        bad = next((column for column, cell in enumerate(row) if not _is_number(cell)), None)
        if bad is not None and not row[bad].strip():
            raise DataError(f"line {number} of the {role} CSV {path} has no value in column "
                            f"{bad + 1} of {width}" + (trailing if bad == width - 1 else ""))
        if bad is not None:
            raise DataError(f"line {number} of the {role} CSV {path} holds {row[bad].strip()!r}, "
                            f"which is not a number{hint}")
    if (not need_y and features == 1 and width == 2 and not names  # "-0,5": x alone?
            and all(DECIMAL_COMMA.fullmatch(",".join(row)) for _, row in lines)):
        warn(f"the {role} CSV {path} holds two whole numbers a line and no decimal point: they "
             "are read as x,y (a labelled point); if they are one number written with a decimal "
             "comma (0,5 for 0.5), save the file with decimal points (a header line x,y says "
             "they are x and y)", FastMAMLWarning)
    # float64, as written (an output echoes its x); the model takes them as float32
    values = torch.tensor([[float(c) for c in row] for _, row in lines], dtype=torch.float64)
    as_seen = values.float()  # by the model
    bad_rows = (~torch.isfinite(as_seen)).any(1).nonzero().flatten().tolist()
    if bad_rows:
        raise DataError(f"line {lines[bad_rows[0]][0]} of the {role} CSV {path} holds a NaN or "
                        "infinite value (or one beyond float32's range)")
    vanishing = ((values != 0) & (as_seen == 0)).any(1).nonzero().flatten().tolist()
    if vanishing:  # below float32's smallest subnormal, about 1.4e-45
        warn(f"line {lines[vanishing[0]][0]} of the {role} CSV {path} holds a value too small for "
             f"float32, which the model reads as 0 ({len(vanishing)} line(s) so): scale the data",
             FastMAMLWarning)
    if names and len(names) != width:  # else which column is y is a guess
        raise DataError(f"the header of the {role} CSV {path} names {len(names)} column(s), but "
                        f"its rows have {width}: give one name per column")
    lowered = [name.lower() for name in names]
    target = None  # x only
    if width != features:
        known = {name.lower() for name in x_names}
        others = [i for i, name in enumerate(lowered) if name not in known]
        target = (lowered.index("y") if "y" in lowered else
                  others[0] if known and len(others) == 1 and len(set(lowered)) == width
                  else width - 1)
        # (else the last by position); task files as ever, so that a run trained on files
        # headed so (x_names records their order) still resumes and evaluates
        if names and role != "task":
            refuse_x_named_target(names[target], role, path)
    if target is None and "y" in lowered:
        raise DataError(f"the header of the {role} CSV {path} names a column y, but its rows "
                        f"hold only the {features} x value(s) of a point: give the x values")
    x_columns = [column for column in range(width) if column != target]
    return Points(values[:, x_columns], None if target is None else values[:, target:target + 1],
                  [names[column] for column in x_columns] if names else None,
                  names[target] if names and target is not None else None)


def refuse_x_named_target(name: str, role: str, path: Path) -> None:
    """A ``DataError`` where the target column (``y`` by name, else by position) is named as an
    x column is (``x``, ``x2``): a header such as ``target,x`` would be learnt backwards."""
    if re.fullmatch(r"x\d*", name.lower()):
        raise DataError(f"the header of the {role} CSV {path} names no y column, so its column "
                        f"{name!r} would be the target: name the target column y"
                        + (", or delete a column that is neither an x value nor a label (an "
                           "id)" if role == "query" else ""))


def _fits(width: int, features: int | None, need_y: bool) -> bool:
    """Whether rows of ``width`` fields are points: ``features`` x values then y (any number
    of them where None), or the x values alone where y is not needed."""
    if not features:
        return width >= 2
    return width in ((features + 1,) if need_y else (features, features + 1))


def _is_comment(text: str) -> bool:
    """A line starting with ``#``, other than a spreadsheet's error value (``#N/A,2``)."""
    stripped = text.lstrip()
    return stripped.startswith("#") and not EXCEL_ERROR.match(stripped)


def _commented_header(comment: str, width: int, path: Path) -> list[str]:
    """The column names in a comment line (``# x,y``) that holds one name per column of
    ``width``, each a name as code writes one (``x1``, ``temp-c``, ``x (m)``); [] where it is
    free text, with a warning where it has one field per column (which is y is then a guess)."""
    names = [name.strip() for name in comment.lstrip().lstrip("#").split(",")]
    if len(names) != width:
        return []
    if not all(COLUMN_NAME.fullmatch(name) for name in names):
        warn(f"the comment {comment.strip()!r} above the points of {path} has one field per "
             "column but is not read as their names (names as code writes them, a unit in "
             "brackets at most): the file is read without a header, its last column as y; "
             "write the header as a plain first line", ColumnNamesWarning)
        return []
    return names


def align_columns(points: Points, names: Sequence[str]) -> tuple[Points, bool]:
    """``points`` with its x columns in the order of ``names`` (a run's record, or the first
    headed task file's) where its header names the same columns (in any case) in another
    order, and whether it could be matched: False where the names differ or are ambiguous
    (alike but for case), and the columns are left as they stand. A file without a header is
    matched as it stands."""
    if not names or not points.x_names or list(points.x_names) == list(names):
        return points, True
    ours, theirs = ([name.lower() for name in n] for n in (points.x_names, names))
    if (sorted(ours) != sorted(theirs) or len(set(ours)) != len(ours)
            or len(set(theirs)) != len(theirs)):
        return points, False
    order = [ours.index(name) for name in theirs]
    return Points(points.x[:, order], points.y, [points.x_names[i] for i in order],
                  points.y_name), True


def _row_form(features: int | None, need_y: bool) -> str:
    """What a row of a points CSV holds, in words (``features`` None: any number, with y)."""
    if features is None:
        return "x,y (one or more x values, then y)"
    if features == 1:
        return "x,y" if need_y else "x (or x,y)"
    return f"{features} x values, then y" if need_y else f"{features} x values (or them, then y)"


def _is_number(text: str) -> bool:
    """A decimal number as a CSV writes it (Python's ``float`` also takes ``1_0`` as 10)."""
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


def task_files(folder: Path) -> list[Path]:
    """The ``.csv`` files directly in ``folder`` (hidden ones skipped), sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_task_file(p))


def _is_task_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() == ".csv"


def assign_tasks(root: str | os.PathLike[str], fractions: tuple[float, ...] = (0.7, 0.15, 0.15),
                 seed: int = 1, min_points: int = 1) -> Assignment:
    """Each split's task files, relative to ``root`` (``splits.assign_items``); with explicit
    splits, one file's contents in two of them (a copied task) is an error. Without, the files
    of fewer than ``min_points`` points (too short for a task) take no split's share."""
    root = data_root(root)
    return assign_items(root, found_items(root, task_files), fractions, seed, "task",
                        _contents, lambda path: len(read_points(path, "task", need_y=True)[0])
                        < min_points)


def _contents(split_root: Path, path: Path) -> str:
    """A task's identity: its file's contents (files are often numbered afresh in each
    explicit split, so a name in two of them is no sign of one task)."""
    return f"the same file contents, {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


@dataclass
class PointTasks:
    """The tasks of one split: every task's points, (count, features + 1) of x then y, its
    file's name, and the names of the x columns and of the target (the first headed task
    file's; None if none has a header)."""

    points: list[Tensor]
    names: list[str]
    x_names: list[str] | None = None
    y_name: str | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def features(self) -> int | None:
        """The x values of a point (None: the split has no tasks)."""
        return self.points[0].shape[1] - 1 if self.points else None


def load_point_tasks(root: str | os.PathLike[str], min_points: int,
                     assignment: Assignment | None = None,
                     x_names: Sequence[str] | None = None) -> dict[str, PointTasks]:
    """The splits of a folder of task CSVs (see the module docstring); ``assignment`` (a run's
    record of ``assign_tasks``) fixes which file is in which split. A file whose header names
    the x columns of ``x_names`` (a run's record; None: the first headed file's, in split
    order; empty: no matching, every file as it stands) in another order has its columns put
    in that order (``align_columns``); files naming others are warned of. A new run's (no
    ``x_names``) file whose target column is named as an x column is refused
    (``refuse_x_named_target``); a started run's files are read as they were."""
    new_run = x_names is None
    root = data_root(root)
    if assignment is None:
        assignment = assign_tasks(root, min_points=min_points)
    files = assigned_items(root, found_items(root, task_files), assignment, "task file")
    skipped_files_warning(sorted(p for folder in item_folders(root)
                                 for p in unread_files(folder, task_files(folder))),
                          str(root), root, "that are not .csv task files")
    nested = _nested_task_files(root)
    skipped_files_warning(nested, str(root), root, "in subfolders, which are not read (task "
                          "files lie directly in the data folder, or in its train/, val/ and "
                          "test/)")
    if not files:
        raise DataError(f"no task files in {root}: expected {root}/<task>.csv (one x,y or "
                        "x1,...,xd,y row per point), or train/, val/ and test/ folders of them"
                        + (f" (its subfolders hold {len(nested)}: move them up)" if nested
                           else ""))
    kept: dict[str, list[tuple[Tensor, str]]] = {name: [] for name in SPLITS}
    short: list[str] = []  # the files too short for a task
    first, unnamed, y_name = None, [], None
    matching = x_names is None or len(x_names) > 0
    x_names = list(x_names) if x_names else None
    for split, split_root, path in files:
        points = read_points(path, "task", need_y=True, x_names=x_names or ())
        if not len(points.x):  # empty, or a header alone: short, with no columns to compare
            short.append(path.relative_to(root).as_posix())
            continue
        if new_run and points.y_name:
            refuse_x_named_target(points.y_name, "task", path)
        x_names = x_names or (points.x_names if matching else None)
        y_name = y_name or points.y_name
        points, matched = align_columns(points, x_names or [])
        if not matched:
            unnamed.append(path.relative_to(root).as_posix())
        x, y, _, _ = points
        first = first or (path, x.shape[1])
        if x.shape[1] != first[1]:
            raise DataError(f"the task files of {root} differ in their x values per point: "
                            f"{first[0]} has {first[1]}, {path} has {x.shape[1]}; every task's "
                            "points need the same number of them")
        if len(x) >= min_points:
            kept[split].append((torch.cat([x, y], dim=1).float(),
                                path.relative_to(split_root).as_posix()))
        else:
            short.append(path.relative_to(root).as_posix())
    if short:
        warn(f"left out {len(short)} of {len(files)} task files in {root} with fewer than "
             f"{min_points} points (k_shot + queries): " + ", ".join(short[:3])
             + (", ..." if len(short) > 3 else ""), ShortTasksWarning)
    if unnamed:
        warn(f"{len(unnamed)} task file(s) in {root} name their x columns otherwise than "
             f"{', '.join(x_names or [])}, in any order (e.g. {unnamed[0]}): their columns are "
             "taken as they stand", ColumnNamesWarning)
    return {split: PointTasks([points for points, _ in entries], [name for _, name in entries],
                              x_names, y_name)
            for split, entries in kept.items()}


def _nested_task_files(root: Path) -> list[Path]:
    """The .csv files in subfolders of the folders that hold task files (the data folder, or
    its split folders), which are not read; hidden and system folders skipped at any depth."""
    splits = [root / name for name in SPLITS if (root / name).is_dir()]
    return sorted(path for top in [root, *splits] for sub in subfolders(top) if sub not in splits
                  for path in files_below(sub, _is_task_file))


class PointSampler:
    """Meta-batches of regression tasks: each a random task of the split, with ``k_shot``
    support and ``k_query`` query points drawn from its file without replacement."""

    def __init__(self, tasks: PointTasks, k_shot: int, k_query: int,
                 device: torch.device | str = "cpu"):
        self.tasks, self.k_shot, self.k_query, self.device = tasks, k_shot, k_query, device

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        size, draws = self.k_shot + self.k_query, []
        for t in torch.randint(len(self.tasks), (num_tasks,), generator=generator).tolist():
            task = self.tasks.points[t]  # (count, features + 1): files may be of any length
            draws.append(task[torch.randperm(len(task), generator=generator)[:size]])
        points = torch.stack(draws)  # (tasks, k_shot + k_query, features + 1)
        x, y, k = points[..., :-1], points[..., -1:], self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:]).to(self.device)

    def fixed_tasks(self, count: int, seed: int, chunk: int) -> list[TaskBatch]:
        """``count`` tasks drawn with ``seed`` (the same for every run), in chunks of ``chunk``."""
        return list(self.sample(count, torch.Generator().manual_seed(seed)).split(chunk))
