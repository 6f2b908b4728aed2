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
from collections.abc import Sequence
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
        try:
            if isinstance(source, Image.Image):
                return self.convert(source)
            with Image.open(source) as file:
                return self.convert(file)
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


def fingerprint(root: Path, files: Sequence[Path], image_format: ImageFormat) -> str:
    """A short stable hash to name the cache of the pixels ``image_format`` makes of ``files``
    (this ``CONVERSION`` of it): of each file's path under ``root``, size and modification time,
    so that a file changed or replaced, or another data folder with the same file names, never
    reads pixels cached from other files (names that are not valid UTF-8 hash by their bytes on
    disk)."""
    items = [f"{image_format} conversion {CONVERSION}"]
    for file in files:
        try:
            stat = file.stat()
        except OSError as error:
            raise DataError(f"cannot read image {file}: {error}") from error
        name = file.relative_to(root) if file.is_relative_to(root) else file  # (an absolute one)
        items.append(f"{name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()[:12]


SHOWN_UNREAD = 10  # unreadable files named in the error; the rest counted


def read_images(paths: Sequence[Path], image_format: ImageFormat,
                workers: int | None = None) -> np.ndarray:
    """All ``paths`` decoded by ``image_format`` into one array, a process per CPU core; every
    unreadable file is named in one ``DataError`` (``stack_decoded``)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
        return stack_decoded([image_format.read_or_why(p) for p in paths])
    with Pool(workers) as pool:
        return stack_decoded(pool.map(image_format.read_or_why, paths, chunksize=256))


def stack_decoded(decoded: Sequence[np.ndarray | str]) -> np.ndarray:
    """Decoded images (``ImageFormat.read_or_why``) as one array; a ``DataError`` that names
    every file that could not be read (a scraped folder's broken files, all at once)."""
    unread = [item for item in decoded if isinstance(item, str)]
    if len(unread) == 1 and len(decoded) == 1:
        raise DataError(f"cannot read image {unread[0]}")
    if unread:
        shown = "; ".join(unread[:SHOWN_UNREAD]) + (
            f"; and {len(unread) - SHOWN_UNREAD} more" if len(unread) > SHOWN_UNREAD else "")
        raise DataError(f"cannot read {len(unread)} of {len(decoded)} images (replace or delete "
                        f"{'it' if len(unread) == 1 else 'them'}): {shown}")
    return np.stack(decoded)


def channels_first(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 pixels as (N, C, H, W)."""
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def as_model_input(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, C, H, W) pixels as the float32 input the sampler gives the model: / 255."""
    return torch.as_tensor(pixels).float().div_(255)
