"""Inception-v3 as used for FID: 2048-d pool features, in the layout of pytorch-fid's weight file.

The standard FID network is the TensorFlow Inception graph of 2015-12-05. pytorch-fid ported it to
PyTorch as ``pt_inception-2015-12-05-6726825d.pth``: a state dict of torchvision's Inception-v3 layout
(1008 classes, no auxiliary head) whose mixed blocks differ from torchvision's in two ways that this
module reproduces -- average pooling inside the blocks ignores the zero padding (TensorFlow's behaviour),
and the last block's pooling branch uses max pooling. The module names below are chosen so that file
loads with strict key matching. torchvision cannot be imported beside our torch build, so the network is
written out here (see docs/metrics.md).

Input: uint8 images [N, 3, H, W] (1-channel images are repeated to 3). They are scaled to [0, 1],
resized to 299x299 bilinearly (align_corners=False, as pytorch-fid does), mapped to [-1, 1] and run
through the network; the output is the global average pool, [N, 2048].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .registry import MetricError
from .weights import file_digest, module_digest


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 'SAME' average pool divides by the number of valid (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions at 17x17."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank at 8x8; ``max_pool`` selects the FID graph's last-block pooling."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images -> 2048-d pool features. ``ident`` names the weights for the real-statistics cache."""

    feature_dim = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the file holds the classifier; features are taken before it
        self.ident = "fid-inception-v3:random"
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got {list(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = images.to(self.fc.weight.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (2.0 * x - 1.0).contiguous(memory_format=torch.channels_last)  # ~1.5x faster convolutions (CPU, GPU)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # [N, 2048]

    @torch.no_grad()
    def randomize(self, generator: torch.Generator | None = None) -> FIDInceptionV3:
        """He-normal random weights that keep activations in range (the default init collapses the features
        to ~0 after 40 layers); for tests and timing without the real weight file."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        return self.set_ident()

    def set_ident(self, ident: str | None = None) -> FIDInceptionV3:
        """Identity for caches: the weight file's digest, or a digest of the current (e.g. random) weights."""
        self.ident = ident or f"fid-inception-v3:{module_digest(self)[:16]}"
        return self


def load_state_dict_strict(module: nn.Module, state: dict, file: str | Path, what: str) -> None:
    """Load with exact key and shape matching; BatchNorm's ``num_batches_tracked`` counters may be absent."""
    if not isinstance(state, dict):
        raise MetricError(f"{file} does not hold a state dict of {what}.")
    own = module.state_dict()

    def core(keys):
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    missing = sorted(core(own) - core(state))
    unexpected = sorted(core(state) - core(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MetricError(f"{file} is not in the expected format for {what} ({detail}).")
    bad = [k for k in core(own) if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise MetricError(f"{file} has tensors of the wrong shape for {what} (first: {bad[0]}).")
    merged = {k: state.get(k, v) for k, v in own.items()}
    module.load_state_dict(merged, strict=True)


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """Build the FID Inception and load pytorch-fid's weight file (strict key matching)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricError(f"{path} could not be read as a PyTorch weight file ({type(e).__name__}).") from None
    net = FIDInceptionV3()
    load_state_dict_strict(net, state, path, "the FID Inception-v3")
    net.set_ident(f"fid-inception-v3:{file_digest(path)[:16]}")
    return net.to(device, memory_format=torch.channels_last).eval()
