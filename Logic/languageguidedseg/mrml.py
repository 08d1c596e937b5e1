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

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import LgsegError

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


def volume_array(volume_node: Any) -> tuple[np.ndarray, bool]:
    """A copy of the volume's voxels in (k, j, i) order and whether it is RGB ((k, j, i, 3), alpha dropped).

    A copy, so a worker thread never reads VTK memory that the scene may change or free meanwhile.
    """
    components = _image_data(volume_node).GetNumberOfScalarComponents()
    if components == 1:
        return np.array(slicer.util.arrayFromVolume(volume_node), copy=True), False
    if components in (3, 4) and volume_node.IsA("vtkMRMLVectorVolumeNode"):  # arrayFromVolume's RGB(A) case
        return np.array(slicer.util.arrayFromVolume(volume_node)[..., :3], copy=True), True
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
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(i0, i1, j0, j1, k0, k1)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    region = mask[k0: k1 + 1, j0: j1 + 1, i0: i1 + 1]
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
    The segmentation gets the volume as reference geometry. Returns the segment ID.
    """
    dims = volume_dimensions(volume_node)
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None] if dims[2] == 1 else mask
    if mask.shape != (dims[2], dims[1], dims[0]):
        raise LgsegError(f"mask shape {mask.shape} does not match the volume ({dims[2]}, {dims[1]}, {dims[0]})")
    _check_axis_index(dims, axis, slice_index)
    _ensure_converter_rules()

    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = find_segment(segmentation_node, segment_name, tag_value)
    if slice_index is None:
        merged = (mask != 0).astype(np.uint8)
    else:
        # Replacing a segment replaces all of it, so merge the new slice into the current content first.
        merged = (
            segment_mask(segmentation_node, segment_id, volume_node)
            if segment_id is not None
            else np.zeros(mask.shape, dtype=np.uint8)
        )
        index: list[Union[slice, int]] = [slice(None)] * 3
        index[2 - int(axis)] = int(slice_index)  # type: ignore[arg-type]  # _check_axis_index: not None here
        merged[tuple(index)] = mask[tuple(index)] != 0
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

    labelmap = _labelmap_from_mask(merged, volume_node, segmentation_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
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

    Needs no ``slicer.util``; used to merge slice results into an existing segment, and by tests.
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
    return Segmenter(model=model, device=device)


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
    ):
        if scope not in SCOPES:
            raise LgsegError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'")
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
        self.array, self.rgb = volume_array(volume_node)
        self.segmenter: Any = None
        self.result: Any = None

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
        self.result = self.segmenter.segment_array(
            self.array,
            rgb=self.rgb,
            report=self.report,
            axis=self.axis,
            slice_index=self.slice_index,
            threshold=self.threshold,
            progress=progress,
            cancel=cancel,
        )
        return self.result

    def segment_style(self) -> tuple[str, tuple[float, float, float], str]:
        """Segment name, colour and tag value from the model package."""
        package = self.segmenter.package
        config = getattr(package, "config", None)
        name = getattr(config, "segment_name", None) or getattr(package, "name", None) or "Segment"
        color = tuple(getattr(config, "segment_color", None) or (1.0, 0.0, 0.0))
        return str(name), color, str(getattr(package, "name", name))

    def write(self, segmentation_node: Any) -> NodeSegmentationResult:
        """Write the computed mask into ``segmentation_node`` (main thread) and return the result."""
        if self.result is None:
            raise LgsegError("nothing to write: run compute() first")
        name, color, tag_value = self.segment_style()
        mask = np.asarray(self.result.mask, dtype=np.uint8)
        if mask.ndim == 2:
            mask = mask[None]
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
        )


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
) -> NodeSegmentationResult:
    """Segment ``volume_node`` and write the mask as one segment of ``segmentation_node``.

    ``report`` empty or None = approximate it from the image with the model's prototype bank. ``model`` is a model
    name, a model folder, a loaded ``Segmenter`` or None (the default installed model). ``scope`` is "volume" (every
    slice along ``axis``) or "slice" (only ``slice_index`` along ``axis``, or the slice shown by ``slice_node``;
    only that slice of the segment changes). ``segmentation_node`` None = a new node is added to the scene.
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
    )
    job.compute(progress=progress, cancel=cancel)
    if segmentation_node is None:
        segmentation_node = new_segmentation_node(volume_node)
    return job.write(segmentation_node)
