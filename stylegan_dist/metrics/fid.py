"""FID (Heusel et al. 2017) as in the paper: Inception-v3 pool features of generated vs real images.

Generated images are quantised to uint8 first, as the official code does. Real images, at the generator's
current resolution, are as many as generated ones: the dataset in order, repeated when it is smaller (the
official metric draws num reals from the repeating dataset), and each mirrored with probability 1/2 when the
run used mirror augmentation (a fixed draw, so the statistics are reproducible). ``fid_repeat_reals=False``
uses the first min(num, dataset size) reals once each. Real statistics are cached under a hash of the
dataset's content, the resolution, the sample count, the mirror and repeat settings and the feature
extractor's identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import frechet
from .frechet import FeatureStats
from .realdata import iter_real_slice, manifest_digest, open_dataset, rank_range
from .registry import (
    MetricError,
    MetricOptions,
    Progress,
    cpu_generator,
    device_generator,
    generate,
    my_chunks,
    register_metric,
    seed_for,
    to_uint8,
)
from .weights import resolve_weight


def get_inception(opts: MetricOptions):
    if opts.inception is None:
        from .inception import load_inception

        opts.inception = load_inception(resolve_weight("inception", opts.weights.get("inception")), opts.device)
    return opts.inception


def _dim(extractor) -> int:
    return int(getattr(extractor, "feature_dim", 2048))


def real_stats(opts: MetricOptions, extractor, num: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the real images, from the cache when a valid entry exists."""
    if not opts.data:
        raise MetricError("FID needs the real images: give the dataset directory (--data).")
    manifest = open_dataset(opts.data)
    count = num if opts.fid_repeat_reals else min(num, int(manifest["num_images"]))
    key = frechet.cache_key(dataset=manifest_digest(manifest), resolution=opts.resolution, num=count,
                            extractor=str(getattr(extractor, "ident", type(extractor).__name__)),
                            mirror=bool(opts.fid_mirror), repeat=bool(opts.fid_repeat_reals))
    path = frechet.cache_path(opts.resolve_cache_dir(), key)
    cached = frechet.load_cached_stats(path, key)
    # Every rank must take the same branch (the gathers below are collective).
    if all(opts.gather(cached is not None)):
        opts.say(f"  reals: cached statistics of {count} images ({path.name})")
        n, mu, sigma = cached
        return mu, sigma, n
    if path.exists() and cached is None:
        opts.say(f"  reals: cache file {path} is unreadable or inconsistent; rebuilding it")
    stats = FeatureStats(_dim(extractor))
    start, stop = rank_range(count, opts.rank, opts.world_size)
    prog = Progress(opts, "reals", count)
    for images in iter_reals(opts, manifest, start, stop, count):
        stats.append(extractor(images.to(opts.device)))
        prog.update(len(images))
    merged = FeatureStats.merge(opts.gather(stats))
    mu, sigma = merged.mean_cov()
    if opts.rank == 0:
        frechet.save_cached_stats(path, key, merged.count, mu, sigma)
    return mu, sigma, merged.count


MIRROR_SEED = 20191212  # the fixed draw of which reals are mirrored


def mirror_mask(count: int) -> np.ndarray:
    """[count] bool: which of the reals 0..count-1 are mirrored (the same draw on every rank)."""
    return np.random.default_rng(MIRROR_SEED).random(count) < 0.5


def iter_reals(opts: MetricOptions, manifest: dict[str, Any], start: int, stop: int, count: int):
    """uint8 batches of reals [start, stop) of the ``count`` FID reals: real i is dataset row i mod N, mirrored
    (left-right) when ``opts.fid_mirror`` and the fixed draw says so."""
    n_data = int(manifest["num_images"])
    if n_data < 1:
        raise MetricError(f"Dataset {opts.data} has no images.")
    mask = mirror_mask(count) if opts.fid_mirror else None
    pos = start
    while pos < stop:
        epoch_start = pos - pos % n_data
        seg_stop = min(stop, epoch_start + n_data)
        for images in iter_real_slice(opts.data, manifest, opts.resolution, opts.batch_size, pos - epoch_start,
                                      seg_stop - epoch_start):
            if mask is not None:
                flip = torch.from_numpy(mask[pos:pos + len(images)])
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            pos += len(images)
            yield images


def fake_stats_partial(opts: MetricOptions, extractor, num: int, tag: str = "fid") -> FeatureStats:
    """This rank's slice of generated-image statistics (combine slices with FeatureStats.merge)."""
    stats = FeatureStats(_dim(extractor))
    prog = Progress(opts, "fakes", num)
    for k, n in my_chunks(num, opts.batch_size, opts.rank, opts.world_size):
        s = seed_for(opts.seed, tag, k)
        z = torch.randn(n, opts.G.latent_dim, generator=cpu_generator(s))
        images = generate(opts, z, device_generator(s + 1, opts.device))
        stats.append(extractor(to_uint8(images)))
        prog.update(n)
    return stats


def fid_from_partials(fake_parts: list[FeatureStats], real: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = FeatureStats.merge(fake_parts).mean_cov()
    return frechet.frechet_distance(mu, sigma, real[0], real[1])


@register_metric
def fid50k(opts: MetricOptions) -> dict[str, Any]:
    """FID between ``num`` (default 50,000) generated images and as many real images (see the module doc)."""
    num = int(opts.num or 50_000)
    if num < 2:
        raise MetricError(f"FID needs at least 2 samples, got {num}.")
    extractor = get_inception(opts)
    mu_r, sigma_r, _ = real_stats(opts, extractor, num)
    parts = opts.gather(fake_stats_partial(opts, extractor, num))
    return {"fid50k": fid_from_partials(parts, (mu_r, sigma_r))}
