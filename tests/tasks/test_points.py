"""Regression tasks from CSV files: reading points, the split, and sampling support and query."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from fastmaml import DataError
from fastmaml.errors import FastMAMLWarning
from fastmaml.tasks.points import (ColumnNamesWarning, PointSampler, ShortTasksWarning,
                                   align_columns, assign_tasks, load_point_tasks, read_points)


def write_task(path: Path, task: int, points: int) -> None:
    """A task whose y is its number and whose x are 0..points-1, so a draw shows its source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x,y\n" + "".join(f"{i},{task}\n" for i in range(points)))


def test_a_query_that_may_be_written_with_decimal_commas_is_warned_of(tmp_path: Path) -> None:
    """A one-column query of a locale with decimal commas (-0,5 for -0.5) read as x,y labels:
    predicted at the wrong x and scored against the digits after the comma, unsaid."""
    (tmp_path / "comma.csv").write_text("-0,5\n0,5\n2,25\n")
    with pytest.warns(FastMAMLWarning, match=r"comma.csv holds two whole numbers a line and no "
                      r"decimal point: they are read as x,y .*decimal comma \(0,5 for 0.5\)"):
        x, y, _, _ = read_points(tmp_path / "comma.csv", "query", need_y=False, features=1)
    assert x[:, 0].tolist() == [-0.0, 0.0, 2.0] and y[:, 0].tolist() == [5.0, 5.0, 25.0]
    for text in ("-0.5,1\n0,5\n", "x,y\n0,5\n", "1\n2\n"):  # a decimal point, a header, x alone
        (tmp_path / "plain.csv").write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read_points(tmp_path / "plain.csv", "query", need_y=False, features=1)
    with warnings.catch_warnings():  # a support's second column is y by need
        warnings.simplefilter("error")
        read_points(tmp_path / "comma.csv", "support", need_y=True, features=1)


def test_excels_separator_line_is_skipped(tmp_path: Path) -> None:
    """Excel writes ``sep=,`` as line 1 of some CSVs: it was a header, then line 2 "not a
    number"; another separator is named as such."""
    for first, header, named in (("sep=,", "x,y\n", ["x"]), ('"SEP=,"', "", None)):
        (tmp_path / "excel.csv").write_text(f"{first}\n{header}1,2\n3,4\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (not a comment naming the columns: none said)
            x, y, names, _ = read_points(tmp_path / "excel.csv", "support", need_y=True)
        assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0]
        assert names == named
    for mark in ";\t":
        (tmp_path / "excel.csv").write_text(f"sep={mark}\r\nx{mark}y\r\n1{mark}2\r\n")
        with pytest.raises(DataError, match=f"fields look separated by {re.escape(repr(mark))}"):
            read_points(tmp_path / "excel.csv", "support", need_y=True)


def test_a_header_leaving_x_unnamed_is_told_the_runs_name_for_it(tmp_path: Path) -> None:
    for header, x_names, said in ((",x2,y", (), "x1"), (",x2,y", ("sqft", "rooms"), "sqft"),
                                  (",SQFT,y", ("sqft", "rooms"), "rooms")):
        (tmp_path / "points.csv").write_text(f"{header}\n0,1,2\n")
        with pytest.raises(DataError, match=rf"leaves its first column unnamed: name it \({said}, "):
            read_points(tmp_path / "points.csv", "support", need_y=True, features=2,
                        x_names=x_names)


def test_quoted_fields_after_a_space_are_points(tmp_path: Path) -> None:
    """``"1", "2"`` (a space after the comma, as some writers put it) was taken for a header."""
    (tmp_path / "spaced.csv").write_text('"x", "y"\n"1", "2"\n3, 4\n')
    x, y, names, _ = read_points(tmp_path / "spaced.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names == ["x"]


def test_a_csv_with_a_byte_order_mark_keeps_its_first_point(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a BOM
    path.write_bytes("\ufeff1.0,2.0\n3.0,4.0\n5.0,6.0\n".encode())
    x, y, names, _ = read_points(path, "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0, 5.0] and y[:, 0].tolist() == [2.0, 4.0, 6.0]
    assert names is None  # no header
    (tmp_path / "bad.csv").write_text("x,y\n1,abc\n")
    with pytest.raises(DataError, match="not a number"):
        read_points(tmp_path / "bad.csv", "support", need_y=True)


def test_a_header_y_x_is_read_by_name_and_another_delimiter_is_named(tmp_path: Path) -> None:
    (tmp_path / "swapped.csv").write_text("Y, X\n2.0,1.0\n4.0,3.0\n")
    x, y, names, _ = read_points(tmp_path / "swapped.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names == ["X"]
    for name, text, need_y in (("semicolons.csv", "x;y\n1;2\n3;4\n", True),
                               ("tabs.csv", "1\t2\n3\t4\n", False)):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name} .*fields look separated by "
                                            f"{re.escape(repr(text[1]))}: save it with commas"):
            read_points(tmp_path / name, "query", need_y=need_y)


def test_comment_lines_are_skipped_and_numpy_savetxts_header_names_the_columns(
        tmp_path: Path) -> None:
    """``#`` lines are comments wherever they stand, and a bad line keeps its own number; the
    comment just before the points names the columns where it is one name per column, as
    ``numpy.savetxt(..., header="y,x")`` writes ``# y,x`` (free text names nothing)."""
    (tmp_path / "saved.csv").write_text("# y,x\n2.0,1.0\n# a note\n4.0,3.0\n")
    x, y, names, _ = read_points(tmp_path / "saved.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names == ["x"]
    (tmp_path / "noted.csv").write_text("# measured in lab 3, on 2024-05-01\n#\nx,y\n1,2\n3,4\n")
    x, y, names, _ = read_points(tmp_path / "noted.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names == ["x"]
    (tmp_path / "free.csv").write_text("# sqft, price\n# of houses in town\n1,2\n3,4\n")
    x, y, names, _ = read_points(tmp_path / "free.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names is None
    (tmp_path / "bad.csv").write_text("# x,y\n1,2\n# note\n3,oops\n")
    with pytest.raises(DataError, match="line 4 of the support CSV .* holds 'oops'"):
        read_points(tmp_path / "bad.csv", "support", need_y=True)
    (tmp_path / "prose.csv").write_text('# measured in lab 3, "calibrated\n1,2\n# end"\n3,4\n')
    with pytest.warns(ColumnNamesWarning, match="one field per column but is not read as their "
                                                "names"):  # free text, of two fields
        x, y, names, _ = read_points(tmp_path / "prose.csv", "support", need_y=True)
    assert x[:, 0].tolist() == [1.0, 3.0] and y[:, 0].tolist() == [2.0, 4.0] and names is None
    for header in ("y,x (m)", "y, x-pos", "y,x [m]"):  # units and hyphens; a blank line after
        (tmp_path / "units.csv").write_text(f"# {header}\n\n2.0,1.0\n4.0,3.0\n")
        x, y, names, _ = read_points(tmp_path / "units.csv", "support", need_y=True)
        assert x[:, 0].tolist() == [1.0, 3.0] and names == [header.split(",")[1].strip()]
    (tmp_path / "nan.csv").write_text("x,y\n1,2\n3,nan\n")  # as numpy.savetxt writes a NaN
    with pytest.raises(DataError, match="line 3 of the support CSV .* holds a NaN or infinite"):
        read_points(tmp_path / "nan.csv", "support", need_y=True)
    (tmp_path / "tiny.csv").write_text("x,y\n1,2\n3,1e-50\n5,-2e-46\n7,1e-40\n")
    with pytest.warns(FastMAMLWarning, match=r"line 3 of the support CSV .* holds a value too "
                                             r"small for float32, which the model reads as 0 "
                                             r"\(2 line\(s\) so\)"):  # 1e-40: a subnormal, kept
        _, y, _, _ = read_points(tmp_path / "tiny.csv", "support", need_y=True)
    assert y[1:3, 0].tolist() == [1e-50, -2e-46]  # read as written: float32 is the model's
    (tmp_path / "errors.csv").write_text("#N/A,#N/A\n1,2\n")  # not a header of two names
    with pytest.raises(DataError, match="line 1 of the support CSV .* holds '#N/A'"):
        read_points(tmp_path / "errors.csv", "support", need_y=True)
    for value in ("#N/A", "#n/a", "#ERROR!", "#DIV/0!"):  # a spreadsheet's error: not a comment
        (tmp_path / "sheet.csv").write_text(f"x,y\n1,2\n{value},4\n")
        with pytest.raises(DataError, match=f"line 3 of the support CSV .* holds '{value}'"):
            read_points(tmp_path / "sheet.csv", "support", need_y=True)
    (tmp_path / "comments.csv").write_text("# nothing yet\n")
    with pytest.raises(DataError, match="holds no points"):
        read_points(tmp_path / "comments.csv", "support", need_y=True)


@pytest.mark.parametrize("text, message", [
    ("abc,1\n1,2\n3,4\n", "line 1 of the support CSV .* holds 'abc', which is not a number"),
    ("x,y\n1,2\n3\n4,5\n", "line 3 of the support CSV .* has 1 field"),
    ("x,y\n1,2\n\n3,oops\n", "line 4 of the support CSV .* holds 'oops'"),
    ("x,y,\n1,2,\n", r"line 2 of the support CSV .* has no value in column 3 of 3 \(each line "
                     "ends in a comma, as a spreadsheet writes an empty last column"),
    ("x,y\n1,2\n2,\n3,4\n", "line 3 of the support CSV .* has no value in column 2 of 2$"),
    ("x,y\n,2\n", "line 2 of the support CSV .* has no value in column 1 of 2$"),
    ("x,y\n", "holds no points"),
    ("", "holds no points"),
    ("1;2\n", "line 1 of the support CSV .* has 1 field.*fields look separated by ';'"),
    (",x,y\n0,1,2\n1,3,4\n", "unnamed, as pandas writes a row index: .*index=False"),
    (",x\n0,1\n1,3\n", "unnamed, as pandas writes a row index"),  # else read as x=index
    (",y\n0,1\n1,3\n", "leaves its first column unnamed: name it"),  # not to be deleted
    ("0,5;1,2\n1,5;0,3\n", "holds '5;1', which is not a number.*fields look separated by ';'"),
    ("x,y\t\n1,abc\n", "line 2 .* holds 'abc', which is not a number$"),  # a stray tab: no hint
    ("target,x\n1,2\n3,4\n", "names no y column, so its column 'x' would be the "
                              "target: name the target column y"),
    ("value,X2\n1,2\n3,4\n", "its column 'X2' would be the target"),
])
def test_a_bad_line_is_named_and_a_data_line_is_never_taken_for_a_header(
        tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "points.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_points(tmp_path / "points.csv", "support", need_y=True)


def test_a_query_with_a_column_besides_x_is_told_it_may_delete_it(tmp_path: Path) -> None:
    """``id,x`` for a run of one x: the last column would be the labels, but the other is
    an id, not the x value renaming would make it."""
    (tmp_path / "query.csv").write_text("id,x\n1,0.5\n2,1.5\n")
    with pytest.raises(DataError, match=r"its column 'x' would be the target: name the target "
                                        r"column y, or delete a column that is neither an x "
                                        r"value nor a label \(an id\)$"):
        read_points(tmp_path / "query.csv", "query", need_y=False, features=1)


def test_a_trailing_comma_on_every_line_is_named_where_the_run_knows_its_columns(
        tmp_path: Path) -> None:
    """A run of one x value given ``1,2,`` lines: three fields, each line's last one empty."""
    (tmp_path / "points.csv").write_text("1,2,\n3,4,\n")
    with pytest.raises(DataError, match=r"line 1 of the support CSV .* has 3 field\(s\): .* all "
                                        r"alike \(each line ends in a comma"):
        read_points(tmp_path / "points.csv", "support", need_y=True, features=1)
    (tmp_path / "points.csv").write_text("1,2,\n3,4,5\n")  # a line of three values
    with pytest.raises(DataError, match=r"has 3 field\(s\): .* all alike$"):
        read_points(tmp_path / "points.csv", "support", need_y=True, features=1)


def test_a_task_file_headed_without_y_is_read_by_position_as_ever(tmp_path: Path) -> None:
    """A support or query file headed ``target,x`` is refused, and so are a new run's task
    files (they trained the model backwards, predicting x); task files a run already trained
    on are read as they were, so that it resumes and evaluates."""
    (tmp_path / "task.csv").write_text("t,x\n0,1\n2,3\n")
    x, y, names, target = read_points(tmp_path / "task.csv", "task", need_y=True)
    assert x[:, 0].tolist() == [0.0, 2.0] and y[:, 0].tolist() == [1.0, 3.0] and names == ["t"]
    assert target == "x"
    with pytest.raises(DataError, match="its column 'x' would be the target"):
        read_points(tmp_path / "task.csv", "support", need_y=True)
    root = tmp_path / "tasks"
    for t in range(3):
        write_task(root / f"t{t}.csv", t, 4)
    (root / "t0.csv").write_text("target,x\n" + "".join(f"{10 * i},{i}\n" for i in range(4)))
    everything = {"train": ["t0.csv", "t1.csv", "t2.csv"], "val": [], "test": []}
    with pytest.raises(DataError, match=r"the header of the task CSV .*t0.csv names no y column, "
                                        "so its column 'x' would be the target"):
        load_point_tasks(root, min_points=2, assignment=everything)  # a new run's
    tasks = load_point_tasks(root, min_points=2, assignment=everything, x_names=[])  # a started
    assert tasks["train"].points[0][:, -1].tolist() == [0.0, 1.0, 2.0, 3.0]  # run's, as ever
    (root / "t2.csv").write_text("price,sqft\n" + "".join(f"{i},{i}\n" for i in range(4)))
    (root / "t0.csv").write_text("price,sqft\n" + "".join(f"{i},{i}\n" for i in range(4)))
    tasks = load_point_tasks(root, min_points=2, assignment=everything)["train"]
    assert (tasks.x_names, tasks.y_name) == (["price"], "sqft")  # (said as training starts)


def test_tasks_split_by_file_and_short_files_are_left_out(tmp_path: Path) -> None:
    short = (1, 4, 6)
    for t in range(10):
        write_task(tmp_path / "tasks" / f"t{t}.csv", t, 3 if t in short else 8)
    (tmp_path / "tasks" / "notes.txt").write_text("not a task")
    (tmp_path / "tasks" / "t10.csv").write_text("x,y\n")  # a header alone: no points
    (tmp_path / "tasks" / "t11.csv").write_text("")
    short += (10, 11)
    assignment = assign_tasks(tmp_path / "tasks", (0.6, 0.2, 0.2), min_points=5)
    with pytest.warns(ShortTasksWarning, match=r"left out 5 of 12 task files .* fewer than 5 "
                                               r"points \(k_shot \+ queries\): \w+\.csv, .*, \.\.\.$"):
        splits = load_point_tasks(tmp_path / "tasks", min_points=5, assignment=assignment)
    names = [n for split in splits.values() for n in split.names]
    assert sorted(names) == sorted(f"t{t}.csv" for t in range(12) if t not in short)
    # the 7 long files are split 4 / 2 / 1; the short ones take no share (recorded in train)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 1]
    assert {f"t{t}.csv" for t in short} <= set(assignment["train"])


def test_draws_take_points_from_the_whole_file(tmp_path: Path) -> None:
    """Not only its first k_shot + k_query rows."""
    write_task(tmp_path / "tasks" / "t.csv", 0, 50)
    tasks = load_point_tasks(tmp_path / "tasks", min_points=5,
                             assignment={"train": ["t.csv"], "val": [], "test": []})
    batch = PointSampler(tasks["train"], 2, 3).sample(40, torch.Generator().manual_seed(0))
    drawn = torch.cat([batch.support_x.flatten(), batch.query_x.flatten()]).unique()
    assert len(drawn) > 40  # of the 50 rows (x = row number)


def test_a_draw_takes_distinct_points_of_one_task(tmp_path: Path) -> None:
    for t, points in enumerate((6, 20, 9)):  # files of uneven lengths
        write_task(tmp_path / "train" / f"t{t}.csv", t, points)
    write_task(tmp_path / "test" / "t9.csv", 9, 6)
    splits = load_point_tasks(tmp_path, min_points=6)
    assert splits["train"].names == ["t0.csv", "t1.csv", "t2.csv"] and not len(splits["val"])
    batch = PointSampler(splits["train"], k_shot=2, k_query=4).sample(200, torch.Generator())
    x = torch.cat([batch.support_x, batch.query_x], dim=1)[..., 0]
    y = torch.cat([batch.support_y, batch.query_y], dim=1)[..., 0]
    assert batch.support_x.shape == (200, 2, 1) and batch.query_y.shape == (200, 4, 1)
    assert (y == y[:, :1]).all()  # every point of a draw from one task
    lengths = torch.tensor([6.0, 20.0, 9.0])[y[:, 0].long()]
    assert (x < lengths[:, None]).all()  # only points of that task's own file
    assert all(len(set(row.tolist())) == 6 for row in x)  # without replacement
    assert set(y[:, 0].tolist()) == {0.0, 1.0, 2.0}


def test_a_split_folder_of_links_to_nothing_is_named(tmp_path: Path) -> None:
    """A test/ of links into an unmounted drive gave a test split of no tasks, unsaid (only
    folders that held a task file were looked at)."""
    for t in range(3):
        write_task(tmp_path / "train" / f"t{t}.csv", t, 6)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t9.csv").symlink_to(tmp_path / "unmounted" / "t9.csv")
    with pytest.warns(FastMAMLWarning, match=r"skipped 1 file\(s\) in .* that link to nothing "
                      r".*: test/t9.csv$"):
        splits = load_point_tasks(tmp_path, min_points=6)
    assert not len(splits["test"])


def test_a_task_copied_into_two_explicit_splits_is_an_error(tmp_path: Path) -> None:
    write_task(tmp_path / "train" / "t0.csv", 0, 6)
    write_task(tmp_path / "train" / "t1.csv", 1, 6)
    write_task(tmp_path / "test" / "t0.csv", 9, 6)  # numbered afresh in its split: another task
    assert assign_tasks(tmp_path)["test"] == ["test/t0.csv"]
    for split in ("train", "test"):  # empty alike, but no task: left out, not one task
        (tmp_path / split / "empty.csv").write_text("x,y\n")
    assert "test/empty.csv" in assign_tasks(tmp_path)["test"]
    write_task(tmp_path / "test" / "t7.csv", 1, 6)  # a copy of a training task
    with pytest.raises(DataError, match=r"train/t1.csv and test/t7.csv of .* are one task \(the "
                                        r"same file contents, [0-9a-f]{12}\) in two splits"):
        load_point_tasks(tmp_path, min_points=6)


def test_copied_tasks_land_in_one_split_when_the_folder_is_split(tmp_path: Path) -> None:
    """Without explicit splits a copied task file goes where its original goes, whatever the
    seed; a folder without copies is split as before (one file, one share)."""
    for t in range(9):
        write_task(tmp_path / f"t{t}.csv", t, 6)
    plain = {seed: assign_tasks(tmp_path, seed=seed) for seed in range(8)}
    assert plain[1] == {"train": ["t0.csv", "t1.csv", "t2.csv", "t4.csv", "t5.csv", "t7.csv"],
                        "val": ["t6.csv", "t8.csv"], "test": ["t3.csv"]}  # as before grouping
    for copy in ("copy-a.csv", "copy-b.csv"):
        (tmp_path / copy).write_bytes((tmp_path / "t0.csv").read_bytes())
    for seed in range(8):
        assignment = assign_tasks(tmp_path, seed=seed)
        (split,) = [name for name, files in assignment.items() if "t0.csv" in files]
        assert {"copy-a.csv", "copy-b.csv"} <= set(assignment[split])
        assert {name: [f for f in files if not f.startswith("copy")]
                for name, files in assignment.items()} == plain[seed]


def test_a_folder_without_tasks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no task files in"):
        load_point_tasks(tmp_path / "empty", min_points=2)
    with pytest.raises(DataError, match="not found"):
        load_point_tasks(tmp_path / "nowhere", min_points=2)


def test_points_of_several_x_values_and_a_target_named_anywhere(tmp_path: Path) -> None:
    (tmp_path / "task.csv").write_text("a,b,y\n1,2,3\n4,5,6\n")
    x, y, names, _ = read_points(tmp_path / "task.csv", "task", need_y=True)
    assert x.tolist() == [[1, 2], [4, 5]] and y.tolist() == [[3], [6]] and names == ["a", "b"]
    (tmp_path / "middle.csv").write_text("x1,Y,x2\n1,3,2\n4,6,5\n")  # y wherever it is named
    x, y, names, _ = read_points(tmp_path / "middle.csv", "support", need_y=True, features=2)
    assert x.tolist() == [[1, 2], [4, 5]] and y.tolist() == [[3], [6]]
    assert names == ["x1", "x2"]
    (tmp_path / "inputs.csv").write_text("1,2\n4,5\n")  # a query: y may be left out
    x, y, names, _ = read_points(tmp_path / "inputs.csv", "query", need_y=False, features=2)
    assert x.tolist() == [[1, 2], [4, 5]] and y is None and names is None
    with pytest.raises(DataError, match=r"has 2 field\(s\): it must hold one row per point, 2 x "
                                        "values, then y, all alike"):
        read_points(tmp_path / "inputs.csv", "support", need_y=True, features=2)
    with pytest.raises(DataError, match=r"has 3 field\(s\): .* per point, x \(or x,y\), all"):
        read_points(tmp_path / "task.csv", "query", need_y=False)
    (tmp_path / "single.csv").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"per point, x,y \(one or more x values, then y\)"):
        read_points(tmp_path / "single.csv", "task", need_y=True)
    # a header of another width than the rows: which column y is would be a guess
    for header, rows, features in (("x,y", "1,2,3\n", None), ("y,x1,x2", "1,2\n", 2),
                                   ("x1,x2,x3,y", "1,2,3\n", 2)):
        (tmp_path / "named.csv").write_text(f"{header}\n{rows}")
        with pytest.raises(DataError, match=f"the header of the query CSV .* names "
                                            f"{header.count(',') + 1} column\\(s\\), but its "
                                            "rows have"):
            read_points(tmp_path / "named.csv", "query", need_y=features is None,
                        features=features)


def test_the_one_column_named_beside_the_runs_x_columns_is_the_target(tmp_path: Path) -> None:
    """``price,sqft,rooms`` for a run on ``sqft,rooms``: price is y, not the last column."""
    (tmp_path / "query.csv").write_text("price,SqFt,rooms\n300,80,3\n500,120,4\n")
    x, y, names, _ = read_points(tmp_path / "query.csv", "query", need_y=False, features=2,
                              x_names=("sqft", "rooms"))
    assert x.tolist() == [[80, 3], [120, 4]] and y.tolist() == [[300], [500]]
    assert names == ["SqFt", "rooms"]
    x, y, names, _ = read_points(tmp_path / "query.csv", "query", need_y=False, features=2)
    assert y.tolist() == [[3], [4]] and names == ["price", "SqFt"]  # no names: the last
    for header in ("price,cost,rooms", "y2,sqft,sqft"):  # two unknown, or names repeated
        (tmp_path / "other.csv").write_text(f"{header}\n300,80,3\n")
        x, y, names, _ = read_points(tmp_path / "other.csv", "query", need_y=False, features=2,
                                  x_names=("sqft", "rooms"))
        assert y.tolist() == [[3]]


def test_task_files_of_different_x_values_are_an_error(tmp_path: Path) -> None:
    write_task(tmp_path / "tasks" / "t0.csv", 0, 6)
    (tmp_path / "tasks" / "t1.csv").write_text("".join(f"{i},{i},1\n" for i in range(6)))
    with pytest.raises(DataError, match=r"differ in their x values per point: .*t0.csv has 1, "
                                        r".*t1.csv has 2"):
        load_point_tasks(tmp_path / "tasks", min_points=6)
    (tmp_path / "tasks" / "t0.csv").write_text("".join(f"{i},{-i},0\n" for i in range(6)))
    tasks = load_point_tasks(tmp_path / "tasks", min_points=6, assignment={
        "train": ["t0.csv", "t1.csv"], "val": [], "test": []})["train"]
    assert tasks.features == 2
    batch = PointSampler(tasks, k_shot=2, k_query=3).sample(10, torch.Generator())
    assert batch.support_x.shape == (10, 2, 2) and batch.query_y.shape == (10, 3, 1)
    assert (batch.query_x[..., 0].abs() == batch.query_x[..., 1].abs()).all()  # x, not y
    assert set(batch.query_y.flatten().tolist()) <= {0.0, 1.0}


def test_columns_named_in_another_order_are_put_in_the_first_files_order(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "a.csv").write_text("Speed,Load,y\n" + "".join(f"{i},{-i},{i}\n" for i in range(6)))
    (root / "b.csv").write_text("load,speed,y\n" + "".join(f"{-i},{i},{i}\n" for i in range(6)))
    (root / "c.csv").write_text("u,v,y\n" + "".join(f"{i},{-i},{i}\n" for i in range(6)))
    (root / "d.csv").write_text("".join(f"{i},{-i},{i}\n" for i in range(6)))  # no header
    everything = {"train": ["a.csv", "b.csv", "c.csv", "d.csv"], "val": [], "test": []}
    with pytest.warns(ColumnNamesWarning, match=r"1 task file\(s\) in .* name their x columns "
                                                r"otherwise than Speed, Load, in any order \(e.g. "
                                                r"c.csv\): their columns are taken as they stand"):
        tasks = load_point_tasks(root, min_points=6, assignment=everything)["train"]
    assert tasks.x_names == ["Speed", "Load"]
    for points in tasks.points:  # every file's columns as speed (= y), load (= -y)
        assert torch.equal(points[:, 0], points[:, 2]) and torch.equal(points[:, 1], -points[:, 2])
    with pytest.warns(ColumnNamesWarning, match=r"1 task file\(s\) .* than load, speed, in"):
        tasks = load_point_tasks(root, min_points=6, assignment=everything,
                                 x_names=["load", "speed"])["train"]  # a run's recorded order
    for points in tasks.points[:2]:  # the named files' columns as load, speed now
        assert torch.equal(points[:, 1], points[:, 2]) and torch.equal(points[:, 0], -points[:, 2])
    with warnings.catch_warnings():  # a run started before names were recorded: as they stand
        warnings.simplefilter("error", ColumnNamesWarning)
        tasks = load_point_tasks(root, min_points=6, assignment=everything, x_names=())["train"]
    assert tasks.x_names is None and torch.equal(tasks.points[1][:, 1], tasks.points[1][:, 2])


def test_what_a_csv_holds_otherwise_is_said(tmp_path: Path) -> None:
    """Underscored digits are no number, a query headed y alone holds no x, another encoding
    than UTF-8 is named, and files beside the task CSVs are named in a warning."""
    (tmp_path / "under.csv").write_text("x,y\n1_0,2\n")
    with pytest.raises(DataError, match="line 2 of the support CSV .* holds '1_0', which is not "
                                        "a number"):
        read_points(tmp_path / "under.csv", "support", need_y=True)
    (tmp_path / "only-y.csv").write_text("y\n1\n2\n")
    with pytest.raises(DataError, match="names a column y, but its rows hold only the 1 x "
                                        r"value\(s\) of a point"):
        read_points(tmp_path / "only-y.csv", "query", need_y=False)
    (tmp_path / "latin.csv").write_bytes("température,y\n1,2\n".encode("latin-1"))
    with pytest.raises(DataError, match="it is not UTF-8 text .*save it as CSV UTF-8"):
        read_points(tmp_path / "latin.csv", "support", need_y=True)
    root = tmp_path / "tasks"
    for t in range(3):
        write_task(root / f"t{t}.csv", t, 8)
    (root / "t3.tsv").write_text("x\ty\n1\t2\n")
    (root / ".hidden").write_text("")
    for nested in ("more/t4.csv", "more/deeper/t5.CSV", ".git/t6.csv", "__MACOSX/._t0.csv",
                   "more/.ipynb_checkpoints/t0-checkpoint.csv"):
        write_task(root / nested, 4, 8)
    with pytest.warns(FastMAMLWarning) as caught:
        load_point_tasks(root, min_points=2, assignment={"train": ["t0.csv", "t1.csv"],
                                                         "val": [], "test": ["t2.csv"]})
    assert [str(w.message).split(str(root))[1] for w in caught] == [
        " that are not .csv task files: t3.tsv",
        " in subfolders, which are not read (task files lie directly in the data folder, or in "
        "its train/, val/ and test/): more/deeper/t5.CSV, more/t4.csv"]
    split = tmp_path / "split"  # a split's files all one level down: the split would be empty
    for name in ("train/a.csv", "train/b.csv", "test/hard/c.csv"):
        write_task(split / name, 0, 8)
    with pytest.warns(FastMAMLWarning, match=r"in subfolders, which are not read .*: "
                                             r"test/hard/c.csv$"):
        assert len(load_point_tasks(split, min_points=2)["test"]) == 0
    flat = tmp_path / "flat"
    write_task(flat / "tasks" / "a.csv", 0, 8)
    with pytest.warns(FastMAMLWarning, match="in subfolders"), \
            pytest.raises(DataError, match=r"no task files in .*flat: .* \(its subfolders hold 1: "
                                           r"move them up\)"):
        load_point_tasks(flat, min_points=2)


def test_one_x_column_named_in_either_order_is_the_first_files(tmp_path: Path) -> None:
    """``time,temp`` then ``temp,time``: time is x in both (no y named, the first headed file
    says which column is x); a file naming another x column is warned of."""
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "a.csv").write_text("time,temp\n" + "".join(f"{i},{2 * i}\n" for i in range(6)))
    (root / "b.csv").write_text("temp,time\n" + "".join(f"{2 * i},{i}\n" for i in range(6)))
    (root / "c.csv").write_text("hour,temp\n" + "".join(f"{i},{2 * i}\n" for i in range(6)))
    everything = {"train": ["a.csv", "b.csv", "c.csv"], "val": [], "test": []}
    with pytest.warns(ColumnNamesWarning, match=r"1 task file\(s\) in .* name their x columns "
                                                r"otherwise than time, in any order \(e.g. c.csv"):
        tasks = load_point_tasks(root, min_points=6, assignment=everything)["train"]
    assert tasks.x_names == ["time"]
    for points in tasks.points:  # x = time, y = temp = 2 time in every file
        assert torch.equal(points[:, 1], 2 * points[:, 0])


def test_three_columns_in_a_cyclic_order_are_put_in_the_runs_order(tmp_path: Path) -> None:
    """(Two swapped columns, the other tests' case, are their own inverse permutation.)"""
    (tmp_path / "task.csv").write_text("b,c,a,y\n2,3,1,9\n")
    moved, matched = align_columns(read_points(tmp_path / "task.csv", "task", need_y=True),
                                   ["a", "b", "c"])
    assert matched and moved.x.tolist() == [[1.0, 2.0, 3.0]] and moved.x_names == ["a", "b", "c"]


def test_names_alike_but_for_case_are_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "task.csv").write_text("A,a,y\n1,2,3\n")
    points = read_points(tmp_path / "task.csv", "task", need_y=True)
    assert align_columns(points, ["a", "A"]) == (points, False)
    assert align_columns(points, ["A", "a"]) == (points, True)
    moved, matched = align_columns(points, ["Y2", "a"])
    assert not matched and moved is points
