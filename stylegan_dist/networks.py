"""StyleGAN generator (style-based and traditional) and discriminator, faithful to the paper and to the
official FFHQ configuration (see shared/REFERENCE.md):

* equalized learning rate everywhere: weights N(0, 1/lrmul), scaled at run time by gain*lrmul/sqrt(fan_in);
* mapping network f: Z -> W, 8 x 512 dense + leaky ReLU 0.2, lrmul 0.01, z pixel-normalised;
* synthesis g: learned 4x4 constant; per layer conv -> noise*B -> bias -> lrelu -> instance norm -> style;
  upsampling conv followed by the [1,2,1] blur; one toRGB per resolution; nearest-upsampled fade-in;
* discriminator: fromRGB per resolution, conv -> blur -> conv+downsample, minibatch stddev at 4x4.

Progressive growing: both networks hold every resolution up to ``model.resolution`` and run only the
part up to the current one, so parameters of inactive resolutions get no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, log2i

SQRT2 = math.sqrt(2.0)


def nf(stage: int, fmap_base: int, fmap_max: int) -> int:
    """Feature maps at stage s (resolution 2^(s+1)): min(fmap_base / 2^s, fmap_max)."""
    return min(int(fmap_base / (2.0**stage)), fmap_max)


def assert_shape(x: torch.Tensor, shape: list[int | None]) -> None:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise AssertionError(f"expected shape {shape}, got {list(x.shape)}")


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def instance_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    # (x - mean) / sqrt(mean((x - mean)^2) + eps) over H, W: the official formula, as one fused op.
    return F.instance_norm(x, eps=eps)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample_box(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def is_fading(alpha: float | torch.Tensor) -> bool:
    """A tensor alpha (used under torch.compile, so that each new value is not a new graph) always means
    the fade path; a float means it when below 1."""
    return isinstance(alpha, torch.Tensor) or alpha < 1.0


# --------------------------------------------------------------------------------------------------
# Equalized-learning-rate layers


class EqualizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, lrmul: float = 1.0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lrmul)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.w_coef = gain * lrmul / math.sqrt(in_features)
        self.b_coef = lrmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.b_coef if self.bias is not None else None
        return F.linear(x, self.weight * self.w_coef, b)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, w_coef={self.w_coef:.4g}"


class EqualizedConv2d(nn.Module):
    """k x k conv, optionally fused with x2 nearest upsampling (before) or 2x2 box downsampling (after).

    Fused variants compute the same function as the unfused ones with a strided 4x4 (transposed)
    convolution whose kernel is the 3x3 kernel summed over the four 2x2 phase shifts, as the official
    code does from 128x128 on.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, gain: float = SQRT2, bias: bool = True,
                 up: bool = False, down: bool = False, fused: bool = False):
        super().__init__()
        assert not (up and down)
        assert not fused or kernel == 3, "fused up/down sampling is defined for 3x3 kernels"
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.w_coef = gain / math.sqrt(in_channels * kernel * kernel)
        self.up, self.down, self.fused, self.pad = up, down, fused and (up or down), kernel // 2

    @staticmethod
    def _phase_sum(w: torch.Tensor) -> torch.Tensor:
        w = F.pad(w, [1, 1, 1, 1])
        return w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]  # [O, I, 4, 4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.w_coef
        b = self.bias
        if self.up and self.fused:
            w = self._phase_sum(w).flip([2, 3]).transpose(0, 1)  # [I, O, 4, 4] for conv_transpose2d
            return F.conv_transpose2d(x, w, b, stride=2, padding=1)
        if self.down and self.fused:
            return F.conv2d(x, self._phase_sum(w) * 0.25, b, stride=2, padding=1)
        if self.up:
            x = upsample_nearest(x)
        x = F.conv2d(x, w, b, padding=self.pad)
        if self.down:
            x = downsample_box(x)
        return x

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i} -> {o}, k={k}, up={self.up}, down={self.down}, fused={self.fused}"


class Blur(nn.Module):
    """Depthwise low-pass filter with the normalised [1,2,1] x [1,2,1] kernel, 'same' padding."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(k, k)
        k = k / k.sum()
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=x.shape[1])


# --------------------------------------------------------------------------------------------------
# Generator


class LayerEpilogue(nn.Module):
    """noise * B -> bias -> leaky ReLU -> (pixel norm) -> (instance norm) -> style modulation."""

    def __init__(self, channels: int, w_dim: int, *, use_noise: bool, use_pixel_norm: bool,
                 use_instance_norm: bool, use_styles: bool):
        super().__init__()
        self.noise_weight = nn.Parameter(torch.zeros(channels)) if use_noise else None  # B, zero at init
        self.bias = nn.Parameter(torch.zeros(channels))
        self.use_pixel_norm, self.use_instance_norm = use_pixel_norm, use_instance_norm
        self.style = EqualizedLinear(w_dim, 2 * channels, gain=1.0) if use_styles else None  # A

    def forward(self, x: torch.Tensor, w: torch.Tensor | None, noise: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, wd = x.shape
        if self.noise_weight is not None:
            if noise is None:
                noise = torch.randn(n, 1, h, wd, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_weight.view(1, -1, 1, 1).to(x.dtype)
        x = lrelu(x + self.bias.view(1, -1, 1, 1).to(x.dtype))
        if self.use_pixel_norm:
            x = pixel_norm(x)
        if self.use_instance_norm:
            x = instance_norm(x)
        if self.style is not None:
            style = self.style(w).view(n, 2, c, 1, 1).to(x.dtype)  # y = (y_s, y_b)
            x = x * (style[:, 0] + 1) + style[:, 1]
        return x


class SynthesisBlock(nn.Module):
    """Resolution 2^res (res >= 3): upsample + 3x3 conv, blur, epilogue; 3x3 conv, epilogue."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, fused: bool, blur: bool, **epi):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, out_channels, 3, bias=False, up=True, fused=fused)
        self.blur = Blur(out_channels) if blur else None
        self.epi0 = LayerEpilogue(out_channels, w_dim, **epi)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3, bias=False)
        self.epi1 = LayerEpilogue(out_channels, w_dim, **epi)

    def forward(self, x, w0, w1, n0=None, n1=None):
        x = self.conv0(x)
        if self.blur is not None:
            x = self.blur(x)
        x = self.epi0(x, w0, n0)
        return self.epi1(self.conv1(x), w1, n1)


def _fused(cfg_fused_scale: str, res_log2: int) -> bool:
    return {"always": True, "never": False, "auto": res_log2 >= 7}[cfg_fused_scale]


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m, g = cfg.model, cfg.generator
        self.resolution_log2 = log2i(m.resolution)
        self.num_layers = 2 * self.resolution_log2 - 2  # two per resolution, 18 at 1024
        self.use_styles = g.use_styles
        self.num_ws = self.num_layers if g.use_styles else 1
        self.w_dim = m.w_dim
        ch = [nf(r - 1, m.fmap_base, m.fmap_max) for r in range(self.resolution_log2 + 1)]  # ch[r]: at 2^r
        self.channels = ch
        epi = dict(use_noise=g.use_noise, use_pixel_norm=g.use_pixel_norm, use_instance_norm=g.use_instance_norm,
                   use_styles=g.use_styles)
        if g.const_input:
            self.const = nn.Parameter(torch.ones(1, ch[2], 4, 4))
            self.input_dense = None
        else:
            self.const = None
            # Latent into the first layer, as in Progressive GAN (gain sqrt(2)/4 as in the official code).
            self.input_dense = EqualizedLinear(m.w_dim, ch[2] * 16, gain=SQRT2 / 4, bias=False)
        self.epi0 = LayerEpilogue(ch[2], m.w_dim, **epi)
        self.conv = EqualizedConv2d(ch[2], ch[2], 3, bias=False)
        self.epi1 = LayerEpilogue(ch[2], m.w_dim, **epi)
        self.blocks = nn.ModuleList(
            SynthesisBlock(ch[r - 1], ch[r], m.w_dim, _fused(m.fused_scale, r), m.blur, **epi)
            for r in range(3, self.resolution_log2 + 1)
        )
        self.torgb = nn.ModuleList(
            EqualizedConv2d(ch[r], m.num_channels, 1, gain=1.0) for r in range(2, self.resolution_log2 + 1)
        )

    def noise_shapes(self, resolution: int) -> list[tuple[int, int]]:
        """(layer index, spatial size) of each noise input used up to ``resolution``."""
        return [(i, 2 ** (i // 2 + 2)) for i in range(2 * log2i(resolution) - 2)]

    def forward(self, ws: torch.Tensor, resolution: int, alpha: float | torch.Tensor = 1.0,
                noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """ws: [N, num_ws, w_dim] -> images [N, C, resolution, resolution] in about [-1, 1]."""
        assert_shape(ws, [None, self.num_ws, self.w_dim])
        r_cur = log2i(resolution)
        assert 2 <= r_cur <= self.resolution_log2, resolution
        n = ws.shape[0]
        noise = noise if noise is not None else [None] * self.num_layers

        def w(i: int) -> torch.Tensor | None:
            return ws[:, i] if self.use_styles else None

        if self.const is not None:
            x = self.const.expand(n, -1, -1, -1).to(ws.dtype)
        else:
            x = self.input_dense(ws[:, 0]).view(n, -1, 4, 4)  # [N, 512, 4, 4]
        x = self.epi0(x, w(0), noise[0])
        x = self.epi1(self.conv(x), w(1), noise[1])
        skip = None
        for r in range(3, r_cur + 1):
            if r == r_cur and is_fading(alpha):
                skip = upsample_nearest(self.torgb[r - 3](x))
            x = self.blocks[r - 3](x, w(2 * r - 4), w(2 * r - 3), noise[2 * r - 4], noise[2 * r - 3])
        img = self.torgb[r_cur - 2](x)
        if skip is not None:
            img = torch.lerp(skip, img, alpha.to(img.dtype) if isinstance(alpha, torch.Tensor) else alpha)
        return img


class MappingNetwork(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m, g = cfg.model, cfg.generator
        self.normalize = g.normalize_latents
        dims = [m.latent_dim] + [g.mapping_fmaps] * (g.mapping_layers - 1) + [m.w_dim]
        self.layers = nn.ModuleList(
            EqualizedLinear(dims[i], dims[i + 1], gain=SQRT2, lrmul=g.mapping_lrmul) for i in range(g.mapping_layers)
        )
        self.latent_dim = m.latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert_shape(z, [None, self.latent_dim])
        x = pixel_norm(z) if self.normalize else z
        for layer in self.layers:
            x = lrelu(layer(x))
        return x  # [N, w_dim]


class Generator(nn.Module):
    """Mapping + synthesis + running average of w. Style-based or traditional, chosen by the config."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        g = cfg.generator
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.num_layers = self.synthesis.num_layers
        self.w_avg_beta = g.w_avg_beta
        self.register_buffer("w_avg", torch.zeros(cfg.model.w_dim))
        self.max_resolution = cfg.model.resolution
        self.latent_dim = cfg.model.latent_dim

    def active_layers(self, resolution: int) -> int:
        """Synthesis layers in use at ``resolution`` (the crossover range for style mixing)."""
        return min(2 * log2i(resolution) - 2, self.num_layers)

    def map(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
            update_w_avg: bool = False) -> torch.Tensor:
        """z [N, latent] -> ws [N, num_ws, w_dim], with the truncation trick in W when psi != 1."""
        w = self.mapping(z)
        if update_w_avg:
            with torch.no_grad():
                # w_avg <- lerp(batch mean, w_avg, beta), as in the official code.
                self.w_avg.copy_(torch.lerp(w.detach().float().mean(0), self.w_avg, self.w_avg_beta))
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            cutoff = self.num_ws if truncation_cutoff is None else min(truncation_cutoff, self.num_ws)
            ws[:, :cutoff] = torch.lerp(self.w_avg.to(ws.dtype), ws[:, :cutoff], truncation_psi)
        return ws

    def mix(self, ws: torch.Tensor, ws2: torch.Tensor, crossover: int) -> torch.Tensor:
        """Layers [0, crossover) keep ws, layers [crossover, ...) take ws2."""
        out = ws.clone()
        out[:, crossover:] = ws2[:, crossover:]
        return out

    def forward(self, z: torch.Tensor, resolution: int | None = None, alpha: float | torch.Tensor = 1.0, *,
                mixing_prob: float = 0.0, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_w_avg: bool = False, noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """z [N, latent_dim] -> images [N, C, R, R].

        Style mixing regularisation (training): with probability ``mixing_prob`` a second latent is drawn
        and used from a crossover layer drawn uniformly in [1, active layers), one draw per minibatch as
        in the official code.
        """
        resolution = resolution or self.max_resolution
        ws = self.map(z, truncation_psi, truncation_cutoff, update_w_avg)
        if mixing_prob > 0.0 and torch.rand([]).item() < mixing_prob:
            cur = self.active_layers(resolution)
            if cur > 1:
                crossover = int(torch.randint(1, cur, []).item())
                ws = self.mix(ws, self.map(torch.randn_like(z), truncation_psi, truncation_cutoff), crossover)
        return self.synthesis(ws, resolution, alpha, noise)


# --------------------------------------------------------------------------------------------------
# Discriminator


def minibatch_stddev(x: torch.Tensor, group_size: int, num_features: int = 1) -> torch.Tensor:
    """Append the average stddev over groups of samples (Progressive GAN). Sample i belongs to group i % M.

    The group is the largest divisor of N that is <= group_size (the official code needs N % G == 0).
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    while n % g:
        g -= 1
    y = x.float().reshape(g, -1, num_features, c // num_features, h, w)  # [G, M, n, c, H, W]
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [M, n, c, H, W]
    y = y.mean(dim=[2, 3, 4])  # [M, n]
    y = y.reshape(-1, num_features, 1, 1).repeat(g, 1, h, w).to(x.dtype)  # [N, n, H, W]
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Resolution 2^res (res >= 3): 3x3 conv, lrelu, blur, 3x3 conv + downsample, lrelu."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool, blur: bool):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3)
        self.blur = Blur(in_channels) if blur else None
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3, down=True, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lrelu(self.conv0(x))
        if self.blur is not None:
            x = self.blur(x)
        return lrelu(self.conv1(x))


class Discriminator(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m, d = cfg.model, cfg.discriminator
        self.resolution_log2 = log2i(m.resolution)
        ch = [nf(r - 1, m.fmap_base, m.fmap_max) for r in range(self.resolution_log2 + 1)]
        self.fromrgb = nn.ModuleList(
            EqualizedConv2d(m.num_channels, ch[r], 1) for r in range(2, self.resolution_log2 + 1)
        )
        # blocks[r - 3] maps 2^r -> 2^(r-1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch[r], ch[r - 1], _fused(m.fused_scale, r), m.blur)
            for r in range(3, self.resolution_log2 + 1)
        )
        self.mbstd_group_size, self.mbstd_num_features = d.mbstd_group_size, d.mbstd_num_features
        extra = d.mbstd_num_features if d.mbstd_group_size > 1 else 0
        c4, c0 = ch[2], nf(0, m.fmap_base, m.fmap_max)
        self.conv = EqualizedConv2d(c4 + extra, c4, 3)
        self.dense0 = EqualizedLinear(c4 * 16, c0)
        self.dense1 = EqualizedLinear(c0, 1, gain=1.0)
        self.num_channels = m.num_channels

    def forward(self, img: torch.Tensor, resolution: int | None = None,
                alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
        """images [N, C, R, R] -> scores [N, 1]."""
        resolution = resolution or 2**self.resolution_log2
        assert_shape(img, [None, self.num_channels, resolution, resolution])
        r_cur = log2i(resolution)
        x = lrelu(self.fromrgb[r_cur - 2](img))
        for r in range(r_cur, 2, -1):
            x = self.blocks[r - 3](x)
            if r == r_cur and is_fading(alpha):
                y = lrelu(self.fromrgb[r_cur - 3](downsample_box(img)))
                x = torch.lerp(y, x, alpha.to(x.dtype) if isinstance(alpha, torch.Tensor) else alpha)
        if self.mbstd_group_size > 1:
            x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_features)
        x = lrelu(self.conv(x))
        x = lrelu(self.dense0(x.flatten(1)))
        return self.dense1(x)


# --------------------------------------------------------------------------------------------------
# Factories and summaries

GENERATORS = {"style": Generator, "traditional": Generator}  # one class, switches from the config


def build_generator(cfg: Config) -> Generator:
    return GENERATORS[cfg.generator.architecture](cfg)


def build_discriminator(cfg: Config) -> Discriminator:
    return Discriminator(cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
