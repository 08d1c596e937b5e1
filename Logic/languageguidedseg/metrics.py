"""Foreground Dice and IoU as the language-guided segmentation papers report them.

``dice`` / ``iou`` are micro-averaged: intersections and sums are added over every pixel of the evaluation set
before dividing, the headline numbers of the GuideDecoder / ProLearn protocol. ``mean_dice`` / ``mean_iou`` average
the per-image scores; an image whose prediction and ground truth are both empty scores 1.0 (MONAI's
``ignore_empty=False`` convention), an empty ground truth with a non-empty prediction scores 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

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
        self.intersection += int((pred & true).sum())
        self.prediction_sum += int(pred.sum())
        self.target_sum += int(true.sum())
        # MONAI's per-image values: [N, C=1, H, W] float, ignore_empty=False gives 1.0 for empty-empty.
        pred_f, true_f = pred[:, None].float(), true[:, None].float()
        self.image_dice += compute_dice(pred_f, true_f, include_background=True, ignore_empty=False)[:, 0].tolist()
        self.image_iou += compute_iou(pred_f, true_f, include_background=True, ignore_empty=False)[:, 0].tolist()

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
