"""Image sources for tools/make_shards.py: scikit-learn's digits and ImageFolder trees.

A source lists its classes and, per class, picklable item references; ``load(item)`` turns one into
a uint8 image (3, S, S), S = image_size, so that worker processes can load items in parallel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from arflow.data.writing.images import list_images, read_image


@dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, classes "0".."9"), grey repeated on 3 channels."""

    image_size: int

    name = "digits"
    preprocessing = "bicubic-resize"

    @property
    def classes(self) -> list[tuple[str, list[int]]]:
        targets = _digits()[1]
        return [(str(c), np.flatnonzero(targets == c).tolist()) for c in range(10)]

    def load(self, index: int) -> np.ndarray:
        """(3, S, S) uint8: values 0..16 scaled to 0..255, resized bicubically."""
        grey = np.round(_digits()[0][index] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((self.image_size,) * 2, Image.BICUBIC)
        return np.repeat(np.asarray(image)[None], 3, axis=0)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


@dataclass(frozen=True)
class ImageFolderSource:
    """A folder per class (ImageNet layout); classes sorted by folder name, images as listed by
    ``images.list_images`` (recursive, sorted), ADM-centre-cropped to S (``images.centre_crop``)."""

    root: str
    image_size: int

    preprocessing = "adm-centre-crop"

    @property
    def name(self) -> str:
        return f"imagefolder:{os.path.abspath(self.root)}"

    @property
    def classes(self) -> list[tuple[str, list[str]]]:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist (or pass 'digits')")
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not folders:
            raise ValueError(f"image folder {self.root!r} has no class sub-folders")
        return [
            (name, [f"{name}/{path}" for path in list_images(os.path.join(self.root, name))])
            for name in folders
        ]

    def load(self, relative_path: str) -> np.ndarray:
        """(3, S, S) uint8."""
        return read_image(os.path.join(self.root, relative_path), self.image_size)


def make_source(spec: str, image_size: int) -> DigitsSource | ImageFolderSource:
    return DigitsSource(image_size) if spec == "digits" else ImageFolderSource(spec, image_size)
