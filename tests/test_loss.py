import torch
from conftest import tiny_config
from torch import nn

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
