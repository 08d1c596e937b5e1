"""Left and right in reports: translation between the patient's and the image's sides, and the geometry behind it.

The translation is checked over every report of both shipped models' data sets and prototype banks; the geometry
on real images: a QaTa-COV19 chest X-ray (as a PNG, as a volume and as the same volume stored with its columns
flipped, with the real ``qata-cxr`` model) and the two real CTs of ``ct-examples`` against TotalSegmentator's labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA_ROOT, dataset
from languageguidedseg.cli import main
from languageguidedseg.errors import LgsegError
from languageguidedseg.imageio import image_array, image_geometry, read_image, read_mask
from languageguidedseg.inference import slices_of
from languageguidedseg.package import installed_models_folder
from languageguidedseg.reports import KVASIR_LOCATIONS, ZONES, parse_kvasir_locations, parse_qata_report
from languageguidedseg.sides import (
    RADIOLOGICAL_DISPLAY,
    Geometry,
    Orientation,
    sides_label,
    swap_sides,
    translate_report,
)

# A QaTa validation image whose report is unilateral, lower left lung in image sides (the patient's right).
XRAY_ID = "cxr_s11236-e25185-r1"
IMAGE_REPORT = "unilateral pulmonary infection, one infected area, lower left lung."
PATIENT_REPORT = "unilateral pulmonary infection, one infected area, lower right lung."
# A validation image with infection in both lower lungs, where either lung can be asked for.
BILATERAL_ID = "cxr_s11230-e20636-r1"
CT = DATA_ROOT / "ct-examples"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _reports(name: str) -> set:
    root = dataset(name)
    return {p.read_text(encoding="utf-8").strip() for p in (root / "reports").glob("*.txt")}


def _prototype_reports(model: str) -> set:
    return set(json.loads((installed_models_folder() / model / "model.json").read_text())["config"]
               ["prototype_reports"])


def _mirror(flags: tuple, names: tuple) -> tuple:
    """The flags of ``names`` with left and right exchanged ("left lower" <-> "right lower", "top left" <-> ...)."""
    return tuple(flags[names.index(swap_sides(name))] for name in names)


def _without_sides(text: str) -> str:
    return re.sub(r"(?i)\b(left|right)", "SIDE", text)


# ---------------------------------------------------------------- translation over the real vocabulary


@pytest.mark.parametrize("model,data", [("qata-cxr", "qata-cov19")])
def test_every_qata_report_translates_to_the_mirrored_zones(model, data):
    reports = _reports(data) | _prototype_reports(model)
    assert len(reports) > 50
    for report in reports:
        swapped = swap_sides(report)
        assert swap_sides(swapped) == report
        assert _without_sides(swapped) == _without_sides(report)  # nothing else changes, case and punctuation kept
        before, after = parse_qata_report(report), parse_qata_report(swapped)
        assert after.zones == _mirror(before.zones, ZONES), report
        assert (after.laterality, after.count) == (before.laterality, before.count)
        if before.laterality == "bilateral":
            assert "bilateral" in swapped


@pytest.mark.parametrize("model,data", [("kvasir-polyp", "kvasir-seg")])
def test_every_kvasir_report_stays_as_written_and_mirrors_only_when_asked(model, data):
    reports = _reports(data) | _prototype_reports(model)
    for report in reports:
        # Polyp reports name positions in the image: "none", never translated.
        for sides in ("patient", "image"):
            assert translate_report(report, sides, "none", RADIOLOGICAL_DISPLAY) == report
            assert translate_report(report, "none", sides, RADIOLOGICAL_DISPLAY) == report
        swapped = swap_sides(report)
        assert _without_sides(swapped) == _without_sides(report)
        assert parse_kvasir_locations(swapped) == _mirror(parse_kvasir_locations(report), KVASIR_LOCATIONS)


@pytest.mark.parametrize("text,expected", [
    ("Bilateral pulmonary infection, lower left lung and middle lower right lung.",
     "Bilateral pulmonary infection, lower right lung and middle lower left lung."),
    ("LEFT lower lobe; Right upper lobe.", "RIGHT lower lobe; Left upper lobe."),
    ("lower left and right lung", "lower left and right lung"),  # both sides, as written
    ("opacities in both lungs, right-sided effusion", "opacities in both lungs, left-sided effusion"),
    ("upper left, lower right; rightmost.", "upper right, lower left; leftmost."),
    ("bright outright leftover", "bright outright leftover"),  # words that only contain "left" / "right"
    ("Left/right unclear", "Left/right unclear"),
    ("top left, right of the image", "top right, left of the image"),  # two places, not a pair
    ("left and left", "right and right"),
])
def test_swap_handles_the_words_that_carry_sides(text, expected):
    assert swap_sides(text) == expected


def test_translation_follows_the_conventions_and_the_orientation():
    flipped = Orientation("left")  # the patient's left on the image's left
    sagittal = Orientation(None)
    assert translate_report(PATIENT_REPORT, "patient", "image", RADIOLOGICAL_DISPLAY) == IMAGE_REPORT
    assert translate_report(IMAGE_REPORT, "image", "patient", RADIOLOGICAL_DISPLAY) == PATIENT_REPORT
    assert translate_report(PATIENT_REPORT, "image", "image", RADIOLOGICAL_DISPLAY) == PATIENT_REPORT
    assert translate_report(PATIENT_REPORT, "patient", "patient", RADIOLOGICAL_DISPLAY) == PATIENT_REPORT
    assert translate_report(PATIENT_REPORT, "patient", "image", flipped) == PATIENT_REPORT
    assert translate_report(PATIENT_REPORT, "patient", "image", sagittal) == PATIENT_REPORT
    with pytest.raises(LgsegError, match="one of image, patient, none"):
        translate_report(PATIENT_REPORT, "patients", "image", RADIOLOGICAL_DISPLAY)
    assert sides_label("patient", RADIOLOGICAL_DISPLAY) == "Left/right: patient (assumed: radiological display)"
    assert sides_label("patient", Orientation("right", source="volume")) == \
        "Left/right: patient (image orientation from the volume)"
    assert "no left-right axis" in sides_label("patient", sagittal)


# ---------------------------------------------------------------- orientation from geometry


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _lps(direction: np.ndarray) -> Geometry:
    matrix = np.eye(4)
    matrix[:3, :3] = direction
    return Geometry.from_lps(matrix)


@pytest.mark.parametrize("direction,expected", [
    (np.eye(3), {0: None, 1: "right", 2: "right"}),  # LPS axial: columns run to the patient's left
    (np.diag([-1.0, -1.0, 1.0]), {0: None, 1: "left", 2: "left"}),  # RAS-stored (NIfTI from many tools)
    (_rotation_z(30) @ np.diag([1.0, -1.0, 1.0]), {0: None, 1: "right", 2: "right"}),  # oblique, rows flipped
    (_rotation_z(150), {0: None, 1: "left", 2: "left"}),  # oblique, columns flipped
    (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), {0: "right", 1: None, 2: None}),  # i runs A-P
    (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), {0: None, 1: None, 2: None}),  # sagittal
])
def test_orientation_of_each_slice_axis(direction, expected):
    geometry = _lps(direction)
    assert {axis: geometry.orientation(axis).patient_left for axis in range(3)} == expected


# TotalSegmentator's class_map["total"] (v2): structures named by the patient's side.
LEFT_LOBES, RIGHT_LOBES = (10, 11), (12, 13, 14)
LEFT_BODY = (69, 86, *range(92, 104))  # humerus, autochthon, ribs 1-12 (left)
RIGHT_BODY = (70, 87, *range(104, 116))


@pytest.mark.parametrize("image,labels,left,right", [
    ("ct.nii.gz", "ct-labels.nii.gz", LEFT_LOBES, RIGHT_LOBES),
    # The DICOM series covers the upper abdomen, below the lungs: its left-right pairs are ribs, muscles, humeri.
    ("ct-dicom", "ct-dicom-labels.nii.gz", LEFT_BODY, RIGHT_BODY),
    ("ct.nii.gz", "ct-labels.nii.gz", LEFT_BODY, RIGHT_BODY),
])
def test_computed_patient_left_is_where_the_left_labels_lie_in_real_ct(image, labels, left, right):
    if not (CT / image).exists():
        pytest.skip(f"{CT / image} not found")
    volume = read_image(CT / image)
    geometry = image_geometry(volume, CT / image)
    # The label map on the image's own voxel grid (the DICOM labels are stored with their rows flipped).
    label_image = sitk.Resample(sitk.ReadImage(str(CT / labels)), volume, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0)
    values = sitk.GetArrayFromImage(label_image)
    assert np.isin(values, left).sum() > 1000 and np.isin(values, right).sum() > 1000
    assert geometry.orientation(0).patient_left is None  # sagittal slices: no left-right across them
    for axis in (1, 2):  # coronal and axial slices, the slice axes with a left-right direction
        side = geometry.orientation(axis).patient_left
        stack = slices_of(values, False, axis)
        left_columns = np.nonzero(np.isin(stack, left))[2]
        right_columns = np.nonzero(np.isin(stack, right))[2]
        middle = (left_columns.mean() + right_columns.mean()) / 2
        on_image_right = np.mean(left_columns > middle)
        assert (on_image_right > 0.95) if side == "right" else (on_image_right < 0.05), (image, axis, side)
        assert np.mean(right_columns > middle) == pytest.approx(1.0 - (side == "right"), abs=0.05)
    expected = "right" if image == "ct-dicom" else "left"  # LPS-stored DICOM; RAS-stored NIfTI
    assert geometry.orientation(2).patient_left == expected


@pytest.mark.parametrize("image", ["ct.nii.gz", "ct-dicom"])
def test_segmenter_translates_with_the_segmented_slices_orientation(image, segmenter):
    """A patient-side report gives the mask of the image-side report that names the side computed above."""
    if not (CT / image).exists():
        pytest.skip(f"{CT / image} not found")
    volume = read_image(CT / image)
    geometry = image_geometry(volume, CT / image)
    voxels = image_array(volume)
    for axis in (1, 2):
        index = slices_of(voxels, False, axis).shape[0] // 2
        run = {"axis": axis, "slice_index": index, "threshold": 0.2}  # a CT is not what qata-cxr knows: low cut
        patient = segmenter.segment_array(voxels, report="lower left lung.", sides="patient", geometry=geometry, **run)
        image_side = geometry.orientation(axis).patient_left
        named = segmenter.segment_array(voxels, report=f"lower {image_side} lung.", sides="image", **run)
        other = segmenter.segment_array(voxels, report=f"lower {swap_sides(image_side)} lung.", sides="image", **run)
        np.testing.assert_array_equal(patient.mask, named.mask)
        assert np.any(named.mask != other.mask)  # the report's side matters to the model


# ---------------------------------------------------------------- the real chest X-ray model


@pytest.fixture(scope="module")
def xray(qata) -> Path:
    path = qata / "images" / f"{XRAY_ID}.png"
    assert (qata / "reports" / f"{XRAY_ID}.txt").read_text().strip() == IMAGE_REPORT
    return path


@pytest.fixture(scope="module")
def segmenter():
    from languageguidedseg.inference import Segmenter

    return Segmenter.load("qata-cxr", "cpu")


def test_patient_side_report_gives_the_image_side_mask(xray, segmenter, tmp_path, capsys):
    output = tmp_path / "patient.png"
    code = main(["segment", str(xray), "--model", "qata-cxr", "--report", PATIENT_REPORT, "--sides", "patient",
                 "--output", str(output), "--json", "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["report"] == PATIENT_REPORT and summary["sides"] == "patient"
    assert summary["orientation"] == "assumed: radiological display"  # a PNG has no orientation
    mask = read_mask(output)
    # The data set's own report in image sides (what `lgseg segment --sides image` runs) gives the same mask.
    original = segmenter.segment_array(image_array(read_image(xray)), report=IMAGE_REPORT, sides="image")
    np.testing.assert_array_equal(mask, original.mask != 0)
    assert mask.sum() > 200 and mask[:, : mask.shape[1] // 2].sum() > 0.95 * mask.sum()  # the image's left


def test_approximated_report_comes_in_the_chosen_convention(xray, segmenter):
    image = image_array(read_image(xray))
    in_image = segmenter.approximate(image, sides="image")
    in_patient = segmenter.approximate(image, sides="patient")
    assert in_image.report in segmenter.config.prototype_reports
    assert in_patient.report == swap_sides(in_image.report) != in_image.report
    assert [r for r, _ in in_patient.top] == [swap_sides(r) for r, _ in in_image.top]
    assert in_patient.sides_label == "Left/right: patient (assumed: radiological display)"
    result = segmenter.segment_array(image, report=None, sides="patient")
    assert result.report_source == "prototype" and result.sides == "patient"
    assert swap_sides(result.report) in segmenter.config.prototype_reports


def _xray_volumes(xray: Path, folder: Path) -> dict:
    """The X-ray as a one-slice volume (LPS identity, as ITK reads a PNG) and the same physical image stored with its
    columns reversed and a direction that flips them back: same patient, same place, the other way round on disk."""
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(xray)))
    plain = sitk.GetImageFromArray(pixels[None])
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(pixels[None, :, ::-1]))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    flipped.SetOrigin((pixels.shape[1] - 1.0, 0.0, 0.0))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"plain": folder / "plain.nrrd", "flipped": folder / "flipped.nii.gz"}
    sitk.WriteImage(plain, str(paths["plain"]))
    sitk.WriteImage(flipped, str(paths["flipped"]))
    return paths


def _lps_x(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Physical x (LPS: larger is further to the patient's left) of every mask voxel."""
    k, j, i = np.nonzero(mask)
    direction = np.reshape(image.GetDirection(), (3, 3))
    ijk = np.stack([i, j, k]).astype(float) * np.asarray(image.GetSpacing())[:, None]
    return (np.asarray(image.GetOrigin())[:, None] + direction @ ijk)[0]


def test_flipped_volume_segments_the_same_patient_side(xray, segmenter, tmp_path):
    paths = _xray_volumes(xray, tmp_path)
    masks, images = {}, {}
    for name, path in paths.items():
        images[name] = read_image(path)
        result = segmenter.segment_array(image_array(images[name]), report=PATIENT_REPORT, sides="patient",
                                         geometry=image_geometry(images[name], path))
        assert result.sides_label == "Left/right: patient (image orientation from the file)"
        masks[name] = result.mask
        assert result.mask.sum() > 200
    centre = (xray_width := masks["plain"].shape[2]) / 2 - 0.5
    for name in paths:  # the patient's right: physical x below the centre
        assert np.mean(_lps_x(masks[name], images[name]) < centre) > 0.95, name
    # The same voxels in physical space (the network sees a mirrored X-ray in one of them, so not exactly).
    back = masks["flipped"][:, :, ::-1].astype(bool)
    plain = masks["plain"].astype(bool)
    assert 2 * np.sum(back & plain) / (back.sum() + plain.sum()) > 0.7
    assert xray_width == 224


# ---------------------------------------------------------------- the MRML bridge (volume nodes in a scene)


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer", reason="the MRML tests need the slicer-core package")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("this 'slicer' module has no MRML library (install slicer-core)")
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


def _load(scene, path: Path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), path
    return node


def _world_x(mask: np.ndarray, volume_node) -> np.ndarray:
    """World RAS x (larger is further to the patient's right) of every voxel of a (k, j, i) mask."""
    from languageguidedseg import mrml

    k, j, i = np.nonzero(mask)
    return (mrml.ijk_to_world_matrix(volume_node) @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[0]


def test_volume_node_orientation_comes_from_ijk_to_ras_and_parent_transforms(qata, xray, segmenter, scene, tmp_path):
    from languageguidedseg import mrml

    assert "lower left lung and lower right lung" in (qata / "reports" / f"{BILATERAL_ID}.txt").read_text()
    paths = _xray_volumes(qata / "images" / f"{BILATERAL_ID}.png", tmp_path)
    # A PNG added to Slicer: slicer-core's reader has no PNG support, so the voxels come from a NRRD copy (the same
    # voxels and geometry, see test_mrml) and the storage node names the PNG, as after Slicer's Add Data.
    png = _load(scene, _xray_volumes(xray, tmp_path / "png")["plain"])
    png.GetStorageNode().SetFileName(str(xray))
    result = mrml.segment_volume_node(png, None, report=PATIENT_REPORT, model=segmenter, sides="patient")
    assert result.sides_label == "Left/right: patient (assumed: radiological display)"
    assert result.orientation == "assumed: radiological display" and result.report == PATIENT_REPORT
    assert mrml.volume_sides_label(png, "image") == result.sides_label  # the label before a run

    node = _load(scene, paths["plain"])
    first = mrml.segment_volume_node(node, None, report=PATIENT_REPORT, model=segmenter, sides="patient")
    assert first.sides == "patient" and first.sides_label == "Left/right: patient (image orientation from the volume)"
    centre_x = (mrml.ijk_to_world_matrix(node) @ np.array([111.5, 111.5, 0.0, 1.0]))[0]
    assert first.mask.sum() > 200 and np.mean(_world_x(first.mask, node) > centre_x) > 0.95

    # A parent transform that mirrors the volume left-right: the patient's right is now the image's other half.
    import vtk

    mirror = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mirror")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 0, -1.0)
    mirror.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(mirror.GetID())
    second = mrml.segment_volume_node(node, None, report=PATIENT_REPORT, model=segmenter, sides="patient")
    centre_x = (mrml.ijk_to_world_matrix(node) @ np.array([111.5, 111.5, 0.0, 1.0]))[0]
    assert second.mask.sum() > 200 and np.mean(_world_x(second.mask, node) > centre_x) > 0.95
    assert mrml.volume_sides_label(node, "image") == second.sides_label
    assert mrml.volume_sides_label(node, "none").startswith("Left/right: as written")
    assert not np.array_equal(first.mask, second.mask)  # other voxels of the same volume: the other lung

    image_sides = mrml.segment_volume_node(node, None, report=IMAGE_REPORT, model=segmenter, sides="image")
    assert image_sides.sides == "image" and image_sides.report == IMAGE_REPORT
    np.testing.assert_array_equal(image_sides.mask, first.mask)  # image sides ignore the transform
