"""MRML bridge: read a volume node, segment it with the engine, write one segment into a segmentation node.

Everything here touches MRML nodes but needs no Qt and no Slicer GUI (of ``slicer.util`` only the array and matrix
helpers, which need neither), so the same code runs inside 3D Slicer and, for tests, on the MRML library of the
``slicer-core`` package.

Geometry conventions: voxel arrays are in numpy order ``(k, j, i)`` (what ``slicer.util.arrayFromVolume`` returns),
``axis`` is an IJK index axis (0 = i, 1 = j, 2 = k), and masks are written as a binary labelmap whose
image-to-world matrix is the volume's IJK-to-RAS matrix, so the segment lines up with the volume voxel for voxel.

Work is split in three steps so that a GUI can run the slow middle step in a worker thread and still leave the
scene untouched when the user cancels: :class:`SegmentationJob` snapshots the volume (main thread),
:meth:`SegmentationJob.compute` runs the model (any thread, no MRML access), :meth:`SegmentationJob.write` writes the
segment (main thread). :func:`segment_volume_node` runs all three in a row.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import LgsegError
from .sides import Geometry, check_sides, is_raster_file, orientation_of, result_sides, sides_label


class _Lazy:
    """A module imported on first use, so that importing the engine never needs ``slicer`` (MRML) or VTK."""

    def __init__(self, name: str):
        self._name = name
        self._module: Any = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as exc:
                raise LgsegError(
                    f"MRML needs the '{self._name.split('.')[0]}' package ({exc}); run inside 3D Slicer, or "
                    "install it with: pip install slicer-core"
                ) from None
        return getattr(self._module, attribute)


slicer = _Lazy("slicer")
vtk = _Lazy("vtk")
numpy_support = _Lazy("vtk.util.numpy_support")

SCOPES = ("volume", "slice")

# Tag written on the segment so that re-runs find it even after the user renamed it.
SEGMENT_TAG = "LanguageGuidedSeg.Segment"

_rules_lock = threading.Lock()


@dataclass
class NodeSegmentationResult:
    """What :func:`segment_volume_node` and :meth:`SegmentationJob.write` return."""

    mask: np.ndarray  # uint8 0/1, (k, j, i): the whole volume, zero outside the slice in slice mode
    report: str  # the report text that guided the segmentation (given or approximated)
    report_source: str  # "given" | "prototype"
    segment_id: str
    similarity: Optional[float] = None  # cosine similarity of the prototype approximation
    axis: int = 2
    slice_index: Optional[int] = None
    seconds: float = 0.0
    foreground_fraction: float = 0.0
    segmentation_node: Any = None  # the node written (a new one when None was given)
    sides: str = "patient"  # the convention of ``report``: "patient", "image" or "none" (the model names no sides)
    orientation: str = ""  # where the image orientation came from, e.g. "from the volume"
    sides_label: str = ""  # both in one line, for display beside the report box
    # Whether the image is in the model's domain (None: unknown) and, when it is not, the warning in plain words
    # ("" when in domain or unknown); see languageguidedseg.inference.SegmentationResult.
    in_domain: Optional[bool] = None
    domain_score: Optional[float] = None
    domain_slices: Optional[tuple[int, int]] = None
    domain_warning: str = ""
    report_warnings: list[str] = field(default_factory=list)  # where the given report contradicts the image
    model: str = ""  # the model that ran (the one chosen for the image when the model was "auto")


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------------


def _image_data(volume_node: Any) -> Any:
    if volume_node is None:
        raise LgsegError("no input volume; select a volume node")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise LgsegError(f"volume '{volume_node.GetName()}' has no voxels; load image data into it first")
    return image


def volume_dimensions(volume_node: Any) -> tuple[int, int, int]:
    """Voxel counts along (i, j, k)."""
    i, j, k = (int(d) for d in _image_data(volume_node).GetDimensions())
    return i, j, k


def ijk_to_ras_matrix(volume_node: Any) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix in its own (parent transform) coordinate frame."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _transform_between(source_node: Any, target_node: Any, what: str) -> np.ndarray:
    """4x4 matrix from the frame of ``source_node``'s parent transform to ``target_node``'s (None = world)."""
    source = source_node.GetParentTransformNode() if source_node is not None else None
    target = target_node.GetParentTransformNode() if target_node is not None else None
    if source is None and target is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        raise LgsegError(f"the {what} is under a non-linear transform; harden the transform first (Data module)")
    return slicer.util.arrayFromVTKMatrix(matrix)


def ijk_to_world_matrix(volume_node: Any) -> np.ndarray:
    """IJK-to-world (RAS) matrix including linear parent transforms of the volume."""
    return _transform_between(volume_node, None, "volume") @ ijk_to_ras_matrix(volume_node)


def volume_geometry(volume_node: Any) -> Optional[Geometry]:
    """Where the volume lies in the patient (IJK-to-world, parent transforms included), for left/right in reports.

    None for a volume read from a 2D image file (PNG, JPEG, BMP, TIFF): such files carry no orientation, so the
    engine assumes a frontal radiograph in radiological display.
    """
    storage = volume_node.GetStorageNode()
    if storage is not None and storage.GetFileName() and is_raster_file(storage.GetFileName()):
        return None
    return Geometry(ijk_to_world_matrix(volume_node), source="volume")


def volume_sides_label(volume_node: Any, report_sides: str, sides: str = "patient", axis: Optional[int] = None) -> str:
    """The label a run on ``volume_node`` will return as ``sides_label``, before running it (e.g. beside an empty
    report box); ``report_sides`` is the model's (``ModelInfo.report_sides``), ``axis`` the slicing axis."""
    orientation = orientation_of(volume_geometry(volume_node), default_axis(volume_node) if axis is None else axis)
    return sides_label(result_sides(check_sides(sides), report_sides), orientation)


def default_axis(volume_node: Any) -> int:
    """The IJK axis to slice along when none is given: the one-voxel axis of a 2D image, else k."""
    dims = volume_dimensions(volume_node)
    if dims[2] == 1:
        return 2
    ones = [a for a in range(3) if dims[a] == 1]
    return ones[0] if ones else 2


def slice_axis_and_index(slice_node: Any, volume_node: Any) -> tuple[int, int]:
    """IJK axis and slice index of ``volume_node`` shown by ``slice_node`` (a ``vtkMRMLSliceNode``).

    The axis is the volume axis whose direction is most aligned with the slice normal (the third column of
    SliceToRAS), compared as unit vectors so anisotropic spacing does not bias the choice; the index is the slice
    through the centre of the view, rounded and clamped to the volume. This works for oblique, flipped and
    transformed volumes because both are expressed in world RAS.
    """
    if slice_node is None:
        raise LgsegError("no slice view; choose a slice view for slice mode")
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2]
    centre = slice_to_ras[:, 3]
    ijk_to_world = ijk_to_world_matrix(volume_node)
    directions = ijk_to_world[:3, :3]
    lengths = np.linalg.norm(directions, axis=0)
    if np.any(lengths == 0):
        raise LgsegError(f"volume '{volume_node.GetName()}' has a zero spacing; fix its geometry (Volumes module)")
    alignment = np.abs((directions / lengths).T @ (normal / max(np.linalg.norm(normal), 1e-12)))
    axis = int(np.argmax(alignment))
    centre_ijk = np.linalg.inv(ijk_to_world) @ centre
    dims = volume_dimensions(volume_node)
    index = int(math.floor(centre_ijk[axis] + 0.5))
    return axis, min(max(index, 0), dims[axis] - 1)


# --------------------------------------------------------------------------------------------------------------
# Reading voxels
# --------------------------------------------------------------------------------------------------------------


def volume_array(volume_node: Any, axis: Optional[int] = None,
                 slice_index: Optional[int] = None) -> tuple[np.ndarray, bool]:
    """A copy of the volume's voxels in (k, j, i) order and whether it is RGB ((k, j, i, 3), alpha dropped).

    With ``axis`` and ``slice_index``, only that slice, as a one-voxel-thick (k, j, i) block. A copy, so a worker
    thread never reads VTK memory that the scene may change or free meanwhile.
    """
    components = _image_data(volume_node).GetNumberOfScalarComponents()
    index: tuple = (slice(None),) * 3
    if slice_index is not None and axis is not None:
        index = tuple(slice(slice_index, slice_index + 1) if a == 2 - axis else slice(None) for a in range(3))
    if components == 1:
        return np.array(slicer.util.arrayFromVolume(volume_node)[index], copy=True), False
    if components in (3, 4) and volume_node.IsA("vtkMRMLVectorVolumeNode"):  # arrayFromVolume's RGB(A) case
        return np.array(slicer.util.arrayFromVolume(volume_node)[index][..., :3], copy=True), True
    raise LgsegError(
        f"volume '{volume_node.GetName()}' has {components} components per voxel; "
        "use a grayscale or RGB volume (Vector to Scalar Volume module)"
    )


# --------------------------------------------------------------------------------------------------------------
# Writing the segment
# --------------------------------------------------------------------------------------------------------------


def _ensure_converter_rules() -> None:
    """Register the standard segmentation conversion rules if nobody did.

    Slicer's Segmentations module registers them at startup; the bare MRML library does not, and without them a
    segmentation cannot even create an empty binary labelmap.
    """
    with _rules_lock:
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        names = {rule.GetClassName() for rule in factory.GetConverterRules()}
        for rule_class in (
            slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
            slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        ):
            if rule_class.__name__ not in names:
                factory.RegisterConverterRule(rule_class())


def find_segment(segmentation_node: Any, segment_name: str, tag_value: Optional[str] = None) -> Optional[str]:
    """ID of the segment written by an earlier run: by our tag if given, else by name; None if there is none."""
    segmentation = segmentation_node.GetSegmentation()
    if tag_value:
        for index in range(segmentation.GetNumberOfSegments()):
            value = vtk.reference("")
            if segmentation.GetNthSegment(index).GetTag(SEGMENT_TAG, value) and str(value) == tag_value:
                return segmentation.GetNthSegmentID(index)
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    return segment_id or None


def _labelmap_from_mask(mask: np.ndarray, volume_node: Any, segmentation_node: Any) -> Any:
    """A binary oriented image of ``mask`` in the volume's geometry, cropped to the mask's bounding box.

    Cropping keeps a small result (one slice, a small lesion) cheap to write, even in a large volume.
    """
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != n))) for n in range(3)]
    if any(len(n) == 0 for n in nonzero):
        bounds = [(0, 0)] * 3  # one background voxel: an empty segment
    else:
        bounds = [(int(n[0]), int(n[-1])) for n in nonzero]
    (k0, k1), (j0, j1), (i0, i1) = bounds
    return _labelmap(mask[k0: k1 + 1, j0: j1 + 1, i0: i1 + 1], (i0, i1, j0, j1, k0, k1), volume_node,
                     segmentation_node)


def _labelmap(region: np.ndarray, extent: Sequence[int], volume_node: Any, segmentation_node: Any) -> Any:
    """A binary oriented image holding ``region`` ((k, j, i) voxels of ``extent`` (i0, i1, j0, j1, k0, k1) of the
    volume's grid), placed in the segmentation's coordinate frame."""
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(*extent)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = (region != 0).astype(np.uint8).ravel()
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(_ijk_to_segmentation(volume_node, segmentation_node)))
    return labelmap


def _ijk_to_segmentation(volume_node: Any, segmentation_node: Any) -> np.ndarray:
    """Volume IJK to the segmentation's coordinate frame (they differ when their parent transforms differ)."""
    return _transform_between(volume_node, segmentation_node, "volume or segmentation") @ ijk_to_ras_matrix(
        volume_node
    )


def _check_axis_index(dims: Sequence[int], axis: Optional[int], slice_index: Optional[int]) -> None:
    if axis is not None and axis not in (0, 1, 2):
        raise LgsegError(f"axis must be 0 (i), 1 (j) or 2 (k), not {axis}")
    if slice_index is not None:
        if axis is None:
            raise LgsegError("a slice index needs an axis")
        if not 0 <= int(slice_index) < dims[axis]:
            raise LgsegError(f"slice {slice_index} is outside the volume (0..{dims[axis] - 1} along axis {axis})")


def write_mask(
    mask: np.ndarray,
    volume_node: Any,
    segmentation_node: Any,
    *,
    segment_name: str = "Segment",
    color: Sequence[float] = (1.0, 0.0, 0.0),
    axis: Optional[int] = None,
    slice_index: Optional[int] = None,
    tag_value: Optional[str] = None,
) -> str:
    """Write ``mask`` ((k, j, i), or (j, i) for a one-slice volume) as one binary labelmap segment.

    The segment (found by tag, else by name; created with ``segment_name`` and ``color`` if missing) has its content
    replaced; with ``slice_index`` only that slice along ``axis`` is replaced and the rest of the segment is kept.
    A segmentation without other segments gets the volume as reference geometry; one with other segments keeps its
    own, and this segment gets a labelmap layer of its own, so the others are not resampled. Returns the segment ID.
    """
    dims = volume_dimensions(volume_node)
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None] if dims[2] == 1 else mask
    if mask.shape != (dims[2], dims[1], dims[0]):
        raise LgsegError(f"mask shape {mask.shape} does not match the volume ({dims[2]}, {dims[1]}, {dims[0]})")
    _check_axis_index(dims, axis, slice_index)
    _ensure_converter_rules()

    segmentation = segmentation_node.GetSegmentation()
    segment_id = find_segment(segmentation_node, segment_name, tag_value)
    others = any(segmentation.GetNthSegmentID(i) != segment_id for i in range(segmentation.GetNumberOfSegments()))
    if not others:  # a segmentation of other segments keeps the grid they were drawn on (e.g. oversampled)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segment_id is None:
        segment_id = segmentation.AddEmptySegment("", segment_name, [float(c) for c in color[:3]])
        if not segment_id:
            raise LgsegError(f"could not add segment '{segment_name}' to '{segmentation_node.GetName()}'")
        segment = segmentation.GetSegment(segment_id)
        # Explicit name and colour, so Slicer's terminology defaults do not replace them later.
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if tag_value:
            segment.SetTag(SEGMENT_TAG, tag_value)

    if others:
        # Segments share labelmap layers, and writing a labelmap of another grid into a shared layer resamples the
        # whole layer onto that grid (vtkSegmentationModifier): the segment gets a layer of its own first.
        segmentation.SeparateSegmentLabelmap(segment_id)

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    writes: list[tuple[Any, int, Optional[list[int]]]]
    if slice_index is None or axis is None:  # _check_axis_index: a slice index comes with an axis
        writes = [(_labelmap_from_mask(mask, volume_node, segmentation_node), logic.MODE_REPLACE, None)]
    else:
        # Only that slice changes, at the cost of one slice: clear it (minimum with zeros) and add the new slice
        # (maximum), each restricted to the slice's extent; the rest of the segment is left as it is.
        extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
        extent[2 * axis] = extent[2 * axis + 1] = int(slice_index)
        index = [slice(None)] * 3
        index[2 - axis] = slice(int(slice_index), int(slice_index) + 1)
        region = mask[tuple(index)]
        writes = [(_labelmap(np.zeros_like(region), extent, volume_node, segmentation_node), logic.MODE_MERGE_MIN,
                   extent)]
        if region.any():
            writes.append((_labelmap(region, extent, volume_node, segmentation_node), logic.MODE_MERGE_MAX, extent))
    for labelmap, mode, modified in writes:
        done = (logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode, modified)
                if modified else logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode))
        if not done:
            raise LgsegError(f"could not write segment '{segment_name}' into '{segmentation_node.GetName()}'")
    return segment_id


def _reference_image(volume_node: Any, segmentation_node: Any) -> Any:
    """An empty oriented image with the volume's voxel grid, expressed in the segmentation's coordinate frame."""
    dims = volume_dimensions(volume_node)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    ijk_to_segmentation = _ijk_to_segmentation(volume_node, segmentation_node)
    reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_segmentation))
    return reference


def segment_mask(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """The segment as a (k, j, i) uint8 0/1 array on the volume's voxel grid (nearest-neighbour resampled).

    Used to merge slice results into an existing segment, and by tests.
    """
    dims = volume_dimensions(volume_node)
    out = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
    labelmap = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
        return out
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return out
    resampled = slicer.vtkOrientedImageData()
    reference = _reference_image(volume_node, segmentation_node)
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False
    ):
        raise LgsegError(f"could not read segment '{segment_id}' in the geometry of '{volume_node.GetName()}'")
    extent = resampled.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return out
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    values = values.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    # Clip the resampled extent to the volume: it may be larger when the segment reaches outside the volume.
    lo = [max(extent[2 * a], 0) for a in range(3)]
    hi = [min(extent[2 * a + 1], dims[a] - 1) for a in range(3)]
    if any(high < low for low, high in zip(lo, hi)):
        return out
    out[lo[2]: hi[2] + 1, lo[1]: hi[1] + 1, lo[0]: hi[0] + 1] = values[
        lo[2] - extent[4]: hi[2] - extent[4] + 1,
        lo[1] - extent[2]: hi[1] - extent[2] + 1,
        lo[0] - extent[0]: hi[0] - extent[0] + 1,
    ] != 0
    return out


# --------------------------------------------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------------------------------------------


def load_segmenter(model: Any = None, device: str = "auto") -> Any:
    """A ``Segmenter`` for ``model`` (name, folder or an already loaded ``Segmenter``, which is returned as is)."""
    from .inference import Segmenter  # imports torch: only when a segmentation is actually run

    if isinstance(model, Segmenter):
        return model
    return Segmenter.load(model, device)


def segment_style(config: Any) -> tuple[str, tuple[float, float, float], str]:
    """Segment name, colour and tag value of the segments of a model (its ``ModelConfig``)."""
    card = config.card
    return str(card.segment_name or config.name), tuple(card.segment_color or (1.0, 0.0, 0.0)), config.name


class SegmentationJob:
    """One segmentation of one volume node, split into snapshot / compute / write (see the module docstring)."""

    def __init__(
        self,
        volume_node: Any,
        report: Optional[str] = None,
        model: Any = None,
        scope: str = "volume",
        slice_index: Optional[int] = None,
        axis: Optional[int] = None,
        threshold: Optional[float] = None,
        device: str = "auto",
        slice_node: Any = None,
        sides: str = "patient",
    ):
        if scope not in SCOPES:
            raise LgsegError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'")
        self.sides = check_sides(sides)
        self.volume_node = volume_node
        self.dimensions = volume_dimensions(volume_node)
        if scope == "slice" and slice_index is None and slice_node is not None:
            if self.dimensions[default_axis(volume_node)] == 1:
                # A 2D image has one slice, whichever view the user picked.
                axis, slice_index = default_axis(volume_node), 0
            else:
                axis, slice_index = slice_axis_and_index(slice_node, volume_node)
        self.axis = default_axis(volume_node) if axis is None else int(axis)
        if scope == "slice" and slice_index is None:
            if self.dimensions[self.axis] != 1:
                raise LgsegError("slice mode needs a slice index or a slice view")
            slice_index = 0
        self.slice_index = None if scope == "volume" else int(slice_index)  # type: ignore[arg-type]  # set above
        _check_axis_index(self.dimensions, self.axis, self.slice_index)
        self.scope = scope
        self.report = report if report and report.strip() else None
        self.model = model
        self.threshold = threshold
        self.device = device
        # Slice mode copies only the slice (a keystroke in live refine must not copy the whole volume).
        self.array, self.rgb = volume_array(volume_node, self.axis, self.slice_index)
        self.geometry = volume_geometry(volume_node)  # snapshot: compute() may run in a worker thread
        self.segmenter: Any = None
        self.result: Any = None
        # Segment name, colour and tag when the model ran elsewhere (a worker process): see segment_style().
        self.style: Optional[tuple[str, tuple[float, float, float], str]] = None
        self.model_used = ""  # the model that ran, when it ran elsewhere (a runner that chose it for the image)

    def compute(
        self,
        progress: Optional[Callable[[int, int], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> Any:
        """Load the model (once) and segment the snapshot; touches no MRML node, so it may run in a worker thread.

        Raises ``languageguidedseg.inference.SegmentationCancelled`` when ``cancel()`` returns True.
        """
        if self.segmenter is None:
            self.segmenter = load_segmenter(self.model, self.device)
        self.result = self.segmenter.segment_array(self.array, progress=progress, cancel=cancel,
                                                   **self.segment_options())
        return self.result

    def segment_options(self) -> dict:
        """The keyword arguments of ``Segmenter.segment_array`` for the snapshot ``self.array`` (e.g. to run the job
        in another process)."""
        return dict(
            rgb=self.rgb,
            report=self.report,
            axis=self.axis,
            slice_index=None if self.slice_index is None else 0,  # the snapshot holds only that slice
            threshold=self.threshold,
            sides=self.sides,
            geometry=self.geometry,
        )

    def segment_style(self) -> tuple[str, tuple[float, float, float], str]:
        """Segment name, colour and tag value from the model package."""
        return self.style if self.style is not None else segment_style(self.segmenter.config)

    def write(self, segmentation_node: Any) -> NodeSegmentationResult:
        """Write the computed mask into ``segmentation_node`` (main thread) and return the result."""
        if self.result is None:
            raise LgsegError("nothing to write: run compute() first")
        name, color, tag_value = self.segment_style()
        mask = np.asarray(self.result.mask, dtype=np.uint8)
        if mask.ndim == 2:
            mask = mask[None]
        if self.slice_index is not None:  # the slice's mask, placed in the volume
            whole = np.zeros(self.dimensions[::-1], dtype=np.uint8)
            index = [slice(None)] * 3
            index[2 - self.axis] = slice(self.slice_index, self.slice_index + 1)
            whole[tuple(index)] = mask
            mask = whole
        segment_id = write_mask(
            mask,
            self.volume_node,
            segmentation_node,
            segment_name=name,
            color=color,
            axis=self.axis,
            slice_index=self.slice_index,
            tag_value=tag_value,
        )
        return NodeSegmentationResult(
            mask=mask,
            report=self.result.report,
            report_source=self.result.report_source,
            segment_id=segment_id,
            similarity=getattr(self.result, "similarity", None),
            axis=self.axis,
            slice_index=self.slice_index,
            seconds=float(getattr(self.result, "seconds", 0.0) or 0.0),
            foreground_fraction=float(getattr(self.result, "foreground_fraction", 0.0) or 0.0),
            segmentation_node=segmentation_node,
            sides=self.result.sides,
            orientation=self.result.orientation,
            sides_label=self.result.sides_label,
            in_domain=self.result.in_domain,
            domain_score=self.result.domain_score,
            domain_slices=self.result.domain_slices,
            domain_warning=self.result.domain_warning,
            report_warnings=list(self.result.report_warnings),
            model=self.model_used or (self.segmenter.config.name if self.segmenter is not None else ""),
        )


def add_volume_node(scene: Any, image: Any, name: str, source: Optional[Union[str, Path]] = None) -> Any:
    """Add a volume node holding a SimpleITK image (e.g. :func:`languageguidedseg.imageio.read_image`'s DICOM
    series, the reader ``lgseg`` uses), geometry kept: ITK's LPS becomes Slicer's RAS. RGB images become vector
    volume nodes; a 2D image a one-slice volume, as Slicer loads it. ``source``: the file the image was read from,
    recorded in a storage node as Slicer's loaders do (:func:`volume_geometry` uses it: a PNG has no orientation)."""
    from .imageio import _ijk_to_lps, image_array, is_rgb

    rgb = is_rgb(image)
    voxels = np.ascontiguousarray(image_array(image))
    if voxels.ndim == (3 if rgb else 2):
        voxels = voxels[None]
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", name)
    data = vtk.vtkImageData()
    data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    scalars = numpy_support.numpy_to_vtk(voxels.reshape(-1, 3) if rgb else voxels.ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(data)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_lps(image)))
    if not rgb:
        node.CreateDefaultDisplayNodes()
    if source is not None and Path(source).is_file():
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(source))
        node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def new_segmentation_node(volume_node: Any, name: Optional[str] = None) -> Any:
    """Add a segmentation node (with display node) beside ``volume_node``, under the same parent transform."""
    scene = volume_node.GetScene()
    if scene is None:
        raise LgsegError("the volume is not in a scene")
    _ensure_converter_rules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    if volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def remove_node(node: Any) -> None:
    """Remove ``node`` from its scene with its display and storage nodes (a half-made node that must not stay, or one
    a new image replaces); nothing when it is in no scene."""
    scene = node.GetScene()
    if scene is None or not scene.IsNodePresent(node):
        return
    others = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] + [node.GetStorageNode()]
    scene.RemoveNode(node)
    for other in others:
        if other is not None and scene.IsNodePresent(other):
            scene.RemoveNode(other)


def segment_volume_node(
    volume_node: Any,
    segmentation_node: Any,
    report: Optional[str] = None,
    model: Union[str, Path, Any, None] = None,
    scope: str = "volume",
    slice_index: Optional[int] = None,
    axis: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    *,
    threshold: Optional[float] = None,
    device: str = "auto",
    slice_node: Any = None,
    cancel: Optional[Callable[[], bool]] = None,
    sides: str = "patient",
) -> NodeSegmentationResult:
    """Segment ``volume_node`` and write the mask as one segment of ``segmentation_node``.

    ``report`` empty or None = approximate it from the image with the model's prototype bank. ``model`` is a model
    name, a model folder, a loaded ``Segmenter`` or None (the default installed model). ``scope`` is "volume" (every
    slice along ``axis``) or "slice" (only ``slice_index`` along ``axis``, or the slice shown by ``slice_node``;
    only that slice of the segment changes). ``segmentation_node`` None = a new node is added to the scene.
    ``sides``: "patient" (default) or "image", what left and right mean in ``report`` and in the returned report; the
    orientation comes from the volume's IJK-to-RAS matrix and parent transforms (see :func:`volume_geometry`).
    Nothing is written when the segmentation fails or is cancelled.
    """
    job = SegmentationJob(
        volume_node,
        report=report,
        model=model,
        scope=scope,
        slice_index=slice_index,
        axis=axis,
        threshold=threshold,
        device=device,
        slice_node=slice_node,
        sides=sides,
    )
    job.compute(progress=progress, cancel=cancel)
    if segmentation_node is None:
        segmentation_node = new_segmentation_node(volume_node)
    return job.write(segmentation_node)
