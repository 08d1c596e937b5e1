"""The decoder's convolution blocks: MONAI's ``UnetResBlock`` and ``UnetOutBlock`` (2D), layer for layer.

Importing any ``monai`` module runs MONAI's package ``__init__``, which imports all of MONAI (``monai.apps``,
``monai.data``, every network including one built on transformers' BERT): about two seconds before the first mask,
paid by every ``lgseg segment`` call and by the Slicer module's first Apply. The two blocks are a few lines each, so
the engine keeps their exact layout here, with MONAI's parameter names, so that weights load either way; MONAI stays
where it does the work (losses, metrics and transforms in training). ``Testing/test_network.py`` checks that these
blocks and MONAI's give the same outputs from the same weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _convolution(cin: int, cout: int, kernel_size: int, bias: bool) -> nn.Sequential:
    """MONAI's ``Convolution`` without activation, norm or dropout: a container whose one layer is ``conv``."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)))


class UnetResBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and leaky ReLU, plus a 1x1 convolution on the skip path when the
    channel count changes (MONAI ``UnetResBlock(2, cin, cout, kernel_size=3, stride=1, norm_name="batch")``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = _convolution(cin, cout, kernel_size, bias=False)
        self.conv2 = _convolution(cout, cout, kernel_size, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = nn.BatchNorm2d(cout)
        self.norm2 = nn.BatchNorm2d(cout)
        self.in_channels = cin
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = _convolution(cin, cout, 1, bias=False)
            self.norm3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        return self.lrelu(out + residual)


class UnetOutBlock(nn.Module):
    """A 1x1 convolution with bias (MONAI ``UnetOutBlock(2, cin, cout)``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _convolution(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
