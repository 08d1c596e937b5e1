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
        # The data set's reports name image sides (its dataset.json), which evaluate keeps.
        report = ["--report", sample.report, "--sides", "image"] if with_reports and sample.report else []
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


def _copy_without_dataset_json(qata: Path, folder: Path, count: int = 2) -> Path:
    """A data set in the project layout with the first val images of QaTa (linked) and no dataset.json."""
    ids = json.loads((qata / "split.json").read_text())["val"][:count]
    for sub, suffix in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (folder / sub).mkdir(parents=True)
        for sample_id in ids:
            (folder / sub / f"{sample_id}{suffix}").symlink_to(qata / sub / f"{sample_id}{suffix}")
    (folder / "split.json").write_text(json.dumps({"val": ids}))
    return folder


def test_evaluate_reads_reports_in_the_data_sets_convention(qata, kvasir, tiny_model, tmp_path, capsys):
    # Declared by the data set: no warning where the model was trained on reports of the same kind.
    assert main(["evaluate", str(qata), "--model", str(tiny_model), "--limit", "2", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sides"] == "image" and captured.err == ""
    # Polyp reports name no sides; a model trained on reports that do (the chest X-ray default, here the tiny
    # model) is most likely the wrong --model: scored anyway, with one warning line that says so.
    assert main(["evaluate", str(kvasir), "--model", str(tiny_model), "--limit", "2", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sides"] == "none"
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("warning:")
    assert "name no sides" in captured.err and "check --model" in captured.err
    assert main(["evaluate", str(kvasir), "--model", "kvasir-polyp", "--limit", "2", "--json", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    # Not declared: the model's own convention, said in one warning line.
    bare = _copy_without_dataset_json(qata, tmp_path / "bare")
    assert main(["evaluate", str(bare), "--model", str(tiny_model), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sides"] == "image"
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("warning:")
    assert "dataset.json" in captured.err and "model's own convention" in captured.err
    # --sides overrides both.
    assert main(["evaluate", str(bare), "--model", str(tiny_model), "--json", "--quiet", "--sides", "patient"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sides"] == "patient" and captured.err == ""
    (bare / "dataset.json").write_text('{"report_sides": "sideways"}')
    assert main(["evaluate", str(bare), "--model", str(tiny_model), "--quiet"]) == 2
    assert "report_sides" in capsys.readouterr().err


@pytest.mark.parametrize("reports", ["given", "none"])
def test_training_validation_scores_like_lgseg_evaluate(qata, tiny_model, reports):
    """The training's validation runs the same evaluation over the network in memory (not folded or compiled)."""
    import torch

    from languageguidedseg.data import load_pair
    from languageguidedseg.evaluation import evaluate
    from languageguidedseg.inference import Segmenter
    from languageguidedseg.package import load_package

    samples = load_split(qata, "val")[:LIMIT]
    cache = {s: load_pair(s) for s in samples}
    installed = evaluate(Segmenter.load(tiny_model, "cpu"), samples, reports)
    package = load_package(tiny_model)
    in_memory = Segmenter(package.build_network(), package.config, torch.device("cpu"), batch_size=32)
    training = evaluate(in_memory, samples, reports, keep=2, load=cache.__getitem__)
    assert training.scores.n == installed.scores.n == LIMIT
    assert training.without_report == installed.without_report == (LIMIT if reports == "none" else 0)
    assert training.scores.dice == pytest.approx(installed.scores.dice, abs=2e-3)
    assert training.scores.mean_iou == pytest.approx(installed.scores.mean_iou, abs=2e-3)
    # The first predictions come back on each image's own grid, for the training's figure.
    assert [p.shape for p in training.predictions] == [cache[s][1].shape for s in samples[:2]]
    assert all(p.dtype == bool for p in training.predictions)
