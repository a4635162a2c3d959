"""LPIPS (Zhang et al. 2018), VGG16 'lin' variant v0.1: the perceptual distance behind PPL.

d(x0, x1) = sum over the five VGG16 stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of the spatial
mean of  w_l . (f0_l - f1_l)^2, where f_l are the stage activations normalised to unit length over
channels and w_l >= 0 are the learned per-channel 'lin' weights. Inputs are images in [-1, 1]; they are
shifted and scaled per channel first (the constants of LPIPS v0.1).

Two weight files (see weights.py): the VGG16 backbone in torchvision's ``vgg16`` state-dict format
(keys ``features.<i>.weight/bias``; classifier keys are ignored) and the LPIPS linear layers in the lpips
package's ``weights/v0.1/vgg.pth`` format (keys ``lin<k>.model.1.weight`` of shape [1, C_k, 1, 1]).
The lpips package itself cannot be used because it imports torchvision (docs/metrics.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .inception import load_state_dict_strict
from .registry import MetricError
from .weights import file_digest, module_digest

# torchvision's vgg16().features: conv channels, 'M' = 2x2 max pool. Indices in the Sequential matter for
# the state-dict keys: each conv is followed by a ReLU.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_STAGE_ENDS = (4, 9, 16, 23, 30)  # slice ends after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
STAGE_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    """1x1 conv without bias; ``model.1`` is the key layout of the lpips package (0 is a dropout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(_Lin(c) for c in STAGE_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.ident = "lpips-vgg16:random"
        self.eval().requires_grad_(False)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in _STAGE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] (1-channel images are repeated) -> distances [N]."""
        if img0.shape != img1.shape:
            raise ValueError(f"LPIPS needs images of one shape, got {list(img0.shape)} and {list(img1.shape)}")
        if img0.shape[1] == 1:
            img0, img1 = img0.repeat(1, 3, 1, 1), img1.repeat(1, 3, 1, 1)
        n = img0.shape[0]
        x = (torch.cat([img0, img1]).float() - self.shift) / self.scale
        total = torch.zeros(n, device=x.device)
        for lin, f in zip(self.lins, self._stages(x)):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (f[:n] - f[n:]).square()
            total = total + lin.model[1](diff).mean(dim=(1, 2, 3))
        return total

    def set_ident(self, ident: str | None = None) -> LPIPS:
        self.ident = ident or f"lpips-vgg16:{module_digest(self)[:16]}"
        return self

    def randomize_lins(self, generator: torch.Generator | None = None) -> LPIPS:
        """Non-negative random lin weights (the learned ones are non-negative); for tests and timing."""
        for lin in self.lins:
            w = lin.model[1].weight
            w.copy_(torch.rand(w.shape, generator=generator) / w.shape[1])
        return self


def _read(path: str | Path, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricError(f"{path} could not be read as a PyTorch weight file for {what} ({type(e).__name__}).") \
            from None


def load_lpips(vgg16_path: str | Path, lin_path: str | Path, device: torch.device | str = "cpu") -> LPIPS:
    net = LPIPS()
    vgg = _read(vgg16_path, "VGG16")
    if not isinstance(vgg, dict):
        raise MetricError(f"{vgg16_path} does not hold a VGG16 state dict.")
    feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
    load_state_dict_strict(net.features, feats, vgg16_path, "torchvision's VGG16 ('features.*' keys)")
    lin = _read(lin_path, "LPIPS")
    if not isinstance(lin, dict):
        raise MetricError(f"{lin_path} does not hold the LPIPS linear-layer state dict.")
    # Accept both the packaged layout (lin<k>.model.1.weight) and a dropout-free one (lin<k>.model.0.weight).
    lins = {}
    for k in range(len(STAGE_CHANNELS)):
        w = lin.get(f"lin{k}.model.1.weight", lin.get(f"lin{k}.model.0.weight"))
        if w is None:
            raise MetricError(f"{lin_path} is not in the lpips package's vgg.pth format (no lin{k}.model.1.weight).")
        lins[f"{k}.model.1.weight"] = w
    load_state_dict_strict(net.lins, lins, lin_path, "the LPIPS linear layers")
    net.set_ident(f"lpips-vgg16:{file_digest(vgg16_path)[:12]}:{file_digest(lin_path)[:12]}")
    return net.to(device).eval()
