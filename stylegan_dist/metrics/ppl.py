"""Perceptual path length (paper section 4.1), four variants: ppl_{z,w}{full,end}.

For each sample: two latents z1, z2 ~ N(0, I); t ~ U[0, 1] ('full') or t drawn from {0, 1} ('end', the
paper's definition; the official code uses t = 0, which has the same distribution because z1 and z2 are
exchangeable). Z: slerp(z1, z2; t) and slerp(z1, z2; t + eps) are mapped to W. W: lerp(w1, w2; t) and
lerp(w1, w2; t + eps). Both images of a pair get the same noise inputs. The central face region
(rows 3c..7c, columns 2c..6c, c = H/8) is cropped; images larger than 256 are box-downsampled to 256; the
distance is LPIPS / eps^2 (images below 32 px, early in progressive growing, are enlarged by nearest
neighbour first so that all five VGG stages see at least 2x2 pixels). Values outside the [1st, 99th]
percentile (numpy 'lower' / 'higher') are dropped and the mean of the rest is reported. eps = 1e-4, 100,000
samples by default.

The crop is on by default (StyleGAN v1's PPL always crops; ``metrics.ppl_crop=false`` for data that are not
centred faces). TF32 is switched off while PPL runs: its ~1e-3 relative error would swamp image differences
of order eps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .registry import (
    MetricError,
    MetricOptions,
    Progress,
    box_downsample_to,
    cpu_generator,
    device_generator,
    my_chunks,
    no_tf32,
    random_noise,
    register_metric,
    seed_for,
)
from .weights import resolve_weight

MIN_LPIPS_SIZE = 32  # smaller images (progressive growing's early resolutions) are enlarged, nearest


def get_lpips(opts: MetricOptions):
    if opts.lpips is None:
        from .lpips import load_lpips

        opts.lpips = load_lpips(resolve_weight("vgg16", opts.weights.get("vgg16")),
                                resolve_weight("lpips", opts.weights.get("lpips")), opts.device)
    return opts.lpips


def normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of directions a -> b at t [N, 1]; the result has unit length."""
    a, b = normalize(a), normalize(b)
    d = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    p = t * torch.acos(d)
    c = normalize(b - d * a)
    return normalize(a * torch.cos(p) + c * torch.sin(p))


def face_crop(images: torch.Tensor) -> torch.Tensor:
    """Rows 3c..7c, columns 2c..6c with c = H / 8 (the official PPL's face region). Below 8 px, c is not a whole
    pixel: the images are nearest-upscaled to 8 px first, so the crop covers the same fraction of the image."""
    if images.shape[2] < 8:
        images = F.interpolate(images, scale_factor=8 // images.shape[2], mode="nearest")
    c = images.shape[2] // 8
    return images[:, :, c * 3:c * 7, c * 2:c * 6]


@torch.no_grad()
def pair_distances(opts: MetricOptions, lpips, n: int, space: str, sampling: str, seed: int) -> torch.Tensor:
    """Scaled LPIPS distances [n] of n interpolation pairs drawn from ``seed``."""
    G, dev, eps = opts.G, opts.device, opts.ppl_epsilon
    g = cpu_generator(seed)
    z = torch.randn(2 * n, G.latent_dim, generator=g, dtype=torch.float64)
    if sampling == "full":
        t = torch.rand(n, 1, generator=g, dtype=torch.float64)
    else:
        t = torch.randint(0, 2, (n, 1), generator=g).to(torch.float64)
    z0, z1 = z[0::2], z[1::2]
    if space == "z":
        ze = torch.stack([slerp(z0, z1, t), slerp(z0, z1, t + eps)], dim=1).reshape(2 * n, -1)
        ws = G.map(ze.float().to(dev))  # [2n, num_ws, w_dim]
    else:
        w = G.map(z.float().to(dev)).double()  # [2n, num_ws, w_dim]
        w0, w1 = w[0::2], w[1::2]
        tt = t.to(dev)[:, :, None]
        ws = torch.stack([torch.lerp(w0, w1, tt), torch.lerp(w0, w1, tt + eps)], dim=1)
        ws = ws.reshape(2 * n, *w.shape[1:]).float()
    noise = [x.repeat_interleave(2, dim=0) for x in random_noise(G, n, opts.resolution,
                                                                 device_generator(seed + 1, dev), dev)]
    images = G.synthesis(ws, opts.resolution, opts.alpha, noise=noise).float()
    if opts.ppl_crop:
        images = face_crop(images)
    images = box_downsample_to(images, 256)
    if images.shape[-1] < MIN_LPIPS_SIZE:  # VGG16's fifth stage needs >= 16 px; tiny (early) resolutions
        images = F.interpolate(images, scale_factor=math.ceil(MIN_LPIPS_SIZE / images.shape[-1]), mode="nearest")
    return lpips(images[0::2], images[1::2]).double() / (eps * eps)


def filtered_mean(distances: np.ndarray) -> float:
    """Mean of the distances within the [1st, 99th] percentile (the official outlier rejection)."""
    d = np.asarray(distances, np.float64)
    if d.size == 0:
        raise MetricError("PPL got no samples; set a positive sample count.")
    lo = np.percentile(d, 1, method="lower")
    hi = np.percentile(d, 99, method="higher")
    return float(d[(d >= lo) & (d <= hi)].mean())


def ppl_partial(opts: MetricOptions, space: str, sampling: str, num: int, tag: str) -> dict[str, Any]:
    """This rank's chunks: {'chunks': [k, ...], 'distances': [array, ...]}."""
    lpips = get_lpips(opts)
    out: dict[str, Any] = {"chunks": [], "distances": []}
    prog = Progress(opts, tag, num, unit="pairs")
    with no_tf32():
        for k, n in my_chunks(num, opts.batch_size, opts.rank, opts.world_size):
            d = pair_distances(opts, lpips, n, space, sampling, seed_for(opts.seed, tag, k))
            out["chunks"].append(k)
            out["distances"].append(d.cpu().numpy())
            prog.update(n)
    return out


def ppl_from_partials(parts: list[dict[str, Any]]) -> float:
    """Concatenate all ranks' distances in chunk order, reject outliers, average."""
    pairs = sorted((k, d) for p in parts for k, d in zip(p["chunks"], p["distances"]))
    return filtered_mean(np.concatenate([d for _, d in pairs]) if pairs else np.empty(0))


def _ppl(opts: MetricOptions, space: str, sampling: str, name: str) -> dict[str, float]:
    num = int(opts.num or 100_000)
    parts = opts.gather(ppl_partial(opts, space, sampling, num, name))
    return {name: ppl_from_partials(parts)}


@register_metric
def ppl_zfull(opts: MetricOptions) -> dict[str, float]:
    return _ppl(opts, "z", "full", "ppl_zfull")


@register_metric
def ppl_wfull(opts: MetricOptions) -> dict[str, float]:
    return _ppl(opts, "w", "full", "ppl_wfull")


@register_metric
def ppl_zend(opts: MetricOptions) -> dict[str, float]:
    return _ppl(opts, "z", "end", "ppl_zend")


@register_metric
def ppl_wend(opts: MetricOptions) -> dict[str, float]:
    return _ppl(opts, "w", "end", "ppl_wend")
