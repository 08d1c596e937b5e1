"""Inference-only speed-ups of a built network, with the same outputs (to float rounding): batch norm folded into
the convolutions before it, and the convolutional parts compiled for the CPU with oneDNN Graph."""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch
from torch import nn

from .blocks import UnetResBlock
from .network import LanguageGuidedSegNet, UpStage


@torch.no_grad()
def fold_batchnorm(network: LanguageGuidedSegNet) -> LanguageGuidedSegNet:
    """Fold each eval-mode BatchNorm into the convolution before it (inference only; same outputs, less work)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    network.encoder.fold_batchnorm()
    for module in network.modules():
        if isinstance(module, UnetResBlock):
            for i in (1, 2, 3):
                norm = getattr(module, f"norm{i}", None)
                if isinstance(norm, nn.BatchNorm2d):
                    conv = getattr(module, f"conv{i}")
                    conv.conv = fuse_conv_bn_eval(conv.conv.eval(), norm.eval())
                    setattr(module, f"norm{i}", nn.Identity())
    return network


class _OneDNNFusionScope:
    """Switches TorchScript's process-wide oneDNN-fusion flag on while any of our fused graphs runs, in any thread,
    and back to what it was when the last one finishes. Counted under a lock: with two threads a plain save/restore
    around each call can restore the wrong value and leave the flag changed for the whole process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._previous = False

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._previous = torch.jit.onednn_fusion_enabled()
                torch.jit.enable_onednn_fusion(True)
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                torch.jit.enable_onednn_fusion(self._previous)


# The flag it guards is process-wide, so the guard is too.
_ONEDNN_FUSION = _OneDNNFusionScope()


class _OneDNNGraph(nn.Module):
    """A traced, frozen convolutional sub-network run under oneDNN Graph fusion (conv + activation + add in one
    kernel). The fuser is on only while such a graph runs; afterwards the flag is as the process had it."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> Any:
        with _ONEDNN_FUSION:
            return self.traced(x)


@torch.no_grad()
def fuse_convolutions(network: LanguageGuidedSegNet, image_size: int = 224) -> LanguageGuidedSegNet:
    """Compile the encoder and the decoder's convolution blocks for the CPU with oneDNN Graph (inference only).

    Call after :func:`fold_batchnorm` on a channels-last network. Outputs are unchanged (to float rounding); at batch 1
    on a 2-core CPU the encoder runs about twice as fast, as per-operator overhead dominates there. The attention
    stages stay eager (fusion makes them slower). If this PyTorch cannot trace or fuse, the network stays eager.
    """
    image = torch.zeros(1, 3, image_size, image_size).to(memory_format=torch.channels_last)
    try:
        # torch.jit is deprecated in favour of torch.compile, which needs a C++ compiler at run time that most
        # users (and 3D Slicer installs) lack; tracing needs none.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skips = network.encoder(image)[-2::-1]
            modules: list[tuple[nn.Module, str, torch.Tensor]] = [(network, "encoder", image)]
            up: UpStage
            for up, skip in zip(network.up_stages, skips):  # type: ignore[assignment]  # ModuleList of UpStage
                example = torch.zeros(1, up.block.in_channels, *skip.shape[-2:])
                modules.append((up, "block", example.to(memory_format=torch.channels_last)))
            fused = []
            for owner, name, example in modules:
                traced = torch.jit.freeze(torch.jit.trace(getattr(owner, name).eval(), example, check_trace=False,
                                                          strict=False))
                wrapper = _OneDNNGraph(traced)
                for _ in range(3):  # the profiling runs after which the fused kernels are compiled
                    wrapper(example)
                fused.append((owner, name, wrapper))
    except Exception as exc:  # noqa: BLE001 - any failure to compile only costs speed: stay eager
        logging.getLogger(__name__).debug("oneDNN fusion unavailable, running eager: %s", exc)
        return network
    for owner, name, wrapper in fused:
        setattr(owner, name, wrapper)
    return network
