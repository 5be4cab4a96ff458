"""Writing image grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None) -> Path:
    """images: uint8 (B, C, H, W), C in (1, 3) -> one PNG, row-major, `cols` per row
    (default: a near-square grid); empty cells stay black."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"save_grid takes uint8 (B, C, H, W) with C = 1 or 3, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    B, C, H, W = images.shape
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    canvas = torch.zeros(rows * cols, C, H, W, dtype=torch.uint8)
    canvas[:B] = images.cpu()
    grid = canvas.reshape(rows, cols, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, cols * W, C)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.numpy()
    Image.fromarray(array[..., 0] if C == 1 else array).save(path)
    return path
