"""The batch-source protocol the training loop reads from, and an in-memory source.

A source yields uint8 image batches [N, C, R, R] at the resolution the schedule asks for; the loop
converts them to float on the device. ``data_pipeline.stream`` provides the Parquet / Ray Data
sources; ``TensorSource`` holds a small image tensor in memory (tests, benchmarks, notebooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class BatchSource(Protocol):
    def batches(self, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Infinite iterator of uint8 [batch_size, C, resolution, resolution]; continues the epoch."""
        ...


def box_downsample_u8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [N, C, R, R] -> uint8 [N, C, r, r] by repeated 2x2 box filtering (as the dataset tool)."""
    x = images
    while x.shape[-1] > resolution:
        x = (F.avg_pool2d(x.float(), 2)).round().clamp(0, 255).to(torch.uint8)
    return x


class TensorSource:
    """Deterministic shuffled epochs over an in-memory uint8 tensor, split across ranks, with mirroring.

    The position (epoch, index) is the whole state, so ``state_dict``/``load_state_dict`` give a resumed
    run exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, images: torch.Tensor, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 mirror: bool = True):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N, C, R, R]"
        self.images = images[rank::world_size].contiguous()
        if len(self.images) == 0:
            raise ValueError("TensorSource: no images for this rank")
        self.seed, self.mirror, self.rank = seed, mirror, rank
        self.max_resolution = images.shape[-1]
        self._levels: dict[int, torch.Tensor] = {self.max_resolution: self.images}
        self.epoch, self.index = 0, 0

    def _level(self, resolution: int) -> torch.Tensor:
        if resolution not in self._levels:
            self._levels[resolution] = box_downsample_u8(self.images, resolution)
        return self._levels[resolution]

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + epoch)
        n = len(self.images)
        return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5

    def batches(self, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
        data = self._level(resolution)
        while True:
            order, flips = self._epoch_plan(self.epoch)
            out = []
            while len(out) < batch_size:
                if self.index >= len(order):
                    self.epoch, self.index = self.epoch + 1, 0
                    order, flips = self._epoch_plan(self.epoch)
                i = order[self.index]
                img = data[i]
                if self.mirror and flips[self.index]:
                    img = img.flip(-1)
                out.append(img)
                self.index += 1
            yield torch.stack(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
