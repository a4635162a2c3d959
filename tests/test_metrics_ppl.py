"""Perceptual path length with randomly initialised small networks."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stylegan_dist.metrics import MetricError, MetricOptions, calc_metric
from stylegan_dist.metrics.lpips import LPIPS
from stylegan_dist.metrics.ppl import face_crop, filtered_mean, pair_distances, ppl_from_partials, ppl_partial, slerp
from stylegan_dist.metrics.registry import box_downsample_to
from stylegan_dist.metrics.testing import run_ranks
from stylegan_dist.networks import build_generator


@pytest.fixture(scope="module")
def lpips():
    return LPIPS().randomize_lins(torch.Generator().manual_seed(0)).set_ident()


def make_G(noise_strength: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    G = build_generator(tiny_config(resolution=16)).eval()
    with torch.no_grad():
        for m in G.modules():
            if getattr(m, "noise_weight", None) is not None:
                m.noise_weight.fill_(noise_strength)
    return G


class WaveGenerator(torch.nn.Module):
    """A hand-made generator: w [8] sets the phase of a sine grating, phase = k * <u, w>. Larger k means the
    images change k times faster along any W path (a shift, which LPIPS sees; a contrast change it would not)."""

    def __init__(self, k: float, resolution: int = 16):
        super().__init__()
        self.k, self.latent_dim, self.num_ws, self.max_resolution = k, 8, 1, resolution
        self.u = torch.nn.functional.normalize(torch.arange(1.0, 9.0), dim=0)
        object.__setattr__(self, "synthesis", self)  # not a submodule

    def map(self, z, *a, **kw):
        return z[:, None, :]  # [N, 1, 8]

    def noise_shapes(self, resolution):
        return []

    def forward(self, ws, resolution, alpha=1.0, noise=None):
        phase = self.k * (ws[:, 0] @ self.u.to(ws))  # [N]
        x = torch.linspace(0, 2 * torch.pi * 2, resolution)
        grid = x[None, :] + 0.5 * x[:, None]  # [R, R], a slanted grating of two periods
        chans = [torch.sin(grid[None] + phase[:, None, None] + c) for c in (0.0, 2.0, 4.0)]
        return torch.stack(chans, dim=1)  # [N, 3, R, R] in [-1, 1]


def opts_for(G, lpips, **kw):
    return MetricOptions(G=G, resolution=16, batch_size=kw.pop("batch_size", 32), num=kw.pop("num", 48), lpips=lpips,
                         **kw)


def test_slerp_endpoints_and_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    n = torch.nn.functional.normalize
    torch.testing.assert_close(slerp(a, b, torch.zeros(5, 1, dtype=torch.float64)), n(a, dim=-1))
    torch.testing.assert_close(slerp(a, b, torch.ones(5, 1, dtype=torch.float64)), n(b, dim=-1))
    angle = torch.acos((n(a, dim=-1) * n(b, dim=-1)).sum(-1))
    for t in (0.25, 0.6):
        x = slerp(a, b, torch.full((5, 1), t, dtype=torch.float64))
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(torch.acos((n(a, dim=-1) * x).sum(-1)), t * angle)


def test_ppl_is_deterministic_for_a_seed(lpips):
    G = make_G(0.5)
    r1 = calc_metric("ppl_wfull", opts_for(G, lpips, seed=3))["results"]["ppl_wfull"]
    r2 = calc_metric("ppl_wfull", opts_for(G, lpips, seed=3))["results"]["ppl_wfull"]
    r3 = calc_metric("ppl_wfull", opts_for(G, lpips, seed=4))["results"]["ppl_wfull"]
    assert r1 == r2
    assert r1 != r3
    assert np.isfinite(r1) and r1 > 0


@pytest.mark.parametrize("name", ["ppl_wfull", "ppl_wend", "ppl_zfull"])
def test_generator_changing_faster_along_w_has_larger_ppl(lpips, name):
    slow = calc_metric(name, opts_for(WaveGenerator(1.0), lpips))["results"][name]
    fast = calc_metric(name, opts_for(WaveGenerator(3.0), lpips))["results"][name]
    assert fast > 4.0 * slow  # the squared distance of a small step grows like k^2 = 9


def test_both_images_of_a_pair_share_the_noise(lpips):
    # With strong noise inputs, different noise per image would give distances ~ LPIPS(noise) / eps^2, i.e.
    # orders of magnitude above the noise-free generator's values.
    quiet = calc_metric("ppl_zfull", opts_for(make_G(0.0), lpips))["results"]["ppl_zfull"]
    noisy = calc_metric("ppl_zfull", opts_for(make_G(1.0), lpips))["results"]["ppl_zfull"]
    assert noisy < 20 * quiet


def test_all_four_variants_run_and_differ(lpips):
    G = make_G(0.2)
    vals = {n: calc_metric(n, opts_for(G, lpips, num=24))["results"][n]
            for n in ("ppl_zfull", "ppl_wfull", "ppl_zend", "ppl_wend")}
    assert all(np.isfinite(v) and v > 0 for v in vals.values())
    assert len(set(vals.values())) == 4


def test_percentile_filter_drops_outliers():
    # 1000 values, 5 wild outliers at the top: the 99th percentile ('higher') is an ordinary value.
    d = np.concatenate([np.arange(1.0, 996.0), [1e9, 2e9, 3e9, 4e9, 5e9]])
    kept = d[(d >= np.percentile(d, 1, method="lower")) & (d <= np.percentile(d, 99, method="higher"))]
    assert kept.max() < 1000 and kept.min() > 1  # the bottom 1% goes too
    assert filtered_mean(d) == pytest.approx(kept.mean())
    assert filtered_mean(d) == pytest.approx(np.arange(10.0, 992.0).mean())
    low = np.concatenate([[-1e9], np.full(150, 5.0)])
    assert filtered_mean(low) == 5.0
    with pytest.raises(MetricError):
        filtered_mean(np.empty(0))


def test_two_workers_give_the_single_process_value(lpips):
    G = make_G(0.3)
    single = calc_metric("ppl_zend", opts_for(G, lpips, num=40, batch_size=8))["results"]["ppl_zend"]

    def rank_fn(rank, gather):
        o = opts_for(G, lpips, num=40, batch_size=8, rank=rank, world_size=2, gather=gather)
        return calc_metric("ppl_zend", o)["results"]["ppl_zend"]

    assert run_ranks(2, rank_fn) == [single, single]
    # The combining function on explicit partials, in any order.
    parts = [ppl_partial(opts_for(G, lpips, num=40, batch_size=8, rank=r, world_size=3), "z", "end", 40, "ppl_zend")
             for r in range(3)]
    assert ppl_from_partials(parts[::-1]) == single


def test_crop_and_downsample_follow_the_official_geometry():
    x = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64).repeat(1, 3, 1, 1)
    c = face_crop(x)
    assert c.shape == (1, 3, 32, 32)
    assert c[0, 0, 0, 0] == x[0, 0, 24, 16]  # rows 3c..7c, columns 2c..6c with c = 8
    big = torch.rand(2, 3, 1024, 1024)
    small = box_downsample_to(big, 256)
    assert small.shape == (2, 3, 256, 256)
    torch.testing.assert_close(small[0, :, 0, 0], big[0, :, :4, :4].mean(dim=(1, 2)))
    assert box_downsample_to(torch.rand(1, 3, 128, 128), 256).shape[-1] == 128


def test_pair_distances_scale_with_one_over_epsilon_squared(lpips):
    # Halving eps halves the image difference, so distance / eps^2 stays about the same.
    G = make_G()
    o = opts_for(G, lpips)
    d1 = pair_distances(o, lpips, 16, "w", "full", seed=7)
    d2 = pair_distances(o.replace(ppl_epsilon=5e-5), lpips, 16, "w", "full", seed=7)
    assert torch.allclose(d1, d2, rtol=0.1)


def test_face_crop_below_8_pixels_covers_the_same_fraction():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    c = face_crop(x)  # rows 1.5..3.5, columns 1..3 of the 4x4 image, at half-pixel steps
    assert c.shape == (1, 1, 4, 4)
    assert c[0, 0, :, 0].tolist() == [x[0, 0, 1, 1], x[0, 0, 2, 1], x[0, 0, 2, 1], x[0, 0, 3, 1]]
    assert c[0, 0, 0, :].tolist() == [x[0, 0, 1, 1], x[0, 0, 1, 1], x[0, 0, 1, 2], x[0, 0, 1, 2]]


@pytest.mark.slow
def test_ppl_with_the_crop_at_every_resolution_from_4_to_1024(lpips):
    torch.manual_seed(0)
    G = build_generator(tiny_config("model.fmap_base=1024", "model.fmap_max=8", resolution=1024)).eval()
    assert MetricOptions(G=G).ppl_crop  # StyleGAN v1's PPL crops by default
    for r in [4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        o = MetricOptions(G=G, resolution=r, batch_size=2, num=2, lpips=lpips)
        value = calc_metric("ppl_wend", o)["results"]["ppl_wend"]
        assert np.isfinite(value) and value >= 0, r
