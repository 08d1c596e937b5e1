"""The report checked against the image (consistency.py): the rule, the kept presences, and the real models on real
validation images, where the image's sides and the patient's differ (a PNG X-ray is taken in radiological display:
the patient's left on the image's right)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from languageguidedseg.cli import main
from languageguidedseg.config import ModelCard
from languageguidedseg.consistency import Contradiction, ReportCheck, contradiction
from languageguidedseg.imageio import image_array, read_image
from languageguidedseg.sides import swap_sides

# Unilateral QaTa val cases: the true report in the image's sides, and the same in the patient's.
CASES = {
    "cxr_s11236-e25185-r1": ("unilateral pulmonary infection, one infected area, lower left lung.",
                             "unilateral pulmonary infection, one infected area, lower right lung."),
    "cxr_s11293-e21104-r1": ("unilateral pulmonary infection, one infected area, lower right lung.",
                             "unilateral pulmonary infection, one infected area, lower left lung."),
}
BILATERAL_ID = "cxr_s11230-e20636-r1"
CARD = ModelCard(report_check_shown=0.5, report_check_margin=0.5)


@pytest.mark.parametrize("named,presence,expected", [
    ("left", (0.05, 0.97), Contradiction("left")),  # only the other side shows findings
    ("left", (0.0, 0.97), Contradiction("left")),  # a half of zeros (the mask kept to the other side)
    ("left", (0.6, 0.9), Contradiction("left")),  # the other side shows findings more surely (log-odds 1.8)
    ("left", (0.97, 0.98), None),  # both show findings about as surely (0.4)
    ("left", (0.99, 0.6), None),  # the named side shows findings more surely
    ("left", (0.1, 0.4), None),  # neither side shows findings
    ("right", (0.97, 0.01), Contradiction("right")),
    ("bilateral", (0.0, 1.0), None),  # a report naming both sides is not checked
    (None, (0.0, 1.0), None),  # a report that names no side
])
def test_contradiction_rule(named, presence, expected):
    assert contradiction(named, presence, CARD) == expected


def test_warning_text_speaks_the_readers_sides():
    assert Contradiction("left").text() == \
        "the report names the left lung only; the image shows findings on the right lung"
    assert Contradiction("left").text(swap_sides) == \
        "the report names the right lung only; the image shows findings on the left lung"


def test_presences_are_kept_by_slice_and_computed_once():
    calls = []

    def predict(slices: np.ndarray) -> np.ndarray:
        calls.append(len(slices))
        probabilities = np.zeros(slices.shape[:3], dtype=np.float32)
        probabilities[:, :, :4] = 1.0  # findings in the left half only
        return probabilities

    check = ReportCheck(CARD, predict, capacity=2)
    slices = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    assert check.warnings(slices[:1], "lower right lung.") == \
        ["the report names the right lung only; the image shows findings on the left lung"]
    assert check.warnings(slices[:1], "lower left lung.") == [] and calls == [1]  # kept: no second pass
    assert check.warnings(slices[:1], "no side named") == [] and calls == [1]
    np.testing.assert_allclose(check.presence(slices), [[1.0, 0.0]] * 3)
    assert calls == [1, 2]  # only the two slices not kept
    check.presence(slices[:1])
    assert calls == [1, 2, 1]  # the capacity (2) evicted the oldest


# ---------------------------------------------------------------- the real models


@pytest.fixture(scope="module")
def segmenter():
    from languageguidedseg.inference import Segmenter

    return Segmenter.load("qata-cxr", "cpu")


def _image(qata, sample_id: str) -> np.ndarray:
    return image_array(read_image(qata / "images" / f"{sample_id}.png"))


@pytest.mark.parametrize("sample_id", list(CASES))
def test_swapped_side_report_is_warned_about_in_the_patients_sides(qata, segmenter, sample_id):
    image_report, patient_report = CASES[sample_id]
    assert (qata / "reports" / f"{sample_id}.txt").read_text().strip() == image_report
    image = _image(qata, sample_id)
    true = segmenter.segment_array(image, report=patient_report, sides="patient")
    assert true.report_warnings == []
    swapped = segmenter.segment_array(image, report=swap_sides(patient_report), sides="patient")
    named = "left" if "left" in swap_sides(patient_report) else "right"  # the patient's sides, as the user wrote
    shown = swap_sides(named)
    assert swapped.report_warnings == [f"the report names the {named} lung only; the image shows findings on the "
                                       f"{shown} lung"]
    # The user decides: the mask follows the report, into the image half of the side it names.
    named_half = slice(112, None) if named == "left" else slice(None, 112)  # the patient's left: the image's right
    assert swapped.mask.sum() > 100 and swapped.mask[:, named_half].sum() > 0.9 * swapped.mask.sum()
    # Written in the image's sides, the warning names the image's sides.
    in_image = segmenter.segment_array(image, report=swap_sides(image_report), sides="image")
    assert in_image.report_warnings == [f"the report names the {shown} lung only; the image shows findings on the "
                                        f"{named} lung"]
    assert segmenter.segment_array(image, report=image_report, sides="image").report_warnings == []


def test_check_reuses_the_no_report_run_of_the_slice(qata, segmenter, monkeypatch):
    image = _image(qata, BILATERAL_ID)
    check = segmenter.report_check
    calls = []
    predict = check.predict
    monkeypatch.setattr(check, "predict", lambda slices: calls.append(len(slices)) or predict(slices))
    approximated = segmenter.segment_array(image, sides="patient")  # the approximated report: keeps the presences
    assert approximated.report_warnings == []
    report = (qata / "reports" / f"{BILATERAL_ID}.txt").read_text().strip()
    assert segmenter.segment_array(image, report=report, sides="image").report_warnings == []  # the true report
    for edit in ("lower left lung.", "lower right lung.", "bilateral, lower left lung and lower right lung."):
        segmenter.segment_array(image, report=edit, sides="patient")
    assert calls == []  # no second pass for any of the edits
    volume = np.stack([image, image])  # a volume is not checked: every slice would need a second pass
    assert segmenter.segment_array(volume, report="lower left lung.", sides="image").report_warnings == []


def test_kvasir_polyp_never_warns(kvasir):
    from languageguidedseg.inference import Segmenter

    polyps = Segmenter.load("kvasir-polyp", "cpu")
    assert polyps.report_check is None
    image = image_array(read_image(kvasir / "images" / "cju2ycp1u8g2r0799jslnp7cz.jpg"))
    result = polyps.segment_array(image, rgb=True, report="one medium brown oval polyp, located in left of the image")
    assert result.report_warnings == []


def test_segment_json_and_stderr_carry_the_warnings(qata, tmp_path, capsys):
    sample_id = "cxr_s11236-e25185-r1"
    image, output = qata / "images" / f"{sample_id}.png", tmp_path / "mask.png"
    swapped = swap_sides(CASES[sample_id][1])
    run = ["segment", str(image), "--model", "qata-cxr", "--device", "cpu", "--quiet", "-o", str(output)]
    assert main([*run, "--report", swapped, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report_warnings"] == \
        ["the report names the left lung only; the image shows findings on the right lung"]
    assert main([*run, "--report", swapped]) == 0
    captured = capsys.readouterr()
    assert "warning: the report names the left lung only; the image shows findings on the right lung" in \
        captured.err.splitlines()
    assert swapped not in captured.out + captured.err  # the report's text is never printed
    assert main([*run, "--report", CASES[sample_id][1], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report_warnings"] == []


def test_evaluate_reports_the_report_check(qata, capsys):
    assert main(["evaluate", str(qata), "--model", "qata-cxr", "--device", "cpu", "--limit", "6", "--json",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report_warning_n"] == 6 and 0.0 <= summary["report_warning_rate"] <= 1.0
    assert summary["swapped_side_flag_n"] >= 1 and 0.0 <= summary["swapped_side_flag_rate"] <= 1.0
