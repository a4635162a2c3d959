import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from stylegan_dist.config import build_config
from stylegan_dist.loss import StepContext, StyleGANLoss
from stylegan_dist.networks import build_generator


class LinearD(nn.Module):
    """D(x) = <a, x>: its input gradient is a, so R1 = |a|^2 exactly."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.randn(shape))

    def forward(self, img, resolution=None, alpha=1.0):
        return (img * self.a).flatten(1).sum(1, keepdim=True)


def test_r1_penalty_is_squared_input_gradient():
    cfg = tiny_config(resolution=8)
    G = build_generator(cfg)
    D = LinearD((3, 8, 8))
    loss = StyleGANLoss(cfg, G, D, "cpu")
    reals = torch.rand(4, 3, 8, 8) * 2 - 1
    stats = loss.accumulate_gradients("Dboth", reals, StepContext(8, 1.0, 4))
    assert torch.allclose(stats["loss/R1"], D.a.detach().square().sum(), rtol=1e-5)
    # grad of the D loss w.r.t. a includes gamma/2 * d|a|^2/da = gamma * a from R1
    g_both = D.a.grad.clone()
    D.a.grad = None
    loss.accumulate_gradients("D", reals, StepContext(8, 1.0, 4))
    g_main = D.a.grad.clone()
    D.a.grad = None
    loss.accumulate_gradients("Dreg", reals, StepContext(8, 1.0, 4))
    assert torch.allclose(D.a.grad, 10.0 * D.a.detach(), rtol=1e-5)
    # Dboth and D + Dreg differ only through fresh fakes in D; the R1 part is identical
    assert torch.isfinite(g_both).all() and torch.isfinite(g_main).all()


def test_g_loss_only_touches_g():
    cfg = tiny_config(resolution=8)
    G = build_generator(cfg)
    D = LinearD((3, 8, 8)).requires_grad_(False)
    loss = StyleGANLoss(cfg, G, D, "cpu")
    stats = loss.accumulate_gradients("G", torch.zeros(2, 3, 8, 8), StepContext(8, 1.0, 2))
    assert stats["loss/G"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_wgan_gp_gradient_penalty():
    cfg = tiny_config("loss.kind=wgan_gp", resolution=8)
    G = build_generator(cfg)
    D = LinearD((3, 8, 8))
    loss = StyleGANLoss(cfg, G, D, "cpu")
    stats = loss.accumulate_gradients("Dreg", torch.rand(4, 3, 8, 8), StepContext(8, 1.0, 4))
    norm = D.a.detach().square().sum().sqrt()
    assert torch.allclose(stats["loss/GP"], 10.0 * (norm - 1) ** 2, rtol=1e-4)


def _official_d_input_r1(D, reals, resolution, final, alpha, gamma):
    """Reference of the official D input path: reals nearest-upscaled to the final resolution, box-downsampled
    inside D, R1 = gamma/2 * E|grad w.r.t. the upscaled tensor|^2."""
    f = final // resolution
    up = F.interpolate(reals, scale_factor=f, mode="nearest").requires_grad_(True)
    scores = D(F.avg_pool2d(up, f), resolution, alpha)
    (grad,) = torch.autograd.grad(scores.sum(), up, create_graph=True)
    penalty = grad.square().sum(dim=[1, 2, 3])
    return penalty, penalty.mean() * (gamma * 0.5)


@pytest.mark.parametrize("resolution,alpha", [(8, 1.0), (16, 0.5), (32, 1.0)])
def test_r1_while_growing_matches_the_official_full_resolution_input(resolution, alpha):
    from stylegan_dist.networks import build_discriminator

    gamma, final = 10.0, 32
    cfg = tiny_config(resolution=final)
    torch.manual_seed(0)
    D = build_discriminator(cfg)
    loss = StyleGANLoss(cfg, build_generator(cfg), D, "cpu")
    reals = torch.rand(4, 3, resolution, resolution) * 2 - 1
    stats = loss.accumulate_gradients("Dreg", reals, StepContext(resolution, alpha, 4))
    ours = {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}
    D.zero_grad(set_to_none=True)
    penalty, reg = _official_d_input_r1(D, reals, resolution, final, alpha, gamma)
    reg.backward()
    assert torch.allclose(stats["loss/R1"], penalty.mean().detach(), rtol=1e-4)
    for n, p in D.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[n], p.grad, rtol=1e-3, atol=1e-9), n
    # the same penalty in closed form: gamma (r/R)^2 / 2 |grad_low|^2
    low = reals.clone().requires_grad_(True)
    (g_low,) = torch.autograd.grad(D(low, resolution, alpha).sum(), low)
    expect = g_low.square().sum(dim=[1, 2, 3]).mean() * (resolution / final) ** 2
    assert torch.allclose(stats["loss/R1"], expect, rtol=1e-4)
    # the named option keeps the PyTorch ports' R1 at the training resolution: gamma/2 |grad_low|^2
    cfg_t = tiny_config("loss.penalty_resolution=training", resolution=final)
    stats_t = StyleGANLoss(cfg_t, build_generator(cfg_t), D, "cpu").accumulate_gradients(
        "Dreg", reals, StepContext(resolution, alpha, 4))
    assert torch.allclose(stats_t["loss/R1"], g_low.square().sum(dim=[1, 2, 3]).mean(), rtol=1e-4)
    if resolution < final:
        assert stats_t["loss/R1"] > 3 * stats["loss/R1"]


def test_wgan_gp_target_is_met_in_full_resolution_units():
    # LinearD at 8x8 of a 32x32 model: |grad| at 8 is |a|, measured at 32 it is |a| / 4.
    for mode, scale in (("final", 0.25), ("training", 1.0)):
        cfg = tiny_config("loss.kind=wgan_gp", f"loss.penalty_resolution={mode}", resolution=32)
        D = LinearD((3, 8, 8))
        stats = StyleGANLoss(cfg, build_generator(cfg), D, "cpu").accumulate_gradients(
            "Dreg", torch.rand(4, 3, 8, 8), StepContext(8, 1.0, 4))
        norm = D.a.detach().square().sum().sqrt() * scale
        assert torch.allclose(stats["loss/GP"], 10.0 * (norm - 1) ** 2, rtol=1e-4)


def test_wgan_gp_caps_the_learning_rate_as_the_official_celebahq_config():
    from stylegan_dist.schedule import phase_at

    sched = ["schedule.start_resolution=1024", "schedule.lr_dict={1024: 0.003}"]
    cfg = build_config(set_args=["loss.kind=wgan_gp", *sched])
    assert phase_at(cfg, 0).lr == 0.002
    assert phase_at(build_config(set_args=sched), 0).lr == 0.003
    assert phase_at(build_config(set_args=["loss.kind=wgan_gp", "loss.wgan_lr_cap=0", *sched]), 0).lr == 0.003


def test_truncation_is_off_for_the_traditional_generator():
    assert build_config().generator.truncation_psi == 0.7
    assert build_config(preset="B").generator.truncation_psi == 1.0
    assert build_config(preset="B", set_args=["generator.truncation_psi=0.5"]).generator.truncation_psi == 0.5
