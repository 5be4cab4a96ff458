"""Image files: the project's one reader, for training shards and FID reference statistics alike.

One extension list, one folder listing and one crop, so that the images a model is trained on
and the images its samples are compared with are prepared identically.

ADM's centre crop (the preprocessing of guided-diffusion's ImageNet training data and reference
batches, which the ARFlow release also applies before VAE encoding), to a square of side S:

1. while the short side is >= 2 S, halve both sides (integer division) with a box filter;
2. resize bicubically so that the short side is S (the long side rounded to the nearest integer);
3. crop the centre S x S (offsets rounded down).

The repeated box halving is what keeps large images from aliasing: one bicubic step from, say,
1024 to 256 px would look at only a few of the source pixels per output pixel.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str) -> list[str]:
    """Paths relative to ``root`` (with '/') of every image file under it, recursively, sorted."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        relative = os.path.relpath(folder, root)
        for name in files:
            if is_image_file(name):
                found.append(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
    return sorted(found)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop of an RGB image to ``size`` x ``size`` (see the module docstring)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    target = (round(image.width * scale), round(image.height * scale))
    image = image.resize(target, resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """The RGB image at ``path`` as uint8 (3, H, W); with ``size``, ADM-centre-cropped to (3, S, S).

    Raises ValueError naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if size is not None:
        rgb = centre_crop(rgb, size)
    return np.asarray(rgb).transpose(2, 0, 1).copy()
