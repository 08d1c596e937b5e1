"""The Segmenter's no-report mode: the model's test-time zooms."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from languageguidedseg.inference import Segmenter
from languageguidedseg.preprocess import prepare_slices, zoom


def test_no_report_probabilities_average_the_models_zooms(tiny_model):
    """Without a report the image is also segmented at each of ``no_report_scales`` and the probabilities averaged;
    with a report the scales play no part."""
    segmenter = Segmenter(model=tiny_model, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, size=(1, 224, 224), dtype=np.uint8)
    single, nearest, similarity = segmenter.predict_slices(image)
    with_report = segmenter.predict_slices(image, "bilateral pulmonary infection.")[0]
    segmenter.package.config = dataclasses.replace(segmenter.package.config, no_report_scales=(1.0, 0.9, 1.1))
    averaged, nearest_zoomed, similarity_zoomed = segmenter.predict_slices(image)
    with torch.inference_mode():
        batch = prepare_slices(image, segmenter.preprocess)
        passes = [torch.sigmoid(segmenter.network(batch))]
        passes += [zoom(torch.sigmoid(segmenter.network(zoom(batch, s))), 1 / s) for s in (0.9, 1.1)]
    expected = torch.stack(passes).mean(0)[:, 0].numpy()
    assert np.abs(averaged - expected).max() < 1e-4
    assert np.abs(averaged - single).max() > 1e-3
    assert nearest_zoomed == nearest and similarity_zoomed == similarity  # the prototype ranking keeps its pass
    assert np.array_equal(segmenter.predict_slices(image, "bilateral pulmonary infection.")[0], with_report)
