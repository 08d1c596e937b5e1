"""Laterality of reports and masks: which sides a QaTa-scheme report names and which image halves a mask covers.

Classes are :data:`LATERALITIES`: ``bilateral``, ``left``, ``right``. "Left" and "right" here are the sides the
model's reports use; for QaTa (``report_sides: image``) that is the image as displayed, i.e. the low column indices
of the array are the left half.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .reports import ZONES, parse_qata_report

LATERALITIES = ("bilateral", "left", "right")
# A side counts as involved when the mask covers at least this share of the image's area there (chosen on 1500
# QaTa training images with the shipped model: balanced accuracy 0.86 against the true reports; a share-of-mask
# rule did worse, 0.84, as small spurious specks on the other side are common).
SIDE_AREA = 0.015


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


def mask_laterality(mask: np.ndarray, min_area: float = SIDE_AREA) -> Optional[str]:
    """``bilateral`` when the mask covers at least ``min_area`` of the image's area in each half, else the half
    with more mask; None for an empty mask."""
    mask = np.asarray(mask, dtype=np.float64)
    share = left_share(mask)
    if np.isnan(share):
        return None
    total = mask.sum()
    left, right = share * total, (1.0 - share) * total
    if min(left, right) >= min_area * mask.size:
        return "bilateral"
    return "left" if left >= right else "right"
