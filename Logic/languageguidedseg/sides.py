"""Left and right in reports: the patient's sides, the image's sides, and the geometry that links them.

A clinician's "left lung" is the patient's left. A model's reports may name the sides of the image as displayed
instead (QaTa-COV19 / LViT reports do: "lower left lung" is the lung on the image's left, which is the patient's right
in a frontal radiograph shown in the radiological display convention). Each model package declares its reports'
convention (``report_sides``: "image", "patient" or "none"); the engine translates a report between the user's
convention and the model's with the orientation of the slice that is segmented.

The image's left and right are the columns of the 2D slice the network sees (column 0 on the left, as a PNG is
shown). Which of the two is the patient's left follows from the slice's column direction in patient coordinates:
a volume's direction matrix or IJK-to-RAS matrix. A 2D PNG/JPEG has none; it is taken to be a frontal radiograph in
the radiological display convention (the patient's left on the image's right), and results say this was assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import LgsegError

SIDES = ("patient", "image")  # conventions a user reads and writes reports in
REPORT_SIDES = ("image", "patient", "none")  # what the sides in a model's or data set's reports mean

# Shipped packages saved before ``report_sides`` existed; their model.json is hash-locked, so it cannot gain the key.
# Each value is what the package's training data declares in its dataset.json.
LEGACY_REPORT_SIDES = {"qata-cxr": "image", "kvasir-polyp": "none"}

# "left"/"right" as a word or word start ("left-sided", "leftmost", "rightward"), or a pair that names both sides
# ("left and right", "right or left", "left/right"), which reads the same in either convention and stays as written.
_SIDE_WORDS = re.compile(
    r"\b(?P<pair>left\s*(?:and|or|&|/)\s*right|right\s*(?:and|or|&|/)\s*left)\b"
    r"|\b(?P<side>left|right)(?=(?:most|wards?)?\b)",
    re.IGNORECASE,
)
_SWAP = {"left": "right", "right": "left"}
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def check_sides(value: str, allowed: tuple = SIDES, what: str = "sides") -> str:
    """``value`` if it is one of ``allowed``, else a one-line error that lists them."""
    if value not in allowed:
        raise LgsegError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def swap_sides(text: str) -> str:
    """``text`` with left and right exchanged; case, punctuation and every other character kept.

    "bilateral", "both lungs" and pairs such as "left and right" name both sides and stay as written.
    """

    def replace(match: re.Match) -> str:
        word = match.group("side")
        if word is None:
            return match.group(0)
        swapped = _SWAP[word.lower()]
        if word.isupper():
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    return _SIDE_WORDS.sub(replace, text)


@dataclass(frozen=True)
class Orientation:
    """Which side of the displayed slice is the patient's left, and where that was learnt.

    ``patient_left``: "right" (radiological display), "left", or None when the slice's columns do not run
    left-right (e.g. a sagittal slice). ``assumed``: no geometry, taken as radiological display.
    ``source``: what the geometry came from, for messages ("volume", "file").
    """

    patient_left: Optional[str]
    assumed: bool = False
    source: str = "image"

    @property
    def text(self) -> str:
        """Short description: "from the volume", "assumed: radiological display", ..."""
        if self.assumed:
            return "assumed: radiological display"
        if self.patient_left is None:
            return f"from the {self.source}: no left-right axis across this slice"
        return f"from the {self.source}"


RADIOLOGICAL_DISPLAY = Orientation("right", assumed=True)


@dataclass(frozen=True)
class Geometry:
    """Where a voxel array lies in the patient: the 4x4 IJK-to-RAS matrix (IJK in ITK / Slicer order i, j, k)."""

    ijk_to_ras: np.ndarray
    source: str = "image"

    @classmethod
    def from_lps(cls, ijk_to_lps: np.ndarray, source: str = "file") -> Geometry:
        """From an ITK (LPS) IJK-to-physical matrix, e.g. a SimpleITK image's direction, spacing and origin."""
        return cls(np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_lps, dtype=float), source)

    def orientation(self, axis: int = 2) -> Orientation:
        """The orientation of slices along IJK ``axis`` as the network sees them (see :func:`column_axis`)."""
        column = np.asarray(self.ijk_to_ras, dtype=float)[:3, column_axis(axis)]
        length = np.linalg.norm(column)
        if length == 0 or not np.all(np.isfinite(column)):
            return Orientation(None, source=self.source)
        unit = column / length
        # The columns run left-right only if that is their main direction (oblique volumes: the nearest axis).
        if int(np.argmax(np.abs(unit))) != 0:
            return Orientation(None, source=self.source)
        # RAS: +x is the patient's right, so columns that run towards -x put the patient's left on the image's right.
        return Orientation("right" if unit[0] < 0 else "left", source=self.source)


def orientation_of(geometry: Optional[Geometry], axis: int = 2) -> Orientation:
    """The orientation of slices along ``axis``; without geometry, radiological display is assumed."""
    return RADIOLOGICAL_DISPLAY if geometry is None else geometry.orientation(axis)


def column_axis(axis: int) -> int:
    """The IJK axis along the columns of a slice taken along ``axis`` (``inference.slices_of``'s layout).

    Slices along k are (j, i) images and along j (k, i) images, so their columns run along i; slices along i are
    (k, j) images, whose columns run along j.
    """
    if axis not in (0, 1, 2):
        raise LgsegError(f"axis must be 0, 1 or 2 (IJK order), not {axis}")
    return 1 if axis == 0 else 0


def is_raster_file(name: str) -> bool:
    """True for 2D image formats that carry no patient orientation (PNG, JPEG, BMP, TIFF)."""
    return str(name).lower().endswith(_RASTER_SUFFIXES)


def translate_report(text: str, source: str, target: str, orientation: Orientation) -> str:
    """``text`` written in the ``source`` convention, rewritten in ``target`` ("patient", "image" or "none").

    Sides are exchanged only between the patient's and the image's convention, and only where the patient's left is
    on the image's right; "none" (reports without patient sides, e.g. "left of the image") is never rewritten, nor is
    a slice without a left-right axis.
    """
    check_sides(source, REPORT_SIDES, "the report convention")
    check_sides(target, REPORT_SIDES, "the report convention")
    if "none" in (source, target) or source == target or orientation.patient_left != "right":
        return text
    return swap_sides(text)


def result_sides(sides: str, report_sides: str) -> str:
    """The convention of the report text returned to a user who asked for ``sides``: "none" for models whose
    reports carry no patient sides (their text is returned as written)."""
    return "none" if report_sides == "none" else sides


def sides_label(sides: str, orientation: Orientation) -> str:
    """The one-line label shown beside a report box, e.g. "Left/right: patient (image orientation from the volume)"."""
    if sides == "none":
        return "Left/right: as written (this model's reports name no patient sides)"
    if sides == "image":
        return "Left/right: image (as displayed)"
    if orientation.assumed:
        return f"Left/right: {sides} ({orientation.text})"
    if orientation.patient_left is None:
        return f"Left/right: {sides} (this slice has no left-right axis; sides kept as written)"
    return f"Left/right: {sides} (image orientation {orientation.text})"
