"""Report edits: reports that name part of what a case's report names, with the target restricted to that part.

A data set has one true report per image, so a network can learn that the image alone predicts the mask. Edits
derived from the data ask it to segment *part* of what it sees because the text says so:

- ``qata``: a bilateral case gives one edit per side, "unilateral pulmonary infection, one infected area, lower
  left lung." (the zones the report names on that side), with the target restricted to that image half. QaTa
  reports name the image's sides as displayed (99% of a unilateral report's mask area lies in that half). A side
  whose report names its whole extent ("all left lung", "upper middle lower left lung") also gives one edit per
  zone of :data:`ZONE_EDITS` ("upper left lung", ..., "middle lower left lung"), with the target cut to that zone:
  thirds of the vertical extent of the side's lesion (:func:`zone_rows`; Training/README.md has the figures).
- ``kvasir``: a case with several polyps gives one edit per polyp, when the mask has as many connected components
  as the report counts polyps: "one small white round polyp, located in top left of the image" (size from the
  component's area, colour and shape copied from the report, location from the component's centre on a 3 x 3
  grid), with the target that component.

:func:`report_edits` gives none for a case it cannot split reliably; the original pair always stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from languageguidedseg.laterality import report_laterality
from languageguidedseg.reports import ZONES, parse_qata_report

_LEVELS = ("upper", "middle", "lower")
# The zones a whole-side case is also trained on, as QaTa's reports name them (QaTa's combinations of neighbouring
# zones included; "upper lower" names two areas, not one zone, and is left out).
ZONE_EDITS = (("upper",), ("middle",), ("lower",), ("upper", "middle"), ("middle", "lower"))
_KVASIR_SIZES = ("small", "medium", "large")
_KVASIR_GRID = (("top left", "top", "top right"), ("left", "center", "right"),
                ("bottom left", "bottom", "bottom right"))
# Component area as a share of the image: the size words of single-polyp Kvasir-SEG training reports split at
# about these shares (small: median 0.046, medium: 0.146, large: 0.382).
_KVASIR_SIZE_LIMITS = (0.08, 0.29)
# Smaller connected components are specks of the annotation, not polyps.
_MIN_COMPONENT = 0.002
_KVASIR_COUNT = re.compile(r"^\s*(two|three|four|five|six|seven|eight|nine|ten)\s+(.*?)\bpolyps?\b", re.I)
_COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


@dataclass(frozen=True)
class ReportEdit:
    """An edited report and its target: a bool mask of the original image's shape."""

    report: str
    mask: np.ndarray


def report_edits(report: Optional[str], mask: np.ndarray, scheme: Optional[str]) -> list[ReportEdit]:
    """The edits of one case in a report ``scheme`` (a report parser's name: ``qata``, ``kvasir``; else none)."""
    if not report:
        return []
    if scheme == "qata":
        return qata_edits(report, mask)
    if scheme == "kvasir":
        return kvasir_edits(report, mask)
    return []


def qata_side_report(side: str, levels: tuple[str, ...]) -> str:
    """A unilateral QaTa-scheme report: "unilateral pulmonary infection, one infected area, lower left lung."."""
    named = " ".join(level for level in _LEVELS if level in levels)
    zone = "all" if set(levels) == set(_LEVELS) or not levels else named
    return f"unilateral pulmonary infection, one infected area, {zone} {side} lung."


def qata_edits(report: str, mask: np.ndarray) -> list[ReportEdit]:
    """The edits of a QaTa case: one per side of a bilateral case, with the mask restricted to that image half (a
    side whose half holds no mask gives none), and one per zone of :data:`ZONE_EDITS` of each side whose whole
    extent the report names, with the mask cut to that zone of the side (an empty cut gives none)."""
    laterality = report_laterality(report)
    if laterality is None:
        return []
    zones = parse_qata_report(report).zones
    mask = np.asarray(mask, dtype=bool)
    half = mask.shape[1] / 2
    columns = np.arange(mask.shape[1]) + 0.5  # a column belongs to the half that holds its centre
    edits = []
    for side, in_half in (("left", columns < half), ("right", columns >= half)):
        restricted = mask & in_half[None, :]
        if not restricted.any():
            continue
        levels = tuple(name.split()[1] for z, name in zip(zones, ZONES) if z and name.startswith(side))
        if laterality == "bilateral":
            edits.append(ReportEdit(qata_side_report(side, levels), restricted))
        if set(levels) == set(_LEVELS):
            for zone in ZONE_EDITS:
                rows = zone_rows(restricted, zone)
                cut = restricted & rows[:, None]
                if cut.any():
                    edits.append(ReportEdit(qata_side_report(side, zone), cut))
    return edits


def zone_rows(mask: np.ndarray, levels: tuple[str, ...]) -> np.ndarray:
    """The rows of ``levels`` (e.g. ``("upper",)``) of a one-sided lesion that covers its side's whole extent:
    thirds of the lesion's vertical extent, top to bottom (in QaTa's training masks, such lesions span rows 0.12 to
    0.73 of the image (medians), and lesions reported in one zone lie in its third: upper 0.12-0.33, lower
    0.46-0.72)."""
    filled = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=1))
    top, bottom = int(filled[0]), int(filled[-1]) + 1
    cuts = np.round(top + (bottom - top) * np.arange(4) / 3).astype(int)
    rows = np.zeros(mask.shape[0], dtype=bool)
    for level in levels:
        index = _LEVELS.index(level)
        rows[cuts[index]:cuts[index + 1]] = True
    return rows


def kvasir_edits(report: str, mask: np.ndarray) -> list[ReportEdit]:
    """One edit per polyp of a Kvasir case whose report counts as many polyps as its mask has components."""
    from scipy import ndimage

    match = _KVASIR_COUNT.match(report)
    if match is None:
        return []
    count = _COUNTS[match.group(1).lower()]
    words = match.group(2).replace(",", " ").split()
    while words and words[0].lower() in _KVASIR_SIZES:
        words.pop(0)  # the sizes of the several polyps; each edit gets its own polyp's size
    appearance = " ".join(words)
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, range(1, n + 1))
    components = [i + 1 for i, area in enumerate(areas) if area >= _MIN_COMPONENT * mask.size]
    if len(components) != count:
        return []
    height, width = mask.shape
    edits = []
    for label in components:
        polyp = labels == label
        cy, cx = ndimage.center_of_mass(polyp)
        location = _KVASIR_GRID[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]
        share = polyp.sum() / mask.size
        size = _KVASIR_SIZES[int(np.searchsorted(_KVASIR_SIZE_LIMITS, share, side="right"))]
        description = " ".join(filter(None, ["one", size, appearance, "polyp"]))
        edits.append(ReportEdit(f"{description}, located in {location} of the image", polyp))
    return edits
