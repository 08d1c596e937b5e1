"""One evaluation loop, used by ``lgseg evaluate`` and by the training's per-epoch validation.

Each image is segmented at the network's input size and its probabilities resampled to the image's own grid, then
scored against its ground-truth mask there: micro-averaged foreground Dice / IoU over the split, the protocol of
the GuideDecoder / ProLearn papers, plus per-image means (see :mod:`metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .data import Sample, load_pair
from .errors import LgsegError
from .inference import ProgressCallback, Segmenter
from .metrics import ScoreAccumulator, SegmentationScores
from .sides import RADIOLOGICAL_DISPLAY, translate_report

GUIDANCE = ("given", "none")  # each image's own report (the bank where it has none), or the bank for every image


@dataclass
class Evaluation:
    """Scores of a split in one guidance mode, and the first predictions (for figures)."""

    scores: SegmentationScores
    without_report: int  # images the prototype bank guided
    seconds: float
    predictions: list[np.ndarray] = field(default_factory=list)  # bool masks of the first ``keep`` images
    in_domain_rate: Optional[float] = None  # the share judged in the model's domain; None: it has no description


def evaluate(segmenter: Segmenter, samples: Sequence[Sample], reports: str = "given", *,
             sides: Optional[str] = None, threshold: Optional[float] = None, keep: int = 0,
             load: Callable[[Sample], tuple[np.ndarray, np.ndarray]] = load_pair,
             progress: Optional[ProgressCallback] = None) -> Evaluation:
    """Segment and score ``samples`` (``load`` reads an image and its mask, e.g. from a cache).

    ``reports``: ``given`` guides each image by its report, ``none`` by the prototype bank. ``sides``: what left and
    right mean in the samples' reports (``image``, ``patient`` or ``none``; None = the model's own convention); they
    are translated into the model's, the images taken as 2D files in radiological display. ``threshold`` defaults
    to the model's.
    """
    if reports not in GUIDANCE:
        raise LgsegError(f"reports must be one of {', '.join(GUIDANCE)}, not {reports!r}")
    if not samples:
        raise LgsegError("there are no images to evaluate; choose another split or folder")
    threshold = segmenter.config.card.threshold if threshold is None else threshold
    started = time.perf_counter()
    scores, kept = ScoreAccumulator(), []
    without_report = in_domain = 0
    for start in range(0, len(samples), segmenter.batch_size):
        chunk = samples[start:start + segmenter.batch_size]
        pairs = [load(sample) for sample in chunk]
        texts = [sample.report if reports == "given" else None for sample in chunk]
        without_report += sum(1 for text in texts if text is None or not text.strip())
        if sides is not None:
            texts = [text and translate_report(text, sides, segmenter.report_sides, RADIOLOGICAL_DISPLAY)
                     for text in texts]
        # Images of one size and colour type go through the network together; the order does not matter.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (image, _) in enumerate(pairs):
            groups.setdefault(image.shape, []).append(index)
        masks: dict[int, np.ndarray] = {}
        for indices in groups.values():
            stack = np.stack([pairs[i][0] for i in indices])
            probabilities, _, _, domain_scores = segmenter.predict_slices(stack, [texts[i] for i in indices])
            if segmenter.domain is not None:
                in_domain += int((domain_scores >= segmenter.domain.config.threshold).sum())
            for i, probability in zip(indices, probabilities):
                masks[i] = probability > threshold
                scores.update(masks[i], pairs[i][1])
        kept += [masks[i] for i in range(len(chunk)) if start + i < keep]
        if progress is not None:
            progress(start + len(chunk), len(samples))
    rate = in_domain / len(samples) if segmenter.domain is not None else None
    return Evaluation(scores.compute(), without_report, time.perf_counter() - started, kept, rate)
