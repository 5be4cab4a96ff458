"""Image sources for tools/make_shards.py: scikit-learn's digits and ImageFolder trees.

A source lists its classes and, per class, picklable item references; ``load(item)`` turns one into
a uint8 image (3, S, S), S = image_size, so that worker processes can load items in parallel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, classes "0".."9"), grey repeated on 3 channels."""

    image_size: int

    name = "digits"

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
    """A folder per class (ImageNet layout); classes sorted by folder name, images by file name."""

    root: str
    image_size: int

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
            (
                name,
                sorted(
                    os.path.join(name, f)
                    for f in os.listdir(os.path.join(self.root, name))
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                ),
            )
            for name in folders
        ]

    def load(self, relative_path: str) -> np.ndarray:
        """(3, S, S) uint8: RGB, shorter side resized to S (bicubic), centre crop."""
        path = os.path.join(self.root, relative_path)
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
        square = ImageOps.fit(
            rgb, (self.image_size,) * 2, method=Image.BICUBIC, centering=(0.5, 0.5)
        )
        return np.asarray(square).transpose(2, 0, 1).copy()


def make_source(spec: str, image_size: int) -> DigitsSource | ImageFolderSource:
    return DigitsSource(image_size) if spec == "digits" else ImageFolderSource(spec, image_size)
