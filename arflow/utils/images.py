"""Model outputs as pictures: quantisation to uint8 and PNG grids people can read."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Images smaller than this are enlarged (nearest neighbour, by an integer factor) in grids, so an
# 8x8 digit is not a speck. The gap between cells is mid-grey so that it stands out both from
# white strokes on black (the digits) and from photographs' edges.
MIN_CELL_PX = 64
GAP_PX = 6
GAP_GREY = 128


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) float -> uint8. The DiT/SiT evaluation's quantisation
    (clamp(127.5 x + 128) then truncate, i.e. round to nearest), so FIDs are comparable."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)


def grid_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 on the CPU with 3 channels (or 1: grey data, or latents
    without a VAE to decode them, shown by their first channel)."""
    x = images[:, :3] if images.shape[1] == 3 else images[:, :1]
    return to_uint8(x.float()).cpu()


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    cols: int | None = None,
    min_cell: int = MIN_CELL_PX,
    gap: int = GAP_PX,
) -> Path:
    """images: uint8 (B, C, H, W), C in (1, 3) -> one PNG, row-major, `cols` per row (default: a
    near-square grid). Cells smaller than `min_cell` px are enlarged by the smallest integer
    factor that reaches it (nearest neighbour: the pixels stay as sampled); `gap` px of mid-grey
    separate the cells; empty cells stay black."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"save_grid takes uint8 (B, C, H, W) with C = 1 or 3, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("save_grid got no images")
    if cols is not None and cols < 1:
        raise ValueError(f"a grid needs >= 1 column, got cols={cols}")
    B, C, H, W = images.shape
    factor = max(1, math.ceil(min_cell / min(H, W)))
    cells = images.cpu().repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    H, W = H * factor, W * factor
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    canvas = torch.full(
        (C, rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap), GAP_GREY, dtype=torch.uint8
    )
    for i in range(rows * cols):
        top, left = (i // cols) * (H + gap), (i % cols) * (W + gap)
        canvas[:, top : top + H, left : left + W] = cells[i] if i < B else 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if C == 1 else array).save(path)
    return path
