"""Image files to model inputs: one conversion shared by the training loaders and ``adapt``.

A data set's ``ImageFormat`` (PIL mode, square side, inversion) turns any file Pillow reads, or
any PIL image, into the uint8 pixels the data set is cached as; ``as_model_input`` scales them
to the float tensor the model sees (pixels / 255, channels first), exactly as the task sampler
does, so that an image given to a trained run matches its training images bit for bit.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError

POOL_MIN_IMAGES = 1000  # fewer images decode faster than worker processes start
MODES = {1: "L", 3: "RGB"}


def image_suffixes() -> frozenset[str]:
    """The file suffixes Pillow can open (``.png``, ``.jpg``, ...), lower case."""
    return frozenset(Image.registered_extensions())


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in image_suffixes()


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
        """(size, size) for ``L``, (size, size, 3) for ``RGB``, uint8."""
        image = image.convert(self.mode)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.uint8)
        return 255 - pixels if self.invert else pixels

    def read(self, path: Path) -> np.ndarray:
        """One image file, converted; an unreadable file is a ``DataError`` that names it."""
        try:
            with Image.open(path) as file:
                return self.convert(file)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {path}: {error}") from error


def read_images(paths: Sequence[Path], image_format: ImageFormat,
                workers: int | None = None) -> np.ndarray:
    """All ``paths`` decoded by ``image_format.read`` into one array, a process per CPU core."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
        return np.stack([image_format.read(p) for p in paths])
    with Pool(workers) as pool:
        return np.stack(pool.map(image_format.read, paths, chunksize=256))


def channels_first(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 pixels as (N, C, H, W)."""
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def as_model_input(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, C, H, W) pixels as the float32 input the sampler gives the model: / 255."""
    return torch.as_tensor(pixels).float().div_(255)
