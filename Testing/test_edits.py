"""Report edits, laterality of reports and masks, and the steering / laterality probes on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import QATA_REPORT
from languageguidedseg.data import load_pair, load_split
from languageguidedseg.laterality import (
    keep_to_side,
    left_share,
    probability_laterality,
    report_laterality,
    side_presence,
)
from languageguidedseg.probes import (
    LEFT_REPORT,
    RIGHT_REPORT,
    laterality_probe,
    steering_probe,
    whole_sides,
    zone_steering_probe,
)
from training.edits import kvasir_edits, qata_edits, report_edits


@pytest.mark.parametrize("text, expected", [
    (QATA_REPORT, "bilateral"),
    ("unilateral pulmonary infection, one infected area, lower left lung.", "left"),
    ("unilateral pulmonary infection, one infected area, all right lung.", "right"),
    ("bilateral pulmonary infection.", "bilateral"),
    ("pulmonary infection.", None),
    (None, None),
])
def test_report_laterality(text, expected):
    assert report_laterality(text) == expected


def test_mask_sides():
    mask = np.zeros((100, 101), dtype=bool)
    assert np.isnan(left_share(mask))
    mask[40:60, 5:30] = True
    assert left_share(mask) == 1.0
    mask[:, :50] = False
    mask[40:60, 70:95] = True
    assert left_share(mask) == 0.0
    middle = np.zeros((4, 5), dtype=bool)
    middle[:, 2] = True  # the middle column of an odd width is split between the halves
    assert left_share(middle) == 0.5


def test_laterality_of_probabilities():
    """A side is involved where its most confident 0.5% of the half is foreground: a confident trace counts, a faint
    haze over a whole half does not."""
    probabilities = np.zeros((200, 201), dtype=np.float32)
    probabilities[40:60, 5:30] = 0.9
    assert side_presence(torch.from_numpy(probabilities)).tolist() == pytest.approx([0.9, 0.0])
    assert probability_laterality(probabilities) == "left"
    probabilities[:, 101:] = 0.4  # haze on the right
    assert probability_laterality(probabilities) == "left"
    probabilities[150:155, 150:160] = 0.95  # 50 pixels: exactly the top 0.5% of the right half (200 x 100)
    assert probability_laterality(probabilities) == "bilateral"
    probabilities[40:60, 5:30] = 0.2
    assert probability_laterality(probabilities) == "right"
    assert probability_laterality(np.zeros((8, 8), dtype=np.float32)) is None  # no foreground: a tie
    # One column (a thin volume seen from the side, a one-pixel-wide image) has no halves: no side, no error.
    assert probability_laterality(np.ones((16, 1), dtype=np.float32)) is None


def test_a_mask_keeps_to_the_one_side_its_report_names():
    probabilities = np.zeros((10, 11), dtype=np.float32)
    probabilities[2:8, 1:4] = 0.6  # left: 18 pixels
    probabilities[2:8, 6:11] = 0.9  # right: 30 pixels, the mask's larger part
    kept = probabilities.copy()
    keep_to_side(kept, "right", 0.5)  # agrees already: unchanged
    assert np.array_equal(kept, probabilities)
    keep_to_side(kept, "bilateral", 0.5)
    assert np.array_equal(kept, probabilities)
    keep_to_side(kept, "left", 0.5)  # the mask would lie mostly on the right: the right half goes
    assert left_share(kept > 0.5) == 1.0 and np.array_equal(kept[:, :5], probabilities[:, :5])
    assert not kept[:, 5:].any()  # the middle column of an odd width too


def test_qata_edit_names_one_side_and_keeps_its_half_of_the_mask():
    mask = np.zeros((224, 224), dtype=bool)
    mask[150:200, 20:90] = True
    mask[100:200, 130:200] = True
    report = "bilateral pulmonary infection, two infected areas, lower left lung and middle lower right lung."
    left, right = qata_edits(report, mask)
    assert left.report == "unilateral pulmonary infection, one infected area, lower left lung."
    assert right.report == "unilateral pulmonary infection, one infected area, middle lower right lung."
    assert report_laterality(left.report) == "left" and report_laterality(right.report) == "right"
    assert np.array_equal(left.mask | right.mask, mask) and not (left.mask & right.mask).any()
    assert left.mask[:, 112:].sum() == 0 and right.mask[:, :112].sum() == 0
    all_left = qata_edits("bilateral pulmonary infection, two infected areas, all left lung and lower right lung.",
                          mask)[0]
    assert all_left.report == "unilateral pulmonary infection, one infected area, all left lung."
    # A unilateral case that names part of a side, a case without a report and other schemes have no edits.
    assert qata_edits(left.report, mask) == []
    assert report_edits(None, mask, "qata") == [] and report_edits(report, mask, None) == []


def test_a_whole_side_trains_on_each_zone_with_the_target_cut_to_that_third():
    mask = np.zeros((224, 224), dtype=bool)
    mask[40:160, 20:90] = True  # all of the left lung: rows 40-159, thirds 40-79, 80-119, 120-159
    mask[120:160, 130:200] = True  # lower right
    report = "bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
    edits = {edit.report: edit.mask for edit in qata_edits(report, mask)}
    zone = "unilateral pulmonary infection, one infected area, {} left lung."
    assert set(edits) == {zone.format("all"), "unilateral pulmonary infection, one infected area, lower right lung.",
                          *(zone.format(z) for z in ("upper", "middle", "lower", "upper middle", "middle lower"))}
    rows = {name: np.flatnonzero(edits[zone.format(name)].any(axis=1)) for name in ("upper", "middle", "lower")}
    assert (rows["upper"][[0, -1]].tolist(), rows["middle"][[0, -1]].tolist(), rows["lower"][[0, -1]].tolist()) == \
        ([40, 79], [80, 119], [120, 159])
    for name, target in edits.items():
        if "left" in name:
            assert left_share(target) == 1.0  # a zone edit of the left side keeps to the left half
    upper, middle = edits[zone.format("upper")], edits[zone.format("middle")]
    assert np.array_equal(edits[zone.format("upper middle")], upper | middle)
    # A unilateral case that names the whole side has the zone edits alone.
    left_only = mask & (np.arange(224) < 112)
    unilateral = qata_edits("unilateral pulmonary infection, one infected area, all left lung.", left_only)
    assert [e.report for e in unilateral] == [zone.format(z) for z in ("upper", "middle", "lower", "upper middle",
                                                                        "middle lower")]


def test_qata_edits_on_real_training_cases(qata):
    samples = [s for s in load_split(qata, "train", validate=False)[:60] if report_laterality(s.report)]
    with_edits = zone_edits = 0
    for sample in samples:
        _, mask = load_pair(sample)
        edits = report_edits(sample.report, mask, "qata")
        with_edits += bool(edits)
        expected = report_laterality(sample.report) == "bilateral" or bool(whole_sides(sample.report))
        assert bool(edits) == (expected and mask.any())
        for edit in edits:
            assert edit.mask.shape == mask.shape and edit.mask.any() and not (edit.mask & ~mask).any()
            assert left_share(edit.mask) == {"left": 1.0, "right": 0.0}[report_laterality(edit.report)]
            zone_edits += "all" not in edit.report and edit.report not in sample.report
    assert with_edits > 20 and zone_edits > 20


def test_kvasir_edit_describes_one_polyp():
    mask = np.zeros((256, 256), dtype=bool)
    mask[10:40, 10:40] = True  # small, top left
    mask[150:250, 150:250] = True  # medium, bottom right
    edits = kvasir_edits("two small, medium white round polyp, located in top left, bottom right of the image", mask)
    assert [e.report for e in edits] == ["one small white round polyp, located in top left of the image",
                                         "one medium white round polyp, located in bottom right of the image"]
    assert edits[0].mask.sum() == 900 and edits[1].mask.sum() == 10000
    # As many components as counted polyps, or no edit; single polyps have none.
    assert kvasir_edits("three small white round polyp, located in top left of the image", mask) == []
    assert kvasir_edits("one small white round polyp, located in top left of the image", mask) == []


def test_kvasir_edits_on_real_training_cases(kvasir):
    found = 0
    for sample in load_split(kvasir, "train", validate=False):
        if sample.report and not sample.report.startswith("one"):
            _, mask = load_pair(sample)
            for edit in report_edits(sample.report, mask, "kvasir"):
                found += 1
                assert edit.report.startswith("one ") and "located in" in edit.report
                assert edit.mask.any() and not (edit.mask & ~mask).any()
    assert found >= 20


def _side_predict(follow_text: bool):
    """A predictor whose mask covers the half the report names (or, ignoring the text, the whole image)."""
    def predict(images, reports):
        out = np.zeros(images.shape[:3], dtype=np.float32)
        half = images.shape[2] // 2
        for i, report in enumerate(reports):
            side = report_laterality(report) if follow_text else "bilateral"
            if side in ("left", "bilateral"):
                out[i, :, :half] = 1
            if side in ("right", "bilateral"):
                out[i, :, half:] = 1
        return out
    return predict


def test_steering_probe_is_one_when_the_mask_follows_the_text_and_zero_when_it_ignores_it(qata):
    samples = load_split(qata, "val", validate=False)[:12]
    followed = steering_probe(_side_predict(True), samples)
    ignored = steering_probe(_side_predict(False), samples)
    assert followed.n == ignored.n == sum(report_laterality(s.report) == "bilateral" for s in samples) > 0
    assert followed.steering == 1.0 and ignored.steering == 0.0
    assert report_laterality(LEFT_REPORT) == "left" and report_laterality(RIGHT_REPORT) == "right"


def _zone_predict(follow_text: bool):
    """A predictor whose mask covers the image's top half for an "upper" report and the bottom half for a "lower"
    one (or, ignoring the text, the whole image)."""
    def predict(images, reports):
        out = np.zeros(images.shape[:3], dtype=np.float32)
        middle = images.shape[1] // 2
        for i, report in enumerate(reports):
            if not follow_text or "upper" in report:
                out[i, :middle] = 1
            if not follow_text or "lower" in report:
                out[i, middle:] = 1
        return out
    return predict


def test_zone_steering_probe_is_one_when_the_mask_follows_the_zone_and_zero_when_it_ignores_it(qata):
    samples = load_split(qata, "val", validate=False)[:40]
    followed = zone_steering_probe(_zone_predict(True), samples, batch_size=8)
    ignored = zone_steering_probe(_zone_predict(False), samples, batch_size=8)
    # One figure per image (the mean of its sides where its report names both whole).
    assert followed.n == ignored.n == sum(bool(whole_sides(s.report)) for s in samples) > 0
    assert any(len(whole_sides(s.report)) == 2 for s in samples)
    assert ignored.zone_steering == 0.0
    # The lesions' mid-heights lie near the image's: an upper-half mask lies mostly above them.
    assert followed.zone_steering > 0.6
    assert followed.to_dict() == {"zone_steering": round(followed.zone_steering, 4), "zone_steering_n": followed.n}
    assert whole_sides("bilateral pulmonary infection, two infected areas, all left lung and lower right lung.") == \
        ["left"]
    assert whole_sides("unilateral pulmonary infection, one infected area, upper middle lower right lung.") == \
        ["right"]


def test_laterality_probe_is_balanced_accuracy(qata):
    samples = [s for s in load_split(qata, "val", validate=False) if report_laterality(s.report)][:40]
    truth = {s.id: s.report for s in samples}
    order = iter(samples)

    def always_bilateral(images):
        return [QATA_REPORT] * len(images)

    result = laterality_probe(always_bilateral, samples, batch_size=8)
    assert result.n == 40 and result.recall["bilateral"] == 1.0
    assert result.balanced_accuracy == pytest.approx(1 / len(result.recall))

    def the_true_report(images):
        return [truth[next(order).id] for _ in range(len(images))]

    assert laterality_probe(the_true_report, samples, batch_size=8).balanced_accuracy == 1.0
