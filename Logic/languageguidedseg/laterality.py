"""Laterality of reports and masks: which sides a QaTa-scheme report names and which image halves a mask covers.

Classes are :data:`LATERALITIES`: ``bilateral``, ``left``, ``right``. "Left" and "right" here are the sides the
model's reports use; for QaTa (``report_sides: image``) that is the image as displayed, i.e. the low column indices
of the array are the left half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from .reports import ZONES, parse_qata_report

LATERALITIES = ("bilateral", "left", "right")
# A side counts as involved where its most confident SIDE_SHARE of the image half is confidently foreground (the mean
# probability there reaches the model's side_presence). With the true QaTa val masks (presence 0.5: 0.25% of the half
# covered) this agrees with the true reports' laterality in 99% (balanced accuracy). Area rules on the thresholded
# mask do worse with a network's masks (val, shipped qata-cxr: 0.75 against 0.78): small spurious specks on the other
# side and faint true areas are common.
SIDE_SHARE = 0.005


def report_laterality(text: Optional[str]) -> Optional[str]:
    """``bilateral`` / ``left`` / ``right`` from the zones a QaTa-scheme report names; None if it names no side.

    The zones decide; a report that names no zone but says "bilateral" counts as bilateral.
    """
    if not text:
        return None
    labels = parse_qata_report(text)
    left = any(z for z, name in zip(labels.zones, ZONES) if name.startswith("left"))
    right = any(z for z, name in zip(labels.zones, ZONES) if name.startswith("right"))
    if left and right:
        return "bilateral"
    if left or right:
        return "left" if left else "right"
    return "bilateral" if labels.laterality == "bilateral" else None


def left_share(mask: np.ndarray) -> float:
    """Share of a 2D mask's foreground (``[H, W]``, bool or weights) in the left image half; NaN for an empty mask.

    An odd width splits the middle column between both halves.
    """
    columns = np.asarray(mask, dtype=np.float64).sum(axis=0)
    total = columns.sum()
    if total <= 0:
        return float("nan")
    width = columns.shape[0]
    weights = np.clip(width / 2 - np.arange(width), 0.0, 1.0)  # overlap of column x = [x, x + 1] with [0, W / 2]
    return float((columns * weights).sum() / total)


def side_presence(probabilities: torch.Tensor, share: float = SIDE_SHARE) -> torch.Tensor:
    """How surely each image half holds foreground: the mean of its ``share`` highest probabilities.

    ``[..., H, W]`` -> ``[..., 2]`` (left half, right half); of an odd width the middle column belongs to neither.
    On a binary mask this is ``min(1, area / (share * half area))`` per half.
    """
    height, width = probabilities.shape[-2:]
    half = width // 2
    if half == 0:  # one column (e.g. a thin volume seen from the side): no halves, no side holds anything
        return probabilities.new_zeros(probabilities.shape[:-2] + (2,))
    k = max(1, round(share * height * half))
    halves = (probabilities[..., :half], probabilities[..., width - half:])
    return torch.stack([h.flatten(-2).topk(k, dim=-1).values.mean(-1) for h in halves], dim=-1)


def presence_laterality(presence: Sequence[float], threshold: float = 0.5) -> Optional[str]:
    """``bilateral`` when both halves' :func:`side_presence` reach ``threshold``, else the half with the higher
    presence; None for a tie (no foreground anywhere)."""
    left, right = (float(v) for v in presence)
    if min(left, right) >= threshold:
        return "bilateral"
    if left == right:
        return None
    return "left" if left > right else "right"


def probability_laterality(probabilities: np.ndarray, threshold: float = 0.5) -> Optional[str]:
    """The laterality of a 2D probability map ``[H, W]`` (see :data:`SIDE_SHARE`)."""
    presence = side_presence(torch.from_numpy(np.asarray(probabilities, dtype=np.float32)))
    return presence_laterality(presence.tolist(), threshold)


def keep_to_side(probabilities: np.ndarray, side: Optional[str], threshold: float) -> None:
    """Make a 2D map ``[H, W]`` agree with a report that names one side (in place): where the mask
    (``probabilities > threshold``) would lie mostly in the other image half, that half's probabilities become 0."""
    if side not in ("left", "right"):
        return
    share = left_share(probabilities > threshold)
    if np.isnan(share) or (share > 0.5 if side == "left" else share < 0.5):
        return
    width = probabilities.shape[-1]
    if side == "left":
        probabilities[..., width // 2:] = 0.0
    else:
        probabilities[..., :(width + 1) // 2] = 0.0
