"""Network input from image slices: robust intensity scaling, resizing and normalisation, and the way back."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import PreprocessConfig

# Percentiles of a larger slice are estimated from an evenly strided subsample of about this many pixels:
# plenty for a 0.5 % tail, and it keeps a 100 x 512 x 512 stack well under a second.
_PERCENTILE_SAMPLES = 65536


def scale_intensity(slices: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map each slice from its own [lower, upper] percentile range to [0, 1] (float32, clipped).

    ``slices`` is ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` (RGB; percentiles over all channels together so colours
    keep their balance). NaN and inf become 0 (the lower bound); a constant or all-NaN slice becomes all zeros. When a
    slice's percentile range is empty (e.g. a mostly black slice) its min/max range is used instead.
    """
    stack = np.asarray(slices)
    _check_stack(stack)
    count = stack.shape[0]
    lower, upper = _slice_bounds(stack, config)
    bad = None
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 range turns into inf, handled below
        scaled = stack.astype(np.float32)  # always a fresh copy, so the in-place steps below are safe
    if not np.issubdtype(stack.dtype, np.integer):
        bad = ~np.isfinite(scaled)
        if not bad.any():
            bad = None
    span = upper - lower
    gain = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
    shape = (count,) + (1,) * (stack.ndim - 1)
    if bad is not None:
        np.copyto(scaled, np.broadcast_to(lower.reshape(shape), scaled.shape).astype(np.float32), where=bad)
    scaled -= lower.reshape(shape).astype(np.float32)
    scaled *= gain.reshape(shape).astype(np.float32)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return scaled


def prepare_slices(slices: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """Network input ``[N, 3, size, size]`` float32 in channels_last memory format.

    Intensities are scaled with :func:`scale_intensity`, grayscale is replicated to 3 channels, every slice is resized
    bilinearly (antialiased when shrinking) and normalised with ``config.mean`` / ``config.std``.
    """
    scaled = torch.from_numpy(scale_intensity(slices, config))
    # [N, H, W, C] viewed as [N, C, H, W] is already channels_last in memory: no copy needed.
    batch = scaled.unsqueeze(1) if scaled.ndim == 3 else scaled.permute(0, 3, 1, 2)
    height, width = batch.shape[-2:]
    if (height, width) != (config.size, config.size):
        batch = F.interpolate(batch, size=(config.size, config.size), mode="bilinear", align_corners=False,
                              antialias=config.size < height or config.size < width)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)  # resize one channel, then replicate
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def restore_size(probabilities: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resample ``[N, 1, s, s]`` or ``[N, s, s]`` probabilities bilinearly to ``[N, H, W]`` (the slice's own size)."""
    maps = probabilities.unsqueeze(1) if probabilities.ndim == 3 else probabilities
    if maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"expected probabilities of shape [N, 1, s, s] or [N, s, s], got {tuple(probabilities.shape)}")
    height, width = int(shape[0]), int(shape[1])
    maps = maps.float()
    if tuple(maps.shape[-2:]) != (height, width):
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False,
                             antialias=height < maps.shape[-2] or width < maps.shape[-1])
    return maps[:, 0].contiguous()


def zoom(batch: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N, C, H, W]`` magnified by ``scale`` about the centre, same size (bilinear; beyond the image its border
    repeats). ``zoom(zoom(x, s), 1 / s)`` gives back ``x`` where the zoomed image still showed it."""
    theta = batch.new_tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]]).expand(len(batch), 2, 3)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _check_stack(stack: np.ndarray) -> None:
    if stack.ndim == 3 or (stack.ndim == 4 and stack.shape[-1] == 3):
        if 0 in stack.shape:
            raise ValueError(f"slice stack is empty: shape {stack.shape}")
        return
    raise ValueError(f"expected slices [N, H, W] or [N, H, W, 3], got shape {stack.shape}")


def _slice_bounds(stack: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (lower, upper) intensity bounds as float64 arrays of length N, over the finite values only."""
    count = stack.shape[0]
    pixels = stack.shape[1] * stack.shape[2]
    step = max(1, math.ceil(pixels / _PERCENTILE_SAMPLES))
    # Subsample whole pixels, never single channels, so RGB percentiles see all three colours.
    sample = stack.reshape(count, pixels, -1)[:, ::step].reshape(count, -1)
    quantiles = (config.lower_percentile, config.upper_percentile)
    low, high, full_low, full_high = np.zeros((4, count))
    finite = np.isfinite(sample)
    if finite.all():
        rows = np.ones(count, dtype=bool)
        low, high = np.percentile(sample, quantiles, axis=1)
    else:
        rows = finite.any(axis=1)  # an all-NaN slice keeps (0, 0) and becomes zeros
        if not rows.any():
            return low, high
        sample = np.where(finite, sample.astype(np.float64), np.nan)[rows]
        low[rows], high[rows] = np.nanpercentile(sample, quantiles, axis=1)
    full_low[rows], full_high[rows] = np.nanmin(sample, axis=1), np.nanmax(sample, axis=1)
    # An empty percentile window (e.g. 99.5 % black) would erase the slice; fall back to its full range.
    empty = high <= low
    return np.where(empty, full_low, low), np.where(empty, full_high, high)
