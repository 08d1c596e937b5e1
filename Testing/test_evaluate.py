"""``lgseg evaluate`` on real QaTa-COV19 validation images, checked against ``lgseg segment`` and a hand-made Dice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from languageguidedseg.cli import main
from languageguidedseg.data import load_split

LIMIT = 4
EVALUATE_KEYS = {"dice", "iou", "mean_dice", "n", "reports", "split", "model"}


@pytest.fixture(autouse=True)
def one_thread_subprocesses(own_models_folder, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _segment_by_hand(qata: Path, model: Path, out: Path, with_reports: bool, capsys) -> tuple[float, float, float]:
    """Micro Dice, IoU and mean per-image Dice of ``lgseg segment`` outputs for the first LIMIT val images."""
    intersection = predicted = target = 0
    per_image = []
    for sample in load_split(qata, "val")[:LIMIT]:
        report = ["--report", sample.report] if with_reports and sample.report else []
        output = out / f"{sample.id}.png"
        assert main(["segment", str(sample.image_path), "--model", str(model), "--output", str(output), *report]) == 0
        capsys.readouterr()
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) > 0
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.mask_path))) > 127
        both, sizes = int((prediction & truth).sum()), int(prediction.sum()) + int(truth.sum())
        intersection += both
        predicted += int(prediction.sum())
        target += int(truth.sum())
        per_image.append(2 * both / sizes if sizes else 1.0)
    dice = 2 * intersection / (predicted + target)
    iou = intersection / (predicted + target - intersection)
    return dice, iou, float(np.mean(per_image))


@pytest.mark.parametrize("reports", ["given", "none"])
def test_evaluate_matches_segment_outputs(qata, tiny_model, tmp_path, capsys, reports):
    code = main(["evaluate", str(qata), "--split", "val", "--reports", reports, "--model", str(tiny_model),
                 "--limit", str(LIMIT), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert EVALUATE_KEYS <= set(result)
    assert result["n"] == LIMIT and result["reports"] == reports and result["split"] == "val"
    assert result["model"] == "tiny"
    assert "evaluating" in captured.err  # the progress bar, on stderr

    # QaTa's dataset.json says its reports name the image's sides: the steering and laterality probes run.
    assert -1.0 <= result["steering"] <= 1.0 and result["steering_n"] >= 1
    assert 0.0 <= result["laterality_balanced_accuracy"] <= 1.0 and result["laterality_n"] == LIMIT

    dice, iou, mean_dice = _segment_by_hand(qata, tiny_model, tmp_path, reports == "given", capsys)
    assert result["dice"] == pytest.approx(dice, abs=1e-4)
    assert result["iou"] == pytest.approx(iou, abs=1e-4)
    assert result["mean_dice"] == pytest.approx(mean_dice, abs=1e-4)


def test_evaluate_text_output_and_errors(qata, tiny_model, tmp_path, capsys):
    assert main(["evaluate", str(qata), "--model", str(tiny_model), "--limit", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Dice" in captured.out and "micro" in captured.out and captured.err == ""
    assert "steering" in captured.out and "laterality" in captured.out

    assert main(["evaluate", str(qata), "--model", str(tiny_model), "--limit", "2", "--no-probes", "--json"]) == 0
    assert "steering" not in json.loads(capsys.readouterr().out)

    assert main(["evaluate", str(tmp_path / "nothing"), "--model", str(tiny_model)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["evaluate", str(qata), "--model", str(tiny_model), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
