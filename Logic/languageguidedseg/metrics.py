"""Foreground Dice and IoU as the language-guided segmentation papers report them.

``dice`` / ``iou`` are micro-averaged: intersections and sums are added over every pixel of the evaluation set
before dividing, the headline numbers of the GuideDecoder / ProLearn protocol. ``mean_dice`` / ``mean_iou`` average
the per-image scores; an image whose prediction and ground truth are both empty scores 1.0 (MONAI's
``ignore_empty=False`` convention), an empty ground truth with a non-empty prediction scores 0.0. The per-image
scores are computed here as MONAI's ``compute_dice`` / ``compute_iou`` compute them (float32 division of the
counts; ``Testing/test_metrics.py`` compares the two), so that scoring needs no MONAI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from .errors import LgsegError

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class SegmentationScores:
    """Micro-averaged foreground Dice/IoU, per-image means, and the number of images scored."""

    dice: float
    iou: float
    mean_dice: float
    mean_iou: float
    n: int


@dataclass
class ScoreAccumulator:
    """Adds up binary predictions and targets image by image; ``compute()`` gives :class:`SegmentationScores`."""

    intersection: int = 0
    prediction_sum: int = 0
    target_sum: int = 0
    image_dice: list[float] = field(default_factory=list)
    image_iou: list[float] = field(default_factory=list)

    def update(self, prediction: ArrayLike, target: ArrayLike) -> None:
        """Score one image ``[H, W]`` or a batch ``[N, H, W]`` (``[N, 1, H, W]`` too).

        Values are bool or 0/1; non-bool values are foreground where > 0.5, so probabilities must be thresholded
        by the caller if another cut-off is wanted.
        """
        pred, true = _as_batch(prediction, "prediction"), _as_batch(target, "target")
        if pred.shape != true.shape:
            raise LgsegError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(true.shape)}; "
                f"resample the prediction to the ground-truth grid before scoring"
            )
        intersection, prediction_sum, target_sum = ((pred & true).sum((1, 2)), pred.sum((1, 2)), true.sum((1, 2)))
        self.intersection += int(intersection.sum())
        self.prediction_sum += int(prediction_sum.sum())
        self.target_sum += int(target_sum.sum())
        # Per image, in float32 as MONAI divides; an empty prediction of an empty ground truth scores 1.0.
        total, union = prediction_sum + target_sum, prediction_sum + target_sum - intersection
        one = torch.ones((), dtype=torch.float32)
        self.image_dice += torch.where(total > 0, (2 * intersection).float() / total.float(), one).tolist()
        self.image_iou += torch.where(union > 0, intersection.float() / union.float(), one).tolist()

    def compute(self) -> SegmentationScores:
        """Scores over everything passed to :meth:`update` so far."""
        if not self.image_dice:
            raise LgsegError("no images were scored; check that the evaluation set is not empty")
        total = self.prediction_sum + self.target_sum
        union = total - self.intersection
        # An evaluation set with no foreground anywhere is a perfect match, as for a single empty image.
        dice = 2.0 * self.intersection / total if total else 1.0
        iou = self.intersection / union if union else 1.0
        return SegmentationScores(
            dice=dice,
            iou=iou,
            mean_dice=float(np.mean(self.image_dice)),
            mean_iou=float(np.mean(self.image_iou)),
            n=len(self.image_dice),
        )


def _as_batch(values: ArrayLike, role: str) -> torch.Tensor:
    """Bool tensor [N, H, W] on the CPU."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
    else:
        tensor = torch.as_tensor(np.ascontiguousarray(values))
    if tensor.dtype != torch.bool:
        tensor = tensor > 0.5
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise LgsegError(f"{role} has shape {tuple(tensor.shape)}; pass [H, W], [N, H, W] or [N, 1, H, W] masks")
    return tensor
