"""FID (Heusel et al. 2017) as in the paper: Inception-v3 pool features of generated vs real images.

Generated images are quantised to uint8 first, as the official code does. Real images, at the generator's
current resolution, are as many as generated ones: the dataset in order, repeated when it is smaller (the
official metric draws num reals from the repeating dataset), and each mirrored with probability 1/2 when the
run used mirror augmentation (a fixed draw, so the statistics are reproducible). ``fid_repeat_reals=False``
uses the first min(num, dataset size) reals once each. Real statistics are cached under a hash of the
dataset's content, the resolution, the sample count, the mirror and repeat settings and the feature
extractor's identity.

``fid50k_mix2``, ``fid50k_mix3``, ``fid50k_mix4`` (paper section 3.1, Table 2): the same FID with every
generated image mixing 2, 3 or 4 latents, switched at distinct crossover layers drawn uniformly among the
layers in use.

``fid_shapes``: the same FID in the feature space of the project's own attribute classifier (its penultimate
layer; ``python -m stylegan_dist.metrics.classifier`` trains one on the synthetic shapes dataset in a minute on
a CPU), so that a demo or CI run can show that the model learns without any downloaded weights. Its values
are not comparable with Inception FIDs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import storage
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
    random_noise,
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
        opts.say(f"  reals: cached statistics of {count} images ({storage.name(path)})")
        n, mu, sigma = cached
        return mu, sigma, n
    if cached is None and storage.exists(path):
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


def mixed_ws(G, z: torch.Tensor, num_latents: int, resolution: int, gen: torch.Generator,
             device: torch.device) -> torch.Tensor:
    """Style mixing at test time (paper section 3.1, Table 2): each image takes ``num_latents`` latents
    z [N * k, latent] (image i: rows i*k .. i*k+k-1) and k - 1 distinct crossover layers drawn uniformly among
    the layers in use at ``resolution``; layers before the first crossover take the first latent's w, and so
    on. -> ws [N, num_ws, w_dim]."""
    k = num_latents
    n = z.shape[0] // k
    ws = G.map(z.to(device)).view(n, k, G.num_ws, -1)  # [N, k, num_ws, w_dim]
    layers = G.active_layers(resolution)
    if k - 1 > layers - 1:
        raise MetricError(f"FID with {k} mixed latents needs {k} synthesis layers at {resolution}x{resolution}, "
                          f"which has {layers}; evaluate it at a larger resolution.")
    # k - 1 distinct crossovers in [1, layers): the first k - 1 of a random permutation, sorted.
    cross = torch.rand(n, layers - 1, generator=gen).argsort(dim=1)[:, :k - 1].sort(dim=1).values + 1  # [N, k-1]
    which = (torch.arange(G.num_ws)[None, :, None] >= cross[:, None, :]).sum(dim=2)  # [N, num_ws] in [0, k)
    index = which.to(device)[:, None, :, None].expand(n, 1, G.num_ws, ws.shape[-1])
    return ws.gather(1, index)[:, 0]


def fake_stats_partial(opts: MetricOptions, extractor, num: int, tag: str = "fid",
                       num_latents: int = 1) -> FeatureStats:
    """This rank's slice of generated-image statistics (combine slices with FeatureStats.merge). With
    ``num_latents`` > 1 every image mixes that many latents (``mixed_ws``)."""
    stats = FeatureStats(_dim(extractor))
    prog = Progress(opts, "fakes", num)
    for k, n in my_chunks(num, opts.batch_size, opts.rank, opts.world_size):
        s = seed_for(opts.seed, tag, k)
        g = cpu_generator(s)
        z = torch.randn(n * num_latents, opts.G.latent_dim, generator=g)
        if num_latents == 1:
            images = generate(opts, z, device_generator(s + 1, opts.device))
        else:
            with torch.no_grad():
                ws = mixed_ws(opts.G, z, num_latents, opts.resolution, g, opts.device)
                noise = random_noise(opts.G, n, opts.resolution, device_generator(s + 1, opts.device), opts.device)
                images = opts.G.synthesis(ws, opts.resolution, opts.alpha, noise=noise)
        stats.append(extractor(to_uint8(images)))
        prog.update(n)
    return stats


def fid_from_partials(fake_parts: list[FeatureStats], real: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = FeatureStats.merge(fake_parts).mean_cov()
    return frechet.frechet_distance(mu, sigma, real[0], real[1])


def _fid(opts: MetricOptions, name: str, num_latents: int) -> dict[str, Any]:
    num = int(opts.num or 50_000)
    if num < 2:
        raise MetricError(f"FID needs at least 2 samples, got {num}.")
    extractor = get_inception(opts)
    mu_r, sigma_r, _ = real_stats(opts, extractor, num)
    tag = "fid" if num_latents == 1 else name
    parts = opts.gather(fake_stats_partial(opts, extractor, num, tag=tag, num_latents=num_latents))
    return {name: fid_from_partials(parts, (mu_r, sigma_r))}


@register_metric
def fid50k(opts: MetricOptions) -> dict[str, Any]:
    """FID between ``num`` (default 50,000) generated images and as many real images (see the module doc)."""
    return _fid(opts, "fid50k", 1)


@register_metric
def fid50k_mix2(opts: MetricOptions) -> dict[str, Any]:
    """FID of images that mix 2 latents at random crossover layers (paper Table 2, column 2)."""
    return _fid(opts, "fid50k_mix2", 2)


@register_metric
def fid50k_mix3(opts: MetricOptions) -> dict[str, Any]:
    """FID of images that mix 3 latents at random crossover layers (paper Table 2, column 3)."""
    return _fid(opts, "fid50k_mix3", 3)


@register_metric
def fid50k_mix4(opts: MetricOptions) -> dict[str, Any]:
    """FID of images that mix 4 latents at random crossover layers (paper Table 2, column 4)."""
    return _fid(opts, "fid50k_mix4", 4)


@register_metric
def fid_shapes(opts: MetricOptions) -> dict[str, Any]:
    """FID in the feature space of the shapes classifier (``metrics.classifier``), reals as for fid50k."""
    from .classifier import ClassifierFeatures
    from .separability import get_classifier

    num = int(opts.num or 50_000)
    if num < 2:
        raise MetricError(f"FID needs at least 2 samples, got {num}.")
    features = ClassifierFeatures(get_classifier(opts))
    if features.feature_dim < 1:
        features.clf.embed(torch.zeros(1, 3, 4, 4))  # raises the one-sentence error
    mu_r, sigma_r, _ = real_stats(opts, features, num)
    parts = opts.gather(fake_stats_partial(opts, features, num, tag="fid_shapes"))
    return {"fid_shapes": fid_from_partials(parts, (mu_r, sigma_r))}
