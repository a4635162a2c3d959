"""Metric registry and the options every metric receives.

A metric is one function ``fn(opts: MetricOptions) -> dict[str, float]`` registered with
``@register_metric`` and looked up by its name (``fid50k``, ``ppl_wend``, ``ls`` ...). Each function
works on its own slice of the samples (``opts.rank`` of ``opts.world_size``), hands its partial result to
``opts.gather`` (an all-gather: identity in one process, ``torch.distributed`` under Ray Train) and
combines the partials once, so every rank returns the same numbers.

Samples are drawn in fixed chunks of ``opts.batch_size``; chunk ``k`` is processed by rank
``k % world_size`` with latents from a generator seeded by ``(seed, metric, k)``. The result therefore
does not depend on the number of workers (for the same batch size and device type).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import storage

MetricFn = Callable[["MetricOptions"], dict[str, float]]
_METRICS: dict[str, MetricFn] = {}


class MetricError(RuntimeError):
    """A metric that cannot run as asked (missing weights, unknown name, bad data); one sentence."""


def register_metric(fn: MetricFn) -> MetricFn:
    """Decorator: the function's name is the metric's name."""
    if fn.__name__ in _METRICS:
        raise ValueError(f"metric {fn.__name__} is registered twice")
    _METRICS[fn.__name__] = fn
    return fn


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def is_valid_metric(name: str) -> bool:
    return name in _METRICS


def get_metric(name: str) -> MetricFn:
    if name not in _METRICS:
        raise MetricError(f"Unknown metric '{name}'; choose from {', '.join(list_metrics())}.")
    return _METRICS[name]


def extractors_needed(names: list[str]) -> set[str]:
    """Which pretrained networks the metrics ``names`` load: inception, lpips, classifier."""
    need = set()
    for n in names:
        if n == "ls" or n == "fid_shapes":
            need.add("classifier")
        elif n.startswith("fid"):
            need.add("inception")
        elif n.startswith("ppl"):
            need.add("lpips")
    return need


def parse_metric_list(text: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    for n in names:
        get_metric(n)  # raises for unknown names
    return names


def single_process_gather(obj: Any) -> list[Any]:
    return [obj]


def torch_distributed_gather(obj: Any) -> list[Any]:
    """All-gather of a picklable object over the default torch.distributed group (Ray Train sets one up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class MetricOptions:
    """Everything a metric needs. Feature extractors are injectable (tests pass small random networks);
    when left as None they are built from the weight files named in ``weights`` (see ``weights.py``)."""

    G: torch.nn.Module  # a Generator (G_ema), or any module with the same map/synthesis interface
    resolution: int | None = None  # the resolution G generates at (None: G.max_resolution)
    alpha: float = 1.0  # fade-in weight of that resolution (partially grown networks)
    data: str | None = None  # prepared dataset directory (FID reals)
    num: int | None = None  # sample count override (None: each metric's paper default)
    batch_size: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    gather: Callable[[Any], list[Any]] = single_process_gather
    cache_dir: str | None = None  # real-statistics cache (None: $STYLEGAN_CACHE_DIR or ~/.cache/stylegan_dist)
    weights: dict[str, str | None] = field(default_factory=dict)  # inception / vgg16 / lpips / classifier paths
    inception: Any = None  # callable uint8 [N, C, H, W] -> features [N, D], with .ident (a string) for caching
    lpips: Any = None  # callable (a, b) images in [-1, 1] -> distances [N]
    classifier: Any = None  # AttributeClassifier-like: images in [-1, 1] -> P(attribute) [N, A], .attributes
    ppl_crop: bool = True  # crop the central face region before LPIPS (StyleGAN v1 always does)
    fid_mirror: bool = False  # FID reals mirrored at random (the official metric does when the run mirrored)
    fid_repeat_reals: bool = True  # the dataset repeated until there are as many reals as fakes (official)
    ppl_epsilon: float = 1e-4
    ls_min_accuracy: float = 0.8  # skip attributes whose classifier's held-out balanced accuracy is lower
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.resolution is None:
            self.resolution = int(self.G.max_resolution)
        if not (0 <= self.rank < self.world_size):
            raise MetricError(f"rank {self.rank} is outside world size {self.world_size}.")
        if self.batch_size < 1:
            raise MetricError(f"The metric batch size must be at least 1, got {self.batch_size}.")

    def replace(self, **kw: Any) -> MetricOptions:
        return dataclasses.replace(self, **kw)

    def say(self, msg: str) -> None:
        if self.progress is not None and self.rank == 0:
            self.progress(msg)

    def resolve_cache_dir(self) -> str:
        """Local directory or storage URI of the real-statistics cache."""
        d = self.cache_dir or os.environ.get("STYLEGAN_CACHE_DIR") or Path.home() / ".cache" / "stylegan_dist"
        return storage.resolve(d)


# --------------------------------------------------------------------------------------------------
# Sample scheduling


def seed_for(seed: int, tag: str, chunk: int) -> int:
    """A 63-bit seed for chunk ``chunk`` of metric ``tag``: independent streams per metric and chunk."""
    tag_int = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little")
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag_int, int(chunk)]).generate_state(2, np.uint64)[0]
               & np.uint64(2**63 - 1))


def my_chunks(num: int, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """(chunk index, chunk size) of the chunks of ``num`` samples that belong to ``rank``."""
    n_chunks = (num + batch_size - 1) // batch_size
    for k in range(rank, n_chunks, world_size):
        yield k, min(batch_size, num - k * batch_size)


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def random_noise(G: torch.nn.Module, n: int, resolution: int, gen: torch.Generator,
                 device: torch.device) -> list[torch.Tensor]:
    """One N(0, 1) map per noise input used up to ``resolution`` (drawn on ``device`` with ``gen``)."""
    return [torch.randn(n, 1, s, s, generator=gen, device=device) for _, s in G.synthesis.noise_shapes(resolution)]


class Progress:
    """Rate-limited progress lines: 'name: 1024/50000 images (12.3 s, 83 img/s)'."""

    def __init__(self, opts: MetricOptions, name: str, total: int, unit: str = "images", every_s: float = 10.0):
        self.opts, self.name, self.total, self.unit, self.every_s = opts, name, total, unit, every_s
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            el = now - self.t0
            # Each rank sees its own slice; rank 0's count times the world size estimates the total.
            est = min(self.done * self.opts.world_size, self.total)
            self.opts.say(f"  {self.name}: {est}/{self.total} {self.unit} ({el:.1f} s, "
                          f"{est / max(el, 1e-9):.1f} {self.unit}/s)")


@torch.no_grad()
def generate(opts: MetricOptions, z: torch.Tensor, gen: torch.Generator,
             return_ws: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """z [N, latent] -> images [N, C, R, R] in about [-1, 1] at opts.resolution, random noise, no truncation
    (metrics never truncate, paper section 3)."""
    G = opts.G
    ws = G.map(z.to(opts.device))
    noise = random_noise(G, z.shape[0], opts.resolution, gen, opts.device)
    img = G.synthesis(ws, opts.resolution, opts.alpha, noise=noise)
    return (img, ws) if return_ws else img


def box_downsample_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool by the integer factor H // size when H > size (the official metrics' 'downsample to 256')."""
    h = images.shape[-1]
    if h <= size:
        return images
    f = h // size
    return torch.nn.functional.avg_pool2d(images, f)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, as the official FID does before Inception."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 matmuls and convolutions: TF32's ~1e-3 relative error would swamp PPL's image differences of
    order eps and shifts Inception / classifier features (stylegan2-ada-pytorch's metrics also turn it off)."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def protocol(name: str, opts: MetricOptions) -> dict[str, str]:
    """How metric ``name`` was measured, for the run's MLflow params: {'protocol.<name>.<field>': value}."""
    fields: dict[str, Any] = {"precision": "fp32 (TF32 off)"}
    if name.startswith("fid"):
        how = "the dataset repeated" if opts.fid_repeat_reals else "at most the dataset"
        fields.update(mirror=opts.fid_mirror, reals=f"{int(opts.num or 50_000)} ({how})")
    if name.startswith("ppl"):
        fields.update(crop=opts.ppl_crop, epsilon=opts.ppl_epsilon)
    return {f"protocol.{name}.{k}": str(v) for k, v in fields.items()}


def calc_metric(name: str, opts: MetricOptions) -> dict[str, Any]:
    """Run one metric; returns {'name', 'results': {key: value}, 'seconds', 'num', 'protocol'}. TF32 is off
    while it runs."""
    fn = get_metric(name)
    t0 = time.time()
    if opts.device.type == "cuda":
        torch.cuda.synchronize(opts.device)
    was_training = opts.G.training
    opts.G.eval()
    try:
        with no_tf32():
            results = fn(opts)
    finally:
        opts.G.train(was_training)
    if opts.device.type == "cuda":
        torch.cuda.synchronize(opts.device)
    return {"name": name, "results": {k: float(v) for k, v in results.items()}, "seconds": time.time() - t0,
            "num": opts.num, "protocol": protocol(name, opts)}
