"""Inference-only speed-ups of a built network (fusion.py): folding batch norm and compiling the convolutions
change speed, not outputs."""

from __future__ import annotations

import torch

from languageguidedseg.config import NetworkConfig
from languageguidedseg.encoders import EfficientNetLite
from languageguidedseg.fusion import fold_batchnorm, fuse_convolutions
from languageguidedseg.network import LanguageGuidedSegNet

SMALL = dict(decoder_channels=(64, 48, 32, 24, 16))
SIZE = 128


def _network(seed: int, bank_size: int = 0) -> LanguageGuidedSegNet:
    """A random network in eval mode with non-trivial BatchNorm statistics, so folding has something to fold."""
    torch.manual_seed(seed)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=bank_size, **SMALL), pretrained_encoder=False)
    if bank_size:
        net.bank.fill(torch.randn(bank_size, 384), torch.randn(bank_size, 384), torch.arange(bank_size))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _report_tokens(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, 9, dtype=torch.bool)
    mask[0, 6:] = False  # the first report is shorter: padded
    return torch.randn(batch, 9, 384), mask


def test_inference_compilation_keeps_outputs():
    """fold_batchnorm + fuse_convolutions (what Segmenter.load runs on CPU) change speed, not outputs."""
    net = _network(1, bank_size=6)
    images = torch.randn(3, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    tokens, mask = _report_tokens(3)
    with torch.inference_mode():
        expected = [net(images[:1], tokens[:1], mask[:1]), net(images, tokens, mask), net(images)]
    fast = fuse_convolutions(fold_batchnorm(net).to(memory_format=torch.channels_last), SIZE)
    assert not isinstance(fast.encoder, EfficientNetLite), "the encoder was not compiled"
    with torch.inference_mode():
        for _ in range(4):  # the first calls of a new batch size profile, later ones run fused kernels
            got = [fast(images[:1], tokens[:1], mask[:1]), fast(images, tokens, mask), fast(images)]
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_leaves_no_batchnorm_and_the_same_outputs():
    net = _network(2)
    images, (tokens, mask) = torch.randn(2, 3, SIZE, SIZE), _report_tokens(2)
    with torch.inference_mode():
        expected = net(images, tokens, mask)
        folded = fold_batchnorm(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(images, tokens, mask), expected, atol=1e-4, rtol=1e-4)
