"""Helpers for tests and timing runs without pretrained weights: small random feature extractors, random
weight files in the real formats, an in-process all-gather over threads, and tiny checkpoints."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .weights import module_digest


class TinyExtractor(nn.Module):
    """uint8 images -> ``dim`` random-conv features (a stand-in for Inception with the same interface)."""

    def __init__(self, dim: int = 16, seed: int = 0, channels: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, padding=1)
        with torch.no_grad():
            for m in (self.conv1, self.conv2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / (m.weight[0].numel() ** 0.5))
                m.bias.zero_()
        self.feature_dim = dim
        self.calls = 0  # images seen, so tests can tell cache hits from misses
        self.ident = f"tiny:{module_digest(self)[:16]}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += images.shape[0]
        x = images.float() / 127.5 - 1.0
        x = F.avg_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.tanh(self.conv2(x))
        return torch.cat([x.mean(dim=(2, 3)), x.square().mean(dim=(2, 3))], 1)[:, :self.feature_dim]


class ThreadGather:
    """All-gather between ``world_size`` threads of one process (a stand-in for torch.distributed)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Any] = [None] * world_size

    def for_rank(self, rank: int) -> Callable[[Any], list[Any]]:
        def gather(obj: Any) -> list[Any]:
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read
            return out

        return gather


def run_ranks(world_size: int, fn: Callable[[int, Callable[[Any], list[Any]]], Any]) -> list[Any]:
    """Run fn(rank, gather) in ``world_size`` threads; returns each rank's result (errors re-raised)."""
    tg = ThreadGather(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, tg.for_rank(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            tg.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def write_random_weight_files(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Random weights in the real file formats: FID Inception (pytorch-fid layout), VGG16 (torchvision's
    'features.*' keys) and LPIPS lin layers (lpips package layout). For CLI tests and CPU timing."""
    from .inception import FIDInceptionV3
    from .lpips import LPIPS

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = {"inception": d / "pt_inception-random.pth", "vgg16": d / "vgg16-random.pth",
             "lpips": d / "lpips-random.pth"}
    torch.save(FIDInceptionV3().randomize(g).state_dict(), paths["inception"])
    lp = LPIPS().randomize_lins(g)
    torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()}, paths["vgg16"])
    torch.save({f"lin{i}.model.1.weight": lin.model[1].weight for i, lin in enumerate(lp.lins)}, paths["lpips"])
    return paths


def write_checkpoint(cfg, path: str | Path, cur_nimg: int, G: nn.Module | None = None,
                     extra: dict | None = None) -> Path:
    """A checkpoint in the training format holding ``G`` (or a fresh generator) as G and G_ema."""
    from .. import checkpoint as ckpt_mod
    from ..config import to_dict
    from ..networks import build_discriminator, build_generator

    G = G if G is not None else build_generator(cfg)
    state = {"format": ckpt_mod.FORMAT_VERSION, "G": G.state_dict(), "D": build_discriminator(cfg).state_dict(),
             "G_ema": G.state_dict(), "config": to_dict(cfg), "state": {"cur_nimg": int(cur_nimg)},
             "extra": dict(extra or {})}
    return ckpt_mod.atomic_save(state, path)


def make_synthetic_dataset(out: str | Path, num_images: int = 256, resolution: int = 32, seed: int = 0) -> str:
    """A prepared synthetic dataset (data_pipeline.synthetic) with known factors as labels; returns its path."""
    from data_pipeline.synthetic import run

    run([str(out), "--num-images", str(num_images), "--resolution", str(resolution), "--seed", str(seed),
         "--workers", "1", "--quiet", "--overwrite"])
    return str(out)


def distributed_worker(rank: int, world_size: int, init_file: str, metric: str, kwargs: dict, out_dir: str) -> None:
    """One process of a gloo process group running ``metric`` with the torch.distributed all-gather; writes
    its result to out_dir/rank<r>.json. For tests of the real collective path (torch.multiprocessing.spawn)."""
    import json

    import torch.distributed as dist

    from ..config import build_config
    from ..networks import build_generator
    from . import calc_metric
    from .registry import MetricOptions, torch_distributed_gather

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        G = build_generator(build_config(set_args=kwargs.pop("config"))).eval()
        opts = MetricOptions(G=G, rank=rank, world_size=world_size, gather=torch_distributed_gather,
                             inception=TinyExtractor(), **kwargs)
        res = calc_metric(metric, opts)["results"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()
