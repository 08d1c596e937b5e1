"""Probes of the report loop, for data sets whose reports name the image's sides (QaTa: ``report_sides: image``).

- **Steering** (:func:`steering_probe`): does editing the report move the mask? On the bilateral cases, each image
  is segmented once with :data:`LEFT_REPORT` and once with :data:`RIGHT_REPORT`; the figure is the mean over images
  of the left report's mask share in the left image half minus the right report's (1 = the mask follows the
  report completely, 0 = the text is ignored). An empty mask has no side and counts as a share of 0.5.
- **Zone steering** (:func:`zone_steering_probe`): does naming a zone move the mask within a side? On the cases
  whose true report names a side's whole extent ("all left lung"), each image is segmented with "unilateral
  pulmonary infection, one infected area, upper <side> lung." and with the same report naming "lower"; the figure
  is the mean over images of the upper report's mask share above the true lesion's mid-height on that side minus
  the lower report's (1 = the mask moves completely to the named zone, 0 = the zone is ignored), an image whose
  report names both sides whole counting the mean of its two sides. An empty mask counts as a share of 0.5.
- **Laterality** (:func:`laterality_probe`): does the approximated report (no report given) name the sides that
  the true report names? Balanced accuracy over bilateral / left / right (chance 1/3); an approximated report that
  names no side counts as wrong.
- **Report check** (:func:`report_check_probe`): how often is a report warned about as contradicting the image
  (:mod:`~languageguidedseg.consistency`)? The share of the true reports warned about (false warnings), and of the
  unilateral cases given their true report with the side swapped (caught wrong-side reports).

All take plain callables, so they run on a :class:`~languageguidedseg.inference.Segmenter` (``lgseg evaluate``)
or on a network in training: ``predict(images, reports) -> probabilities`` and ``approximate(images) -> reports``,
where ``images`` is a stack ``[N, H, W(, 3)]`` of one data set's images of one size; the report check takes
``check(images, reports) -> warned`` (one bool per image).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .data import Sample, load_pair
from .laterality import LATERALITIES, left_share, report_laterality
from .reports import ZONES, parse_qata_report
from .sides import swap_sides

LEFT_REPORT = "unilateral pulmonary infection, one infected area, middle lower left lung."
RIGHT_REPORT = "unilateral pulmonary infection, one infected area, middle lower right lung."
ZONE_REPORT = "unilateral pulmonary infection, one infected area, {zone} {side} lung."

Predict = Callable[[np.ndarray, Sequence[Optional[str]]], np.ndarray]
Approximate = Callable[[np.ndarray], Sequence[str]]
Check = Callable[[np.ndarray, Sequence[Optional[str]]], Sequence[bool]]
ProgressCallback = Callable[[int, int], None]  # (images done, images in all), as the engine's other loops


@dataclass
class SteeringResult:
    """Mean left-report minus right-report left-half share over ``n`` bilateral images."""

    steering: float
    n: int

    def to_dict(self) -> dict:
        return {"steering": round(self.steering, 4), "steering_n": self.n}


@dataclass
class ZoneSteeringResult:
    """Mean upper-report minus lower-report share above the lesion's mid-height over ``n`` images."""

    zone_steering: float
    n: int

    def to_dict(self) -> dict:
        return {"zone_steering": round(self.zone_steering, 4), "zone_steering_n": self.n}


@dataclass
class LateralityResult:
    """Balanced accuracy of the approximated report's laterality, the recall per true class and the counts."""

    balanced_accuracy: float
    recall: dict[str, float]
    n: int
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"laterality_balanced_accuracy": round(self.balanced_accuracy, 4),
                "laterality_recall": {k: round(v, 4) for k, v in self.recall.items()},
                "laterality_n": self.n}


@dataclass
class ReportCheckResult:
    """The share of ``n`` true reports warned about and of ``swapped_n`` side-swapped unilateral reports."""

    warning_rate: float
    n: int
    swapped_flag_rate: float
    swapped_n: int

    def to_dict(self) -> dict:
        return {"report_warning_rate": round(self.warning_rate, 4), "report_warning_n": self.n,
                "swapped_side_flag_rate": round(self.swapped_flag_rate, 4), "swapped_side_flag_n": self.swapped_n}


def bilateral_cases(samples: Sequence[Sample]) -> list[Sample]:
    """The samples whose report names both sides."""
    return [s for s in samples if report_laterality(s.report) == "bilateral"]


def steering_probe(predict: Predict, samples: Sequence[Sample], threshold: float = 0.5, batch_size: int = 16,
                   progress: Optional[ProgressCallback] = None) -> SteeringResult:
    """The steering figure on the bilateral cases among ``samples`` (see the module docstring)."""
    cases = bilateral_cases(samples)
    differences: list[float] = []
    for chunk, images in _image_batches(cases, batch_size):
        shares = []
        for report in (LEFT_REPORT, RIGHT_REPORT):
            probabilities = predict(images, [report] * len(chunk))
            shares.append([_side_share(p > threshold) for p in probabilities])
        differences += [left - right for left, right in zip(*shares)]
        if progress is not None:
            progress(len(differences), len(cases))
    return SteeringResult(float(np.mean(differences)) if differences else float("nan"), len(differences))


def whole_sides(report: Optional[str]) -> list[str]:
    """The sides ("left", "right") whose whole extent (upper, middle and lower zones) a QaTa-scheme report names."""
    if not report:
        return []
    zones = dict(zip(ZONES, parse_qata_report(report).zones))
    levels = ("upper", "middle", "lower")
    return [side for side in ("left", "right") if all(zones[f"{side} {level}"] for level in levels)]


def zone_steering_probe(predict: Predict, samples: Sequence[Sample], threshold: float = 0.5, batch_size: int = 16,
                        progress: Optional[ProgressCallback] = None) -> ZoneSteeringResult:
    """The zone-steering figure on the cases among ``samples`` whose report names a side's whole extent (see the
    module docstring); a side whose image half holds no true lesion is left out."""
    cases = [s for s in samples if whole_sides(s.report)]
    differences: dict[str, list[float]] = {}  # per image: one difference per side named whole
    done = 0
    for chunk, images in _image_batches(cases, batch_size):
        masks = [load_pair(sample)[1] > 0 for sample in chunk]
        for side in ("left", "right"):
            pairs: list[tuple[int, float]] = []
            for i, (sample, mask) in enumerate(zip(chunk, masks)):
                middle = mid_height(mask, side) if side in whole_sides(sample.report) else None
                if middle is not None:
                    pairs.append((i, middle))
            if not pairs:
                continue
            indices = [i for i, _ in pairs]
            shares = []
            for zone in ("upper", "lower"):
                probabilities = predict(images[indices], [ZONE_REPORT.format(zone=zone, side=side)] * len(indices))
                shares.append([share_above(p > threshold, middle) for p, (_, middle) in zip(probabilities, pairs)])
            for (i, _), upper, lower in zip(pairs, *shares):
                differences.setdefault(chunk[i].id, []).append(upper - lower)
        done += len(chunk)
        if progress is not None:
            progress(done, len(cases))
    per_image = [float(np.mean(sides)) for sides in differences.values()]
    return ZoneSteeringResult(float(np.mean(per_image)) if per_image else float("nan"), len(per_image))


def laterality_probe(approximate: Approximate, samples: Sequence[Sample], batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None) -> LateralityResult:
    """Balanced accuracy of the approximated reports' laterality against the true reports' (samples whose true
    report names no side are left out)."""
    truths = {s.id: report_laterality(s.report) for s in samples}
    cases = [s for s in samples if truths[s.id] is not None]
    hits = {c: 0 for c in LATERALITIES}
    counts = {c: 0 for c in LATERALITIES}
    done = 0
    for chunk, images in _image_batches(cases, batch_size):
        for sample, approximated in zip(chunk, approximate(images)):
            truth = str(truths[sample.id])
            counts[truth] += 1
            hits[truth] += int(report_laterality(approximated) == truth)
        done += len(chunk)
        if progress is not None:
            progress(done, len(cases))
    recall = {c: hits[c] / counts[c] for c in LATERALITIES if counts[c]}
    balanced = float(np.mean(list(recall.values()))) if recall else float("nan")
    return LateralityResult(balanced, recall, sum(counts.values()), counts)


def report_check_probe(check: Check, samples: Sequence[Sample], batch_size: int = 16,
                       progress: Optional[ProgressCallback] = None) -> ReportCheckResult:
    """The report check's figures (see the module docstring) on the samples that have a report."""
    cases = [s for s in samples if s.report and s.report.strip()]
    warned, flagged = [], []
    done = 0
    for chunk, images in _image_batches(cases, batch_size):
        reports = [str(sample.report) for sample in chunk]
        warned += [bool(w) for w in check(images, reports)]
        unilateral = [i for i, report in enumerate(reports) if report_laterality(report) in ("left", "right")]
        if unilateral:
            flagged += [bool(w) for w in check(images[unilateral], [swap_sides(reports[i]) for i in unilateral])]
        done += len(chunk)
        if progress is not None:
            progress(done, len(cases))
    return ReportCheckResult(float(np.mean(warned)) if warned else float("nan"), len(warned),
                             float(np.mean(flagged)) if flagged else float("nan"), len(flagged))


def _side_share(mask: np.ndarray) -> float:
    share = left_share(mask)
    return 0.5 if np.isnan(share) else share


def mid_height(mask: np.ndarray, side: str) -> Optional[float]:
    """The middle row of the true lesion's vertical extent in the image half of ``side`` (None: no lesion there)."""
    half = mask.shape[1] / 2
    columns = np.arange(mask.shape[1]) + 0.5
    in_half = columns < half if side == "left" else columns >= half
    rows = np.flatnonzero((mask & in_half[None, :]).any(axis=1))
    return None if not len(rows) else (rows[0] + rows[-1] + 1) / 2


def share_above(mask: np.ndarray, middle: float) -> float:
    """The share of a mask's pixels above row ``middle`` (0.5 for an empty mask)."""
    total = mask.sum()
    if not total:
        return 0.5
    rows = np.arange(mask.shape[0]) + 0.5
    return float(mask[rows < middle].sum() / total)


def _image_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[tuple[list[Sample], np.ndarray]]:
    """Chunks of samples with their images stacked; images of one shape go together (a chunk may be split)."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [load_pair(sample)[0] for sample in chunk]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(image.shape, []).append(index)
        for indices in groups.values():
            yield [chunk[i] for i in indices], np.stack([images[i] for i in indices])
