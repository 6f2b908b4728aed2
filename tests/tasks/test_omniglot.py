from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from fastmaml import ConfigError, DataError
from fastmaml.tasks import omniglot
from fastmaml.tasks.fewshot import FewShotSampler
from fastmaml.tasks.omniglot import (LAKE_VAL_CHARACTERS, OMNIGLOT_MD5, download_omniglot,
                                     load_omniglot, load_omniglot_alphabets, load_omniglot_images,
                                     omniglot_alphabets, omniglot_characters, split_characters)

FAKE = {"images_background": ["Beta", "Alpha"], "images_evaluation": ["Gamma"]}


def write_fake_omniglot(root: Path, characters: int = 2) -> None:
    """The official layout with random 1-bit 105x105 drawings (black strokes on white)."""
    rng = np.random.default_rng(0)
    for folder, alphabets in FAKE.items():
        for alphabet in alphabets:
            for c in range(1, characters + 1):
                character = root / folder / alphabet / f"character{c:02d}"
                character.mkdir(parents=True)
                for i in range(1, 21):
                    strokes = rng.random((105, 105)) < 0.1
                    Image.fromarray(~strokes).convert("1").save(character / f"0001_{i:02d}.png")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    write_fake_omniglot(root)
    return root


def test_characters_in_order(fake_root: Path) -> None:
    names = [str(p.relative_to(fake_root)) for p in omniglot_characters(fake_root)]
    assert names == [f"{folder}/{alphabet}/character{c:02d}" for folder in FAKE
                     for alphabet in sorted(FAKE[folder]) for c in (1, 2)]


def test_preprocessing_lanczos_28_inverted(fake_root: Path, tmp_path: Path) -> None:
    images = load_omniglot_images(fake_root, cache_dir=tmp_path)
    assert images.shape == (6, 20, 1, 28, 28) and images.dtype == torch.uint8
    png = omniglot_characters(fake_root)[3] / "0001_05.png"
    with Image.open(png) as image:
        expected = 255 - np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    assert np.array_equal(images[3, 4, 0].numpy(), expected)
    assert [p.name for p in tmp_path.iterdir()][0].startswith("omniglot-28-")


def test_second_load_reads_the_cache(fake_root: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_omniglot_images(fake_root, cache_dir=tmp_path)

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded the PNGs again")

    monkeypatch.setattr(omniglot, "read_images", no_decoding)
    assert torch.equal(load_omniglot_images(fake_root, cache_dir=tmp_path), first)


def test_the_cache_is_not_shared_by_other_images_of_the_same_names(fake_root: Path,
                                                                  tmp_path: Path) -> None:
    first = load_omniglot_images(fake_root, cache_dir=tmp_path / "cache")
    blank = tmp_path / "blank"
    for png in sorted(fake_root.rglob("*.png")):  # the same names, all white (no strokes)
        (blank / png.relative_to(fake_root)).parent.mkdir(parents=True, exist_ok=True)
        Image.new("1", (105, 105), 1).save(blank / png.relative_to(fake_root))
    blank_images = load_omniglot_images(blank, cache_dir=tmp_path / "cache")
    assert (blank_images == 0).all() and first.any()  # inverted: white paper is 0
    assert len(list((tmp_path / "cache").glob("omniglot-28-*.npy"))) == 2


def test_default_cache_from_env_and_never_in_the_root(fake_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    load_omniglot_images(fake_root)
    assert len(list((tmp_path / "cache").glob("omniglot-28-*.npy"))) == 1
    with pytest.raises(ConfigError, match="inside the data root"):
        load_omniglot_images(fake_root, cache_dir=fake_root / "cache")
    assert not list(fake_root.glob("*.npy")) and not (fake_root / "cache").exists()


def test_missing_folder_says_what_and_how(tmp_path: Path) -> None:
    (tmp_path / "images_background").mkdir()
    with pytest.raises(DataError) as info:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "images_evaluation" in message and "characterNN" in message
    assert "download=true to fastmaml train" in message and "download=True" in message
    assert ("--data-root DIR (fastmaml train and eval; data_root=DIR in fastmaml.meta_train) or "
            "$FASTMAML_OMNIGLOT" in message)
    assert "call fastmaml.tasks.omniglot.load_omniglot(root, download=True)" in message


def test_a_root_given_as_one_of_the_two_folders_names_the_folder_above(fake_root: Path,
                                                                      tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the Omniglot data root .*images_background is one of its "
                       f"two folders: .*--data-root {re.escape(str(fake_root))}$"):
        load_omniglot(fake_root / "images_background", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "moved"])
def test_damaged_data_names_the_file(fake_root: Path, tmp_path: Path, damage: str) -> None:
    """A moved image (21 in one character, 19 in another: all still a multiple of 20) would
    shift every later character's images by one, unsaid. The remedy is never to delete an
    image: every character has 20."""
    root = tmp_path / "root"
    shutil.copytree(fake_root, root)
    png = root / "images_evaluation" / "Gamma" / "character02" / "0001_07.png"
    data = png.read_bytes()
    if damage == "missing":
        png.unlink()
    elif damage == "moved":
        png.rename(root / "images_evaluation" / "Gamma" / "character01" / "0002_07.png")
    else:
        png.write_bytes(b"garbage" if damage == "garbage" else data[: len(data) // 2])
    restore = (r"restore the character from the official images_evaluation\.zip, or remove "
               rf"{re.escape(str(root / 'images_evaluation'))}, and download=true fetches it "
               "again$")
    said = {"missing": rf"character02 has 19 PNG images; every Omniglot character has 20: "
                       f"{restore}",
            "moved": rf"character01 has 21 PNG images; every Omniglot character has 20: "
                     f"{restore}"}
    unread = (r"cannot read 1 of 120 images \(restore it from the official zip, or remove the "
              r"images_background/ or images_evaluation/ folder that holds it, and download=true "
              r"fetches it again\): .*0001_07\.png: ")
    with pytest.raises(DataError, match=said.get(damage, unread)):
        load_omniglot_images(root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("below", ["omniglot", "omniglot-py"])  # (torchvision's folder)
def test_a_data_root_one_level_too_high_names_the_folder_below(fake_root: Path, tmp_path: Path,
                                                              below: str) -> None:
    (tmp_path / "data" / "other").mkdir(parents=True)
    (tmp_path / "data" / below).mkdir()
    (tmp_path / "data" / below / "images_background").symlink_to(fake_root / "images_background")
    with pytest.raises(DataError, match=r"missing images_background, images_evaluation \(it is "
                       rf"one level down: give the data folder as "
                       rf"{re.escape(str(tmp_path / 'data' / below))}\)\. Expected"):
        load_omniglot(tmp_path / "data", cache_dir=tmp_path / "cache")


def test_the_official_zips_unextracted_in_the_data_root_are_noticed(tmp_path: Path) -> None:
    (tmp_path / "images_background.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"missing images_background, images_evaluation \(found "
                                        r"images_background\.zip: extract it here\)"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"\(found images_background\.zip and "
                                        r"images_evaluation\.zip: extract them here\)"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_a_folder_extracted_into_a_folder_of_its_own_name_is_named(fake_root: Path,
                                                                  tmp_path: Path) -> None:
    """Else its alphabets would be read as characters, the first said to hold 0 PNG images."""
    root = tmp_path / "root"
    (root / "images_background").mkdir(parents=True)
    (root / "images_background" / "images_background").symlink_to(fake_root / "images_background")
    (root / "images_evaluation").symlink_to(fake_root / "images_evaluation")
    outer = re.escape(str(root / "images_background"))
    with pytest.raises(DataError, match=rf"{outer} holds another images_background/ \(the zip "
                       rf"extracted into a folder of its own name\): move the alphabets in "
                       rf"{outer}/images_background up into {outer}$"):
        load_omniglot_images(root, cache_dir=tmp_path / "cache")


def test_hidden_files_and_folders_of_a_copied_tree_are_not_characters(fake_root: Path,
                                                                        tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(fake_root, root)
    character = root / "images_background" / "Alpha" / "character01"
    (character / "._0001_01.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble
    (root / "images_background" / "Alpha" / ".ipynb_checkpoints").mkdir()
    (root / "images_evaluation" / "__MACOSX" / "Gamma").mkdir(parents=True)
    assert omniglot_characters(root) == [root / p.relative_to(fake_root)
                                         for p in omniglot_characters(fake_root)]
    images = load_omniglot_images(root, cache_dir=tmp_path / "cache")
    assert torch.equal(images, load_omniglot_images(fake_root, cache_dir=tmp_path / "cache"))


def test_split_sizes_disjoint_and_deterministic() -> None:
    official = split_characters(1623)
    assert [len(official[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert torch.equal(torch.cat(list(official.values())).sort().values, torch.arange(1623))
    vinyals = split_characters(1623, "vinyals")
    assert [len(vinyals[s]) for s in ("train", "val", "test")] == [1200, 0, 423]
    assert torch.equal(vinyals["test"], official["test"])
    assert torch.equal(vinyals["train"], torch.cat([official["train"], official["val"]]))
    assert torch.equal(split_characters(1623)["train"], official["train"])
    assert not torch.equal(split_characters(1623, seed=2)["train"], official["train"])
    # numpy's default_rng(1) permutation: fixed forever, so the split is too
    assert official["train"][:5].tolist() == np.random.default_rng(1).permutation(1623)[:5].tolist()


def test_split_errors() -> None:
    with pytest.raises(ConfigError, match="unknown Omniglot split"):
        split_characters(1623, "random")
    for found in (6, 1200):  # 1200: no meta-test character left (a truncated data root)
        with pytest.raises(DataError, match=f"more than 1200 characters, found {found}"):
            split_characters(found)
    assert len(split_characters(1201)["test"]) == 1


def zip_fake_omniglot(fake_root: Path, served: Path) -> dict[str, str]:
    md5 = {}
    for folder in OMNIGLOT_MD5:
        archive = shutil.make_archive(str(served / folder), "zip", fake_root, folder)
        md5[folder] = hashlib.md5(Path(archive).read_bytes()).hexdigest()
    return md5


def test_download_over_loopback(fake_root: Path, http_folder: tuple[Path, str],
                                tmp_path: Path) -> None:
    served, url = http_folder
    md5 = zip_fake_omniglot(fake_root, served)
    root = tmp_path / "downloaded"
    download_omniglot(root, base_url=url, md5=md5)
    assert sorted(p.name for p in root.iterdir()) == sorted(OMNIGLOT_MD5)
    assert torch.equal(load_omniglot_images(root, cache_dir=tmp_path / "a"),
                       load_omniglot_images(fake_root, cache_dir=tmp_path / "b"))


def test_download_from_a_mirror_named_in_the_environment(
        fake_root: Path, http_folder: tuple[Path, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    served, url = http_folder
    (served / "mirror").mkdir()
    md5 = zip_fake_omniglot(fake_root, served / "mirror")
    for mirror, root in ((f"{url}/mirror/", "over_http"), (str(served / "mirror"), "a_folder")):
        monkeypatch.setenv("FASTMAML_OMNIGLOT_URL", mirror)
        download_omniglot(tmp_path / root, md5=md5)
        assert sorted(p.name for p in (tmp_path / root).iterdir()) == sorted(OMNIGLOT_MD5)


def test_download_bad_md5_leaves_no_partial_folder(fake_root: Path, http_folder: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    served, url = http_folder
    md5 = zip_fake_omniglot(fake_root, served)
    root = tmp_path / "downloaded"
    with pytest.raises(DataError) as info:
        download_omniglot(root, base_url=url)  # the official checksums do not match the fakes
    message = str(info.value)
    assert "images_background.zip" in message and OMNIGLOT_MD5["images_background"] in message
    assert md5["images_background"] in message
    assert list(root.iterdir()) == []


def test_a_data_root_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(DataError, match="data root .*notes.txt is a file: name the folder"):
        load_omniglot(tmp_path / "notes.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="data root .*notes.txt is a file: name a folder to "
                                        "download images_background into"):
        load_omniglot(tmp_path / "notes.txt", download=True, cache_dir=tmp_path / "cache")


# ----- the real data set (skipped when absent, failing under FASTMAML_REQUIRE_DATA=1) -----

@pytest.fixture(scope="module")
def real_splits(omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[dict[str, Tensor], Path]:
    cache = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    splits = load_omniglot(omniglot_root, cache_dir=cache)
    print(f"full Omniglot cache built in {time.perf_counter() - start:.1f} s")
    return splits, cache


def test_real_splits(real_splits: tuple[dict[str, Tensor], Path]) -> None:
    splits, _ = real_splits
    assert {name: tuple(t.shape) for name, t in splits.items()} == {
        "train": (1100, 20, 1, 28, 28), "val": (100, 20, 1, 28, 28), "test": (423, 20, 1, 28, 28)}
    images = torch.cat(list(splits.values())).float() / 255
    assert images.min() == 0.0 and images.max() == 1.0
    assert 0.03 < images.mean() < 0.2  # mostly background (0), strokes (1) are the minority
    assert (images[:, :, :, 0, :] < 0.5).float().mean() > 0.95  # the border is background


def test_real_cached_load_decodes_no_image(real_splits: tuple[dict[str, Tensor], Path],
                                           omniglot_root: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    splits, cache = real_splits

    def decode(*args: object) -> None:
        raise AssertionError("the cached load decoded the PNGs again")
    monkeypatch.setattr(omniglot, "read_images", decode)
    # download=True finds both folders present: no network, no write to the data root
    again = load_omniglot(omniglot_root, "vinyals", download=True, cache_dir=cache)
    assert torch.equal(again["test"], splits["test"]) and len(again["train"]) == 1200


def test_real_sampler(real_splits: tuple[dict[str, Tensor], Path]) -> None:
    sampler = FewShotSampler(real_splits[0]["train"], n_way=20, k_shot=1, k_query=5, rotate=True)
    batch = sampler.sample(16, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (16, 20, 1, 28, 28)
    assert batch.query_x.shape == (16, 100, 1, 28, 28)
    assert batch.support_y.max() == 19 and batch.query_x.max() == 1.0


def test_alphabets_of_the_characters(fake_root: Path) -> None:
    alphabets, background = omniglot_alphabets(omniglot_characters(fake_root))
    # background Alpha, Beta (sorted), then evaluation Gamma; two characters each
    assert alphabets.tolist() == [0, 0, 1, 1, 2, 2] and background == 2
    with pytest.raises(ConfigError, match="needs the alphabet"):
        split_characters(6, "lake")
    with pytest.raises(DataError, match="lake split needs"):  # too small to hold out 100
        split_characters(6, "lake", alphabets=(alphabets, background))


@pytest.mark.parametrize("split", ["official", "lake"])
def test_a_split_of_an_incomplete_data_set_is_refused(omniglot_root: Path, tmp_path: Path,
                                                      split: str) -> None:
    """An alphabet missing reshuffles every character (without Armenian, 241 of the 382
    meta-test characters were meta-train ones of the complete set, so a run trained on it was
    tested on characters it had trained on)."""
    root = tmp_path / "omniglot"
    for folder in ("images_background", "images_evaluation"):
        (root / folder).mkdir(parents=True)
        for alphabet in sorted((omniglot_root / folder).iterdir())[folder == "images_background":]:
            (root / folder / alphabet.name).symlink_to(alphabet)
    with pytest.raises(DataError, match=f"{root} holds 944 background and 659 evaluation "
                       f"characters, not Omniglot's 964 and 659: the {split} split is drawn"):
        load_omniglot_alphabets(root, split)


def test_real_lake_split(omniglot_root: Path) -> None:
    characters = omniglot_characters(omniglot_root)
    alphabets, background = omniglot_alphabets(characters)
    splits = split_characters(len(characters), "lake", alphabets=(alphabets, background))
    sizes = {name: len(index) for name, index in splits.items()}
    assert sizes["test"] == 659 and sizes["train"] + sizes["val"] == 964  # Lake et al.'s sets
    assert sizes["val"] >= LAKE_VAL_CHARACTERS
    assert all(characters[i].parts[-3] == "images_evaluation" for i in splits["test"])
    train_alphabets = set(alphabets[splits["train"]].tolist())
    val_alphabets = set(alphabets[splits["val"]].tolist())
    assert not train_alphabets & val_alphabets  # meta-val holds whole, unseen alphabets
    assert len(train_alphabets | val_alphabets) == 30
    assert torch.equal(load_omniglot_alphabets(omniglot_root, "lake")["test"],
                       alphabets[splits["test"]])


def test_real_within_alphabet_20_way_tasks(real_splits: tuple[dict[str, Tensor], Path],
                                           omniglot_root: Path) -> None:
    groups = load_omniglot_alphabets(omniglot_root)["test"]
    sampler = FewShotSampler(real_splits[0]["test"], 20, 1, 1, groups=groups, within_group=True)
    draws = sampler._draw(50, torch.Generator().manual_seed(0))
    task_groups = groups[draws.classes]
    assert (task_groups == task_groups[:, :1]).all()
