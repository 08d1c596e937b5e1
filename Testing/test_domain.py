"""The applicability check: images a model was not made for are flagged, and ``--model auto`` picks the model made
for the image (the shipped models on real images, a few of each; a package without a description)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_ROOT, QATA_REPORT
from test_cli import run_main

CT = DATA_ROOT / "ct-examples" / "ct.nii.gz"


def _val_images(root: Path, count: int) -> list[np.ndarray]:
    from languageguidedseg.data import load_pair, load_split

    return [load_pair(sample)[0] for sample in load_split(root, "val", validate=False)[:count]]


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _first_val_image(root: Path) -> Path:
    from languageguidedseg.data import load_split

    return load_split(root, "val", validate=False)[0].image_path


@pytest.fixture(scope="module")
def qata_cxr():
    from languageguidedseg.inference import Segmenter

    return Segmenter.load("qata-cxr", "cpu")


@pytest.fixture(scope="module")
def ct_volume() -> np.ndarray:
    from languageguidedseg.imageio import image_array, read_image

    if not CT.is_file():
        pytest.skip(f"the CT example is missing at {CT}")
    return image_array(read_image(CT))


def test_qata_cxr_flags_a_colonoscopy_frame_a_ct_slice_and_a_negative_x_ray(qata_cxr, qata, kvasir, ct_volume):
    frame = _val_images(kvasir, 1)[0]
    xray = _val_images(qata, 1)[0]
    for image, rgb in ((frame, True), (ct_volume[len(ct_volume) // 2], False), (255 - xray, False)):
        result = qata_cxr.segment_array(image, rgb=rgb)
        assert result.in_domain is False and result.domain_score < qata_cxr.domain.config.threshold
        # The mask, as asked, but no approximated report for an image the model was not made for.
        assert result.report == "" and result.similarity is None and result.report_source == "prototype"
        assert result.domain_warning == ("this image does not look like a frontal chest X-ray (the images qata-cxr "
                                         "was trained on); its mask and approximated report are unreliable")
        approximation = qata_cxr.approximate(image, rgb=rgb)
        assert approximation.in_domain is False and approximation.report == "" and approximation.top == []
        given = qata_cxr.segment_array(image, rgb=rgb, report=QATA_REPORT)  # a report given: used, still warned
        assert given.report == QATA_REPORT and given.in_domain is False and given.domain_warning


def test_a_ct_volume_is_judged_slice_by_slice(qata_cxr, ct_volume):
    result = qata_cxr.segment_array(ct_volume, report=QATA_REPORT)
    assert result.in_domain is False and result.domain_slices == (0, len(ct_volume))


def test_approximate_prints_a_warning_instead_of_a_report_for_a_colonoscopy_frame(kvasir, capsys):
    frame = _first_val_image(kvasir)
    code, stdout, stderr = run_main(capsys, "approximate", frame, "--model", "qata-cxr")
    assert code == 0 and stdout == ""
    assert stderr == ("warning: this image does not look like a frontal chest X-ray (the images qata-cxr was trained "
                      "on); its mask and approximated report are unreliable\n")
    code, stdout, _ = run_main(capsys, "approximate", frame, "--model", "qata-cxr", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["in_domain"] is False and summary["report"] == "" and summary["top"] == []
    assert summary["similarity"] is None and summary["domain_score"] < 0.5


@pytest.mark.parametrize("name", ["qata-cxr", "kvasir-polyp"])
def test_val_images_are_in_domain_for_their_model_and_auto_picks_it(name, request):
    from languageguidedseg.inference import Segmenter, choose_model

    root = request.getfixturevalue("qata" if name == "qata-cxr" else "kvasir")
    segmenter = Segmenter.load(name, "cpu")
    loaded = {name: segmenter}

    def load(model: str) -> Segmenter:
        if model not in loaded:
            loaded[model] = Segmenter.load(model, "cpu")
        return loaded[model]

    for image in _val_images(root, 3):
        rgb = image.ndim == 3
        result = segmenter.segment_array(image, rgb=rgb)
        assert result.in_domain is True and result.domain_warning == "" and result.report
        assert result.domain_score >= segmenter.domain.config.threshold and result.domain_slices is None
        assert choose_model(image, rgb=rgb, load=load, models=["qata-cxr", "kvasir-polyp"])[0] == name


def test_segment_auto_names_the_model_and_no_model_fits_noise(qata, own_models_folder, out, tmp_path, capsys):
    import SimpleITK as sitk

    code, stdout, stderr = run_main(capsys, "segment", _first_val_image(qata), "--output", out / "mask.png", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["model"] == "qata-cxr" and summary["in_domain"] is True, stderr
    assert summary["domain_score"] > 0 and summary["domain_slices"] is None and summary["domain_warning"] == ""
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(tmp_path / "noise.png"))
    code, stdout, stderr = run_main(capsys, "segment", tmp_path / "noise.png", "--output", out / "noise-mask.png")
    assert code == 2 and stdout == "" and not (out / "noise-mask.png").exists()
    assert stderr.startswith("error: no installed model is made for this image") and stderr.count("\n") == 1
    assert "qata-cxr (a frontal chest X-ray" in stderr and "kvasir-polyp (a colonoscopy frame" in stderr
    assert stderr.rstrip().endswith("(--model)")


def test_segment_an_out_of_domain_image_writes_the_mask_with_one_warning(kvasir, out, capsys):
    frame = _first_val_image(kvasir)
    code, stdout, stderr = run_main(capsys, "segment", frame, "--model", "qata-cxr", "--output", out / "mask.png")
    assert code == 0 and (out / "mask.png").is_file() and "with model qata-cxr" in stdout
    assert stderr.count("\n") == 1 and stderr.startswith("warning: this image does not look like a frontal chest")
    code, stdout, _ = run_main(capsys, "segment", frame, "--model", "qata-cxr", "--output", out / "mask.png",
                               "--json")
    summary = json.loads(stdout)
    assert summary["in_domain"] is False and summary["report"] == "" and summary["report_source"] == "prototype"
    assert summary["domain_warning"].startswith("this image does not look like a frontal chest X-ray")


def test_a_package_without_a_description_loads_and_says_applicability_is_unknown(tiny_model, qata, capsys):
    from languageguidedseg.data import load_pair, load_split
    from languageguidedseg.inference import Segmenter
    from languageguidedseg.package import load_package

    package = load_package(tiny_model)  # saved with save_package and no description, as packages before it were
    assert package.config.domain is None and package.domain() is None and package.domain_arrays == {}
    segmenter = Segmenter.load(package, "cpu")
    image = load_pair(load_split(qata, "val", validate=False)[0])[0]
    result = segmenter.segment_array(image)
    assert result.in_domain is None and result.domain_score is None and result.domain_warning == ""
    assert result.report  # the approximated report is given: nothing says it does not apply
    code, stdout, _ = run_main(capsys, "approximate", _first_val_image(qata), "--model", tiny_model, "--json")
    assert code == 0 and json.loads(stdout)["in_domain"] is None


@pytest.mark.parametrize("where", ["json", "weights"])
def test_a_changed_byte_in_the_description_is_refused(where, tmp_path):
    from languageguidedseg.errors import LgsegError
    from languageguidedseg.package import CONFIG_FILE, WEIGHTS_FILE, installed_models_folder, load_package

    folder = tmp_path / "qata-cxr"
    shutil.copytree(installed_models_folder() / "qata-cxr", folder)
    if where == "json":
        path = folder / CONFIG_FILE
        text = path.read_text(encoding="utf-8")
        threshold = json.loads(text)["config"]["domain"]["threshold"]
        changed = text.replace(f'"threshold": {json.dumps(threshold)}', f'"threshold": {json.dumps(threshold / 2)}')
        assert changed != text
        path.write_text(changed, encoding="utf-8")
    else:  # a byte of the description's mean, found through the safetensors header
        path = folder / WEIGHTS_FILE
        data = bytearray(path.read_bytes())
        header_size = int.from_bytes(data[:8], "little")
        start, _ = json.loads(data[8:8 + header_size])["domain.mean"]["data_offsets"]
        data[8 + header_size + start] ^= 1
        path.write_bytes(bytes(data))
    with pytest.raises(LgsegError, match="changed"):
        load_package(folder)
