"""The models shipped with the package: listed, verified by hash, and segmenting real validation images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import QATA_REPORT

SHIPPED = {"qata-cxr": ("qata-cov19", "Infection"), "kvasir-polyp": ("kvasir-seg", "Polyp")}


def _shipped(name: str):
    from languageguidedseg.package import installed_models_folder

    folder = installed_models_folder() / name
    if not (folder / "model.json").is_file():
        pytest.fail(f"shipped model {name} is missing from {folder}")
    return folder


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_is_listed_small_and_documented(name):
    from languageguidedseg.package import list_models

    folder = _shipped(name)
    info = {m.name: m for m in list_models() if m.source == "installed"}[name]
    assert info.size_mb <= 25
    assert info.licence and info.task
    # (Its scores are measured, not read back from its hash-locked model.json: see the test below.)
    assert json.loads((folder / "model.json").read_text())["config"]["training"]["command"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_segments_a_validation_image_in_both_modes(name, request):
    from languageguidedseg.data import load_pair, load_split
    from languageguidedseg.inference import Segmenter
    from languageguidedseg.metrics import ScoreAccumulator
    from languageguidedseg.package import load_package

    dataset, segment = SHIPPED[name]
    root = request.getfixturevalue("qata" if dataset == "qata-cov19" else "kvasir")
    package = load_package(name)  # verifies the SHA-256 of the weights and of the description
    assert package.config.card.segment_name == segment
    segmenter = Segmenter.load(package, "cpu")
    samples = [s for s in load_split(root, "val") if s.report][:8]
    given_scores, approximated_scores, found_in_both_modes = ScoreAccumulator(), ScoreAccumulator(), []
    for sample in samples:
        image, truth = load_pair(sample)
        rgb = image.ndim == 3
        # The data sets' reports name image sides (or none): no translation, so the scores are the published ones.
        given = segmenter.segment_array(image, rgb=rgb, report=sample.report, sides="image")
        approximated = segmenter.segment_array(image, rgb=rgb, report=None, sides="image")
        assert given.report_source == "given" and approximated.report_source == "prototype"
        assert approximated.report in package.config.prototype_reports
        assert given.mask.shape == approximated.mask.shape == truth.shape
        if given.mask.any() and approximated.mask.any():
            found_in_both_modes.append(sample.id)
        given_scores.update(given.mask, truth)
        approximated_scores.update(approximated.mask, truth)
    assert found_in_both_modes, f"{name} gives an empty mask in one mode on every image"
    # The masks land on the target, not merely somewhere: micro Dice over these images, both modes.
    assert given_scores.compute().dice > 0.7, given_scores.compute()
    assert approximated_scores.compute().dice > 0.6, approximated_scores.compute()


def test_default_model_is_the_chest_xray_model():
    from languageguidedseg.package import DEFAULT_MODEL, find_model

    _shipped("qata-cxr")
    assert DEFAULT_MODEL == "qata-cxr"
    assert find_model(None).name == "qata-cxr"


def test_qata_mask_follows_the_report_side(qata):
    """Editing the report moves the mask: in image sides, 'left lung' lands in the left half of the image."""
    from languageguidedseg.data import load_pair, load_split
    from languageguidedseg.inference import Segmenter

    _shipped("qata-cxr")
    segmenter = Segmenter.load("qata-cxr", "cpu")
    sample = next(s for s in load_split(qata, "val") if s.report and s.report.startswith("bilateral"))
    image, _ = load_pair(sample)
    half = image.shape[1] // 2
    left = segmenter.segment_array(image, report="unilateral pulmonary infection, one infected area, "
                                                  "middle lower left lung.", sides="image").mask
    right = segmenter.segment_array(image, report="unilateral pulmonary infection, one infected area, "
                                                   "middle lower right lung.", sides="image").mask
    assert left[:, :half].sum() > left[:, half:].sum()
    assert right[:, half:].sum() > right[:, :half].sum()
    both = segmenter.segment_array(image, report=QATA_REPORT, sides="image").mask
    assert both.sum() > 0 and np.count_nonzero(both != left) > 0


def test_qata_approximated_report_agrees_with_its_mask(qata):
    """Without a report, the approximated report names the sides where the probabilities say foreground lies, and
    where it names one side only, the mask lies on that side."""
    from languageguidedseg.data import load_pair, load_split
    from languageguidedseg.inference import Segmenter
    from languageguidedseg.laterality import left_share, probability_laterality, report_laterality

    _shipped("qata-cxr")
    segmenter = Segmenter.load("qata-cxr", "cpu")
    unilateral = 0
    for sample in load_split(qata, "val")[:12]:
        image, _ = load_pair(sample)
        result = segmenter.segment_array(image, sides="image")  # the mask's sides are the image's
        probabilities = segmenter.predict_slices(image[None])[0][0]
        side = report_laterality(result.report)
        assert side == probability_laterality(probabilities, segmenter.config.card.side_presence), sample.id
        if side != "bilateral" and result.mask.any():
            unilateral += 1
            assert (left_share(result.mask) > 0.5) == (side == "left"), sample.id
        approximation = segmenter.approximate(image, top_k=3, sides="image")
        assert approximation.report == result.report
        # A cosine: an absolute tolerance too, for one near 0.
        assert approximation.similarity == pytest.approx(result.similarity, rel=1e-5, abs=1e-5)
        assert len(approximation.top) == 3
    assert unilateral >= 2
    # A batch that mixes a report and no report approximates only the image without one, in the same way.
    stack = np.stack([image, image])
    probabilities, nearest, _, _ = segmenter.predict_slices(stack, [None, QATA_REPORT])
    assert nearest[1] == -1 and segmenter.prototype_report(nearest[0]) == result.report
