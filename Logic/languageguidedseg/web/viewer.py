"""What a reader needs on and beside the web page's slice views: view names, slice k of N, orientation letters,
window/level presets and the segment's size in a clinician's units.

Pure functions of the scene's geometry and of numpy arrays, so that the page (``app.py``) only wires them to state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

# CT presets as 3D Slicer's Volumes module names them (window, level in Hounsfield units): CT-Lung, CT-Abdomen (soft
# tissue) and CT-Bone.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1400.0, -500.0),
    "soft tissue": (350.0, 40.0),
    "bone": (1000.0, 400.0),
}
# A volume whose darkest voxels reach this far below 0 holds Hounsfield units (air is -1000 HU): a CT.
CT_AIR_BELOW = -500.0

# RAS axes: the letter for each direction's positive and negative end.
_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))


def direction_letter(direction: Union[Sequence[float], np.ndarray]) -> str:
    """The patient direction a RAS vector points to most: "R", "L", "A", "P", "S" or "I" ("" for a zero vector)."""
    vector = np.asarray(direction, dtype=float)[:3]
    if not np.any(vector):
        return ""
    axis = int(np.argmax(np.abs(vector)))
    return _LETTERS[axis][0 if vector[axis] > 0 else 1]


def orientation_letters(slice_to_ras: np.ndarray) -> dict[str, str]:
    """Which patient direction lies at each edge of a slice view, from its 4x4 SliceToRAS matrix (columns: the
    screen's right, the screen's up, the normal)."""
    right, up = np.asarray(slice_to_ras, dtype=float)[:3, 0], np.asarray(slice_to_ras, dtype=float)[:3, 1]
    return {"left": direction_letter(-right), "right": direction_letter(right),
            "top": direction_letter(up), "bottom": direction_letter(-up)}


def looks_like_ct(minimum: float) -> bool:
    """True when an image's darkest value is air in Hounsfield units: the CT window presets apply."""
    return minimum < CT_AIR_BELOW


def segment_size(mask: np.ndarray, spacing: Sequence[float], *, axis: Optional[int], slice_index: Optional[int],
                 is_volume: bool, has_spacing: bool) -> str:
    """The segment's size as a clinician reads it: area in mm² on the slice segmented (and the share of the slice),
    and for a volume its volume in ml (and the share of the volume).

    ``mask`` is (k, j, i) or (j, i); ``spacing`` is (i, j, k) in mm; ``axis``/``slice_index`` name the slice of a
    slice-mode run (None for a whole-volume run). Without a known pixel spacing (PNG, JPEG: ``has_spacing`` False) the
    area is given in pixels.
    """
    mask = np.asarray(mask) != 0
    volume = mask if mask.ndim == 3 else mask[None]
    spacing = [float(s) for s in (list(spacing) + [1.0, 1.0, 1.0])[:3]]
    parts = []
    if not is_volume:
        plane = volume[0]
        count = int(plane.sum())
        share = f"{count / max(plane.size, 1):.1%} of the image"
        if has_spacing:
            parts.append(f"{count * spacing[0] * spacing[1]:.0f} mm² ({share})")
        else:
            parts.append(f"{count} pixels ({share}; the file gives no pixel spacing)")
        return "; ".join(parts)
    if axis is not None and slice_index is not None:
        index: list = [slice(None)] * 3
        index[2 - axis] = slice_index
        plane = volume[tuple(index)]
        area = float(np.prod([spacing[a] for a in range(3) if a != axis]))
        count = int(plane.sum())
        parts.append(f"slice {slice_index + 1}: {count * area:.0f} mm² ({count / max(plane.size, 1):.1%} of the "
                     "slice)")
    count = int(volume.sum())
    millilitres = count * spacing[0] * spacing[1] * spacing[2] / 1000.0
    parts.append(f"whole segment: {millilitres:.1f} ml ({count / max(volume.size, 1):.2%} of the volume)")
    return "; ".join(parts)
