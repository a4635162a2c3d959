import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylegan_dist.config import build_config  # noqa: E402

# Tiny networks from the same code as the full-size model.
TINY = [
    "model.fmap_base=128", "model.fmap_max=32", "model.latent_dim=32", "model.w_dim=32",
    "generator.mapping_fmaps=32",
]


def tiny_config(*extra: str, resolution: int = 32):
    return build_config(set_args=[f"model.resolution={resolution}", *TINY, *extra])


# A few ticks across two resolution changes: 8 (stable) -> 16 (fade, stable) -> 32 (fade, stable).
TINY_SCHEDULE = [
    "schedule.start_resolution=8", "schedule.stabilise_kimg=0.064", "schedule.fade_kimg=0.064",
    "schedule.total_kimg=0.4", "schedule.batch_per_gpu={}", "schedule.batch_base=8",
    "schedule.tick_kimg_dict={}", "schedule.tick_kimg_base=0.032", "train.checkpoint_kimg=0.1",
    "train.grid_size=4",
]


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def random_images(n: int = 48, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, resolution, resolution, generator=g) * 255).to(torch.uint8)
