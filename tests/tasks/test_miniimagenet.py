from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml import ConfigError, DataError
from fastmaml.errors import FastMAMLWarning
from fastmaml.tasks import miniimagenet
from fastmaml.tasks.fewshot import FewShotSampler
from fastmaml.tasks.miniimagenet import load_miniimagenet, read_pickle_cache

CLASSES, PER_CLASS = 5, 20


def pickle_cache(seed: int = 0) -> dict[str, Any]:
    """The structure of ``mini-imagenet-cache-*.pkl``: 5 classes x 20 images, interleaved."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (CLASSES * PER_CLASS, 84, 84, 3), dtype=np.uint8)
    names = [f"n0{9 - c}000000" for c in range(CLASSES)]  # not in sorted order
    return {"image_data": images,
            "class_dict": {name: list(range(c, CLASSES * PER_CLASS, CLASSES))
                           for c, name in enumerate(names)}}


def write_pickle(path: Path, data: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol, name", [(2, "val"), (4, "val"), (5, "val"),
                                            (4, "validation")])  # (learn2learn's release)
def test_pickle_cache(tmp_path: Path, protocol: int, name: str) -> None:
    data = pickle_cache()
    write_pickle(tmp_path / f"mini-imagenet-cache-{name}.pkl", data, protocol)
    images = load_miniimagenet(tmp_path, ["val"])["val"].images
    assert images.shape == (CLASSES, PER_CLASS, 3, 84, 84) and images.dtype == torch.uint8
    first = sorted(data["class_dict"])[0]
    expected = data["image_data"][data["class_dict"][first]].transpose(0, 3, 1, 2)
    assert np.array_equal(images[0].numpy(), expected)
    assert images.is_contiguous()


def test_numpy1_module_paths_are_accepted(tmp_path: Path) -> None:
    raw = pickle.dumps(pickle_cache(), protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in raw
    (tmp_path / "old.pkl").write_bytes(raw)
    assert read_pickle_cache(tmp_path / "old.pkl").images.shape == (CLASSES, PER_CLASS, 3, 84, 84)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickle_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = {**pickle_cache(), "extra": _Exploit(marker)}
    write_pickle(tmp_path / "evil.pkl", data)
    with pytest.raises(DataError, match="refusing to unpickle posix.mkdir"):
        read_pickle_cache(tmp_path / "evil.pkl")
    assert not marker.exists()


def _bad(change: str) -> object:
    data = pickle_cache()
    if change == "dtype":
        data["image_data"] = data["image_data"].astype(np.float32)
    elif change == "shape":  # grey
        data["image_data"] = data["image_data"][..., :1]
    elif change == "key":
        del data["class_dict"]
    elif change == "index":
        data["class_dict"]["n09000000"][0] = CLASSES * PER_CLASS
    elif change in ("repeated", "shared"):  # an image twice in a class, or in two classes
        other = "n09000000" if change == "repeated" else "n08000000"  # (images 0,5,.. / 1,6,..)
        data["class_dict"]["n09000000"][1] = data["class_dict"][other][0]
    elif change == "not a dict":
        return [data]
    elif change == "labels":  # class_dict keyed by label numbers
        data["class_dict"] = dict(enumerate(data["class_dict"].values()))
    return data


@pytest.mark.parametrize("change, words", [
    ("dtype", r"uint8 array of \(N, H, W, 3\) RGB images .*got float32"), ("shape", "got uint8"),
    ("labels", r"class_dict's keys must be class names \(strings\), got 0 \(int\)"),
    ("key", "'image_data' and 'class_dict'"), ("index", "n09000000"),
    ("not a dict", "must hold a dict"),
    ("repeated", r"image 0 is listed twice in class_dict \(under 'n09000000' and 'n09000000'\)"),
    ("shared", r"image 1 is listed twice in class_dict \(under 'n09000000' and 'n08000000'\)"),
])
def test_pickle_validation(tmp_path: Path, change: str, words: str) -> None:
    path = write_pickle(tmp_path / "bad.pkl", _bad(change))
    with pytest.raises(DataError, match=words):
        read_pickle_cache(path)


class Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's ``str`` (STRING / BINSTRING), as Python 2 tools
    wrote these caches (with numpy 1's module paths)."""

    def save_as_python2_str(self, value: str | bytes) -> None:
        data = value.encode("ascii") if isinstance(value, str) else value
        if self.proto == 0:
            self.write(pickle.STRING + repr(data)[1:].encode("ascii") + b"\n")
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(value)

    dispatch = {**pickle._Pickler.dispatch, str: save_as_python2_str, bytes: save_as_python2_str}


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_pickle_written_by_python2_reads_as_written_by_python3(tmp_path: Path,
                                                                 protocol: int) -> None:
    data = pickle_cache()
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=protocol).dump(data)
    raw = buffer.getvalue().replace(b"numpy._core", b"numpy.core")
    assert b"\x00\x00\x00" in raw or protocol == 0  # (pixels as a BINSTRING)
    (tmp_path / "py2.pkl").write_bytes(raw)
    read = read_pickle_cache(tmp_path / "py2.pkl")
    expected = read_pickle_cache(write_pickle(tmp_path / "py3.pkl", data))
    assert read.names == expected.names and torch.equal(read.images, expected.images)


def test_a_pickle_of_unequal_classes_ranges_and_another_size(tmp_path: Path) -> None:
    """Classes of different sizes come per class; ``range`` indices and 64x48 pixels (resized
    to 84x84 as an image file would be, and said: they were upscaled unsaid) load."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (7, 48, 64, 3), dtype=np.uint8)
    with pytest.warns(FastMAMLWarning, match=r"small.pkl holds 64x48 images, smaller in a side "
                                             r"than MiniImagenet's 84x84: they are upscaled"):
        read = read_pickle_cache(write_pickle(tmp_path / "small.pkl", {
            "image_data": images, "class_dict": {"b": range(0, 4), "a": [6, 5, 4]}}))
    assert read.names == ["a", "b"] and [tuple(c.shape) for c in read.images] == [
        (3, 3, 84, 84), (4, 3, 84, 84)]
    resized = np.asarray(Image.fromarray(images[6]).resize((84, 84), Image.Resampling.LANCZOS))
    assert np.array_equal(read.images[0][0].numpy(), resized.transpose(2, 0, 1))
    batch = FewShotSampler(read.images, n_way=2, k_shot=1, k_query=2).sample(3)
    assert batch.support_x.shape == (3, 2, 3, 84, 84)


@pytest.mark.parametrize("length", [2**63 + 5, 2**50])
def test_a_pickle_whose_frame_length_is_corrupt_is_a_data_error(tmp_path: Path,
                                                                length: int) -> None:
    raw = bytearray(pickle.dumps(pickle_cache(), protocol=4))
    assert raw[2] == pickle.FRAME[0]
    raw[3:11] = length.to_bytes(8, "little")
    (tmp_path / "bad.pkl").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad.pkl is not a readable MiniImagenet pickle"):
        read_pickle_cache(tmp_path / "bad.pkl")


def test_a_split_file_copied_over_another_is_refused(tmp_path: Path) -> None:
    for split in ("train", "test"):
        write_pickle(tmp_path / f"mini-imagenet-cache-{split}.pkl", pickle_cache())
    with pytest.raises(DataError, match=r"the train and test splits share 5 class\(es\) "
                                        r"\(n05000000, n06000000"):
        load_miniimagenet(tmp_path, ["train", "test"])


def test_a_class_in_train_and_test_with_val_between_is_refused() -> None:
    """Every split is compared with all before it, not only the one just before."""
    with pytest.raises(DataError, match=r"the train and test splits share 1 class\(es\) \(a\)"):
        miniimagenet.check_disjoint(Path("mini"), {"train": ["a", "b"], "val": ["c"],
                                                   "test": ["a"]})


def test_a_split_not_found_says_where_it_may_be(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split not found in .*absent \(no such folder\): "
                       r"expected mini-imagenet-cache-val.pkl or "
                       r"mini-imagenet-cache-validation.pkl \(a pickled dict"):
        load_miniimagenet(tmp_path / "absent", ["val"])
    pickled = write_pickle(tmp_path / "mini-imagenet-cache-val.pkl", pickle_cache())
    with pytest.raises(DataError, match=r"split not found in .*val.pkl \(a file\): "):
        load_miniimagenet(pickled, ["val"])  # the file, not its folder
    pickled.unlink()
    (tmp_path / "mini").mkdir()
    write_pickle(tmp_path / "mini" / "mini-imagenet-cache-val.pkl", pickle_cache())
    with pytest.raises(DataError, match=rf"\(it is one level down: give the data folder as "
                                        rf"{tmp_path / 'mini'}\)"):
        load_miniimagenet(tmp_path, ["val"])
    (tmp_path / "inside" / "images").mkdir(parents=True)
    (tmp_path / "inside" / "images" / "val.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match=r"\(images/val.csv: the CSVs go beside images/"):
        load_miniimagenet(tmp_path / "inside", ["val"])
    (tmp_path / "spelt" / "Validation" / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match=r"\(found Validation/: name it val/\)"):
        load_miniimagenet(tmp_path / "spelt", ["val"])


def test_truncated_pickle(tmp_path: Path) -> None:
    raw = pickle.dumps(pickle_cache())
    (tmp_path / "cut.pkl").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.pkl"):
        read_pickle_cache(tmp_path / "cut.pkl")


def write_image_folder(root: Path) -> dict[str, np.ndarray]:
    """images/ + train/val/test CSVs in the Ravi & Larochelle format; returns the pixels."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    pixels = {}
    classes = {"train": ["n03", "n01", "n02"], "val": ["n04"], "test": ["n05"]}
    for split, labels in classes.items():
        rows = ["filename,label"]
        for i in range(PER_CLASS):
            for label in labels:  # interleaved classes, as any CSV may list them
                name = f"{label}{i:08d}.jpg"
                size = (100, 90) if (label, i) == ("n01", 3) else (84, 84)
                image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
                image.save(root / "images" / name)
                pixels[name] = np.asarray(Image.open(root / "images" / name).convert("RGB")
                                          .resize((84, 84), Image.Resampling.LANCZOS))
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return pixels


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("miniimagenet")
    return root, write_image_folder(root)


def test_image_folder(image_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, pixels = image_folder
    splits = load_miniimagenet(root, cache_dir=tmp_path)
    assert {s: tuple(part.images.shape) for s, part in splits.items()} == {
        "train": (3, PER_CLASS, 3, 84, 84), "val": (1, PER_CLASS, 3, 84, 84),
        "test": (1, PER_CLASS, 3, 84, 84)}
    # classes sorted by label, images in CSV order; n01 image 3 was 100x90 and got resized
    assert splits["train"].names == ["n01", "n02", "n03"]
    train = splits["train"].images.numpy()
    assert np.array_equal(train[0, 3], pixels["n0100000003.jpg"].transpose(2, 0, 1))
    assert np.array_equal(train[2, 19], pixels["n0300000019.jpg"].transpose(2, 0, 1))
    assert len(list(tmp_path.glob("miniimagenet-*.npy"))) == 3


def test_image_folder_second_load_reads_the_cache(image_folder: tuple[Path, dict[str, np.ndarray]],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = image_folder
    first = load_miniimagenet(root, ["val"], cache_dir=tmp_path)["val"].images

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded the images again")

    monkeypatch.setattr(miniimagenet, "read_images", no_decoding)
    assert torch.equal(load_miniimagenet(root, ["val"], cache_dir=tmp_path)["val"].images, first)


def test_the_cache_is_not_shared_by_other_images_of_the_same_names(
        image_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """Another folder with the same CSVs (or the same one with an image replaced) is decoded
    again, never served the pixels cached from the first."""
    root, pixels = image_folder
    first = load_miniimagenet(root, ["val"], cache_dir=tmp_path / "cache")["val"].images
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "val.csv").write_bytes((root / "val.csv").read_bytes())
    for name in pixels:
        if name.startswith("n04"):
            Image.new("RGB", (84, 84), (128, 128, 128)).save(other / "images" / name)
    grey = load_miniimagenet(other, ["val"], cache_dir=tmp_path / "cache")["val"].images
    assert (grey == 128).all() and not torch.equal(grey, first)
    Image.new("RGB", (84, 84), (7, 7, 7)).save(other / "images" / "n0400000005.png", "PNG")
    (other / "images" / "n0400000005.png").replace(other / "images" / "n0400000005.jpg")
    replaced = load_miniimagenet(other, ["val"], cache_dir=tmp_path / "cache")["val"].images
    assert (replaced[0, 5] == 7).all() and (replaced[0, 4] == 128).all()
    (other / "images" / "n0400000006.jpg").unlink()
    with pytest.raises(DataError, match=r"cannot read 1 of 20 images listed in .*val\.csv "
                                        r".*images/n0400000006\.jpg"):
        load_miniimagenet(other, ["val"], cache_dir=tmp_path / "cache")


def link_val_split(root: Path, copy: Path, leave_out: tuple[str, ...] = ()) -> None:
    """``root``'s val.csv and its images, linked into ``copy``, but those of ``leave_out``."""
    (copy / "images").mkdir(parents=True)
    (copy / "val.csv").write_bytes((root / "val.csv").read_bytes())
    for line in (root / "val.csv").read_text().splitlines()[1:]:
        name = line.split(",")[0]
        if name not in leave_out:
            os.link(root / "images" / name, copy / "images" / name)


def test_missing_images_are_named_at_once_with_the_csv_that_lists_them(
        image_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = image_folder
    missing = ("n0400000002.jpg", "n0400000005.jpg", "n0400000011.jpg")
    link_val_split(root, tmp_path / "copy", leave_out=missing)
    shown = "; ".join(rf"images/{re.escape(name)}: No such file or directory" for name in missing)
    with pytest.raises(DataError, match=rf"cannot read 3 of {PER_CLASS} images listed in "
                       rf"{re.escape(str(tmp_path / 'copy' / 'val.csv'))} \(restore them, or "
                       rf"remove them from val\.csv\): {shown}$"):
        load_miniimagenet(tmp_path / "copy", ["val"], cache_dir=tmp_path / "cache")


def test_an_unreadable_image_of_a_csv_is_not_to_be_deleted(
        image_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """Deleting an image the CSV lists makes it missing: the remedy says to restore it or
    remove it from the CSV."""
    root, _ = image_folder
    link_val_split(root, tmp_path / "copy", leave_out=("n0400000004.jpg",))
    (tmp_path / "copy" / "images" / "n0400000004.jpg").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=rf"cannot read 1 of {PER_CLASS} images \(restore it, or "
                                        r"remove it from val\.csv\): .*n0400000004\.jpg: "):
        load_miniimagenet(tmp_path / "copy", ["val"], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("layout", ["csv", "class folders"])
def test_small_image_files_are_said_to_be_upscaled_once_per_split(tmp_path: Path,
                                                                  layout: str) -> None:
    """As a pickle of small images is: a split of them is MiniImagenet at a lower resolution,
    whose accuracies are not the paper's (said when decoded, not on loads from the cache)."""
    root = tmp_path / "small"
    sizes = {"train": {"n01": [(32, 48), (84, 84)], "n02": [(90, 40), (60, 50)]},
             "val": {"n03": [(84, 84), (100, 90)]}}
    for split, classes in sizes.items():
        rows = ["filename,label"]
        for label, shapes in classes.items():
            for i, size in enumerate(shapes):
                folder = root / "images" if layout == "csv" else root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", size, (i, 50, 90)).save(folder / f"{label}_{i}.jpg")
                rows.append(f"{label}_{i}.jpg,{label}")
        if layout == "csv":
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    source = f"{root / 'train.csv'} lists" if layout == "csv" else f"{root / 'train'} holds"
    with pytest.warns(FastMAMLWarning) as said:
        splits = load_miniimagenet(root, ["train", "val"], cache_dir=tmp_path / "cache")
    assert [str(w.message) for w in said] == [
        f"{source} 32x48 images, smaller in a side than MiniImagenet's 84x84: they are upscaled "
        "to it, and accuracies are those of the smaller copy, not comparable with the paper's"]
    assert splits["train"].images.shape == (2, 2, 3, 84, 84)


def test_a_csv_may_name_its_images_by_absolute_path(
        image_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = image_folder
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "images").mkdir(parents=True)
    rows = (root / "val.csv").read_text().splitlines()
    (elsewhere / "val.csv").write_text("\n".join(
        [rows[0]] + [f"{root / 'images' / row.split(',')[0]},{row.split(',')[1]}"
                     for row in rows[1:]]) + "\n")
    assert torch.equal(load_miniimagenet(elsewhere, ["val"], cache_dir=tmp_path / "c")["val"].images,
                       load_miniimagenet(root, ["val"], cache_dir=tmp_path / "c")["val"].images)


def test_image_folder_errors(image_folder: tuple[Path, dict[str, np.ndarray]],
                             tmp_path: Path) -> None:
    root, _ = image_folder
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    (copy / "val.csv").write_text("name,class\nx.jpg,n04\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        load_miniimagenet(copy, ["val"], cache_dir=tmp_path / "cache")
    (copy / "val.csv").write_bytes(b"filename,label\n\xe9t\xe9.jpg,n04\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match="cannot read .*val.csv: 'utf-8' codec can't decode"):
        load_miniimagenet(copy, ["val"], cache_dir=tmp_path / "cache")
    # (saved by a spreadsheet as "CSV UTF-8", with a byte order mark: the header still reads)
    (copy / "val.csv").write_text("filename,label\nabsent.jpg,n04\n", encoding="utf-8-sig")
    with pytest.raises(DataError, match="absent.jpg"):
        load_miniimagenet(copy, ["val"], cache_dir=tmp_path / "cache")
    (copy / "val.csv").write_text("filename,label\na.jpg,n04\nb.jpg,n04\na.jpg,n05\n")
    with pytest.raises(DataError, match="val.csv lists the image a.jpg more than once"):
        load_miniimagenet(copy, ["val"], cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="mini-imagenet-cache-test.pkl.*test.csv.*or a test/ "
                                        "folder of class folders"):
        load_miniimagenet(copy, ["test"])
    with pytest.raises(ConfigError, match="unknown MiniImagenet split 'validation'"):
        load_miniimagenet(root, ["validation"])


def test_split_folders_of_class_folders(image_folder: tuple[Path, dict[str, np.ndarray]],
                                        tmp_path: Path) -> None:
    """The same images as train/<class>/*, val/... (e.g. MAML++'s full-size release)."""
    root, pixels = image_folder
    folders = tmp_path / "folders"
    for split in ("train", "val", "test"):
        for line in (root / f"{split}.csv").read_text().splitlines()[1:]:
            name, label = line.split(",")
            (folders / split / label).mkdir(parents=True, exist_ok=True)
            os.link(root / "images" / name, folders / split / label / name)
    (folders / "train" / ".DS_Store").write_text("")  # not a class
    (folders / "train" / "n01" / "notes.txt").write_text("")  # not an image, named
    os.link(root / "images" / "n0100000000.jpg", folders / "train" / "stray.jpg")  # no class
    with pytest.warns(FastMAMLWarning) as said:
        splits = load_miniimagenet(folders, cache_dir=tmp_path / "cache")
    assert [str(w.message).split(": ")[-1] for w in said] == ["n01/notes.txt", "stray.jpg"]
    (folders / "train" / "n01" / "notes.txt").unlink()
    (folders / "train" / "stray.jpg").unlink()
    from_csv = load_miniimagenet(root, ["train"], cache_dir=tmp_path / "csv")["train"]
    assert splits["train"].names == from_csv.names
    assert torch.equal(splits["train"].images, from_csv.images)
    assert splits["test"].images.shape == (1, PER_CLASS, 3, 84, 84)
    # a class with fewer images (one unreadable, deleted as the error advises): per class
    (folders / "val" / "n04" / "n0400000000.jpg").unlink()
    (folders / "val" / "n05").mkdir()
    os.link(root / "images" / "n0500000000.jpg", folders / "val" / "n05" / "x.jpg")
    val = load_miniimagenet(folders, ["val"], cache_dir=tmp_path / "cache")["val"]
    assert val.names == ["n04", "n05"] and [len(c) for c in val.images] == [PER_CLASS - 1, 1]
    assert np.array_equal(val.images[1][0].numpy(), pixels["n0500000000.jpg"].transpose(2, 0, 1))
    with pytest.raises(DataError, match=r"the val and test splits share 1 class\(es\) \(n05\)"):
        load_miniimagenet(folders, cache_dir=tmp_path / "cache")  # n05 is a test class
    (folders / "val" / "n06").mkdir()
    with pytest.raises(DataError, match=r"val: class folder\(s\) n06 hold no images"):
        load_miniimagenet(folders, ["val"], cache_dir=tmp_path / "cache")
    (folders / "empty" / "test" / "n05").mkdir(parents=True)
    with pytest.raises(DataError, match="test holds no class folders of images"):
        load_miniimagenet(folders / "empty", ["test"], cache_dir=tmp_path / "cache")


def test_sampler_on_miniimagenet(tmp_path: Path) -> None:
    write_pickle(tmp_path / "mini-imagenet-cache-train.pkl", pickle_cache())
    images = load_miniimagenet(tmp_path, ["train"])["train"].images
    batch = FewShotSampler(images, n_way=5, k_shot=1, k_query=15).sample(4)
    assert batch.support_x.shape == (4, 5, 3, 84, 84) and batch.query_x.shape == (4, 75, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32
    assert batch.query_x.min() >= 0 and batch.query_x.max() <= 1
