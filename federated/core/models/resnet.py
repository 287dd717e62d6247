"""A ResNet-18 image encoder that DP-SGD can train: GroupNorm throughout, no BatchNorm.

BatchNorm normalises each sample with its batch's statistics, so one sample's output (and
gradient) depends on the other samples: per-sample gradients, and so DP-SGD's clipping, are
undefined (Opacus' ModuleValidator refuses it). Its running statistics are also a second,
unprotected channel that leaks each site's data statistics through the shared weights, and one
global mean/variance is wrong for every site when the sites are non-IID. GroupNorm normalises
each sample on its own and keeps no running state, so none of this applies.

The layout is torchvision's `resnet18` (BasicBlock, two blocks per stage, widths 64-512,
1x1-conv shortcuts where shape changes), written here with plain torch layers: the CPU torch
the project pins has no matching torchvision build on the package index (the index's wheels
link CUDA libraries and fail to import), and no pretrained weights are used anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

GN_GROUPS = 32  # Wu & He's default: every width here (64..512) divides, 2-16 channels a group
SMALL_IMAGE = 64  # up to this short side, the CIFAR stem (3x3 stride 1, no max-pool)
MIN_IMAGE = 16  # the CIFAR stem halves three times: 16 px still leaves a 2x2 map at the end
WIDTHS = (64, 128, 256, 512)
FEATURES = WIDTHS[-1]

NormFactory = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups (Wu & He, 2018): per-sample statistics, and each group still pools enough
    channels (2 at width 64) for a stable mean and variance."""
    if channels % GN_GROUPS:
        raise ValueError(f"GroupNorm with {GN_GROUPS} groups needs a multiple of {GN_GROUPS} channels, got {channels}")
    return nn.GroupNorm(GN_GROUPS, channels)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # no bias: the norm that follows has its own shift
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut (a strided 1x1 conv + norm when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.norm1 = norm(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.norm2 = norm(c_out)
        self.act = nn.ReLU()  # not in place: functorch and ExpandedWeights modes replay the graph
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(h)) + self.shortcut(x))


def resnet18_trunk(channels: int, small_stem: bool, norm: NormFactory = group_norm) -> nn.Sequential:
    """Stem and four stages of ResNet-18, no pooling head: [B, channels, H, W] -> [B, 512, h, w].

    `norm` is a parameter so the tests can build the BatchNorm original and show why it is refused."""
    if small_stem:  # keep 32 or 64 px inputs at full resolution into the first stage
        stem: list[nn.Module] = [_conv3x3(channels, WIDTHS[0])]
    else:  # ImageNet stem: /4 before the first stage
        stem = [nn.Conv2d(channels, WIDTHS[0], 7, stride=2, padding=3, bias=False)]
    stem += [norm(WIDTHS[0]), nn.ReLU()]
    if not small_stem:
        stem.append(nn.MaxPool2d(3, stride=2, padding=1))
    stages: list[nn.Module] = []
    c_in = WIDTHS[0]
    for i, width in enumerate(WIDTHS):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(BasicBlock(c_in, width, stride, norm), BasicBlock(width, width, 1, norm)))
        c_in = width
    trunk = nn.Sequential(*stem, *stages)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):  # He init: the ReLU network trains from scratch (no pretrained weights)
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return trunk


class ResNet18Encoder(nn.Module):
    """ResNet-18 (GroupNorm) features pooled to a side x side grid, each cell a token of width dim.

    Same contract as ImageEncoder: x [B, channels, H, W] float32 -> (tokens [B, k, dim], None).
    `image_size` (H, W) picks the stem: the ImageNet stem would shrink a 32 px image to 1 px."""

    def __init__(self, channels: int, dim: int, k: int, image_size: tuple[int, ...]) -> None:
        super().__init__()
        side = math.isqrt(k) if k > 0 else 0
        if side < 1 or side * side != k:
            raise ValueError(f"image encoders need a square token count, got k={k}")
        if len(image_size) != 2:  # a schema's shape[1:] arrives as tuple[int, ...]
            raise ValueError(f"image_size must be (height, width), got {image_size}")
        if min(image_size) < MIN_IMAGE:
            raise ValueError(f"ResNet18Encoder needs images of at least {MIN_IMAGE} px a side, got {image_size}")
        self.trunk = resnet18_trunk(channels, small_stem=min(image_size) <= SMALL_IMAGE)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.proj = nn.Linear(FEATURES, dim)  # applied to each token: one Linear on the last axis

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.pool(self.trunk(x))  # [B, 512, side, side]
        return self.proj(h.flatten(2).transpose(1, 2)), None  # [B, k, dim]
