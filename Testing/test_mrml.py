"""The MRML bridge on a real MRML scene (``slicer-core``, no Slicer application).

Volumes are loaded from files with Slicer's own volume reader (``vtkMRMLVolumeArchetypeStorageNode``), segments are
compared with the ``lgseg segment`` command line tool's mask of the same file, voxel by voxel and in RAS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the MRML tests need the slicer-core package")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module has no MRML library (install slicer-core)", allow_module_level=True)

from conftest import QATA_REPORT  # noqa: E402
from languageguidedseg import cli, mrml  # noqa: E402
from languageguidedseg.errors import LgsegError  # noqa: E402

# The tiny test model has random weights: its probabilities lie close to 0.5, so thresholds near 0.5 give masks
# that are neither empty nor full.
# Anisotropic spacing and a direction that rotates about z and flips y: catches axis mix-ups and lost signs.
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.25, 44.0)
_C, _S = np.cos(0.3), np.sin(0.3)
DIRECTION = tuple((np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])).ravel())
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _load_volume(scene, path: Path, vector: bool = False):
    """Load a volume file into a node the way Slicer's Add Data does (vtkITK reader, LPS to RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", path.stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer's reader could not read {path}"
    return node


def _qata_ids(qata: Path, count: int) -> list:
    return json.loads((qata / "split.json").read_text())["val"][:count]


def _run_cli(capsys, image: Path, model: Path, output: Path, *extra: str) -> dict:
    """Run ``lgseg segment`` in-process and return its JSON summary."""
    capsys.readouterr()
    code = cli.main(["segment", str(image), "--model", str(model), "--output", str(output), "--json", "--quiet",
                     "--device", "cpu", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _labelmap_in_ras(segmentation_node, segment_id):
    """The segment's binary labelmap as (values indexed [k, j, i], extent, image-to-world (RAS) matrix)."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    extent = labelmap.GetExtent()
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    image_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    scalars = labelmap.GetPointData().GetScalars()
    from vtk.util import numpy_support

    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(scalars).reshape(shape) if scalars is not None else np.zeros((0, 0, 0))
    return values, extent, image_to_ras


def _sample_segment_at_ras(segmentation_node, segment_id, ras_points: np.ndarray) -> np.ndarray:
    """Segment value (0/1) at RAS points (N x 3), read from its labelmap with its own geometry."""
    values, extent, image_to_ras = _labelmap_in_ras(segmentation_node, segment_id)
    homogeneous = np.c_[ras_points, np.ones(len(ras_points))].T
    ijk = np.linalg.inv(image_to_ras) @ homogeneous
    index = np.rint(ijk[:3]).astype(int)
    # Voxel centres must land on voxel centres: the segment is on the volume's own grid.
    np.testing.assert_allclose(ijk[:3], index, atol=1e-4)
    lo, hi = np.array(extent[0::2])[:, None], np.array(extent[1::2])[:, None]
    inside = np.all((index >= lo) & (index <= hi), axis=0)
    out = np.zeros(len(ras_points), dtype=np.uint8)
    rel = index[:, inside] - lo
    out[inside] = values[rel[2], rel[1], rel[0]] != 0
    return out


def _ras_of_voxels(image: sitk.Image) -> np.ndarray:
    """RAS coordinates of every voxel centre of a 3D SimpleITK image, in numpy (k, j, i) order."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()]).astype(float)
    direction = np.reshape(image.GetDirection(), (3, 3))
    lps = np.asarray(image.GetOrigin())[:, None] + direction @ (np.asarray(image.GetSpacing())[:, None] * ijk)
    return (LPS_TO_RAS[:3, :3] @ lps).T


@pytest.fixture(scope="module")
def oblique_volume_file(qata, tmp_path_factory) -> Path:
    """Three QaTa validation images stacked into an anisotropic, rotated and flipped 3D volume (NRRD)."""
    slices = [sitk.GetArrayFromImage(sitk.ReadImage(str(qata / "images" / f"{i}.png"))) for i in _qata_ids(qata, 3)]
    image = sitk.GetImageFromArray(np.stack(slices).astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path = tmp_path_factory.mktemp("volumes") / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Against the command line tool
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("report", [None, QATA_REPORT], ids=["prototype", "given"])
def test_qata_image_segment_equals_cli_mask(qata, tiny_model, segmenter, scene, tmp_path, capsys, report):
    """A QaTa validation image as a volume node: the segment's labelmap equals ``lgseg segment``'s mask."""
    image_id = _qata_ids(qata, 1)[0]
    png = qata / "images" / f"{image_id}.png"
    # Slicer reads a PNG as a one-slice volume; the NRRD copy has the same voxels and the same geometry.
    nrrd = tmp_path / f"{image_id}.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(png)), str(nrrd))
    volume = _load_volume(scene, nrrd)
    assert volume.GetImageData().GetDimensions() == (224, 224, 1)

    result = mrml.segment_volume_node(volume, None, report=report, model=segmenter)

    extra = [] if report is None else ["--report", report]
    summary = _run_cli(capsys, png, tiny_model, tmp_path / "cli.png", *extra)
    cli_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli.png"))) != 0
    assert 0 < cli_mask.mean() < 1, "a uniform mask would make the comparison meaningless"

    segmentation = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() == 1
    segment_mask = mrml.segment_mask(segmentation, result.segment_id, volume)
    assert segment_mask.shape == (1, 224, 224)
    np.testing.assert_array_equal(segment_mask[0], cli_mask)
    np.testing.assert_array_equal(result.mask[0], cli_mask)
    assert result.report == summary["report"]
    assert result.report_source == summary["report_source"] == ("prototype" if report is None else "given")
    if report is None:
        assert result.similarity == pytest.approx(summary["similarity"], abs=1e-6)
    segment = segmentation.GetSegmentation().GetSegment(result.segment_id)
    assert segment.GetName() == "Infection"
    assert segment.GetColor() == pytest.approx((0.9, 0.2, 0.1))


def test_oblique_anisotropic_volume_lines_up_in_ras_with_cli(oblique_volume_file, tiny_model, segmenter, scene,
                                                             tmp_path, capsys):
    """A 3D volume with anisotropic spacing and a rotated, flipped direction: segment and CLI mask agree in RAS."""
    volume = _load_volume(scene, oblique_volume_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    result = mrml.segment_volume_node(volume, segmentation, report=QATA_REPORT, model=segmenter)

    _run_cli(capsys, oblique_volume_file, tiny_model, tmp_path / "cli.nii.gz", "--report", QATA_REPORT)
    cli_image = sitk.ReadImage(str(tmp_path / "cli.nii.gz"))
    cli_mask = sitk.GetArrayFromImage(cli_image).ravel()
    assert 0 < cli_mask.mean() < 1

    # The segment sampled at the RAS position of every CLI voxel (geometry from the files, not from the bridge).
    sampled = _sample_segment_at_ras(segmentation, result.segment_id, _ras_of_voxels(cli_image))
    np.testing.assert_array_equal(sampled, cli_mask)

    # And the segmentation's reference geometry is the input volume's.
    _, _, image_to_ras = _labelmap_in_ras(segmentation, result.segment_id)
    np.testing.assert_allclose(image_to_ras, mrml.ijk_to_ras_matrix(volume), atol=1e-6)
    reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert reference is not None and reference.GetID() == volume.GetID()


def test_rgb_vector_volume_equals_cli_mask(kvasir, tiny_model, segmenter, scene, tmp_path, capsys):
    """An RGB (vector) volume goes through the RGB path and matches the CLI on the same image."""
    image_id = json.loads((kvasir / "split.json").read_text())["val"][0]
    jpg = next((kvasir / "images").glob(f"{image_id}.*"))
    nrrd = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(jpg)), str(nrrd))
    volume = _load_volume(scene, nrrd, vector=True)
    assert volume.GetImageData().GetNumberOfScalarComponents() == 3

    result = mrml.segment_volume_node(volume, None, model=segmenter)
    _run_cli(capsys, jpg, tiny_model, tmp_path / "cli.png")
    cli_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli.png"))) != 0
    segmentation = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, result.segment_id, volume)[0], cli_mask)


# ----------------------------------------------------------------------------------------------------------------
# Slice mode, re-runs, cancel, saving
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_mode_changes_only_that_slice(oblique_volume_file, segmenter, scene, axis):
    """Slice mode along any IJK axis replaces that slice of the segment and leaves every other voxel alone."""
    volume = _load_volume(scene, oblique_volume_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    first = mrml.segment_volume_node(volume, segmentation, model=segmenter, threshold=0.51)
    before = mrml.segment_mask(segmentation, first.segment_id, volume)
    assert 0 < before.mean() < 1

    index = volume.GetImageData().GetDimensions()[axis] // 2
    second = mrml.segment_volume_node(volume, segmentation, model=segmenter, scope="slice", axis=axis,
                                      slice_index=index, threshold=0.495)
    after = mrml.segment_mask(segmentation, second.segment_id, volume)

    assert second.segment_id == first.segment_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    inside = [slice(None)] * 3
    inside[2 - axis] = index
    inside = tuple(inside)
    outside = np.ones(before.shape, dtype=bool)
    outside[inside] = False
    np.testing.assert_array_equal(after[outside], before[outside])
    # The slice holds exactly what the engine segments for that slice alone.
    array, rgb = mrml.volume_array(volume)
    expected = segmenter.segment_array(array, rgb=rgb, axis=axis, slice_index=index, threshold=0.495).mask
    np.testing.assert_array_equal(after[inside], expected[inside])
    assert not np.array_equal(after[inside], before[inside]), "the slice should change with a lower threshold"


def test_rerun_replaces_the_same_segment_and_keeps_others(oblique_volume_file, segmenter, scene):
    """Running again replaces the content of our segment; the user's other segments stay as they were."""
    volume = _load_volume(scene, oblique_volume_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    dims = volume.GetImageData().GetDimensions()
    other = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
    other[1, 50:80, 60:120] = 1
    other_id = mrml.write_mask(other, volume, segmentation, segment_name="Heart", color=(0.0, 0.0, 1.0))

    first = mrml.segment_volume_node(volume, segmentation, model=segmenter, threshold=0.5)
    segmentation.GetSegmentation().GetSegment(first.segment_id).SetName("my infection")  # found again by its tag
    second = mrml.segment_volume_node(volume, segmentation, model=segmenter, threshold=0.51)

    assert second.segment_id == first.segment_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, second.segment_id, volume), second.mask)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, other_id, volume), other)


def test_cancel_leaves_the_scene_as_it_was(oblique_volume_file, segmenter, scene):
    """A cancelled run raises SegmentationCancelled and writes nothing: no new node, no changed segment."""
    from languageguidedseg.inference import SegmentationCancelled

    volume = _load_volume(scene, oblique_volume_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    first = mrml.segment_volume_node(volume, segmentation, model=segmenter)
    before = mrml.segment_mask(segmentation, first.segment_id, volume)
    nodes = scene.GetNumberOfNodes()

    with pytest.raises(SegmentationCancelled):
        mrml.segment_volume_node(volume, segmentation, model=segmenter, threshold=0.1, cancel=lambda: True)
    with pytest.raises(SegmentationCancelled):
        mrml.segment_volume_node(volume, None, model=segmenter, cancel=lambda: True)

    assert scene.GetNumberOfNodes() == nodes
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, first.segment_id, volume), before)


def test_job_reports_progress_per_slice(oblique_volume_file, segmenter, scene):
    """The compute step reports the slices done, so a GUI progress bar can count them."""
    volume = _load_volume(scene, oblique_volume_file)
    job = mrml.SegmentationJob(volume, model=segmenter)
    calls = []
    job.compute(progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (3, 3)
    assert all(total == 3 for _, total in calls)
    result = job.write(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    assert result.report_source == "prototype" and result.report.startswith("prototype report")


def test_seg_nrrd_round_trip_keeps_name_colour_and_voxels(oblique_volume_file, segmenter, scene, tmp_path):
    """Saved as .seg.nrrd with Slicer's storage node and loaded again: same name, colour and voxels."""
    import slicerio

    volume = _load_volume(scene, oblique_volume_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    result = mrml.segment_volume_node(volume, segmentation, report=QATA_REPORT, model=segmenter)
    path = tmp_path / "result.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    segmentation.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)

    other_scene = slicer.vtkMRMLScene()
    loaded = other_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    loader = other_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    loaded.SetAndObserveStorageNodeID(loader.GetID())
    loader.SetFileName(str(path))
    assert loader.ReadData(loaded)
    segments = loaded.GetSegmentation()
    assert segments.GetNumberOfSegments() == 1
    segment = segments.GetNthSegment(0)
    assert segment.GetName() == "Infection"
    assert segment.GetColor() == pytest.approx((0.9, 0.2, 0.1))
    np.testing.assert_array_equal(mrml.segment_mask(loaded, segments.GetNthSegmentID(0), volume), result.mask)

    # An independent reader (slicerio) sees the same segment; the report is not stored in the file.
    data = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in data["segments"]] == ["Infection"]
    assert QATA_REPORT not in path.read_bytes().decode("latin-1")


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (no model needed)
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_volume(scene, dims=(6, 5, 4), ijk_to_ras=None):
    """A volume node with dims (i, j, k) and the given IJK-to-RAS matrix."""
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    node.SetAndObserveImageData(image)
    if ijk_to_ras is not None:
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, ijk_to_ras[r][c])
        node.SetIJKToRASMatrix(matrix)
    return node


def _slice_node(scene, normal, transverse, position):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetSliceToRASByNTP(*normal, *transverse, *position, 0)
    return node


def _oblique_flipped_ijk_to_ras():
    """i runs inferior (flipped), j runs right-to-left... tilted by 10 degrees; anisotropic spacing."""
    tilt = np.radians(10)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    directions = rotation @ np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = directions * np.array([3.0, 0.8, 1.5])  # spacing of i, j, k
    matrix[:3, 3] = (20.0, -5.0, 40.0)
    return matrix


def test_slice_axis_and_index_for_oblique_flipped_volume(scene):
    """Each view's normal picks the volume axis it is most aligned with, and the index of the slice it shows."""
    ijk_to_ras = _oblique_flipped_ijk_to_ras()
    volume = _synthetic_volume(scene, dims=(8, 7, 6), ijk_to_ras=ijk_to_ras)
    centre = ijk_to_ras @ np.array([5.0, 2.0, 3.0, 1.0])  # voxel i=5, j=2, k=3
    # Columns of the direction matrix: i ~ -S (flipped), j ~ -R, k ~ +A (tilted by 10 degrees).
    axial = _slice_node(scene, (0, 0, 1), (1, 0, 0), centre[:3])
    sagittal = _slice_node(scene, (1, 0, 0), (0, 1, 0), centre[:3])
    coronal = _slice_node(scene, (0, 1, 0), (1, 0, 0), centre[:3])
    assert mrml.slice_axis_and_index(axial, volume) == (0, 5)
    assert mrml.slice_axis_and_index(sagittal, volume) == (1, 2)
    assert mrml.slice_axis_and_index(coronal, volume) == (2, 3)

    # A point between slices rounds to the nearest one; beyond the volume it clamps to the edge.
    between = ijk_to_ras @ np.array([5.0, 2.0, 3.4, 1.0])
    assert mrml.slice_axis_and_index(_slice_node(scene, (0, 1, 0), (1, 0, 0), between[:3]), volume) == (2, 3)
    beyond = ijk_to_ras @ np.array([40.0, 2.0, 3.0, 1.0])
    assert mrml.slice_axis_and_index(_slice_node(scene, (0, 0, -1), (1, 0, 0), beyond[:3]), volume) == (0, 7)


def test_slice_axis_and_index_follows_parent_transform(scene):
    """The slice view shows world coordinates: a translated volume shifts the index accordingly."""
    volume = _synthetic_volume(scene, dims=(10, 10, 10))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 4.0)  # 4 mm superior
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    axial = _slice_node(scene, (0, 0, 1), (1, 0, 0), (0.0, 0.0, 6.0))
    assert mrml.slice_axis_and_index(axial, volume) == (2, 2)


def test_write_mask_geometry_under_transforms_and_in_slices(scene):
    """write_mask puts voxels where the volume has them, for a transformed volume and per slice on every axis."""
    volume = _synthetic_volume(scene, dims=(6, 5, 4), ijk_to_ras=_oblique_flipped_ijk_to_ras())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 7.5)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = mrml.new_segmentation_node(volume)
    assert segmentation.GetTransformNodeID() == transform.GetID()

    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[:, 1:4, 2:5] = 1
    segment_id = mrml.write_mask(mask, volume, segmentation, segment_name="Lesion", color=(0, 1, 0))
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, segment_id, volume), mask)
    _, _, image_to_world = _labelmap_in_ras(segmentation, segment_id)
    np.testing.assert_allclose(image_to_world, _oblique_flipped_ijk_to_ras(), atol=1e-9)

    expected = mask.copy()
    for axis, index in ((0, 3), (1, 0), (2, 2)):
        new = np.zeros_like(mask)
        new[0, 0, 3] = new[2, 4, 0] = 1
        mrml.write_mask(new, volume, segmentation, segment_name="Lesion", axis=axis, slice_index=index)
        region = [slice(None)] * 3
        region[2 - axis] = index
        expected[tuple(region)] = new[tuple(region)]
        np.testing.assert_array_equal(mrml.segment_mask(segmentation, segment_id, volume), expected)

    mrml.write_mask(np.zeros_like(mask), volume, segmentation, segment_name="Lesion")
    assert mrml.segment_mask(segmentation, segment_id, volume).sum() == 0
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1


def test_slice_mode_on_a_2d_image_uses_its_only_slice_in_any_view(scene):
    """A one-slice volume (a 2D image) is segmented in its own plane even if the chosen view looks across it."""
    volume = _synthetic_volume(scene, dims=(6, 5, 1))
    sagittal = _slice_node(scene, (1, 0, 0), (0, 1, 0), (2.0, 2.0, 0.0))
    job = mrml.SegmentationJob(volume, scope="slice", slice_node=sagittal)
    assert (job.axis, job.slice_index) == (2, 0)
    assert mrml.slice_axis_and_index(sagittal, volume) == (0, 2)  # what the view itself shows


def test_errors_are_one_line_lgseg_errors(scene):
    volume = _synthetic_volume(scene, dims=(6, 5, 4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(LgsegError, match="does not match the volume"):
        mrml.write_mask(np.zeros((3, 3, 3)), volume, segmentation, segment_name="x")
    with pytest.raises(LgsegError, match="outside the volume"):
        mrml.write_mask(np.zeros((4, 5, 6)), volume, segmentation, segment_name="x", axis=2, slice_index=4)
    with pytest.raises(LgsegError, match="scope"):
        mrml.SegmentationJob(volume, scope="everything")
    with pytest.raises(LgsegError, match="slice index or a slice view"):
        mrml.SegmentationJob(volume, scope="slice")
    with pytest.raises(LgsegError, match="no voxels"):
        mrml.volume_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    with pytest.raises(LgsegError, match="no input volume"):
        mrml.volume_array(None)


# ----------------------------------------------------------------------------------------------------------------
# A real CT (../shared/data/ct-examples): a DICOM series and a NIfTI volume
# ----------------------------------------------------------------------------------------------------------------

CT_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-examples"


@pytest.fixture(scope="module")
def ct_examples() -> Path:
    if not (CT_EXAMPLES / "ct-dicom").is_dir():
        pytest.skip(f"the CT examples are not at {CT_EXAMPLES}")
    return CT_EXAMPLES


def _view_slice_node(scene, view, volume):
    """Slicer's slice node of ``view`` (Red axial, Yellow sagittal, Green coronal) through the middle voxel."""
    normal, transverse = {"Red": ((0, 0, 1), (1, 0, 0)), "Yellow": ((1, 0, 0), (0, 1, 0)),
                          "Green": ((0, 1, 0), (1, 0, 0))}[view]
    dims = mrml.volume_dimensions(volume)
    centre = mrml.ijk_to_ras_matrix(volume) @ np.array([dims[0] // 2, dims[1] // 2, dims[2] // 2, 1])
    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName(view)
    node.SetSingletonTag(view)
    scene.AddNode(node)
    node.SetSliceToRASByNTP(*normal, *transverse, *centre[:3], 0)
    return node


def _ct_volumes(scene, ct_examples):
    """The DICOM series (through the reader lgseg uses) and the NIfTI (through Slicer's reader) as volume nodes."""
    from languageguidedseg.imageio import read_image

    dicom = mrml.add_volume_node(scene, read_image(ct_examples / "ct-dicom"), "ct-dicom")
    nifti = _load_volume(scene, ct_examples / "ct.nii.gz")
    return {"dicom": dicom, "nifti": nifti}


def test_ct_dicom_series_and_nifti_load_as_volume_nodes_with_their_geometry(scene, ct_examples):
    volumes = _ct_volumes(scene, ct_examples)
    dicom, nifti = volumes["dicom"], volumes["nifti"]
    assert mrml.volume_dimensions(dicom) == (512, 512, 20) and mrml.volume_dimensions(nifti) == (122, 101, 30)
    # The DICOM series lies on the physical grid of its label map (stored with its rows flipped).
    labels = sitk.ReadImage(str(ct_examples / "ct-dicom-labels.nii.gz"))
    flip_rows = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_rows[1, 3] = labels.GetSize()[1] - 1
    np.testing.assert_allclose(mrml.ijk_to_ras_matrix(dicom), LPS_TO_RAS @ _index_to_lps(labels) @ flip_rows,
                               atol=1e-4)
    # Slicer's NIfTI reader and SimpleITK agree on the NIfTI's geometry, and the voxels are the file's.
    ct = sitk.ReadImage(str(ct_examples / "ct.nii.gz"))
    np.testing.assert_allclose(mrml.ijk_to_ras_matrix(nifti), LPS_TO_RAS @ _index_to_lps(ct), atol=1e-4)
    np.testing.assert_array_equal(mrml.volume_array(nifti)[0], sitk.GetArrayFromImage(ct))
    np.testing.assert_array_equal(mrml.volume_array(dicom)[0][:, ::-1].shape, sitk.GetArrayFromImage(labels).shape)


def _index_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


@pytest.mark.parametrize("source", ["dicom", "nifti"])
def test_ct_segmented_whole_and_in_each_view_on_the_volumes_grid(scene, ct_examples, segmenter, source):
    """The module's report loop segments the CT whole and one slice in each of the three views; the segment lies on
    the volume's grid in RAS and slice mode changes only the slice shown."""
    from languageguidedseg.controller import ReportLoopController
    from languageguidedseg.parameters import ReportLoopParameters
    from languageguidedseg.runner import ThreadRunner

    volume = _ct_volumes(scene, ct_examples)[source]
    dims = mrml.volume_dimensions(volume)
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", model="",
                                      report="infection in the lower left lung")
    controller = ReportLoopController(parameters, runner=ThreadRunner(load_segmenter=lambda model, device: segmenter))
    controller.run()
    controller.wait(300)
    whole = controller.last_result
    assert whole is not None and whole.mask.shape == dims[::-1] and whole.mask.any()
    segmentation = parameters.outputSegmentation
    values, extent, image_to_ras = _labelmap_in_ras(segmentation, whole.segment_id)
    np.testing.assert_allclose(image_to_ras, mrml.ijk_to_ras_matrix(volume), atol=1e-6)
    voxels = np.argwhere(whole.mask)[:: max(1, int(whole.mask.sum()) // 2000)]  # (k, j, i) samples
    ras = (mrml.ijk_to_ras_matrix(volume) @ np.c_[voxels[:, ::-1], np.ones(len(voxels))].T)[:3].T
    assert _sample_segment_at_ras(segmentation, whole.segment_id, ras).all()

    before = mrml.segment_mask(segmentation, whole.segment_id, volume)
    parameters.scope = "slice"
    for view, axis in (("Red", 2), ("Yellow", 0), ("Green", 1)):
        _view_slice_node(scene, view, volume)
        parameters.sliceView = view
        parameters.report = ""
        controller.run()
        controller.wait(120)
        result = controller.last_result
        assert (result.axis, result.slice_index) == (axis, dims[axis] // 2), view
        assert result.report_source == "prototype"
        after = mrml.segment_mask(segmentation, whole.segment_id, volume)
        index = [slice(None)] * 3
        index[2 - axis] = result.slice_index
        np.testing.assert_array_equal(after[tuple(index)], result.mask[tuple(index)])
        changed = np.argwhere(after != before)
        assert (changed[:, 2 - axis] == result.slice_index).all(), f"{view}: voxels outside the slice changed"
        before = after


def test_cli_segments_the_dicom_series_onto_the_label_maps_grid(ct_examples, tiny_model, tmp_path, capsys):
    output = tmp_path / "mask.nii.gz"
    summary = _run_cli(capsys, ct_examples / "ct-dicom", tiny_model, output, "--report", "left lower lobe")
    assert summary["report_source"] == "given"
    mask, labels = sitk.ReadImage(str(output)), sitk.ReadImage(str(ct_examples / "ct-dicom-labels.nii.gz"))
    assert mask.GetSize() == labels.GetSize()

    # Mask index -> label map index: a flip of the rows, with integer offsets: the same voxel centres.
    mapping = np.linalg.inv(_index_to_lps(labels)) @ _index_to_lps(mask)
    np.testing.assert_allclose(mapping, np.rint(mapping), atol=1e-4)
    corners = np.array([[0, 0, 0, 1], [511, 511, 19, 1]]).T
    mapped = np.rint(mapping @ corners)[:3]
    assert sorted(mapped[0]) == [0, 511] and sorted(mapped[1]) == [0, 511] and sorted(mapped[2]) == [0, 19]


def test_slice_write_keeps_the_segments_other_slices_and_other_segments(scene):
    """A slice write touches only that slice of that segment, also when another segment overlaps it."""
    volume = _synthetic_volume(scene, dims=(10, 8, 5))
    segmentation = mrml.new_segmentation_node(volume)
    everywhere = np.ones((5, 8, 10), dtype=np.uint8)
    other = mrml.write_mask(everywhere, volume, segmentation, segment_name="Other")
    target = mrml.write_mask(everywhere, volume, segmentation, segment_name="Target")
    new = np.zeros_like(everywhere)
    new[2, 1:3, 1:4] = 1
    for axis, index in ((2, 2), (1, 3), (0, 0)):
        region = [slice(None)] * 3
        region[2 - axis] = index
        expected = mrml.segment_mask(segmentation, target, volume)
        expected[tuple(region)] = new[tuple(region)]
        assert mrml.write_mask(new, volume, segmentation, segment_name="Target", axis=axis, slice_index=index) == target
        np.testing.assert_array_equal(mrml.segment_mask(segmentation, target, volume), expected)
        np.testing.assert_array_equal(mrml.segment_mask(segmentation, other, volume), everywhere)
    # A new segment written one slice at a time holds just that slice.
    single = mrml.write_mask(new, volume, segmentation, segment_name="Single", axis=2, slice_index=2)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, single, volume), new)


def test_writing_from_another_grid_leaves_the_other_segments_on_theirs(scene):
    """A segmentation drawn on a finer grid (Segment Editor's oversampling) keeps its segments' voxels and its
    reference geometry when the module writes a segment from a coarser volume, whole or one slice."""
    fine = _synthetic_volume(scene, dims=(40, 40, 40), ijk_to_ras=np.diag([0.5, 0.5, 0.5, 1.0]))
    coarse = _synthetic_volume(scene, dims=(10, 10, 10), ijk_to_ras=np.diag([2.0, 2.0, 2.0, 1.0]))
    segmentation = mrml.new_segmentation_node(fine)
    drawn = np.zeros((40, 40, 40), dtype=np.uint8)
    drawn[20:23, 20:23, 20:23] = 1
    user = mrml.write_mask(drawn, fine, segmentation, segment_name="Drawn")
    geometry = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[1:4, 1:4, 1:4] = 1
    written = mrml.write_mask(mask, coarse, segmentation, segment_name="Infection")
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, written, coarse), mask)
    mask[2, 5:7, 5:7] = 1
    mrml.write_mask(mask, coarse, segmentation, segment_name="Infection", axis=2, slice_index=2)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, written, coarse), mask)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, user, fine), drawn)
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(user, labelmap)
    assert labelmap.GetSpacing() == (0.5, 0.5, 0.5)
    assert segmentation.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry
