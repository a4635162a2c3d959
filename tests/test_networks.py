import math

import pytest
import torch
from conftest import tiny_config

from stylegan_dist.config import build_config
from stylegan_dist.networks import (
    Blur,
    EqualizedConv2d,
    EqualizedLinear,
    build_discriminator,
    build_generator,
    count_params,
    minibatch_stddev,
)


@pytest.mark.parametrize("arch", ["style", "traditional"])
def test_shapes_at_every_resolution(arch):
    # fmap_base 1024 / fmap_max 8 keeps >= 2 channels at 1024 while staying tiny.
    cfg = build_config(set_args=["model.resolution=1024", "model.fmap_base=1024", "model.fmap_max=8",
                                 "model.latent_dim=16", "model.w_dim=16", "generator.mapping_fmaps=16",
                                 f"generator.architecture={arch}"])
    torch.manual_seed(0)
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert G.num_ws == (18 if arch == "style" else 1)
    z = torch.randn(4, 16)
    for r in [4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        for alpha in ([1.0] if r == 4 else [1.0, 0.5]):
            img = G(z, r, alpha)
            assert img.shape == (4, 3, r, r)
            assert torch.isfinite(img).all()
            assert D(img, r, alpha).shape == (4, 1)


def test_parameter_counts_full_size():
    style = build_config()
    trad = build_config(set_args=["generator.architecture=traditional"])
    with torch.device("meta"):
        g_style, g_trad = build_generator(style), build_generator(trad)
    # Paper: 26.2M vs 23.1M; the released generator has exactly 26,219,627 parameters.
    assert count_params(g_style) == 26_219_627
    assert abs(count_params(g_style) / 26.2e6 - 1) < 0.005
    assert abs(count_params(g_trad) / 23.1e6 - 1) < 0.01
    assert count_params(g_style.mapping) == 8 * (512 * 512 + 512)
    assert count_params(g_trad.mapping) == 0


def test_mapping_depth_zero_means_w_is_normalised_z():
    cfg = tiny_config("generator.mapping_layers=0")
    G = build_generator(cfg)
    z = torch.randn(3, 32)
    w = G.mapping(z)
    assert torch.allclose(w, z / z.square().mean(1, keepdim=True).add(1e-8).sqrt())


def test_style_mixing_layers_before_crossover_get_w1():
    torch.manual_seed(1)
    G = build_generator(tiny_config())
    z = torch.randn(2, 32)
    captured = {}
    orig = G.synthesis.forward

    def spy(ws, *a, **k):
        captured["ws"] = ws
        return orig(ws, *a, **k)

    G.synthesis.forward = spy
    w1 = G.map(z)
    crossovers = set()
    for _ in range(40):
        G(z, 32, mixing_prob=1.0)
        ws = captured["ws"]
        # find the first layer that differs from w1: everything before it is w1, everything after is one w2
        diff = [(ws[:, i] - w1[:, i]).abs().max().item() > 0 for i in range(G.num_ws)]
        c = diff.index(True)
        assert not any(diff[:c]) and all(diff[c:])
        assert all(torch.equal(ws[:, c], ws[:, j]) for j in range(c, G.num_ws))
        crossovers.add(c)
    active = G.active_layers(32)  # 8 layers at 32x32
    assert crossovers <= set(range(1, active)) and len(crossovers) > 3
    # at 8x8 only 4 layers are active: crossover in [1, 4)
    for _ in range(20):
        G(z, 8, mixing_prob=1.0)
        diff = [(captured["ws"][:, i] - w1[:, i]).abs().max().item() > 0 for i in range(G.num_ws)]
        assert 1 <= diff.index(True) < 4
    # mixing off: all layers w1
    G(z, 32, mixing_prob=0.0)
    assert torch.equal(captured["ws"], w1)


def test_truncation_psi_zero_gives_w_avg_and_cutoff():
    G = build_generator(tiny_config())
    G.w_avg.copy_(torch.randn(32))
    z = torch.randn(5, 32)
    ws = G.map(z, truncation_psi=0.0)
    assert torch.allclose(ws, G.w_avg.expand_as(ws))
    ws_cut = G.map(z, truncation_psi=0.0, truncation_cutoff=3)
    assert torch.allclose(ws_cut[:, :3], G.w_avg.expand(5, 3, 32))
    assert torch.equal(ws_cut[:, 3:], G.map(z)[:, 3:])
    half = G.map(z, truncation_psi=0.5)
    assert torch.allclose(half, 0.5 * (G.map(z) + G.w_avg), atol=1e-6)


def test_w_avg_running_average():
    G = build_generator(tiny_config())
    z = torch.randn(8, 32)
    w = G.mapping(z).mean(0)
    G.map(z, update_w_avg=True)
    assert torch.allclose(G.w_avg, w * (1 - 0.995), atol=1e-7)


def test_noise_off_is_deterministic_and_zero_B_changes_nothing():
    z = torch.randn(2, 32)
    G_off = build_generator(tiny_config("generator.use_noise=false"))
    assert torch.equal(G_off(z, 32), G_off(z, 32))
    G_on = build_generator(tiny_config())
    a, b = G_on(z, 32), G_on(z, 32)  # different random noise each call, but B = 0 at init
    assert torch.equal(a, b)
    with torch.no_grad():
        G_on.synthesis.blocks[-1].epi1.noise_weight.fill_(0.5)
    assert not torch.allclose(G_on(z, 32), G_on(z, 32))


def test_explicit_noise_is_used():
    G = build_generator(tiny_config())
    with torch.no_grad():
        for m in G.synthesis.modules():
            if getattr(m, "noise_weight", None) is not None:
                m.noise_weight.fill_(0.3)
    z = torch.randn(2, 32)
    noise = [torch.randn(2, 1, s, s) for _, s in G.synthesis.noise_shapes(32)]
    assert torch.equal(G(z, 32, noise=noise), G(z, 32, noise=noise))


def test_traditional_generator_has_no_styles_and_uses_latent_input():
    G = build_generator(tiny_config("generator.architecture=traditional"))
    assert G.synthesis.const is None and G.synthesis.input_dense is not None
    assert all(getattr(m, "style", None) is None for m in G.synthesis.modules())
    z = torch.randn(2, 32)
    assert not torch.allclose(G(z[:1], 16), G(z[1:], 16))


@pytest.mark.parametrize("up", [True, False])
def test_fused_scale_matches_unfused(up):
    torch.manual_seed(0)
    a = EqualizedConv2d(6, 5, 3, up=up, down=not up, fused=False)
    b = EqualizedConv2d(6, 5, 3, up=up, down=not up, fused=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6, 8, 8)
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_equalized_lr_runtime_scale():
    torch.manual_seed(0)
    lin = EqualizedLinear(512, 512, gain=math.sqrt(2), lrmul=0.01)
    assert abs(lin.weight.std().item() - 100.0) < 2.0  # N(0, 1/lrmul)
    y = lin(torch.randn(4096, 512))
    assert abs(y.var().item() - 2.0) < 0.2  # He: variance gain^2 for unit inputs
    conv = EqualizedConv2d(64, 64, 3)
    assert abs(conv.weight.std().item() - 1.0) < 0.05


def test_blur_kernel_and_minibatch_stddev():
    x = torch.zeros(1, 2, 5, 5)
    x[0, :, 2, 2] = 16.0
    y = Blur(2)(x)
    assert torch.allclose(y[0, 0, 1:4, 1:4], torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert torch.allclose(y.sum(), x.sum())
    feats = torch.randn(8, 4, 3, 3)
    out = minibatch_stddev(feats, 4)
    assert out.shape == (8, 5, 3, 3)
    # sample i is in group i % 2 (M = 8 / 4 = 2)
    for m in range(2):
        grp = feats[m::2]
        expect = (grp.var(0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[m::2, 4], expect.expand(4, 3, 3), atol=1e-6)
