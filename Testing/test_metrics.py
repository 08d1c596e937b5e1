"""Dice / IoU against hand-computed values, numpy and torch inputs, MONAI's empty-empty convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou

from languageguidedseg.errors import LgsegError
from languageguidedseg.metrics import ScoreAccumulator

# Image 1: prediction 4 pixels, target 6 pixels, 3 shared.
PRED_1 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
TRUE_1 = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
# Image 2: prediction 2 pixels, target 2 pixels, 1 shared.
PRED_2 = np.zeros((4, 4), bool)
PRED_2[3, 2:4] = True
TRUE_2 = np.zeros((4, 4), bool)
TRUE_2[3, 3] = TRUE_2[2, 3] = True
EMPTY = np.zeros((4, 4), bool)


def test_hand_computed_scores() -> None:
    scores_acc = ScoreAccumulator()
    scores_acc.update(PRED_1, TRUE_1)
    scores_acc.update(np.stack([PRED_2, EMPTY]), np.stack([TRUE_2, EMPTY]))
    scores = scores_acc.compute()
    # Micro: intersections 3 + 1 + 0 = 4, prediction sum 6, target sum 8, union 10.
    assert scores.n == 3
    assert scores.dice == pytest.approx(2 * 4 / (6 + 8))
    assert scores.iou == pytest.approx(4 / 10)
    # Per image: dice 6/10, 2/4, 1 (empty-empty); iou 3/7, 1/3, 1.
    assert scores.mean_dice == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert scores.mean_iou == pytest.approx((3 / 7 + 1 / 3 + 1.0) / 3)


def test_torch_numpy_and_channel_inputs_agree() -> None:
    from_numpy, from_torch = ScoreAccumulator(), ScoreAccumulator()
    from_numpy.update(np.stack([PRED_1, PRED_2]).astype(np.uint8), np.stack([TRUE_1, TRUE_2]))
    from_torch.update(torch.from_numpy(np.stack([PRED_1, PRED_2]))[:, None].float(),
                      torch.from_numpy(np.stack([TRUE_1, TRUE_2])).long()[:, None])
    assert from_numpy.compute() == from_torch.compute()


def test_empty_prediction_on_foreground_scores_zero() -> None:
    scores_acc = ScoreAccumulator()
    scores_acc.update(EMPTY, TRUE_1)
    scores_acc.update(PRED_1, EMPTY)
    scores = scores_acc.compute()
    assert scores.mean_dice == 0.0 and scores.mean_iou == 0.0 and scores.dice == 0.0 and scores.iou == 0.0


def test_monai_empty_convention() -> None:
    # The per-image convention relies on MONAI: ignore_empty=False scores empty-empty 1 and empty-target 0.
    pred = torch.zeros(2, 1, 4, 4)
    pred[1, 0, 0, 0] = 1
    target = torch.zeros(2, 1, 4, 4)
    assert compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0].tolist() == [1.0, 0.0]
    assert compute_iou(pred, target, include_background=True, ignore_empty=False)[:, 0].tolist() == [1.0, 0.0]


def test_per_image_scores_equal_monais_exactly() -> None:
    """Scoring needs no MONAI; its per-image values are MONAI's, bit for bit (float32 division of the counts)."""
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(64, 37, 53, generator=generator) > torch.rand(64, 1, 1, generator=generator)
    true = torch.rand(64, 37, 53, generator=generator) > torch.rand(64, 1, 1, generator=generator)
    pred[:4], true[:2] = False, False  # empty-empty and empty-target images
    scores = ScoreAccumulator()
    scores.update(pred, true)
    pred_f, true_f = pred[:, None].float(), true[:, None].float()
    assert scores.image_dice == compute_dice(pred_f, true_f, include_background=True, ignore_empty=False)[:, 0].tolist()
    assert scores.image_iou == compute_iou(pred_f, true_f, include_background=True, ignore_empty=False)[:, 0].tolist()


def test_errors() -> None:
    with pytest.raises(LgsegError, match="no images"):
        ScoreAccumulator().compute()
    with pytest.raises(LgsegError, match="shape"):
        ScoreAccumulator().update(np.zeros((4, 4)), np.zeros((4, 5)))
