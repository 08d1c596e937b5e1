"""Reading images and writing masks with SimpleITK, keeping spacing, origin and direction.

Arrays follow SimpleITK's order: ``(y, x)`` for 2D and ``(z, y, x)`` for 3D images, with a trailing channel axis of 3
for RGB images.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import LgsegError
from .fileio import PathLike, atomic_path, full_suffix
from .sides import Geometry, is_raster_file

_READABLE = "a PNG, JPEG, BMP, TIFF, NIfTI, NRRD or MHA file, or a folder with a DICOM series"
# The mask file types, by suffix. .mhd is left out on purpose: it writes two files, which cannot be replaced
# atomically as one.
MASK_SUFFIXES = (".png", ".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd")
_VOLUME_SUFFIXES = ".nii.gz, .nrrd, .mha or .seg.nrrd"


def read_image(path: PathLike, *, max_voxels: Optional[int] = None, confined: bool = False) -> sitk.Image:
    """Read a 2D image, a 3D volume, or the first DICOM series of a folder, keeping its geometry.

    RGB(A) images come back as 3-component vector images (alpha is dropped); grayscale images stay scalar.
    Raises LgsegError with a one-line message for anything that cannot be used.

    ``max_voxels``: refuse, from the header and before any voxel is read, an image of more voxels, or one whose
    voxels would need more memory than that many float32 voxels. ``confined`` (a file someone else sent, e.g. an
    upload): only the formats of :data:`CONFINED_FORMATS`, found from the file's first bytes and read by that
    format's reader alone, and a header may name data files only beside it, in its own folder.
    """
    source = Path(path)
    if not source.exists():
        raise LgsegError(f"input '{source}' does not exist; check the path")
    if source.is_dir():
        return _checked(_read_dicom_series(source, max_voxels), source)
    image_io = _confined_format(source) if confined else ""
    if max_voxels is not None:
        _check_voxels(source, _header(source, image_io), max_voxels)
    return _checked(_read_file(source, image_io), source)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header declares, read without its voxels."""

    size: tuple[int, ...]  # SimpleITK order: (x, y[, z])
    components: int
    pixel_type: str  # e.g. "16-bit signed integer"
    bytes_per_pixel: int

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.voxels * self.bytes_per_pixel


def _header(source: Path, image_io: str = "") -> ImageHeader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    if image_io:
        reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise LgsegError(f"cannot read '{source}' as an image ({_reason(exc)}); use {_READABLE}") from exc
    pixel_id, components = reader.GetPixelID(), reader.GetNumberOfComponents()
    # The size of one voxel of that type, asked of SimpleITK itself rather than tabulated here (a complex voxel is
    # one component of two numbers).
    vector = sitk.GetPixelIDValueAsString(pixel_id).startswith("vector")
    one = sitk.Image([1, 1], pixel_id, components) if vector else sitk.Image([1, 1], pixel_id)
    return ImageHeader(size=tuple(int(s) for s in reader.GetSize()), components=components,
                       pixel_type=sitk.GetPixelIDValueAsString(pixel_id),
                       bytes_per_pixel=one.GetSizeOfPixelComponent() * one.GetNumberOfComponentsPerPixel())


def _check_voxels(source: Path, header: ImageHeader, max_voxels: int) -> None:
    """Refuse an image larger than ``max_voxels`` voxels, or needing more memory than that many float32 voxels."""
    size = " x ".join(str(s) for s in header.size)
    if header.voxels > max_voxels:
        raise LgsegError(f"'{source}' is {size} = {header.voxels:,} voxels, more than the limit of {max_voxels:,} "
                         "(--max-voxels); crop or downsample it first")
    if header.nbytes > 4 * max_voxels:
        raise LgsegError(f"'{source}' ({size}, {header.pixel_type}) would need {header.nbytes / 1e9:.3g} GB of "
                         f"memory, more than the {4 * max_voxels / 1e9:.3g} GB that --max-voxels allows; convert it "
                         "to a smaller voxel type or crop it first")


def image_array(image: sitk.Image) -> np.ndarray:
    """Voxel array in SimpleITK order: ``(y, x)`` or ``(z, y, x)``, plus a channel axis of 3 for RGB."""
    return sitk.GetArrayFromImage(image)


def is_rgb(image: sitk.Image) -> bool:
    """True for a 3-component (RGB) image."""
    return image.GetNumberOfComponentsPerPixel() == 3


def image_geometry(image: sitk.Image, path: PathLike) -> Optional[Geometry]:
    """Where the image lies in the patient, from its direction, spacing and origin; None for 2D image formats
    (PNG, JPEG, BMP, TIFF), which carry no orientation."""
    if Path(path).is_file() and is_raster_file(Path(path).name):
        return None
    return Geometry.from_lps(_ijk_to_lps(image), source="file")


def spatial_shape(image: sitk.Image) -> tuple[int, ...]:
    """Shape of ``image_array(image)`` without the channel axis."""
    return tuple(int(size) for size in reversed(image.GetSize()))


def write_mask(
    mask: np.ndarray,
    reference: sitk.Image,
    path: PathLike,
    *,
    segment_name: str = "Segment",
    color: Sequence[float] = (1.0, 0.0, 0.0),
) -> Path:
    """Write a binary mask (nonzero = foreground) on the grid of ``reference``; the format follows the suffix.

    ``.png`` (2D, values 0/255), ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` (values 0/1), or ``.seg.nrrd`` (a 3D Slicer
    segmentation with one segment). The file is written atomically: on any error nothing is left behind.
    """
    target = Path(path)
    shape = spatial_shape(reference)
    suffix = check_mask_path(target, shape)
    foreground = np.asarray(mask)
    if foreground.shape != shape:
        raise LgsegError(
            f"cannot write '{target}': the mask has shape {foreground.shape} but the image has shape {shape}; "
            "the mask must be on the image's own grid"
        )
    foreground = foreground != 0
    if "\n" in segment_name or "\r" in segment_name:
        raise LgsegError("the segment name must be a single line; remove line breaks from it")
    if suffix == ".png":
        # 0/255 so the PNG is visible in any viewer; PNG keeps no origin or direction, only the pixel spacing.
        image = sitk.GetImageFromArray(foreground.reshape(shape[-2:]).astype(np.uint8) * np.uint8(255))
        image.SetSpacing(reference.GetSpacing()[:2])
    elif suffix != ".seg.nrrd":
        image = sitk.GetImageFromArray(foreground.astype(np.uint8))
        image.SetSpacing(reference.GetSpacing())
        image.SetOrigin(reference.GetOrigin())
        image.SetDirection(reference.GetDirection())

    try:
        with atomic_path(target) as tmp:
            if suffix == ".seg.nrrd":
                _write_segmentation(foreground, reference, tmp, segment_name, color)
            else:
                sitk.WriteImage(image, str(tmp), useCompression=True)
    except LgsegError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError, pynrrd its own errors, the OS OSError
        raise LgsegError(
            f"cannot write '{target}' ({_reason(exc)}); check the output path, its permissions and free disk space"
        ) from exc
    return target


def check_mask_path(path: PathLike, shape: tuple[int, ...]) -> str:
    """Check that a mask of an image of spatial ``shape`` can be written to ``path`` as its suffix says; return the
    suffix. Raises LgsegError for an unknown file type, or for a PNG of a volume."""
    suffix = full_suffix(path)
    if suffix not in MASK_SUFFIXES:
        raise LgsegError(f"cannot write a mask to '{path}': unknown file type '{suffix or Path(path).name}'; "
                         f"use {_VOLUME_SUFFIXES}, or .png for 2D images")
    # A 2D image that SimpleITK read as a one-slice volume still fits in a PNG; real volumes do not.
    if suffix == ".png" and len(shape) == 3 and shape[0] != 1:
        raise LgsegError(f"cannot write the 3D mask '{path}' as PNG (2D only); use {_VOLUME_SUFFIXES} instead")
    return suffix


def read_mask(path: PathLike, segment_name: Optional[str] = None) -> np.ndarray:
    """Read a mask file as a bool array in SimpleITK order (nonzero = foreground).

    For ``.seg.nrrd`` the voxels of the segment called ``segment_name`` (default: the first segment) are returned as
    ``(z, y, x)``; a segmentation of a 2D image therefore has one slice.
    """
    source = Path(path)
    if full_suffix(source) != ".seg.nrrd":
        image = read_image(source)
        voxels = image_array(image)
        return np.any(voxels != 0, axis=-1) if is_rgb(image) else voxels != 0
    if not source.is_file():
        raise LgsegError(f"segmentation '{source}' does not exist; check the path")
    import slicerio  # only needed for .seg.nrrd

    try:
        segmentation = slicerio.read_segmentation(str(source))
        segments = segmentation.get("segments") or []
        if not segments:
            raise LgsegError(f"segmentation '{source}' has no segments; choose a file that contains one")
        segment = segments[0] if segment_name is None else slicerio.segment_from_name(segmentation, segment_name)
        return np.ascontiguousarray(np.transpose(slicerio.segment_mask(segmentation, segment)))
    except LgsegError:
        raise
    except KeyError as exc:
        raise LgsegError(f"segmentation '{source}' has no segment named '{segment_name}'; check the name") from exc
    except Exception as exc:  # pynrrd raises its own error types besides OSError/ValueError
        raise LgsegError(f"cannot read segmentation '{source}' ({_reason(exc)}); choose a valid .seg.nrrd") from exc


def _read_file(source: Path, image_io: str = "") -> sitk.Image:
    _check_complete(source, image_io)
    try:
        return sitk.ReadImage(str(source), imageIO=image_io)
    except RuntimeError as exc:
        with open(source, "rb") as file:
            header = file.read(26)
        # ITK's PNG reader has no pixel type for gray + alpha (PNG colour type 4).
        if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR" and header[25:26] == b"\x04":
            raise LgsegError(f"'{source}' is a grayscale PNG with transparency, which cannot be read; save it "
                             "without the alpha channel (or as RGBA)") from exc
        raise LgsegError(f"cannot read '{source}' as an image ({_reason(exc)}); use {_READABLE}") from exc


def _check_complete(source: Path, image_io: str = "") -> None:
    """Refuse a cut-off JPEG or NIfTI file (an interrupted copy or download): their readers fill the missing part
    with grey or zeros and only print a warning, if anything. The format is the suffix's, or ``image_io``'s where
    the reader was chosen from the file's first bytes."""
    suffix = full_suffix(source)
    if image_io == "NiftiImageIO" and suffix not in (".nii", ".nii.gz"):
        with open(source, "rb") as file:
            suffix = ".nii.gz" if file.read(2) == b"\x1f\x8b" else ".nii"
    cut = f"'{source}' is incomplete (cut off, e.g. by an interrupted copy); copy the whole file again"
    if suffix in (".jpg", ".jpeg") or image_io == "JPEGImageIO":
        data = source.read_bytes()
        # The main image's scan data (after its last start-of-scan marker) ends with the end-of-image marker.
        if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise LgsegError(cut)
    elif suffix in (".nii", ".nii.gz"):
        opener = gzip.open if suffix == ".nii.gz" else open
        try:
            with opener(source, "rb") as file:
                header = file.read(352)
                if len(header) < 348:
                    raise LgsegError(cut)
                needed = _nifti_bytes(header)
                size = len(header)
                # Decompressed only as far as the header says the voxels go: never the whole of a gzip bomb.
                while needed is not None and size < needed:
                    chunk = file.read(1 << 22)
                    if not chunk:
                        break
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise LgsegError(cut if isinstance(exc, EOFError) else
                             f"cannot read '{source}' as an image ({_reason(exc)}); use {_READABLE}") from exc
        if needed is not None and size < needed:
            raise LgsegError(cut)


def _nifti_bytes(header: bytes) -> Optional[int]:
    """The size a single-file NIfTI-1 image must have (header, extensions, voxels); None if the header is not one."""
    for order in ("<", ">"):
        if struct.unpack(order + "i", header[:4])[0] == 348:
            break
    else:
        return None
    if header[344:348] != b"n+1\0":
        return None  # not a single-file NIfTI-1 (an Analyze or .hdr/.img pair): left to the reader
    dims = struct.unpack(order + "8h", header[40:56])
    bitpix = struct.unpack(order + "h", header[72:74])[0]
    offset = int(struct.unpack(order + "f", header[108:112])[0])
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1:dims[0] + 1]):
        return None
    return offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64)) * bitpix // 8


# The file types a confined read accepts, by their first bytes, and the one ITK reader each is read with. ITK's
# other readers are never asked: several follow references to other files (Stimulate .spr, Bruker 2dseq, HDF5 and
# MINC external data) or are rarely used and little tested against hostile input.
CONFINED_FORMATS = {
    "PNGImageIO": "PNG", "JPEGImageIO": "JPEG", "BMPImageIO": "BMP", "TIFFImageIO": "TIFF",
    "NiftiImageIO": "NIfTI or Analyze (.nii, .nii.gz, .hdr with its .img)", "NrrdImageIO": "NRRD (.nrrd, .nhdr)",
    "MetaImageIO": "MetaImage (.mha, .mhd)", "GDCMImageIO": "DICOM",
}
_CONFINED_READABLE = ("a PNG, JPEG, BMP, TIFF, NIfTI, Analyze, NRRD, MetaImage or DICOM file, or a folder with a "
                      "DICOM series")
_HEADER_BYTES = 1 << 20  # a text header longer than this is refused rather than searched
_DATA_FILE_LINE = {
    "MetaImageIO": re.compile(r"^\s*ElementDataFile\s*[=:]\s*(.*?)\s*$", re.IGNORECASE),
    "NrrdImageIO": re.compile(r"^\s*data\s*file\s*:=?\s*(.*?)\s*$", re.IGNORECASE),
}
_NUMBERED = re.compile(r"%0?\d*[diu]")


def _confined_format(source: Path) -> str:
    """The ITK reader for a file someone else sent, from its first bytes; refuses other file types, and headers
    whose data files are not beside them (a header naming e.g. ``/etc/passwd`` as its data would show that file)."""
    with open(source, "rb") as file:
        head = file.read(544)
    if head[:2] == b"\x1f\x8b":  # gzip: only a compressed NIfTI
        try:
            with gzip.open(source, "rb") as file:
                head = file.read(544)
        except (EOFError, OSError, zlib.error) as exc:
            raise LgsegError(f"'{source}' is not a valid gzip file ({_reason(exc)}); use {_CONFINED_READABLE}") \
                from exc
        if _nifti_magic(head) is None:
            raise LgsegError(f"'{source}' is a compressed file but not a compressed NIfTI image; upload images "
                             f"uncompressed, as {_CONFINED_READABLE} (archives are not opened)")
        return "NiftiImageIO"
    image_io = _sniff(head, source)
    if image_io is None:
        raise LgsegError(f"cannot read '{source}': it is not a file type the page opens; use {_CONFINED_READABLE}")
    names = _data_files(source, image_io) if image_io in _DATA_FILE_LINE else []
    if image_io == "NiftiImageIO" and full_suffix(source) == ".hdr":  # the voxels are in the .img beside it
        names = [source.stem + (".img.gz" if source.with_suffix(".img.gz").is_file() else ".img")]
    for name in names:
        if not _plain_name(name):
            raise LgsegError(f"'{source}' names a data file outside the upload; only files uploaded together with "
                             "a header are read: upload the header and its data files as one folder")
        if not _beside(source, name):
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise LgsegError(f"'{source}' names the data file '{shown}', which is not in the same upload; upload the "
                             "header and its data files together, as one folder")
    return image_io


def _sniff(head: bytes, source: Path) -> Optional[str]:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNGImageIO"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEGImageIO"
    if head.startswith(b"BM"):
        return "BMPImageIO"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "TIFFImageIO"
    if head[128:132] == b"DICM":
        return "GDCMImageIO"
    if head.startswith(b"NRRD000"):
        return "NrrdImageIO"
    magic = _nifti_magic(head)
    # A .hdr reads its voxels from the .img of the same name: beside it by construction.
    if magic in (b"n+1", b"n+2") or (magic is not None and full_suffix(source) == ".hdr"):
        return "NiftiImageIO"
    if full_suffix(source) in (".mha", ".mhd") and re.match(rb"\s*\w+\s*=", head):
        return "MetaImageIO"
    return None


def _nifti_magic(head: bytes) -> Optional[bytes]:
    """b"n+1"/b"ni1" (NIfTI-1), b"n+2"/b"ni2" (NIfTI-2), b"" (Analyze 7.5), or None when not such a header."""
    if len(head) >= 348 and (head[:4] == b"\x5c\x01\0\0" or head[:4] == b"\0\0\x01\x5c"):  # 348
        return head[344:347] if head[344:347] in (b"n+1", b"ni1") else b""
    if len(head) >= 540 and (head[:4] == b"\x1c\x02\0\0" or head[:4] == b"\0\0\x02\x1c"):  # 540
        return head[4:7] if head[4:7] in (b"n+2", b"ni2") else None
    return None


def _data_files(source: Path, image_io: str) -> list[str]:
    """The data files a MetaImage or NRRD header names, in all three forms: one name, ``LIST`` (one name a line
    after it) and a numbered pattern (``slice%03d.raw first last step``); ``LOCAL`` (MetaImage): none.

    Every line that may be such a field counts, not only the first, with the lines split as each reader splits them
    (MetaIO at "\\n" only, NRRD at "\\r" too) and as Python does: the readers also match field names differently
    (MetaIO: case and all), and a header must not show this check one field and the reader another.
    """
    with open(source, "rb") as file:
        text = file.read(_HEADER_BYTES + 1).decode("latin-1")
    # The header ends within what was read: MetaIO's last field, or NRRD's empty line.
    ends = (bool(re.search(r"(?m)^[ \t]*ElementDataFile[ \t]*[=:]", text)) if image_io == "MetaImageIO" else
            "" in re.split(r"\r\n|\r|\n", text)[:-1])
    if not ends and (image_io == "MetaImageIO" or len(text) > _HEADER_BYTES):
        raise LgsegError(f"cannot read '{source}' as an image (no data file within its first "
                         f"{_HEADER_BYTES >> 20} MB); use {_CONFINED_READABLE}")
    names: list[str] = []
    for lines in (text.splitlines(), text.split("\n"), re.split(r"\r\n|\r|\n", text)):
        for index, line in enumerate(lines):
            match = _DATA_FILE_LINE[image_io].match(line)
            value = match.group(1) if match is not None else ""
            word = value.split()[0] if value.split() else ""
            if match is None or image_io == "MetaImageIO" and word == "LOCAL":
                continue
            if word == "LIST":
                names += [name for rest in lines[index + 1:] for name in rest.split()]
            elif "%" in value:
                names += _numbered_names(source, value)
            else:
                names.append(value)
    return names


def _numbered_names(source: Path, value: str) -> list[str]:
    words = value.split()
    try:
        pattern, first, last, step = words[0], int(words[1]), int(words[2]), int(words[3])
    except (IndexError, ValueError):
        pattern, first, last, step = "", 0, 0, 0
    count = (last - first) // step + 1 if step else 0
    if len(_NUMBERED.findall(pattern)) != 1 or pattern.count("%") != 1 or not 0 < count <= 100_000:
        raise LgsegError(f"'{source}' names its data files with a pattern that is not one numbered file name "
                         "(e.g. 'slice%03d.raw 1 40 1'); name each data file instead")
    return [pattern % number for number in range(first, last + (1 if step > 0 else -1), step)]


def _plain_name(name: str) -> bool:
    """A file name with no folder in it (relative or absolute), so that it can only name a file beside its header."""
    return bool(name) and name not in (".", "..") and not any(ch in name for ch in "/\\\0:")


def _beside(header: Path, name: str) -> bool:
    """Whether the plain file name ``name`` is a regular file in the header's own folder (not a link)."""
    target = header.parent / name
    return target.is_file() and not target.is_symlink()


def _read_dicom_series(folder: Path, max_voxels: Optional[int] = None) -> sitk.Image:
    # Checked here first: GDCM would print a warning for a folder without DICOM files, and silencing it means
    # switching ITK's process-wide warning display, which belongs to the whole program (e.g. 3D Slicer).
    if not _holds_dicom_file(folder):
        raise LgsegError(f"folder '{folder}' contains no DICOM series; choose {_READABLE}")
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
        if not series_ids:
            raise LgsegError(f"folder '{folder}' contains no DICOM series; choose {_READABLE}")
        files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
        if max_voxels is not None:
            # Every file as large as the first; a multi-frame file holds several slices (its frames) of them.
            first = _header(Path(files[0]), "GDCMImageIO")
            frames = int(np.prod(first.size[2:], dtype=np.int64))
            _check_voxels(folder, replace(first, size=(*first.size[:2], len(files) * frames)), max_voxels)
        _check_slice_spacing(folder, files)
        reader.SetImageIO("GDCMImageIO")  # the files GDCM found, read as DICOM whatever their names say
        reader.SetFileNames(files)
        return reader.Execute()
    except RuntimeError as exc:
        raise LgsegError(f"cannot read the DICOM series in '{folder}' ({_reason(exc)}); check the DICOM files") from exc


def _check_slice_spacing(folder: Path, files: Sequence[str]) -> None:
    """Reject a series with a missing, unreadable or doubled slice: read as one volume of even spacing, its voxels
    would no longer lie where the patient's anatomy is (ITK only prints a warning)."""
    if len(files) < 3:
        return
    positions = []
    header = sitk.ImageFileReader()
    header.SetImageIO("GDCMImageIO")
    for name in files:
        header.SetFileName(name)
        header.ReadImageInformation()
        positions.append(header.GetOrigin())
    normal = np.asarray(header.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(np.asarray(positions, dtype=np.float64) @ normal)
    typical = float(np.median(np.abs(steps)))
    worst = int(np.argmax(np.abs(np.abs(steps) - typical)))
    if typical <= 0 or abs(abs(steps[worst]) - typical) > 0.1 * typical:
        raise LgsegError(
            f"the DICOM series in '{folder}' has a missing or doubled slice ({abs(steps[worst]):.3g} mm between "
            f"'{Path(files[worst]).name}' and '{Path(files[worst + 1]).name}', {typical:.3g} mm elsewhere); the mask "
            "would not line up with the scan; check that every file of the series is there and readable")


def _holds_dicom_file(folder: Path) -> bool:
    """Whether the folder holds a DICOM Part 10 file (the "DICM" marker after the 128-byte preamble)."""
    for entry in folder.iterdir():
        try:
            if entry.is_file():
                with open(entry, "rb") as file:
                    if file.read(132)[128:] == b"DICM":
                        return True
        except OSError:
            continue
    return False


def _checked(image: sitk.Image, source: Path) -> sitk.Image:
    """Reject images the engine cannot use; drop the alpha channel of RGBA images."""
    if image.GetDimension() > 3:
        raise LgsegError(f"'{source}' is a {image.GetDimension()}D image; 4D images are not supported, "
                         "extract a 3D volume first")
    if 0 in image.GetSize():
        raise LgsegError(f"'{source}' is empty (size {'x'.join(map(str, image.GetSize()))}); choose a non-empty image")
    components = image.GetNumberOfComponentsPerPixel()
    if components == 4:
        channels = [sitk.VectorIndexSelectionCast(image, index) for index in range(3)]
        return sitk.Compose(channels)  # Compose keeps the geometry of its inputs
    if components not in (1, 3):
        raise LgsegError(f"'{source}' has {components} components per pixel; only grayscale, RGB and RGBA images "
                         "are supported, convert it to one of them first")
    return image


def _ijk_to_lps(reference: sitk.Image) -> np.ndarray:
    """4x4 voxel-to-LPS matrix; a 2D image becomes the one-slice volume at z = 0 with unit slice spacing."""
    dimension = reference.GetDimension()
    direction = np.eye(3)
    direction[:dimension, :dimension] = np.reshape(reference.GetDirection(), (dimension, dimension))
    spacing = np.ones(3)
    spacing[:dimension] = reference.GetSpacing()
    matrix = np.eye(4)
    matrix[:3, :3] = direction * spacing[np.newaxis, :]
    matrix[:dimension, 3] = reference.GetOrigin()
    return matrix


def _write_segmentation(
    foreground: np.ndarray, reference: sitk.Image, path: Path, name: str, color: Sequence[float]
) -> None:
    import slicerio  # only needed for .seg.nrrd

    volume = foreground if foreground.ndim == 3 else foreground[np.newaxis]
    voxels_ijk = np.transpose(volume)  # (z, y, x) -> (i, j, k), the order slicerio writes
    segmentation = slicerio.create_segmentation(voxels_ijk.shape, _ijk_to_lps(reference))
    slicerio.add_segment(segmentation, voxels_ijk, {
        "id": "Segment_1",
        "name": name,
        "color": [float(value) for value in color],
        # Explicit name and colour, so Slicer does not replace them with terminology defaults.
        "nameAutoGenerated": False,
        "colorAutoGenerated": False,
    })
    slicerio.write_segmentation(str(path), segmentation)


def _reason(exc: BaseException) -> str:
    """Last meaningful line of a (multi-line) SimpleITK/ITK message, to keep user errors on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    for marker in ("sitk::ERROR:", "itk::ERROR:", "ITK ERROR:"):
        text = text.split(marker)[-1].strip()
    # Drop ITK's object prefix, e.g. "PNGImageIO(0x55ddff8bc980): ".
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return text[:200]
