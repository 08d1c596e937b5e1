"""The training losses: mask pooling, InfoNCE with several positives, ProLearn's pseudo-label positives, and the
weighted sum of the terms with each term's switch-off."""

from __future__ import annotations

import math

import pytest
import torch

from languageguidedseg.config import NetworkConfig
from languageguidedseg.network import LanguageGuidedSegNet
from training.losses import LossWeights, SegmentationLoss, info_nce, mask_pool, pseudo_label_positives

SIZE = 64


def test_mask_pool_averages_the_features_inside_the_mask():
    features = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(2, 3, 1, 1)
    features[:, 1] *= -1
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # values 0, 1, 4, 5
    masks[1, 0, 3, 3] = 1  # value 15
    pooled = mask_pool(features, masks)
    assert pooled.shape == (2, 3)
    assert torch.allclose(pooled[0], torch.tensor([2.5, -2.5, 2.5]))
    assert torch.allclose(pooled[1], torch.tensor([15.0, -15.0, 15.0]))


def test_mask_pool_resizes_a_finer_mask_by_area():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # the whole top-left feature cell
    mask[0, 0, 0, 2] = 1  # a quarter of the top-right cell
    # Weights 1 and 0.25: (1 * 1 + 2 * 0.25) / 1.25
    assert mask_pool(features, mask).item() == pytest.approx(1.5 / 1.25)


def _reference_info_nce(a, b, positives, temperature):
    """Symmetric soft-target cross-entropy written out row by row."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    total = 0.0
    for x, y, pos in ((a, b, positives), (b, a, positives.t())):
        rows = []
        for i in range(len(x)):
            logits = [float(x[i] @ y[j]) / temperature for j in range(len(y))]
            log_norm = math.log(sum(math.exp(v) for v in logits))
            targets = [j for j in range(len(y)) if pos[i, j]]
            rows.append(-sum(logits[j] - log_norm for j in targets) / len(targets))
        total += sum(rows) / len(rows)
    return total / 2


def test_info_nce_shares_the_target_among_several_positives():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    positives = torch.eye(5, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = positives[2, 4] = True  # rows 0 and 1 share a report; 2 has two matches
    value = info_nce(a, b, positives, temperature=0.1)
    assert value.item() == pytest.approx(_reference_info_nce(a, b, positives, 0.1), rel=1e-5)


def test_info_nce_is_lowest_when_a_sample_is_equally_close_to_all_its_positives():
    basis = torch.eye(4)
    b = basis[:3]
    # Matched pairs and far negatives, one positive each: close to 0.
    assert info_nce(b, b, torch.eye(3, dtype=torch.bool), 0.05).item() < 1e-6
    # Samples 0 and 1 are positives of each other (e.g. the same pseudo-label): the floor is the entropy of the
    # shared target, reached when each is equally close to both ...
    group = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    between = torch.nn.functional.normalize(basis[0] + basis[1], dim=0)
    balanced = torch.stack([between, between, basis[2]])
    assert info_nce(balanced, b, group, 0.05).item() == pytest.approx(2 / 3 * math.log(2), rel=1e-4)
    # ... and pulling each towards only one of its positives costs more.
    assert info_nce(b, b, group, 0.05).item() > 2 / 3 * math.log(2) + 1


def test_pseudo_label_positives():
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0], [0, 0], [1, 0]], dtype=torch.bool)
    has_report = torch.tensor([True, True, True, True, True, False])
    report = torch.tensor([0, 1, 2, 3, 3, -1])
    positives = pseudo_label_positives(labels, has_report, report[:, None] == report[None, :])
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],  # same pseudo-label vector as sample 1
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],  # no label, but the same report as sample 4
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],  # no report: no positives, not even itself (and it is nobody's positive)
    ], dtype=torch.bool)
    assert torch.equal(positives, expected)


def test_pseudo_label_positives_without_a_parser_are_the_same_reports():
    report = torch.tensor([0, 0, 1])
    positives = pseudo_label_positives(torch.zeros(3, 0, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
                                       report[:, None] == report[None, :])
    assert torch.equal(positives, torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool))


@pytest.fixture(scope="module")
def step():
    """A small network with four images, each with a target and a different report."""
    torch.manual_seed(0)
    network = LanguageGuidedSegNet(NetworkConfig(decoder_channels=(32, 24, 16, 8), text_dim=16, contrast_dim=8),
                                   pretrained_encoder=False, image_size=SIZE)
    images = torch.randn(4, 3, SIZE, SIZE)
    tokens, token_mask = torch.randn(4, 5, 16), torch.ones(4, 5, dtype=torch.bool)
    masks = torch.zeros(4, 1, SIZE, SIZE)
    for i in range(4):
        masks[i, 0, 8 * i:8 * i + 24, 10:40] = 1
    text = torch.randn(4, 16)
    positives = torch.eye(4, dtype=torch.bool)
    # Eval mode: every call sees the same BatchNorm statistics and visual prototype.
    return network.eval(), images, tokens, token_mask, masks, text, positives


def _loss(step, **weights):
    network, images, tokens, token_mask, masks, text, positives = step
    out = network(images, tokens, token_mask, return_features=True)
    return SegmentationLoss(LossWeights(**weights))(network, out, masks, text, positives)


def test_total_is_the_weighted_sum_of_the_terms(step):
    weights = dict(segmentation=1.0, tevia_alignment=0.3, tmca_contrastive=0.2, bank_contrastive=0.5)
    total, terms = _loss(step, **weights)
    assert set(terms) == set(weights)
    assert all(value > 0 for value in terms.values())
    assert total.item() == pytest.approx(sum(weights[k] * terms[k] for k in terms), rel=1e-5)
    assert total.requires_grad


@pytest.mark.parametrize("off", ["tevia_alignment", "tmca_contrastive", "bank_contrastive"])
def test_a_weight_of_zero_switches_a_term_off(step, off):
    weights = dict(segmentation=1.0, tevia_alignment=0.3, tmca_contrastive=0.2, bank_contrastive=0.5)
    full_total, full = _loss(step, **weights)
    total, terms = _loss(step, **{**weights, off: 0.0})
    assert off not in terms and set(terms) == set(full) - {off}
    for key in terms:
        assert terms[key] == pytest.approx(full[key], rel=1e-5)  # the other terms do not change
    assert total.item() == pytest.approx(full_total.item() - weights[off] * full[off], rel=1e-5)


def test_segmentation_alone_is_dice_plus_bce(step):
    from monai.losses import DiceCELoss

    network, images, tokens, token_mask, masks, _, _ = step
    total, terms = _loss(step, tevia_alignment=0.0, tmca_contrastive=0.0, bank_contrastive=0.0)
    assert set(terms) == {"segmentation"}
    logits = network(images, tokens, token_mask)
    expected = DiceCELoss(sigmoid=True, batch=True)(logits, masks)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_pulls_only_the_no_report_rows_towards_the_teachers(step):
    """The teachers' probabilities are a second, soft target of the rows trained without a report; the other rows'
    logits get no gradient from it, and without such rows there is no term."""
    from monai.losses import DiceCELoss

    network, images, tokens, token_mask, masks, text, positives = step
    soft = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    distill = torch.tensor([True, False, True, False])
    out = network(images, tokens, token_mask, return_features=True)
    out["logits"].retain_grad()
    weights = LossWeights(segmentation=0.0, tevia_alignment=0.0, tmca_contrastive=0.0, bank_contrastive=0.0,
                          distillation=0.5)
    total, terms = SegmentationLoss(weights)(network, out, masks, text, positives, soft, distill)
    expected = DiceCELoss(sigmoid=True, batch=True)(out["logits"][distill].float(), soft[distill])
    assert terms["distillation"] == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    total.backward()
    gradient = out["logits"].grad.abs().flatten(1).sum(1)
    assert (gradient[distill] > 0).all() and (gradient[~distill] == 0).all()
    # No no-report row in the batch, or no teachers: no term.
    _, terms = SegmentationLoss(weights)(network, out, masks, text, positives, soft, torch.zeros(4, dtype=torch.bool))
    assert "distillation" not in terms
    _, terms = SegmentationLoss(weights)(network, out, masks, text, positives)
    assert "distillation" not in terms
