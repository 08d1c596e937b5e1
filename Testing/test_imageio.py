"""Image reading and mask writing on real files: geometry, pixel values, formats, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from languageguidedseg.errors import LgsegError
from languageguidedseg.imageio import image_array, is_rgb, read_image, read_mask, spatial_shape, write_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (10.5, -20.25, 33.0)
# A rotation of 0.3 rad about z combined with a flip of the y axis: catches any axis mix-up or lost sign.
_C, _S = np.cos(0.3), np.sin(0.3)
DIRECTION = tuple((np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])).ravel())


def _volume(dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 2000, size=(5, 6, 7)).astype(dtype))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _image_2d(spacing=(0.4, 0.6), origin=(3.0, -4.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(6 * 9, dtype=np.uint8).reshape(6, 9))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _assert_same_geometry(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    # NIfTI stores geometry as float32, hence the tolerance.
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=1e-5)


def _one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(LgsegError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- reading 2D images


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grayscale_png_round_trip(tmp_path, dtype):
    values = (np.arange(20 * 30).reshape(20, 30) * (1 if dtype == np.uint8 else 97) % np.iinfo(dtype).max).astype(dtype)
    path = tmp_path / "gray.png"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    image = read_image(path)
    assert image.GetDimension() == 2 and not is_rgb(image)
    assert spatial_shape(image) == (20, 30)
    array = image_array(image)
    assert array.dtype == dtype
    np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_png_reads_as_rgb(tmp_path, channels):
    values = np.random.default_rng(1).integers(0, 256, size=(12, 17, channels), dtype=np.uint8)
    path = tmp_path / "colour.png"
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=True), str(path))
    image = read_image(path)
    assert is_rgb(image) and image.GetDimension() == 2
    assert spatial_shape(image) == (12, 17)
    np.testing.assert_array_equal(image_array(image), values[..., :3])  # alpha dropped, colours intact


@pytest.mark.parametrize("suffix", [".jpg", ".bmp", ".tif"])
def test_other_2d_formats_readable(tmp_path, suffix):
    values = np.zeros((16, 24, 3), dtype=np.uint8)
    values[:, :12] = (200, 40, 10)
    path = tmp_path / f"colour{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=True), str(path))
    array = image_array(read_image(path))
    assert array.shape == (16, 24, 3)
    if suffix == ".jpg":  # lossy, and chroma is subsampled at the colour edge: compare each half's typical colour
        np.testing.assert_allclose(np.median(array[:, :12], axis=(0, 1)), (200, 40, 10), atol=8)
        np.testing.assert_allclose(np.median(array[:, 12:], axis=(0, 1)), (0, 0, 0), atol=8)
    else:
        np.testing.assert_array_equal(array, values)


# ---------------------------------------------------------------- volumes and geometry


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_read_keeps_geometry_and_values(tmp_path, suffix):
    original = _volume()
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(original, str(path))
    image = read_image(path)
    _assert_same_geometry(image, original)
    assert spatial_shape(image) == (5, 6, 7)
    np.testing.assert_array_equal(image_array(image), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_write_mask_volume_round_trip(tmp_path, suffix):
    reference = _volume()
    mask = image_array(reference) > 500
    written = write_mask(mask, reference, tmp_path / f"mask{suffix}")
    assert written == tmp_path / f"mask{suffix}"
    back = sitk.ReadImage(str(written))
    _assert_same_geometry(back, reference)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask.astype(np.uint8))
    np.testing.assert_array_equal(read_mask(written), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mask{suffix}"]  # no temp file left


def test_write_mask_png_is_visible(tmp_path):
    reference = _image_2d()
    mask = np.zeros(spatial_shape(reference), dtype=bool)
    mask[:, :4] = True
    path = write_mask(mask, reference, tmp_path / "mask.png")
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert values.dtype == np.uint8 and set(np.unique(values)) == {0, 255}
    np.testing.assert_array_equal(values == 255, mask)
    np.testing.assert_array_equal(read_mask(path), mask)


def test_write_mask_for_rgb_and_one_slice_references(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((6, 9, 3), np.uint8), isVector=True)
    one_slice = sitk.GetImageFromArray(np.zeros((1, 6, 9), np.uint8))  # a 2D image some readers return as 3D
    mask = np.zeros((6, 9), bool)
    mask[2:4, 3:7] = True
    np.testing.assert_array_equal(read_mask(write_mask(mask, rgb, tmp_path / "rgb.png")), mask)
    np.testing.assert_array_equal(read_mask(write_mask(mask[np.newaxis], one_slice, tmp_path / "one.png")), mask)
    np.testing.assert_array_equal(read_mask(write_mask(mask[np.newaxis], one_slice, tmp_path / "one.nrrd")),
                                  mask[np.newaxis])


def test_write_mask_2d_nifti_keeps_geometry(tmp_path):
    reference = _image_2d()
    mask = image_array(reference) % 2 == 0
    back = sitk.ReadImage(str(write_mask(mask, reference, tmp_path / "mask.nii.gz")))
    np.testing.assert_allclose(back.GetSpacing()[:2], reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin()[:2], reference.GetOrigin(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).reshape(mask.shape), mask)


def test_seg_nrrd_3d_keeps_segment_and_geometry(tmp_path):
    reference = _volume()
    mask = image_array(reference) > 0
    path = write_mask(mask, reference, tmp_path / "mask.seg.nrrd", segment_name="lesion", color=(0.2, 0.6, 1.0))
    segmentation = slicerio.read_segmentation(str(path))
    assert [segment["name"] for segment in segmentation["segments"]] == ["lesion"]
    segment = segmentation["segments"][0]
    np.testing.assert_allclose(segment["color"], (0.2, 0.6, 1.0))
    assert segment["labelValue"] == 1
    # slicerio voxels are (i, j, k); SimpleITK arrays are (k, j, i).
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "lesion").transpose(), mask)
    expected = np.eye(4)
    expected[:3, :3] = np.reshape(DIRECTION, (3, 3)) * np.array(SPACING)
    expected[:3, 3] = ORIGIN
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-9)
    _assert_same_geometry(sitk.ReadImage(str(path)), reference)
    np.testing.assert_array_equal(read_mask(path), mask)
    np.testing.assert_array_equal(read_mask(path, "lesion"), mask)


def test_seg_nrrd_2d_is_one_slice_volume(tmp_path):
    reference = _image_2d()
    mask = image_array(reference) > 20
    path = write_mask(mask, reference, tmp_path / "mask.seg.nrrd", segment_name="polyp", color=(0.0, 1.0, 0.0))
    segmentation = slicerio.read_segmentation(str(path))
    assert segmentation["segments"][0]["name"] == "polyp"
    np.testing.assert_allclose(segmentation["segments"][0]["color"], (0.0, 1.0, 0.0))
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == (9, 6, 1)
    np.testing.assert_allclose(back.GetSpacing(), (0.4, 0.6, 1.0))
    np.testing.assert_allclose(back.GetOrigin(), (3.0, -4.0, 0.0))
    np.testing.assert_allclose(back.GetDirection(), np.eye(3).ravel())
    np.testing.assert_array_equal(read_mask(path), mask[np.newaxis])


def _write_dicom_series(folder: Path, depth: int = 4) -> sitk.Image:
    volume = sitk.GetImageFromArray((np.arange(depth * 8 * 9).reshape(depth, 8, 9) - 100).astype(np.int16))
    volume.SetSpacing((0.8, 0.6, 2.0))
    volume.SetOrigin((1.0, 2.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.1"
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            "0018|0050": "2.0",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    return volume


def test_dicom_series_folder_reads_as_volume(tmp_path):
    volume = _write_dicom_series(tmp_path)
    image = read_image(tmp_path)
    assert spatial_shape(image) == (4, 8, 9)
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.6, 2.0), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-6)
    np.testing.assert_array_equal(image_array(image), sitk.GetArrayFromImage(volume))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_dicom_series_with_a_missing_or_damaged_slice_is_refused(tmp_path, damage):
    """Read as one evenly spaced volume, a series with a gap would put the mask beside the anatomy."""
    _write_dicom_series(tmp_path, depth=6)
    victim = tmp_path / "slice003.dcm"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(LgsegError, match="missing or doubled slice|cannot read the DICOM series") as caught:
        read_image(tmp_path)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- real data


def _first_file(folder: Path, pattern: str) -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} is absent (expected ../shared/data beside the checkout)")
    files = sorted(folder.glob(pattern))
    if not files:
        pytest.skip(f"no {pattern} files in {folder}")
    return files[0]


def test_real_qata_xray_reads_as_grayscale():
    image = read_image(_first_file(DATA / "qata-cov19" / "images", "*.png"))
    assert image.GetDimension() == 2 and not is_rgb(image)
    assert spatial_shape(image) == (224, 224)
    assert image_array(image).dtype == np.uint8 and image_array(image).max() > 0


def test_real_kvasir_jpeg_reads_as_rgb():
    image = read_image(_first_file(DATA / "kvasir-seg" / "images", "*.jpg"))
    assert is_rgb(image) and image.GetDimension() == 2
    array = image_array(image)
    assert array.shape == (256, 256, 3) and array.dtype == np.uint8
    assert array.max() > 0


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert "does not exist" in _one_line_error(read_image, tmp_path / "nothing.png")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("this is not an image\n")
    assert "fake.png" in _one_line_error(read_image, path)


@pytest.mark.parametrize("suffix", [".jpg", ".nii", ".nii.gz"])
def test_cut_off_file_is_refused_whole_one_is_read(tmp_path, suffix):
    """An interrupted copy: SimpleITK would fill the missing part with grey or zeros and carry on."""
    values = np.random.default_rng(0).integers(0, 255, (64, 80) if suffix == ".jpg" else (12, 64, 80))
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(values.astype(np.uint8 if suffix == ".jpg" else np.int16)), str(whole))
    assert read_image(whole).GetSize()[:2] == (80, 64)
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    assert "incomplete" in _one_line_error(read_image, cut)


def test_gray_alpha_png_is_named_as_such(tmp_path):
    """ITK reads no gray + alpha PNG; the error says what the file is and what to do, not 'use a PNG'."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = 6, 4
    rows = b"".join(b"\x00" + bytes([40, 255] * width) for _ in range(height))  # filter 0, (gray, alpha) pixels
    path = tmp_path / "gray-alpha.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    line = _one_line_error(read_image, path)
    assert "transparency" in line and "alpha" in line


def test_4d_nifti_rejected(tmp_path):
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)) for _ in range(2)]
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    assert "4D" in _one_line_error(read_image, path)


def test_many_components_rejected(tmp_path):
    path = tmp_path / "vectors.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 5), np.float32), isVector=True), str(path))
    assert "5 components" in _one_line_error(read_image, path)


def test_zero_size_image_rejected(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_text("ObjectType = Image\nNDims = 2\nDimSize = 0 5\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    assert "empty" in _one_line_error(read_image, path)


def test_folder_without_dicom(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("no images here")
    assert "no DICOM series" in _one_line_error(read_image, tmp_path)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own warning is not shown on top of ours


def _write_fails(tmp_path: Path, output: Path, reference: sitk.Image, mask: np.ndarray) -> str:
    before = set(tmp_path.rglob("*"))
    message = _one_line_error(write_mask, mask, reference, output)
    assert set(tmp_path.rglob("*")) == before  # neither the output nor a temp file is left
    return message


def test_output_folder_missing(tmp_path):
    reference = _image_2d()
    mask = np.ones(spatial_shape(reference), bool)
    _write_fails(tmp_path, tmp_path / "absent" / "mask.nii.gz", reference, mask)
    (tmp_path / "file.txt").write_text("x")
    _write_fails(tmp_path, tmp_path / "file.txt" / "mask.nii.gz", reference, mask)


def test_output_file_that_cannot_be_created(tmp_path):
    """The error of a read-only folder, for any user (root writes to read-only folders): the file system refuses
    to create the file, here because its name is longer than any file system allows."""
    reference = _image_2d()
    message = _write_fails(tmp_path, tmp_path / ("m" * 300 + ".nrrd"), reference, np.ones(spatial_shape(reference)))
    assert "cannot create a file" in message


def test_output_path_is_a_folder(tmp_path):
    # The temp file is written fine and only the final rename fails: it must be cleaned up.
    (tmp_path / "mask.nii.gz").mkdir()
    reference = _image_2d()
    _write_fails(tmp_path, tmp_path / "mask.nii.gz", reference, np.ones(spatial_shape(reference), bool))


@pytest.mark.parametrize("name", ["mask.jpg", "mask.mhd", "mask.txt", "mask"])
def test_unknown_output_suffix(tmp_path, name):
    reference = _image_2d()
    message = _write_fails(tmp_path, tmp_path / name, reference, np.ones(spatial_shape(reference), bool))
    assert ".nii.gz" in message


def test_png_output_for_volume(tmp_path):
    reference = _volume()
    message = _write_fails(tmp_path, tmp_path / "mask.png", reference, np.ones(spatial_shape(reference), bool))
    assert ".nii.gz" in message and ".seg.nrrd" in message


def test_mask_shape_mismatch(tmp_path):
    message = _write_fails(tmp_path, tmp_path / "mask.nrrd", _volume(), np.ones((5, 6), bool))
    assert "shape" in message
