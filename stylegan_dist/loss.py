"""Losses. The loss object owns the gradient computation of each phase; the loop owns optimisers.

Phases:
  ``G``      generator step: non-saturating logistic (or WGAN) on D(G(z)), with style mixing.
  ``D``      discriminator main loss on reals and fakes.
  ``Dreg``   regularisation only (R1 on reals, or the WGAN-GP gradient penalty).
  ``Dboth``  ``D`` + ``Dreg`` sharing one forward pass of D on the reals (the paper's R1-every-step).

All losses are means over the local minibatch, so averaging gradients over data-parallel workers
gives the gradient of the global minibatch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .networks import Discriminator, Generator

PHASES = ("G", "D", "Dreg", "Dboth")


@dataclass
class StepContext:
    resolution: int
    alpha: float
    batch: int  # local minibatch


class StyleGANLoss:
    def __init__(self, cfg: Config, G: Generator, D: Discriminator, device: torch.device | str, D_forward=None):
        self.cfg = cfg
        self.G, self.D = G, D
        # Optional compiled D with the module's signature (G is compiled in place: loop.compile_models).
        self.D_forward = D_forward if D_forward is not None else D
        self.device = torch.device(device)
        self.lc = cfg.loss
        self.mixing_prob = cfg.generator.mixing_prob
        self.autocast = cfg.perf.precision == "bf16"
        self.compiled = cfg.perf.compile
        # Draws the latents of each G evaluation; replaceable so tests can feed identical latents to a
        # 1-worker and a 2-worker run.
        self.sample_z = lambda n: torch.randn(n, G.latent_dim, device=self.device)

    def _amp(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _alpha(self, ctx: StepContext) -> float | torch.Tensor:
        # Under torch.compile a float alpha would be baked into the graph and recompiled every step of a fade.
        if self.compiled and ctx.alpha < 1.0:
            return torch.tensor(ctx.alpha, device=self.device)
        return ctx.alpha

    def grad_scale(self, ctx: StepContext) -> float:
        """|grad| w.r.t. the reals as the penalty measures it, per unit of |grad| at the training resolution.

        The official D takes full-resolution tensors: reals nearest-upscaled by f = R / r, box-downsampled
        inside D. The gradient w.r.t. the upscaled tensor spreads each pixel's gradient / f^2 over f^2 pixels,
        so its norm is the training-resolution norm / f ("final"). "training" measures it at r (factor 1).
        """
        if self.lc.penalty_resolution == "training":
            return 1.0
        return ctx.resolution / self.cfg.model.resolution

    def run_G(self, n: int, ctx: StepContext) -> torch.Tensor:
        z = self.sample_z(n)
        with self._amp():
            return self.G(z, ctx.resolution, self._alpha(ctx), mixing_prob=self.mixing_prob,
                                  update_w_avg=True)

    def run_D(self, img: torch.Tensor, ctx: StepContext, double_backward: bool = False) -> torch.Tensor:
        # A compiled D cannot be differentiated twice (AOTAutograd has no double backward), so the passes
        # that R1 / the gradient penalty differentiate through run the eager module.
        d = self.D if double_backward else self.D_forward
        with self._amp():
            return d(img, ctx.resolution, ctx.alpha if double_backward else self._alpha(ctx)).float()

    def accumulate_gradients(self, phase: str, reals: torch.Tensor, ctx: StepContext,
                             gain: float = 1.0) -> dict[str, torch.Tensor]:
        """Backpropagate the loss of ``phase`` into .grad of G's or D's parameters; return detached stats.

        ``reals`` is float in [-1, 1], [N, C, R, R]. ``gain`` scales the loss (lazy regularisation).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        stats: dict[str, torch.Tensor] = {}
        wgan = self.lc.kind == "wgan_gp"

        if phase == "G":
            fake_scores = self.run_D(self.run_G(ctx.batch, ctx), ctx)
            loss = (-fake_scores).mean() if wgan else F.softplus(-fake_scores).mean()  # -log sigmoid(D(G(z)))
            (loss * gain).backward()
            stats["loss/G"] = loss.detach()
            return stats

        do_main = phase in ("D", "Dboth")
        do_reg = phase in ("Dreg", "Dboth") and (self.lc.r1_gamma > 0 if not wgan else self.lc.wgan_lambda > 0)
        total = torch.zeros([], device=self.device)

        if do_main:
            with torch.no_grad():
                fakes = self.run_G(ctx.batch, ctx)
            fake_scores = self.run_D(fakes, ctx)
            stats["scores/fake"] = fake_scores.detach().mean()
        if do_main or (do_reg and not wgan):
            reals_in = reals.detach().requires_grad_(do_reg and not wgan)
            real_scores = self.run_D(reals_in, ctx, double_backward=do_reg and not wgan)
            stats["scores/real"] = real_scores.detach().mean()

        if do_main:
            if wgan:
                main = fake_scores.mean() - real_scores.mean()
                main = main + self.lc.wgan_epsilon * real_scores.square().mean()  # keeps scores near 0
            else:
                main = F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()
            total = total + main
            stats["loss/D"] = main.detach()

        if do_reg and not wgan:
            # R1: gamma/2 * E[|grad_x D(x)|^2] on reals (Mescheder et al. 2018).
            (grad,) = torch.autograd.grad(real_scores.sum(), reals_in, create_graph=True)
            penalty = grad.float().square().sum(dim=[1, 2, 3]) * self.grad_scale(ctx) ** 2
            reg = penalty.mean() * (self.lc.r1_gamma * 0.5)
            total = total + reg
            stats["loss/R1"] = penalty.detach().mean()
        elif do_reg and wgan:
            # WGAN-GP: lambda * E[(|grad D(x_hat)| - target)^2 / target^2] on random interpolates.
            with torch.no_grad():
                fakes_gp = fakes if do_main else self.run_G(ctx.batch, ctx)
            t = torch.rand(reals.shape[0], 1, 1, 1, device=self.device, dtype=reals.dtype)
            mixed = torch.lerp(reals.detach(), fakes_gp.to(reals.dtype), t).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.run_D(mixed, ctx, double_backward=True).sum(), mixed,
                                          create_graph=True)
            norm = grad.float().square().sum(dim=[1, 2, 3]).sqrt() * self.grad_scale(ctx)
            reg = ((norm - self.lc.wgan_target).square() / self.lc.wgan_target**2).mean() * self.lc.wgan_lambda
            total = total + reg
            stats["loss/GP"] = reg.detach()

        (total * gain).backward()
        return stats
