"""Image corruptions that another camera or clinic brings: colour (hue, saturation, colour balance), contrast
(gamma), blur and JPEG compression; the frame's geometry (black letterbox borders, resolution, aspect ratio);
what the video system draws on it (on-screen text, the field-of-view mask) and specular highlights.

One implementation serves both sides: ``lgseg evaluate --corrupt`` applies them at fixed severities to measure how a
model carries to other sources, and the training's augmentation (``Training/training/augment.py``) draws them at
random. The operations work on float RGB images ``[3, H, W]`` in [0, 1]; MONAI's transforms do the blur
and the gamma, PIL the JPEG round trip and the text (MONAI has no hue, saturation, JPEG or text transform). The
geometric ones (``border``, ``resize``, ``aspect``) change the ground-truth mask with the image; the others leave it.

A linear change of brightness or contrast is not among them: the preprocessing's percentile scaling undoes it.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

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


def add_borders(image: torch.Tensor, share: float) -> torch.Tensor:
    """Black bars of ``share`` of the width added on the left and on the right (a letterboxed video frame)."""
    import torch

    pad = int(round(share * image.shape[-1]))
    return torch.nn.functional.pad(image, (pad, pad))


def resample(image: torch.Tensor, height: int, width: int, mask: bool = False) -> torch.Tensor:
    """``image`` ``[C, H, W]`` on a ``height`` x ``width`` grid: bilinear with antialiasing (a camera of another
    resolution), nearest for a mask."""
    import torch

    batch = image[None].float()
    if mask:
        return torch.nn.functional.interpolate(batch, size=(height, width), mode="nearest")[0].to(image.dtype)
    return torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False,
                                           antialias=True)[0].clamp(0.0, 1.0)


# What a video processor writes over the frame: examination data in the corners, as the common systems do.
_OVERLAY_TEXT = ("CV-190  GIF-HQ190", "Ex 2026-12-06  10:42:17", "ID 0000000000", "Eh: A5  Cr: N", "NBI  AE: A3",
                 "Zoom x1.5  Fr: 25", "D.F.  Iris: Peak", "Comment:")


def draw_overlay(image: torch.Tensor, lines: int) -> torch.Tensor:
    """``lines`` lines of white on-screen text, alternately in the top-left and bottom-left corners, with a text
    height of 1/28 of the frame's."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    height, width = image.shape[1:]
    pixels = (image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    frame = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(frame)
    size = max(6, height // 28)
    font = ImageFont.load_default(size=size)
    for line in range(lines):
        row = line // 2
        y = size // 2 + row * int(size * 1.3) if line % 2 == 0 else height - (row + 1) * int(size * 1.3) - size // 2
        draw.text((max(2, width // 60), y), _OVERLAY_TEXT[line % len(_OVERLAY_TEXT)], fill=(255, 255, 255),
                  font=font)
    return torch.from_numpy(np.asarray(frame).copy()).permute(2, 0, 1).to(image.dtype) / 255.0


def add_highlights(image: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` specular highlights: saturated white spots with soft edges, of 0.4-1.5% of the shorter side in
    radius, at places drawn from ``seed``."""
    import torch

    height, width = image.shape[1:]
    rng = np.random.default_rng(seed)
    light = torch.zeros(height, width, dtype=image.dtype)
    for _ in range(count):
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.004, 0.015) * min(height, width)
        stretch = rng.uniform(1.0, 2.5)  # highlights on a curved wall are elongated
        # Only the spot's neighbourhood: beyond twice its radius the light is below 1e-7.
        top, bottom = max(0, int(y - 2 * radius)), min(height, int(y + 2 * radius) + 1)
        left, right = max(0, int(x - 2 * radius * stretch)), min(width, int(x + 2 * radius * stretch) + 1)
        rows = torch.arange(top, bottom, dtype=image.dtype)[:, None]
        columns = torch.arange(left, right, dtype=image.dtype)[None, :]
        distance = ((rows - y) / radius) ** 2 + ((columns - x) / (radius * stretch)) ** 2
        light[top:bottom, left:right] = torch.maximum(light[top:bottom, left:right], torch.exp(-(distance ** 2)))
    return image + (1.0 - image) * light[None]


def mask_field_of_view(image: torch.Tensor, radius: float) -> torch.Tensor:
    """Black outside a centred circle of ``radius`` times the half-diagonal (1 = nothing masked; an endoscope's
    round field of view)."""
    import torch

    height, width = image.shape[1:]
    rows = torch.arange(height, dtype=image.dtype)[:, None] + 0.5 - height / 2
    columns = torch.arange(width, dtype=image.dtype)[None, :] + 0.5 - width / 2
    inside = rows ** 2 + columns ** 2 <= (radius * math.hypot(height, width) / 2) ** 2
    return image * inside[None]


# name: (meaning of the severity, its valid range, the severity of the documented measurement)
CORRUPTIONS = {
    "hue": ("hue turned by this many degrees", (-180.0, 180.0), 15.0),
    "saturation": ("saturation times this factor (0 = grey)", (0.0, 10.0), 0.5),
    "colour": ("colour cast: red times 1 + C, blue times 1 - C (C < 0: a blue cast)", (-0.9, 0.9), 0.2),
    "gamma": ("contrast: intensities to the power G within the image's range", (0.1, 10.0), 1.5),
    "blur": ("Gaussian blur, sigma in pixels of the network's input (scaled to the image's size)", (0.0, 20.0), 2.0),
    "jpeg": ("JPEG compression at this quality (1-95)", (1.0, 95.0), 15.0),
    "border": ("black bars of this share of the width added left and right (letterbox)", (0.0, 1.0), 0.25),
    "resize": ("the frame scaled by this factor (another resolution)", (0.1, 4.0), 0.5),
    "aspect": ("the frame's width scaled by this factor, the height kept (another aspect ratio)", (0.25, 4.0), 1.33),
    "overlay": ("this many lines of on-screen text in the corners", (0.0, 16.0), 6.0),
    "specular": ("this many added specular highlights", (0.0, 200.0), 30.0),
    "fov": ("black outside a circle of this radius (1 = the half-diagonal; the field-of-view mask)", (0.3, 1.0),
            0.7),
}
# The corruptions that change the frame's grid, and so the mask with it.
GEOMETRIC = ("border", "resize", "aspect")


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


def corrupt_pair(image: np.ndarray, mask: Optional[np.ndarray], corruptions: Sequence[Corruption],
                 input_size: int = 224) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An 8-bit image (``[H, W]`` or ``[H, W, 3]``, uint8) with the corruptions applied in order, as uint8 RGB
    (a grey image becomes RGB), and its ``mask`` on the corrupted frame's grid (None stays None). ``input_size``
    is the network's input size, the unit of the blur's sigma. Deterministic: the highlights' places are drawn
    from the image's bytes."""
    import torch

    if image.dtype != np.uint8:
        raise LgsegError(f"corruptions apply to 8-bit images (colonoscopy frames, photographs), not {image.dtype}")
    pixels = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0
    target = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))[None]
    for c in corruptions:
        height, width = x.shape[1:]
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
        elif c.name == "border":
            x = add_borders(x, c.severity)
            target = None if target is None else add_borders(target, c.severity)
        elif c.name in ("resize", "aspect"):
            size = (max(1, round(height * c.severity)) if c.name == "resize" else height,
                    max(1, round(width * c.severity)))
            x = resample(x, *size)
            target = None if target is None else resample(target, *size, mask=True)
        elif c.name == "overlay":
            x = draw_overlay(x, int(round(c.severity)))
        elif c.name == "specular":
            x = add_highlights(x, int(round(c.severity)), zlib.crc32(pixels.tobytes()))
        elif c.name == "fov":
            x = mask_field_of_view(x, c.severity)
    corrupted = (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return corrupted, None if target is None else target[0].numpy()
