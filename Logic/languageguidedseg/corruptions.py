"""Image corruptions that another camera or clinic brings: colour (hue, saturation, colour balance), contrast
(gamma), blur and JPEG compression.

One implementation serves both sides: ``lgseg evaluate --corrupt`` applies them at fixed severities to measure how a
model carries to other sources, and the training's appearance augmentation (``Training/training/augment.py``) draws
them at random. The operations work on float RGB images ``[3, H, W]`` in [0, 1]; MONAI's transforms do the blur
and the gamma, PIL the JPEG round trip (MONAI has no hue, saturation or JPEG transform).

A linear change of brightness or contrast is not among them: the preprocessing's percentile scaling undoes it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import LgsegError

if TYPE_CHECKING:  # the operations import torch when they run: parsing a --corrupt option does not load it
    import torch

# Rec. 601 luma and the YIQ chroma axes: a hue rotation turns the (I, Q) plane, a saturation change scales it.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _yiq_transform(image: torch.Tensor, chroma: np.ndarray) -> torch.Tensor:
    """``image`` [3, H, W] with the 2 x 2 matrix ``chroma`` applied to its (I, Q) chroma plane, clipped to [0, 1]."""
    import torch

    yiq = np.eye(3)
    yiq[1:, 1:] = chroma
    matrix = torch.from_numpy(_YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ).to(image.dtype)
    return torch.einsum("ij,jhw->ihw", matrix, image).clamp(0.0, 1.0)


def rotate_hue(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Hue turned by ``degrees`` (luma kept)."""
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    return _yiq_transform(image, np.array([[c, -s], [s, c]]))


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Saturation times ``factor`` (0 = grey, 1 = unchanged; luma kept)."""
    return _yiq_transform(image, np.eye(2) * factor)


def scale_channels(image: torch.Tensor, gains: Sequence[float]) -> torch.Tensor:
    """Colour balance: each channel times its gain, clipped to [0, 1]."""
    return (image * image.new_tensor(gains).view(3, 1, 1)).clamp(0.0, 1.0)


def jpeg_roundtrip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """The image saved as a JPEG of ``quality`` (1-95, PIL's scale, 4:2:0 chroma) and read back."""
    import torch
    from PIL import Image

    pixels = (image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.dtype) / 255.0


def gaussian_blur(image: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian blur with (row, column) ``sigma`` in pixels (MONAI ``GaussianSmooth``)."""
    from monai.transforms import GaussianSmooth
    from monai.utils import convert_to_tensor

    return convert_to_tensor(GaussianSmooth(sigma=tuple(float(s) for s in sigma))(image), track_meta=False)


def adjust_gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """Intensities to the power ``gamma`` within the image's range (MONAI ``AdjustContrast``): > 1 darkens the
    mid-tones, < 1 brightens them."""
    from monai.transforms import AdjustContrast
    from monai.utils import convert_to_tensor

    return convert_to_tensor(AdjustContrast(gamma=float(gamma))(image), track_meta=False)


@dataclass(frozen=True)
class Corruption:
    """One corruption at a fixed severity (see :data:`CORRUPTIONS`)."""

    name: str
    severity: float

    def __str__(self) -> str:
        return f"{self.name}:{self.severity:g}"


# name: (meaning of the severity, its valid range, the severity of the documented measurement)
CORRUPTIONS = {
    "hue": ("hue turned by this many degrees", (-180.0, 180.0), 15.0),
    "saturation": ("saturation times this factor (0 = grey)", (0.0, 10.0), 0.5),
    "colour": ("colour cast: red times 1 + C, blue times 1 - C (C < 0: a blue cast)", (-0.9, 0.9), 0.2),
    "gamma": ("contrast: intensities to the power G within the image's range", (0.1, 10.0), 1.5),
    "blur": ("Gaussian blur, sigma in pixels of the network's input (scaled to the image's size)", (0.0, 20.0), 2.0),
    "jpeg": ("JPEG compression at this quality (1-95)", (1.0, 95.0), 15.0),
}


def parse_corruptions(spec: str) -> list[Corruption]:
    """``"jpeg:30,blur:2"`` as corruptions, applied in that order; a one-line error for anything else."""
    corruptions = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, value = part.partition(":")
        name = name.strip().lower()
        if name not in CORRUPTIONS:
            raise LgsegError(f"unknown corruption {name!r} in {spec!r}; use NAME:SEVERITY with NAME one of "
                             f"{', '.join(CORRUPTIONS)}, e.g. jpeg:30,blur:2")
        try:
            severity = float(value)
        except ValueError:
            raise LgsegError(f"corruption {part!r} needs a number after the colon, e.g. {name}:"
                             f"{CORRUPTIONS[name][2]:g}") from None
        low, high = CORRUPTIONS[name][1]
        if not low <= severity <= high or not math.isfinite(severity):
            raise LgsegError(f"corruption {part!r}: the severity must lie in [{low:g}, {high:g}] "
                             f"({CORRUPTIONS[name][0]})")
        corruptions.append(Corruption(name, severity))
    return corruptions


def corrupt_image(image: np.ndarray, corruptions: Sequence[Corruption], input_size: int = 224) -> np.ndarray:
    """An 8-bit image (``[H, W]`` or ``[H, W, 3]``, uint8) with the corruptions applied in order, as uint8 RGB
    (a grey image becomes RGB). ``input_size`` is the network's input size, the unit of the blur's sigma."""
    import torch

    if image.dtype != np.uint8:
        raise LgsegError(f"corruptions apply to 8-bit images (colonoscopy frames, photographs), not {image.dtype}")
    pixels = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0
    height, width = x.shape[1:]
    for c in corruptions:
        if c.name == "hue":
            x = rotate_hue(x, c.severity)
        elif c.name == "saturation":
            x = scale_saturation(x, c.severity)
        elif c.name == "colour":
            x = scale_channels(x, (1.0 + c.severity, 1.0, 1.0 - c.severity))
        elif c.name == "gamma":
            x = adjust_gamma(x, c.severity)
        elif c.name == "blur":
            if c.severity > 0:
                x = gaussian_blur(x, (c.severity * height / input_size, c.severity * width / input_size))
        elif c.name == "jpeg":
            x = jpeg_roundtrip(x, int(round(c.severity)))
    return (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
