from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml import DataError
from fastmaml.tasks import images as im
from fastmaml.tasks.images import ImageFormat, as_model_input, channels_first, read_images


def test_read_images_serial_and_parallel_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(im.POOL_MIN_IMAGES):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(paths[-1])
    serial = read_images(paths, ImageFormat("L", 3), workers=1)
    assert serial.shape == (len(paths), 3, 3) and serial.dtype == np.uint8
    assert np.array_equal(read_images(paths, ImageFormat("L", 3), workers=2), serial)


@pytest.mark.parametrize("content", [b"garbage", "truncated"])
def test_unreadable_image_names_the_file(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "broken.png"
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(DataError, match="broken.png"):
        read_images([path], ImageFormat("L", 28))


@pytest.mark.parametrize("workers", [1, 2])
def test_every_unreadable_image_is_named_at_once(tmp_path: Path, workers: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A scraped folder's broken files (an HTML page saved as .jpg, a cut download) are named
    in one error, not one per run; past ``SHOWN_UNREAD`` they are counted."""
    monkeypatch.setattr(im, "POOL_MIN_IMAGES", 2)
    monkeypatch.setattr(im, "SHOWN_UNREAD", 2)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("L", (6, 6), i).save(paths[-1], format="PNG")
    for i in (1, 3, 4):
        paths[i].write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"cannot read 3 of 6 images \(replace or delete them\): "
                                        r".*1\.jpg: .*; .*3\.jpg: .*; and 1 more$"):
        read_images(paths, ImageFormat("L", 4), workers=workers)
    with pytest.raises(DataError, match=r"cannot read 1 of 2 images \(replace or delete it\): "
                                        r".*4\.jpg: "):
        read_images(paths[4:], ImageFormat("L", 4), workers=workers)


def test_any_mode_and_size_is_converted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    gray = ImageFormat("L", 12, invert=True).convert(rgb)
    expected = 255 - np.asarray(rgb.convert("L").resize((12, 12), Image.Resampling.LANCZOS))
    assert gray.shape == (12, 12) and np.array_equal(gray, expected)
    color = ImageFormat("RGB", 8).convert(Image.fromarray(gray))  # gray to RGB: 3 equal planes
    assert color.shape == (8, 8, 3) and (color[..., 0] == color[..., 2]).all()
    pixels = channels_first(np.stack([color]))
    assert pixels.shape == (1, 3, 8, 8)
    assert torch.equal(as_model_input(pixels), torch.from_numpy(pixels).float() / 255)


def test_image_files_are_those_pillow_reads(tmp_path: Path) -> None:
    for name in ("a.png", "b.JPG", "c.txt", ".hidden.png", "d.tif", "notes.pdf", "data.h5",
                 "figure.eps", "clip.mpg"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in tmp_path.iterdir() if im.is_image_file(p)) == ["a.png", "b.JPG",
                                                                               "d.tif"]


def test_transparent_pixels_are_white_as_a_viewer_shows_them() -> None:
    rng = np.random.default_rng(2)
    color = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    alpha = np.where(rng.random((6, 6)) < 0.5, 0, 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([color, alpha]))
    opaque = np.asarray(Image.fromarray(color).convert("L"))
    gray = ImageFormat("L", 6).convert(rgba)
    assert np.array_equal(gray, np.where(alpha == 0, 255, opaque))
    strokes = Image.fromarray(np.zeros((6, 6, 2), dtype=np.uint8), "LA")  # all transparent
    assert (ImageFormat("RGB", 6).convert(strokes) == 255).all()


def test_16_bit_pixels_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode == "I;16"
    pixels = read_images([tmp_path / "deep.png"], ImageFormat("L", 5))[0][:1]
    assert pixels.tolist() == [[0, 1, 4, 128, 255]]
    assert ImageFormat("L", 5).convert(Image.fromarray(values.astype(np.int32))).tolist()[0] == \
        [0, 1, 4, 128, 255]
    Image.fromarray(values).save(tmp_path / "keyed.png", transparency=1000)  # a transparent colour
    keyed = read_images([tmp_path / "keyed.png"], ImageFormat("L", 5))[0]
    assert keyed[0].tolist() == [0, 1, 255, 128, 255]


@pytest.mark.parametrize("pixels", [np.full((4, 4), 0.5, np.float32),
                                    np.full((4, 4), 70000, np.int32)])
def test_pixels_without_a_fixed_range_are_refused_naming_the_file(tmp_path: Path,
                                                                 pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide.tif: .*no fixed .*range"):
        read_images([tmp_path / "wide.tif"], ImageFormat("L", 4))[0]


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path: Path) -> None:
    pixels = np.arange(6 * 4, dtype=np.uint8).reshape(4, 6) * 10  # 6 wide, 4 high: asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored turned 90 degrees counter-clockwise
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    upright = np.rot90(pixels, k=-1)  # what a viewer shows: turned back, clockwise
    expected = ImageFormat("L", 5).convert(Image.fromarray(np.ascontiguousarray(upright)))
    upright = read_images([tmp_path / "sideways.png"], ImageFormat("L", 5))[0]
    assert np.array_equal(upright, expected)
    with Image.open(tmp_path / "sideways.png") as opened:  # a PIL image given directly, too
        assert np.array_equal(ImageFormat("L", 5).convert(opened), expected)


def test_an_unreadable_exif_orientation_keeps_the_picture(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow raises on some malformed EXIF (e.g. a zero denominator): the image is kept as
    stored rather than lost."""
    pixels = np.arange(25, dtype=np.uint8).reshape(5, 5) * 10
    Image.fromarray(pixels).save(tmp_path / "odd.png")

    def broken(image: Image.Image) -> Image.Image:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(im.ImageOps, "exif_transpose", broken)
    assert np.array_equal(read_images([tmp_path / "odd.png"], ImageFormat("L", 5))[0], pixels)


def test_a_data_set_names_its_own_remedy_for_unreadable_images(tmp_path: Path) -> None:
    """Deleting a broken file is a dead end where a data set's files are fixed (Omniglot's 20
    per character, the images a CSV lists): its loader says what to do instead."""
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.new("L", (6, 6)).save(paths[0])
    paths[1].write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read 1 of 2 images \(restore it from the zip\): "
                                        r".*b\.png: "):
        read_images(paths, ImageFormat("L", 4), remedy="restore {it} from the zip")


def test_every_missing_image_a_csv_lists_is_named_at_once_with_the_csv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(im, "SHOWN_UNREAD", 2)
    (tmp_path / "images").mkdir()
    files = [tmp_path / "images" / f"{i}.jpg" for i in range(5)]
    for kept in (files[0], files[4]):
        Image.new("RGB", (6, 6)).save(kept)
    with pytest.raises(DataError, match=r"cannot read 3 of 5 images listed in .*train\.csv "
                                        r"\(restore them, or remove them from train\.csv\): "
                                        r"images/1\.jpg: No such file or directory; "
                                        r"images/2\.jpg: No such file or directory; and 1 more$"):
        im.fingerprint(tmp_path, files, ImageFormat("RGB", 4), listed_in=tmp_path / "train.csv")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_smallest_image_enlarged_is_reported(tmp_path: Path, workers: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set of a standard size warns of images upscaled to it (``upscaled``); images
    that are only shrunk are not reported."""
    monkeypatch.setattr(im, "POOL_MIN_IMAGES", 2)
    paths = []
    for i, size in enumerate([(40, 30), (24, 50), (50, 50)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", size).save(paths[-1])
    reported: list[tuple[int, int]] = []
    read_images(paths, ImageFormat("L", 32), workers=workers, upscaled=reported.append)
    read_images(paths[2:], ImageFormat("L", 32), workers=workers, upscaled=reported.append)
    assert reported == [(24, 50)]
