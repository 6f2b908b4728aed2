"""Few-shot data from any image folder: layouts, the class split, short classes, the cache."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml import ConfigError, DataError
from fastmaml.tasks import folder as folder_module
from fastmaml.errors import FastMAMLWarning
from fastmaml.tasks.folder import (BlankImagesWarning, ShortClassesWarning, assign_classes,
                                   load_image_folder)
from fastmaml.tasks.splits import read_assignment, split_indices
from fastmaml.tasks.images import ImageFormat

FORMAT = ImageFormat("L", 8)


def write_class(path: Path, count: int, value: int, suffix: str = ".png") -> None:
    """``count`` images of one class: a constant gray ``value``, in varied sizes and modes."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB" if i % 2 else "L", (10 + i, 12), (value,) * 3 if i % 2 else value)
        image.save(path / f"{i}{suffix}")


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    root = tmp_path / "flowers"
    for c in range(20):
        write_class(root / f"class{c:02d}", 2 if c == 7 else 3 + c % 4, value=10 * c)
    (root / "class99").mkdir()  # empty: a short class
    (root / "notes.txt").write_text("not a class")
    return root


def test_classes_split_once_with_their_images(flat_root: Path, tmp_path: Path) -> None:
    with pytest.warns(ShortClassesWarning, match=r"left out 2 of 21 classes .* fewer than 3 "
                                                 r"images \(k_shot \+ queries\): class07, class99$"):
        splits = load_image_folder(flat_root, FORMAT, min_images=3, cache_dir=tmp_path / "c")
    names = [n for split in splits.values() for n in split.names]
    assert len(names) == len(set(names)) == 19 and "class07" not in names
    # the 19 classes of 3 images or more are split 13 / 3 / 3; the 2 short ones take no share
    assert [len(split) for split in splits.values()] == [13, 3, 3]
    for split in splits.values():
        for name, images in zip(split.names, split.images):
            c = int(name[-2:])
            assert images.shape == (3 + c % 4, 1, 8, 8) and images.dtype == torch.uint8
            assert (images == 10 * c).all()  # every image of the class, converted to L, resized
    again = load_image_folder(flat_root, FORMAT, min_images=3, cache_dir=tmp_path / "c")
    assert [s.names for s in again.values()] == [s.names for s in splits.values()]


def test_files_in_class_folders_that_are_not_images_are_named(flat_root: Path,
                                                               tmp_path: Path) -> None:
    """A photo in a format this Pillow cannot read (HEIC) would otherwise go unused unsaid,
    and a class of such photos be left out as "short" to a user who sees its files."""
    for name in ("IMG_0001.HEIC", "labels.txt", ".DS_Store"):  # the hidden one is not named
        (flat_root / "class03" / name).write_bytes(b"not an image Pillow reads")
    with pytest.warns(FastMAMLWarning, match=r"skipped 2 file\(s\) in the class folders of "
                      r".*flowers whose names end in no image format's suffix this Pillow reads "
                      r"\(e.g. .png, .jpg\): class03/IMG_0001.HEIC, "
                      r"class03/labels.txt$"):
        load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c")


def test_links_to_nothing_in_class_folders_are_named(flat_root: Path, tmp_path: Path) -> None:
    """A class folder of links into another drive, not mounted: its images were skipped unsaid,
    and the class left out as short to a user who sees its files."""
    for name in ("img_a.png", "img_b.png"):
        (flat_root / "class02" / name).symlink_to(tmp_path / "unmounted" / name)
    (flat_root / "class98").symlink_to(tmp_path / "unmounted" / "class98")  # a whole class
    (flat_root / ".#notes.txt").symlink_to("root@host.1234")  # an editor's lock: hidden, unsaid
    with pytest.warns(FastMAMLWarning) as caught:
        load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c")
    said = [str(w.message) for w in caught if "link to nothing" in str(w.message)]
    why = "that link to nothing (their targets were moved or deleted, or sit on a drive not mounted)"
    assert said == [f"skipped 2 file(s) in the class folders of {flat_root} {why}: "
                    "class02/img_a.png, class02/img_b.png",
                    f"skipped 1 file(s) in {flat_root} {why}: class98"]
    assert not [w for w in caught if "suffix" in str(w.message)]  # not called unreadable


def test_a_folder_this_user_may_not_read_inside_a_class_folder_is_passed_over(
        flat_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walking below the class folders for misplaced images, an unreadable folder stopped the
    load with a PermissionError (rglob had skipped it)."""
    locked, unenterable = flat_root / "class03" / "locked", flat_root / "class04" / "644"
    write_class(locked, 1, value=5)
    write_class(unenterable, 1, value=5)
    listing, is_file = Path.iterdir, Path.is_file

    def iterdir(path: Path):  # mode 000: not even listed
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    def entered(path: Path) -> bool:  # mode 644: listed, but its entries cannot be looked at
        if path.parent == unenterable:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(Path, "is_file", entered)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastMAMLWarning)
        warnings.simplefilter("ignore", ShortClassesWarning)
        warnings.simplefilter("ignore", BlankImagesWarning)
        splits = load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c")
    assert sum(len(split) for split in splits.values()) == 20  # class99 is empty


def test_images_outside_the_class_folders_are_named(flat_root: Path, tmp_path: Path) -> None:
    """Images one folder too deep, or beside the class folders, are read by no class."""
    write_class(flat_root / "class03" / "puppies", 2, value=5)
    write_class(flat_root / "class05" / "a" / "b", 1, value=5)
    # a NAS's thumbnails and a hidden folder below those: not the user's images
    write_class(flat_root / "class05" / "a" / "@eaDir" / "0.png", 1, value=5)
    write_class(flat_root / "class05" / "a" / ".thumbs", 1, value=5)
    Image.new("L", (4, 4)).save(flat_root / "stray.png")
    with pytest.warns(FastMAMLWarning, match=r"skipped 4 file\(s\) in .*flowers outside the "
                      r"class folders \(a class's images go directly in its folder, 1 level\(s\) "
                      r"below the root or a split folder\): class03/puppies/0.png, "
                      r"class03/puppies/1.png, class05/a/b/0.png, \.\.\.$"):
        load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c")
    shutil.rmtree(flat_root / "class03" / "puppies")
    shutil.rmtree(flat_root / "class05" / "a")
    (flat_root / "stray.png").unlink()
    (flat_root / "class04" / "link").symlink_to(flat_root / "class06")  # read as class06
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastMAMLWarning)
        warnings.simplefilter("ignore", ShortClassesWarning)
        warnings.simplefilter("ignore", BlankImagesWarning)  # (flat greys)
        load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("class_depth", [1, 2])
def test_images_in_a_folder_above_the_class_level_that_holds_no_class_are_named(
        tmp_path: Path, class_depth: int) -> None:
    """A split folder of images with no class folder (``val/*.png``), or with class_depth=2 a
    group folder of images (``train/misc/*.png``), is read by no class: named, not dropped
    unsaid."""
    root = tmp_path / "data"
    group = "alphabet/" if class_depth == 2 else ""
    for split, classes in (("train", 3), ("test", 2)):
        for c in range(classes):
            write_class(root / split / f"{group}{split}{c}", 2, value=10 * c)
    write_class(root / "val", 2, value=5)  # the user's val images, in no class folder
    if class_depth == 2:
        write_class(root / "train" / "misc", 1, value=5)
    expected = ("train/misc/0.png, " if class_depth == 2 else "") + "val/0.png, val/1.png"
    with pytest.warns(FastMAMLWarning, match=rf"skipped {2 + class_depth - 1} file\(s\) in "
                      rf".*data outside the class folders .*: {expected}$"):
        splits = load_image_folder(root, FORMAT, class_depth=class_depth,
                                   cache_dir=tmp_path / "c")
    assert [len(split) for split in splits.values()] == [3, 0, 2]


def test_images_that_come_out_nearly_one_colour_are_warned_of(tmp_path: Path) -> None:
    """A 12-bit camera's pixels in 16-bit files (0..4095 of 0..65535) read as 0..16 of 255, as
    a viewer shows them: said, as the model sees almost nothing of them."""
    root = tmp_path / "scans"
    ramp = np.linspace(0, 4095, 64).reshape(8, 8).astype(np.uint16)
    for c in range(3):
        (root / f"cell{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(ramp + 8 * (c + i)).save(root / f"cell{c}" / f"{i}.png")
    Image.fromarray(ramp * 16).save(root / "cell2" / "full.png")  # the full range: not faint
    with pytest.warns(BlankImagesWarning, match=r"^6 of 7 images in .*scans span at most 16 of "
                      r"255 levels as read \(e.g. cell0/0.png\), nearly one colour, .*; if they "
                      r"are 16-bit files of a 10- or 12-bit camera \(0..4095, which read as "
                      r"0..16: 16-bit pixels are scaled by 255/65535"):
        load_image_folder(root, FORMAT, fractions=(0.34, 0.33, 0.33), cache_dir=tmp_path / "c")


def test_images_that_come_out_one_flat_colour_are_warned_of(tmp_path: Path) -> None:
    """White strokes on a transparent background are composited onto white, as a viewer shows
    them: blank images, which the warning names."""
    root = tmp_path / "glyphs"
    for c in range(3):
        (root / f"glyph{c}").mkdir(parents=True)
        for i in range(2):
            image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
            image.putpixel((c, i), (255, 255, 255, 255))
            image.save(root / f"glyph{c}" / f"{i}.png")
    Image.new("L", (8, 8), 0).save(root / "glyph2" / "2.png")  # all black: blank too
    drawn = Image.new("L", (8, 8), 255)  # one dark stroke on white: not blank
    drawn.putpixel((3, 3), 0)
    drawn.save(root / "glyph2" / "3.png")
    with pytest.warns(BlankImagesWarning, match=r"7 of 8 images in .*glyphs are one flat colour "
                                                r"as read \(e.g. glyph0/0.png\), from which a "
                                                r"model learns nothing: blank images, or light "
                                                r"strokes on a transparent background"):
        load_image_folder(root, FORMAT, fractions=(0.34, 0.33, 0.33), cache_dir=tmp_path / "c")


def test_an_image_rewritten_at_the_same_size_is_decoded_again(tmp_path: Path) -> None:
    """The cache's key holds each file's modification time, not its size alone (an
    uncompressed BMP of other pixels has the same size)."""
    root = tmp_path / "bitmaps"
    for c in range(3):
        write_class(root / f"class{c}", 2, value=10 * c, suffix=".bmp")
    load_image_folder(root, FORMAT, fractions=(1, 0, 0), cache_dir=tmp_path / "c")
    image = root / "class0" / "0.bmp"
    size = image.stat().st_size
    Image.new("L", (10, 12), 200).save(image)
    os.utime(image, ns=(1, 1))
    assert image.stat().st_size == size
    splits = load_image_folder(root, FORMAT, fractions=(1, 0, 0), cache_dir=tmp_path / "c")
    assert (splits["train"].images[0][0] == 200).all()


def test_a_damaged_split_record_is_refused(tmp_path: Path) -> None:
    for record in ({"train": ["a"], "test": ["b"]}, {"train": "a", "val": [], "test": []}):
        (tmp_path / "splits.json").write_text(json.dumps(record))  # (val's missing; a string)
        with pytest.raises(ConfigError, match="splits.json is not a record of a run's split"):
            read_assignment(tmp_path / "splits.json")


def test_the_split_cuts_at_rounded_cumulative_fractions() -> None:
    """Rounding each split's own share took the last one's: 4 classes gave test none, 10 gave
    val 2 and test 1."""
    sizes = {count: [len(i) for i in split_indices(count, (0.7, 0.15, 0.15), seed=1)]
             for count in (4, 10, 21)}
    assert sizes == {4: [3, 0, 1], 10: [7, 1, 2], 21: [15, 3, 3]}
    assert [len(i) for i in split_indices(5, (0.8, 0, 0.2), seed=1)] == [4, 0, 1]


def test_the_split_depends_on_the_seed_only(flat_root: Path, tmp_path: Path) -> None:
    one = split_indices(21, (0.7, 0.15, 0.15), seed=1)
    assert sorted(np.concatenate(one).tolist()) == list(range(21))
    assert not np.array_equal(one[0], split_indices(21, (0.7, 0.15, 0.15), seed=2)[0])
    for bad in ((0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)):
        with pytest.raises(ConfigError, match="split_fractions"):
            split_indices(21, bad, seed=1)


def test_groups_and_explicit_splits(tmp_path: Path) -> None:
    root = tmp_path / "scripts"
    for split, groups in (("train", ("Latin", "Greek")), ("test", ("Runic",))):
        for g, group in enumerate(groups):
            for c in range(3):
                write_class(root / split / group / f"char{c}", 2, value=50 * g + c, suffix=".jpg")
    splits = load_image_folder(root, FORMAT, class_depth=2, cache_dir=tmp_path / "c")
    assert splits["train"].names == [f"{g}/char{c}" for g in ("Greek", "Latin") for c in range(3)]
    assert splits["train"].groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits["test"].names == [f"Runic/char{c}" for c in range(3)] and not len(splits["val"])
    (root / "train").rename(root / "training")
    with pytest.raises(DataError, match="no train/"):
        load_image_folder(root, FORMAT, class_depth=2, cache_dir=tmp_path / "c")


@pytest.mark.filterwarnings("ignore::fastmaml.tasks.folder.ShortClassesWarning")
def test_decoded_once_and_again_when_a_file_changes(flat_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    load_image_folder(flat_root, FORMAT, cache_dir=cache)
    decode = folder_module.read_images

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_module, "read_images", no_decoding)
    load_image_folder(flat_root, FORMAT, cache_dir=cache, fractions=(0.5, 0.2, 0.3))
    write_class(flat_root / "class00", 1, value=255)  # a changed image: decoded again
    os.utime(flat_root / "class00" / "0.png", ns=(1, 1))
    monkeypatch.setattr(folder_module, "read_images", decode)
    splits = load_image_folder(flat_root, FORMAT, cache_dir=cache)
    found = [images for s in splits.values() for n, images in zip(s.names, s.images)
             if n == "class00"]
    assert (found[0][0] == 255).all() and len(list(cache.iterdir())) == 2


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nowhere", FORMAT)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path / "empty", FORMAT)
    with pytest.raises(ConfigError, match="class_depth"):
        load_image_folder(tmp_path / "empty", FORMAT, class_depth=3)
    write_class(tmp_path / "grouped" / "latin" / "a", 2, value=1)
    with pytest.raises(DataError, match=r"2 folder levels down \(e.g. latin/a/\), so set "
                                        "class_depth=2"):
        load_image_folder(tmp_path / "grouped", FORMAT)
    with pytest.raises(DataError, match=r"1 folder level down \(e.g. a/\), so set "
                                        "class_depth=1"):
        load_image_folder(tmp_path / "grouped" / "latin", FORMAT, class_depth=2)
    write_class(tmp_path / "broken" / "a", 2, value=1)
    (tmp_path / "broken" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1.png"):
        load_image_folder(tmp_path / "broken", FORMAT, cache_dir=tmp_path / "c")


def test_a_class_named_train_among_others_is_a_class(tmp_path: Path) -> None:
    """Vehicles (COCO's names) hold a class ``train`` beside car/, bus/, ...: one folder per
    class, with a warning, not a refusal of explicit splits without test/."""
    root = tmp_path / "vehicles"
    for value, name in enumerate(("bus", "car", "train", "truck")):
        write_class(root / name, 2, value=value)
    with pytest.warns(FastMAMLWarning, match=r"has train/ but no test/, beside 3 other "
                                             r"folder\(s\): read as one folder per class, "
                                             r"train/ being one of them, not a split"):
        assignment = assign_classes(root, fractions=(0.5, 0, 0.5))
    assert sorted(sum(assignment.values(), [])) == ["bus", "car", "train", "truck"]


def test_explicit_splits_need_test_and_nothing_unread_beside_them(tmp_path: Path) -> None:
    root = tmp_path / "splits"
    for split in ("train", "val"):
        write_class(root / split / f"{split}-class", 2, value=1)
    with pytest.raises(DataError, match=r"has train/, val/ but no test/"):
        assign_classes(root)
    write_class(root / "test" / "test-class", 2, value=2)
    for junk in ("__MACOSX", "@eaDir", "$Recycle.Bin"):  # resource forks, NAS thumbnails, ...
        write_class(root / junk / "train", 2, value=3)  # skipped
    assert assign_classes(root) == {"train": ["train/train-class"], "val": ["val/val-class"],
                                    "test": ["test/test-class"]}
    (root / "validation" / "c").mkdir(parents=True)
    with pytest.raises(DataError, match=r"also validation/, which would be left unread.*where "
                                        r"train/ and test/ are classes .*, rename them\)"):
        assign_classes(root)
    cased = tmp_path / "cased"  # a Windows habit: Train/ and Test/
    for split in ("Train", "Test"):
        write_class(cased / split / "a-class", 2, value=1)
    with pytest.raises(DataError, match=r"has Test/, Train/: explicit split folders are named in "
                                        r"lower case .* rename Test/ to test/, Train/ to train/"):
        assign_classes(cased)
    write_class(tmp_path / "classes" / "Test", 2, value=1)  # a class that is named Test
    write_class(tmp_path / "classes" / "Control", 2, value=2)
    assert assign_classes(tmp_path / "classes", fractions=(0.5, 0, 0.5))["test"]


def test_a_class_in_two_explicit_splits_is_an_error(tmp_path: Path) -> None:
    for split in ("train", "test"):  # the ImageFolder habit: the same classes in both
        write_class(tmp_path / "pets" / split / "cat", 2, value=1)
    with pytest.raises(DataError, match=r"train/cat and test/cat of .* are one class \(named "
                                        r"cat\) in two splits"):
        load_image_folder(tmp_path / "pets", FORMAT, cache_dir=tmp_path / "c")
    (tmp_path / "pets" / "test" / "cat").rename(tmp_path / "pets" / "test" / "tabby")
    (tmp_path / "pets" / "test" / "kitty").symlink_to(tmp_path / "pets" / "train" / "cat")
    with pytest.raises(DataError, match="class folders train/cat and test/kitty of .* are one "
                                        "folder \\(a link\\)"):
        load_image_folder(tmp_path / "pets", FORMAT, cache_dir=tmp_path / "c")
    (tmp_path / "pets" / "test" / "kitty").unlink()  # a link to a folder elsewhere is a class
    write_class(tmp_path / "elsewhere" / "dog", 2, value=3)
    (tmp_path / "pets" / "test" / "dog").symlink_to(tmp_path / "elsewhere" / "dog")
    splits = load_image_folder(tmp_path / "pets", FORMAT, cache_dir=tmp_path / "c")
    assert splits["test"].names == ["dog", "tabby"]


@pytest.mark.filterwarnings("ignore::fastmaml.tasks.folder.ShortClassesWarning")
def test_an_assignment_keeps_every_class_in_its_split_when_classes_are_added(
        flat_root: Path, tmp_path: Path) -> None:
    assignment = assign_classes(flat_root)
    before = load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c", assignment=assignment)
    write_class(flat_root / "a-new-class", 3, value=7)  # sorts first: it would shift the shuffle
    assert assign_classes(flat_root) != assignment
    with pytest.warns(FastMAMLWarning, match="left out 1 class folder.* a-new-class"):
        after = load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c",
                                  assignment=assignment)
    assert {k: s.names for k, s in after.items()} == {k: s.names for k, s in before.items()}
    shutil.rmtree(flat_root / assignment["test"][0])
    with pytest.raises(DataError, match=f"class folder.* missing .* {assignment['test'][0]}"):
        load_image_folder(flat_root, FORMAT, cache_dir=tmp_path / "c", assignment=assignment)


def test_a_class_folder_copied_back_in_another_unicode_form_is_the_same_class(
        tmp_path: Path) -> None:
    """A run's classes are matched in composed form: "café" copied from macOS comes back
    decomposed (other bytes) and was "missing"; both forms side by side are one class twice."""
    import unicodedata

    root = tmp_path / "menu"
    composed, decomposed = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    for c, name in enumerate([composed, "tea", "soup", "bread"]):
        write_class(root / name, 2, value=40 * c)
    assignment = assign_classes(root, fractions=(0.5, 0.25, 0.25))
    before = load_image_folder(root, FORMAT, cache_dir=tmp_path / "c", assignment=assignment)
    (root / composed).rename(root / decomposed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastMAMLWarning)  # nothing left out, nothing missing
        warnings.simplefilter("ignore", BlankImagesWarning)  # (one grey per class)
        after = load_image_folder(root, FORMAT, cache_dir=tmp_path / "c", assignment=assignment)
    assert [[unicodedata.normalize("NFC", n) for n in split.names] for split in after.values()] \
        == [split.names for split in before.values()]
    write_class(root / composed, 2, value=5)
    twins = re.escape(f"{ascii(decomposed)} and {ascii(composed)}")  # (printed alike)
    with pytest.raises(DataError, match=f"the class folders {twins} of .*menu are one name in "
                                        r"two Unicode forms \(composed, and decomposed as macOS "
                                        r"writes it\): one class folder twice; merge or rename"):
        load_image_folder(root, FORMAT, cache_dir=tmp_path / "c", assignment=assignment)
    # a new run's assignment, made from this folder, holds both: the folder is said, not a record
    fresh = assign_classes(root, fractions=(0.5, 0.25, 0.25))
    with pytest.raises(DataError, match=f"the class folders {twins} of .*menu are one name"):
        load_image_folder(root, FORMAT, cache_dir=tmp_path / "c", assignment=fresh)
    (root / decomposed / "0.png").unlink()  # merged: a record of both (a run of before) is said
    (root / decomposed / "1.png").unlink()
    (root / decomposed).rmdir()
    both = {**assignment, "test": assignment["test"] + [decomposed]}
    with pytest.raises(DataError, match=f"split record .* names the class folders {twins}, one "
                                        "name in two Unicode forms"):
        load_image_folder(root, FORMAT, cache_dir=tmp_path / "c", assignment=both)
    explicit = tmp_path / "explicit"  # test/'s café copied back from macOS: train/'s class
    for split, name in (("train", composed), ("train", "tea"), ("test", decomposed)):
        write_class(explicit / split / name, 2, value=9)
    with pytest.raises(DataError, match="are one class .*caf.* in two splits"):
        assign_classes(explicit)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    write_class(tmp_path / "latin1" / "a", 2, value=3)
    write_class(tmp_path / "latin1" / "b", 2, value=4)
    first = tmp_path / "latin1" / "a" / "0.png"
    first.rename(first.with_name(os.fsdecode(b"\xe9.png")))  # e-acute in Latin-1, say from a zip
    splits = load_image_folder(tmp_path / "latin1", FORMAT, fractions=(1, 0, 0),
                               cache_dir=tmp_path / "c")
    assert [len(images) for images in splits["train"].images] == [2, 2]
