"""Network input preparation: shapes, dtypes, memory format, robust scaling, and restoring the slice size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from languageguidedseg.config import PreprocessConfig
from languageguidedseg.errors import LgsegError
from languageguidedseg.preprocess import prepare_slices, restore_size, scale_intensity, zoom

CONFIG = PreprocessConfig()


def _stacks() -> dict:
    rng = np.random.default_rng(0)
    return {
        "uint8 x-ray": rng.integers(0, 256, size=(2, 224, 224), dtype=np.uint8),
        "uint16": rng.integers(0, 65536, size=(3, 100, 140), dtype=np.uint16),
        "int16 CT (HU)": rng.integers(-1024, 3000, size=(4, 300, 300)).astype(np.int16),
        "uint8 RGB": rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_stacks()))
def test_prepare_slices_shape_dtype_layout(name):
    stack = _stacks()[name]
    batch = prepare_slices(stack, CONFIG)
    assert batch.shape == (stack.shape[0], 3, 224, 224)
    assert batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("name", list(_stacks()))
def test_scaled_values_in_unit_range(name):
    stack = _stacks()[name]
    scaled = scale_intensity(stack, CONFIG)
    assert scaled.dtype == np.float32 and scaled.shape == stack.shape
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert scaled.max() == 1.0 and scaled.min() == 0.0  # the window spans the slice's range


def test_scaling_is_per_slice_and_keeps_order():
    ramp = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64)
    stack = np.stack([ramp, ramp * 10 + 500]).astype(np.float32)
    scaled = scale_intensity(stack, CONFIG)
    np.testing.assert_allclose(scaled[0], scaled[1], atol=1e-5)  # each slice uses its own window
    assert np.all(np.diff(scaled[0].ravel()) >= 0)


def test_rgb_scaling_keeps_colour_balance():
    rgb = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    rgb[0, :, :16] = (200, 100, 50)
    rgb[0, :, 16:] = (20, 10, 5)
    scaled = scale_intensity(rgb, CONFIG)[0, 0, 0]
    assert scaled[0] > scaled[1] > scaled[2]  # joint percentiles: red stays brighter than green and blue


def test_nan_inf_and_constant_slices_are_finite():
    stack = np.random.default_rng(2).normal(size=(4, 50, 60)).astype(np.float32)
    stack[0, :5] = np.nan
    stack[0, 10, 10] = np.inf
    stack[1] = np.nan
    stack[2] = 7.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        scaled = scale_intensity(stack, CONFIG)
        batch = prepare_slices(stack, CONFIG)
        only_nan = scale_intensity(np.full((1, 8, 8), np.nan, np.float32), CONFIG)  # no finite value anywhere
    assert np.isfinite(scaled).all() and torch.isfinite(batch).all()
    assert scaled[0, :5].max() == 0.0 and scaled[0, 10, 10] == 0.0  # non-finite -> lower bound
    assert scaled[1].max() == 0.0 and scaled[2].max() == 0.0
    assert scaled[3].max() == 1.0
    assert only_nan.shape == (1, 8, 8) and not only_nan.any()


def test_mostly_black_slice_is_not_erased():
    stack = np.zeros((1, 100, 100), dtype=np.uint8)
    stack[0, 50, 50] = 255  # far fewer than 0.5 % of the pixels
    assert scale_intensity(stack, CONFIG)[0, 50, 50] == 1.0


@pytest.mark.parametrize("shape", [(7, 3), (1, 4, 5, 2)])
def test_bad_stack_shape(shape):
    with pytest.raises(ValueError):
        scale_intensity(np.zeros(shape), CONFIG)


@pytest.mark.parametrize("probability_shape", [(2, 1, 224, 224), (2, 224, 224)])
@pytest.mark.parametrize("size", [(300, 250), (100, 80), (224, 224)])
def test_restore_size_returns_slice_size(probability_shape, size):
    restored = restore_size(torch.rand(probability_shape), size)
    assert restored.shape == (2,) + size
    assert restored.dtype == torch.float32


def test_left_half_stays_left():
    probabilities = torch.zeros(1, 1, 224, 224)
    probabilities[..., :112] = 1.0
    restored = restore_size(probabilities, (300, 500)) > 0.5
    assert restored[:, :, :245].all() and not restored[:, :, 255:].any()


def test_resized_input_keeps_left_right():
    stack = np.zeros((1, 300, 500), dtype=np.uint8)
    stack[:, :, :250] = 255
    batch = prepare_slices(stack, CONFIG)
    assert batch[0, 0, :, :100].mean() > batch[0, 0, :, 124:].mean()


def test_config_dict_round_trip():
    config = PreprocessConfig(size=256, lower_percentile=1.0, upper_percentile=99.0)
    values = config.to_dict()
    assert values["mean"] == [0.485, 0.456, 0.406]
    assert PreprocessConfig.from_dict(values) == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


def test_config_with_an_unknown_key_is_refused_by_name():
    with pytest.raises(LgsegError, match="unknown key 'sise' in preprocessing; known keys: size, "):
        PreprocessConfig.from_dict({"sise": 256}, "preprocessing")


@pytest.mark.parametrize("values", [{"size": 0}, {"lower_percentile": 60, "upper_percentile": 40}, {"std": (1, 0, 1)}])
def test_bad_config_is_a_user_error(values):
    with pytest.raises(LgsegError):
        PreprocessConfig.from_dict(values)


def test_zoom_magnifies_about_the_centre_and_back():
    image = torch.zeros(1, 1, 100, 100)
    image[:, :, 40:60, 40:60] = 1.0
    assert torch.allclose(zoom(image, 1.0), image, atol=1e-5)
    assert float(zoom(image, 2.0).sum()) == pytest.approx(4 * 400, rel=0.02)  # twice the width and height
    assert float(zoom(image, 0.5).sum()) == pytest.approx(400 / 4, rel=0.05)
    ramp = torch.linspace(0, 1, 100).expand(1, 1, 100, 100).contiguous()  # a smooth image survives the round trip
    back = zoom(zoom(ramp, 1.1), 1 / 1.1)
    assert torch.allclose(back[..., 10:90, 10:90], ramp[..., 10:90, 10:90], atol=1e-3)
