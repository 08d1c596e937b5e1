"""The training's augmentation: MONAI random transforms on network-ready (normalised) images and their masks.

Geometry (affine) moves image and mask together, never flipped, because reports name the patient's sides. The
appearance of other cameras and clinics (colour balance, hue, saturation, gamma contrast, blur, JPEG compression)
changes the image only, drawn in its [0, 1] range with the operations of ``languageguidedseg.corruptions`` that
``lgseg evaluate --corrupt`` applies at fixed severities. Each transform is seeded by ``Compose.set_random_state``
from the sample's (seed, epoch) draw; transforms that are switched off are left out, so a config without them keeps
the draws (and results) it had before they existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Optional

import torch
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor

from languageguidedseg.config import PreprocessConfig
from languageguidedseg.corruptions import (
    add_borders,
    add_highlights,
    draw_overlay,
    jpeg_roundtrip,
    mask_field_of_view,
    resample,
    rotate_hue,
    scale_saturation,
)

from .config import AugmentationConfig


class UnitRanged(MapTransform):
    """Normalised images (``(x - mean) / std``) to [0, 1] and back (``inverse``), clipped to [0, 1] on the way."""

    def __init__(self, keys: str, mean: tuple[float, ...], std: tuple[float, ...], inverse: bool = False):
        super().__init__(keys)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.inverse = inverse

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False, dtype=torch.float32)
            d[key] = ((image - self.mean) / self.std if self.inverse
                      else (image * self.std + self.mean).clamp(0.0, 1.0))
        return d


class RandImageOpd(RandomizableTransform, MapTransform):
    """With probability ``prob``, ``op(image, value)`` with ``value`` drawn uniformly from [low, high] (an integer
    from low to high inclusive when ``integer``)."""

    def __init__(self, keys: str, op: Callable[[torch.Tensor, Any], torch.Tensor], low: float, high: float,
                 prob: float, integer: bool = False):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.op, self.low, self.high, self.integer = op, low, high, integer
        self.value: Any = low

    def randomize(self, data: Optional[Any] = None) -> None:
        super().randomize(None)
        self.value = (int(self.R.randint(int(self.low), int(self.high) + 1)) if self.integer
                      else float(self.R.uniform(self.low, self.high)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.op(convert_to_tensor(d[key], track_meta=False, dtype=torch.float32), self.value)
        return d


class RandHighlightsd(RandomizableTransform, MapTransform):
    """With probability ``prob``, from 1 to ``count`` specular highlights at places drawn from the transform's
    random state."""

    def __init__(self, count: int, prob: float):
        MapTransform.__init__(self, "image")
        RandomizableTransform.__init__(self, prob)
        self.count, self.value, self.seed = count, 1, 0

    def randomize(self, data: Optional[Any] = None) -> None:
        super().randomize(None)
        self.value = int(self.R.randint(1, self.count + 1))
        self.seed = int(self.R.randint(0, 2 ** 31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = add_highlights(convert_to_tensor(d[key], track_meta=False, dtype=torch.float32),
                                        self.value, self.seed)
        return d


class RandBorderd(RandomizableTransform, MapTransform):
    """With probability ``prob``, black bars of a share of the width drawn from [0, ``share``] added left and right,
    and the frame resampled back to its size: a letterboxed frame as the network sees it (the other ``keys``, the mask
    and the teachers' probabilities, keep up)."""

    def __init__(self, keys: tuple[str, ...], share: float, prob: float):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.share, self.value = share, 0.0

    def randomize(self, data: Optional[Any] = None) -> None:
        super().randomize(None)
        self.value = float(self.R.uniform(0.0, self.share))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                x = convert_to_tensor(d[key], track_meta=False)
                d[key] = resample(add_borders(x, self.value), *x.shape[1:], mask=key == "mask")
        return d


def augmenter(config: AugmentationConfig, preprocess: PreprocessConfig, soft: bool = False) -> Optional[Any]:
    """MONAI dictionary transforms for ``{"image", "mask"}``, and ``"soft"`` (the teachers' probabilities, moved with
    the mask but interpolated) with ``soft``; ``preprocess`` says how images were normalised. None when every
    augmentation is off."""
    if not (config.enabled or config.appearance_enabled):
        return None
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    size = preprocess.size
    # What geometry moves together (the mask by its nearest value, the rest interpolated).
    keys = ("image", "mask", "soft") if soft else ("image", "mask")
    transforms: list[Any] = []
    if config.enabled:
        transforms += [
            RandAffined(keys=keys, prob=config.affine_probability,
                        rotate_range=math.radians(config.rotate_degrees), scale_range=config.scale,
                        translate_range=config.translate * size, mode=("bilinear", "nearest", "bilinear")[:len(keys)],
                        padding_mode="zeros"),
            RandScaleIntensityd(keys="image", factors=config.intensity, prob=config.intensity_probability),
            RandShiftIntensityd(keys="image", offsets=config.intensity, prob=config.intensity_probability),
        ]
    if config.appearance_enabled:
        p = config.appearance_probability
        appearance: list[Any] = []
        if config.colour_balance:  # each channel times its own 1 +- colour_balance
            appearance.append(RandScaleIntensityd(keys="image", factors=config.colour_balance, prob=p,
                                                  channel_wise=True))
        if config.hue_degrees:
            appearance.append(RandImageOpd("image", rotate_hue, -config.hue_degrees, config.hue_degrees, p))
        if config.saturation:
            appearance.append(RandImageOpd("image", scale_saturation, max(0.0, 1.0 - config.saturation),
                                           1.0 + config.saturation, p))
        if config.gamma:
            appearance.append(RandAdjustContrastd(keys="image", prob=p,
                                                  gamma=(max(0.1, 1.0 - config.gamma), 1.0 + config.gamma)))
        if config.blur_sigma:
            sigma = (0.25, max(0.25, config.blur_sigma))
            appearance.append(RandGaussianSmoothd(keys="image", sigma_x=sigma, sigma_y=sigma, prob=p))
        if config.resolution:
            appearance.append(RandSimulateLowResolutiond(keys="image", prob=p, downsample_mode="area",
                                                         upsample_mode="bilinear",
                                                         zoom_range=(1.0 - config.resolution, 1.0)))
        if config.specular:
            appearance.append(RandHighlightsd(config.specular, p))
        if config.fov_radius:
            appearance.append(RandImageOpd("image", mask_field_of_view, config.fov_radius, 1.0, p))
        if config.overlay_lines:
            appearance.append(RandImageOpd("image", draw_overlay, 1, config.overlay_lines, p, integer=True))
        if config.jpeg_quality:  # last, as a camera's encoder would be
            appearance.append(RandImageOpd("image", jpeg_roundtrip, config.jpeg_quality, 95, p, integer=True))
        if config.border:  # squeezes the mask too; the letterbox bars stay black
            appearance.append(RandBorderd(keys, config.border, p))
        transforms += [UnitRanged("image", preprocess.mean, preprocess.std), *appearance,
                       UnitRanged("image", preprocess.mean, preprocess.std, inverse=True)]
    return Compose(transforms)
