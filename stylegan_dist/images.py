"""Image helpers: uint8 <-> [-1, 1] float, fade of real images, sample grids as PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import storage


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the official drange_net)."""
    return images_u8.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fade_reals(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """While a resolution fades in, blend reals with their 2x box-downsampled, nearest-upsampled
    version by (1 - alpha), so real and fake images carry the same amount of new detail (official
    ``process_reals``)."""
    if alpha >= 1.0:
        return x
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
    return torch.lerp(x, low, 1.0 - alpha)


def grid_image(images: torch.Tensor, cols: int | None = None, min_cell: int = 64) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> HWC uint8 grid; small images are nearest-upscaled to min_cell."""
    n, c, h, w = images.shape
    if h < min_cell:
        s = int(math.ceil(min_cell / h))
        images = F.interpolate(images.float(), scale_factor=float(s), mode="nearest")
        n, c, h, w = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    u8 = to_uint8(images).cpu().numpy()
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = u8[i].transpose(1, 2, 0)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> str:
    """Write a PNG to a local path or a storage URI, atomically."""
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return storage.write_bytes(path, buf.getvalue())


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None, min_cell: int = 64) -> str:
    return save_png(grid_image(images, cols, min_cell), path)
