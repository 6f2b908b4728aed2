"""Image files to model inputs: one conversion shared by the training loaders and ``adapt``.

A data set's ``ImageFormat`` (PIL mode, square side, inversion) turns any file Pillow reads, or
any PIL image, into the uint8 pixels the data set is cached as (turned upright by its EXIF
orientation, 16-bit pixels scaled, not clipped, to 8 bits, and transparent pixels shown on
white: as a viewer shows the image); ``as_model_input`` scales them to the float tensor the
model sees (pixels / 255, channels first), exactly as the task sampler does, so that an image
given to a trained run matches its training images bit for bit.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor

from ..errors import DataError

POOL_MIN_IMAGES = 1000  # fewer images decode faster than worker processes start
MODES = {1: "L", 3: "RGB"}
# The version of what ``ImageFormat.convert`` makes of a file: every image cache keys on it.
CONVERSION = 3
NOT_PICTURES = {"EPS", "MPEG", "IPTC"}  # decoded only with Ghostscript, or identified, not read


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The file suffixes of the raster formats Pillow decodes (``.png``, ``.jpg``, ...), lower
    case: not those it only writes (``.pdf``) or only identifies (stub plugins: ``.h5``)."""
    Image.init()
    readable = {name for name, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    readable.add("MPO")  # multi-picture JPEGs: opened by the JPEG plugin
    return frozenset(suffix for suffix, name in Image.registered_extensions().items()
                     if name in readable - NOT_PICTURES)


def is_image_file(path: Path, named: bool = False) -> bool:
    """A file of an image format's suffix; a hidden one only where ``named`` (a file the user
    named, not one a folder's listing found)."""
    return (path.is_file() and (named or not path.name.startswith("."))
            and path.suffix.lower() in image_suffixes())


@dataclass(frozen=True)
class ImageFormat:
    """How an image becomes a data set's uint8 pixels: converted to PIL ``mode`` (``L`` or
    ``RGB``), resized to ``size`` x ``size`` with LANCZOS when it is another size, and with
    ``invert`` turned to 255 - pixel (Omniglot: strokes 255 on a 0 background)."""

    mode: str
    size: int
    invert: bool = False

    @property
    def channels(self) -> int:
        return len(self.mode)

    def convert(self, image: Image.Image) -> np.ndarray:
        """(size, size) for ``L``, (size, size, 3) for ``RGB``, uint8. A camera's photo taken
        sideways is stored unrotated, with an EXIF orientation tag: it is turned upright first."""
        if 0 in image.size:
            raise DataError(f"the image is empty ({image.size[0]}x{image.size[1]} pixels)")
        image = _on_white(_eight_bit(_upright(image))).convert(self.mode)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.uint8)
        return 255 - pixels if self.invert else pixels

    def read_or_why(self, source: Path | Image.Image, name: str = "") -> np.ndarray | str:
        """An image file (or an open image, ``name`` naming it), converted, or why it cannot
        be (``"NAME: why"``)."""
        read = self.read_sized_or_why(source, name)
        return read if isinstance(read, str) else read[0]

    def read_sized_or_why(self, source: Path | Image.Image, name: str = ""
                          ) -> tuple[np.ndarray, tuple[int, int]] | str:
        """``read_or_why``'s pixels with the image's own (width, height), from which they were
        resized (enlarged, where it is smaller in a side than ``size``)."""
        try:
            if isinstance(source, Image.Image):
                return self.convert(source), source.size
            with Image.open(source) as file:
                return self.convert(file), file.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            return f"{name or source}: {error}"


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation; as it is when its EXIF cannot be read (a
    malformed tag must not cost the picture)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow raises various errors on broken EXIF
        return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit pixels. Pillow's ``convert`` clips wider pixels at 255, so a 16-bit
    image (``I;16*``, or ``I`` holding 0..65535, as Pillow opens some 16-bit files) is scaled by
    255/65535 here (a transparent colour becomes an alpha channel); float (``F``) and wider
    integer pixels have no fixed range and are refused."""
    if image.mode == "F":
        raise DataError("a floating-point image (mode F) has no fixed pixel range: save it with "
                        "8- or 16-bit pixels")
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image).astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise DataError(f"an image of mode {image.mode} with pixels outside 0..65535 has no "
                        "fixed range: save it with 8- or 16-bit pixels")
    scaled = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return scaled
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (scaled, alpha))


def _on_white(image: Image.Image) -> Image.Image:
    """An image with transparency composited onto white, as a viewer shows it (``convert``
    would drop the alpha channel and keep whatever colour the transparent pixels hold)."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)


def fingerprint(root: Path, files: Sequence[Path], image_format: ImageFormat,
                listed_in: Path | None = None) -> str:
    """A short stable hash to name the cache of the pixels ``image_format`` makes of ``files``
    (this ``CONVERSION`` of it): of each file's path under ``root``, size and modification time,
    so that a file changed or replaced, or another data folder with the same file names, never
    reads pixels cached from other files (names that are not valid UTF-8 hash by their bytes on
    disk). Every file that cannot be read (missing) is named in one ``DataError``, with the
    file that lists them, ``listed_in`` (a CSV), where they come from one."""
    items, missing = [f"{image_format} conversion {CONVERSION}"], []
    for file in files:
        name = file.relative_to(root) if file.is_relative_to(root) else file  # (an absolute one)
        try:
            stat = file.stat()
        except OSError as error:
            missing.append(f"{name}: {error.strerror or error}")
        else:
            items.append(f"{name}|{stat.st_size}|{stat.st_mtime_ns}")
    if missing and listed_in is None:
        raise unreadable_error(missing, len(files))
    if missing:
        raise unreadable_error(missing, len(files), listed_remedy(listed_in),
                               where=f"listed in {listed_in}")
    return hashlib.sha1("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()[:12]


SHOWN_UNREAD = 10  # unreadable files named in the error; the rest counted
# what to do about unreadable files that a folder's listing found ("{it}": "it" or "them")
REPLACE_OR_DELETE = "replace or delete {it}"


def listed_remedy(listed_in: Path) -> str:
    """What to do about unreadable files that ``listed_in`` (a CSV) lists: deleted, they would
    be missing from it."""
    return f"restore {{it}}, or remove {{it}} from {listed_in.name}"


def unreadable_error(unread: Sequence[str], total: int, remedy: str = "",
                     where: str = "") -> DataError:
    """One error for the ``unread`` (``"NAME: why"``) of ``total`` images ``where`` they are
    (e.g. "listed in <CSV>"): how many, the first ``SHOWN_UNREAD`` named, and ``remedy``, whose
    "{it}" becomes "it" or "them"."""
    shown = "; ".join(unread[:SHOWN_UNREAD]) + (
        f"; and {len(unread) - SHOWN_UNREAD} more" if len(unread) > SHOWN_UNREAD else "")
    remedy = remedy.replace("{it}", "it" if len(unread) == 1 else "them")
    return DataError(f"cannot read {len(unread)} of {total} images{' ' + where if where else ''}"
                     f"{f' ({remedy})' if remedy else ''}: {shown}")


def read_images(paths: Sequence[Path], image_format: ImageFormat, workers: int | None = None,
                remedy: str = REPLACE_OR_DELETE,
                upscaled: Callable[[tuple[int, int]], None] | None = None) -> np.ndarray:
    """All ``paths`` decoded by ``image_format`` into one array, a process per CPU core; every
    unreadable file is named in one ``DataError`` with ``remedy`` (``stack_decoded``). Where
    an image is smaller in a side than the format's size (enlarged to it), ``upscaled`` gets
    the smallest (width, height): a data set of a standard size warns of it."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
        read = [image_format.read_sized_or_why(p) for p in paths]
    else:
        with Pool(workers) as pool:
            read = pool.map(image_format.read_sized_or_why, paths, chunksize=256)
    pixels = stack_decoded([item if isinstance(item, str) else item[0] for item in read], remedy)
    smallest = min((item[1] for item in read), key=min, default=None)  # (no str: raised above)
    if upscaled is not None and smallest is not None and min(smallest) < image_format.size:
        upscaled(smallest)
    return pixels


def stack_decoded(decoded: Sequence[np.ndarray | str], remedy: str = REPLACE_OR_DELETE
                  ) -> np.ndarray:
    """Decoded images (``ImageFormat.read_or_why``) as one array; a ``DataError`` that names
    every file that could not be read (a scraped folder's broken files, all at once) and
    ``remedy`` for them (``unreadable_error``)."""
    unread = [item for item in decoded if isinstance(item, str)]
    if len(unread) == 1 and len(decoded) == 1:
        raise DataError(f"cannot read image {unread[0]}")
    if unread:
        raise unreadable_error(unread, len(decoded), remedy)
    return np.stack(decoded)


def channels_first(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 pixels as (N, C, H, W)."""
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def as_model_input(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, C, H, W) pixels as the float32 input the sampler gives the model: / 255."""
    return torch.as_tensor(pixels).float().div_(255)
