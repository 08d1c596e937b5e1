"""The report checked against the image, for models whose reports name sides (the QaTa scheme: ``report_parser``
``qata``).

What the image shows is read from the slice segmented without the report (the prototype bank guides it): the
:func:`~languageguidedseg.laterality.side_presence` of each image half. A report that names one side only is
contradicted where the other half shows findings (presence at least the card's ``report_check_shown``) more surely
than the named half, by at least ``report_check_margin`` in log-odds (the network's probabilities saturate, so their
order between the halves tells more than a threshold on each; Training/README.md). A report that names both sides
is not checked: the no-report mask misses the weaker side of many bilateral cases (see
Training/README.md). The mask still follows the report (the user decides); the warning says what the image shows.

A slice's presences are kept by a digest of its pixels, so while only the report changes (the report loop's live
updates) the check costs no second pass of the network; a slice first segmented without a report (the approximated
report) is kept from that run. The weights of a Segmenter's network do not change while it is used (training makes
a new Segmenter for each validation), so the digest of the slice is the whole key.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .config import ModelCard
from .laterality import report_laterality, side_presence

# Slices whose presences a check keeps: the QaTa val split (1429 images) fits, so that lgseg evaluate's check of the
# true and the side-swapped reports reuses those of its laterality probe; 4096 entries take about 1 MB.
KEPT_SLICES = 4096
_OTHER = {"left": "right", "right": "left"}

Predict = Callable[[np.ndarray], np.ndarray]  # slices [N, H, W(, 3)] -> no-report probabilities [N, H, W]


@dataclass(frozen=True)
class Contradiction:
    """A report that names the ``named`` side only ("left" or "right", in the model's convention) where the image
    shows findings on the other side, more surely than on the named one."""

    named: str

    @property
    def shown(self) -> str:
        return _OTHER[self.named]

    def text(self, side: Callable[[str], str] = str) -> str:
        """The warning in words; ``side`` gives a side's name in the reader's convention (e.g. the patient's)."""
        return (f"the report names the {side(self.named)} lung only; "
                f"the image shows findings on the {side(self.shown)} lung")


def contradiction(named: Optional[str], presence: Sequence[float], card: ModelCard) -> Optional[Contradiction]:
    """The contradiction between a report's laterality (``report_laterality``: "bilateral", "left", "right" or None)
    and a slice's no-report presences ``(left half, right half)``, or None where they agree (see the module)."""
    if named not in _OTHER:
        return None
    left, right = (float(value) for value in presence)
    found = {"left": left, "right": right}
    other = found[_OTHER[named]]
    if other >= card.report_check_shown and _log_odds(other) - _log_odds(found[named]) >= card.report_check_margin:
        return Contradiction(named)
    return None


def _log_odds(probability: float) -> float:
    p = min(max(probability, 1e-6), 1.0 - 1e-6)  # a half of exact zeros (keep_to_side) is finite
    return math.log(p / (1.0 - p))


def slice_key(slice_: np.ndarray) -> bytes:
    """A digest of a slice's pixels, shape and type."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{slice_.shape}{slice_.dtype.str}".encode())
    digest.update(np.ascontiguousarray(slice_).data)
    return digest.digest()


class ReportCheck:
    """The check of one model's reports against its slices: the card's thresholds, ``predict`` (the no-report
    probabilities of a stack of slices) and the presences of the last ``capacity`` slices seen."""

    def __init__(self, card: ModelCard, predict: Predict, capacity: int = KEPT_SLICES):
        self.card = card
        self.predict = predict
        self.capacity = capacity
        self._kept: collections.OrderedDict[bytes, tuple[float, float]] = collections.OrderedDict()

    def remember(self, slices: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Keep the presences ``[N, 2]`` of ``slices`` from their no-report ``probabilities`` ``[N, H, W]``; returns
        them."""
        return self._remember([slice_key(slice_) for slice_ in slices], probabilities)

    def presence(self, slices: np.ndarray) -> np.ndarray:
        """The no-report presences ``[N, 2]`` (left half, right half) of a stack of slices; only the slices not
        kept are segmented (without a report)."""
        keys = [slice_key(slice_) for slice_ in slices]
        found = {key: self._kept[key] for key in keys if key in self._kept}
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            computed = self._remember([keys[i] for i in missing], self.predict(slices[missing]))
            found.update((keys[i], (float(v[0]), float(v[1]))) for i, v in zip(missing, computed))
        for key in keys:
            if key in self._kept:
                self._kept.move_to_end(key)
        return np.array([found[key] for key in keys], dtype=np.float64).reshape(len(keys), 2)

    def contradictions(self, slices: np.ndarray, reports: Sequence[Optional[str]]) -> list[Optional[Contradiction]]:
        """Per slice, the contradiction between its report (in the model's convention) and the slice."""
        named = [report_laterality(report) for report in reports]
        if all(side is None for side in named):  # nothing to check: no pass of the network
            return [None] * len(named)
        return [contradiction(side, presence, self.card) for side, presence in zip(named, self.presence(slices))]

    def warnings(self, slices: np.ndarray, report: Optional[str], side: Callable[[str], str] = str) -> list[str]:
        """The distinct warnings for one report (in the model's convention) given to every slice of ``slices``,
        with the sides named by ``side`` (e.g. translated into the patient's sides)."""
        found = self.contradictions(slices, [report] * len(slices))
        return list(dict.fromkeys(c.text(side) for c in found if c is not None))

    def _remember(self, keys: Sequence[bytes], probabilities: np.ndarray) -> np.ndarray:
        presence = side_presence(torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))).numpy()
        for key, values in zip(keys, presence):
            self._kept[key] = (float(values[0]), float(values[1]))
            self._kept.move_to_end(key)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return presence
