from typing import Annotated, Union

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class LanguageGuidedSegParameterNode:
    """Parameters of the module, saved with the scene; the parameter object of ``languageguidedseg.controller``.

    inputVolume - the image to segment (grayscale or RGB).
    outputSegmentation - where the segment is written; None = the first run creates a segmentation node.
    model - installed model package name; "" = the default model.
    scope - "slice" (the slice shown in sliceView) or "volume" (every slice).
    sliceView - the view whose slice slice mode segments.
    report - the report text; empty = approximate it from the image. Kept here only, where the user can clear it.
        Not bound to the report box through SlicerParameterName: the wrapper's QTextEdit connector rewrites the box
        on every keystroke and moves the cursor to the start, so the widget syncs the box by hand.
    reportSource - "" | "prototype" (the box holds the approximation) | "given" (the box held the report used).
    reportSimilarity - cosine similarity of the approximation.
    approximationDigest - digest of the approximation put in the box, to tell whether the user edited it.
    threshold - probability threshold.
    device - "auto" (GPU if available) or "cpu".
    sides - what left and right in the report mean: the patient's sides or the image's.
    liveUpdate - in slice mode, re-segment about 0.3 s after typing stops.
    """

    # A Union of node types must include None, or Slicer's serializer cannot write the default and creating the
    # parameter node fails (5.8 to 5.12).
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    scope: Annotated[str, Choice(["slice", "volume"])] = "slice"
    sliceView: Annotated[str, Choice(["Red", "Yellow", "Green"])] = "Red"
    report: str = ""
    reportSource: Annotated[str, Choice(["", "prototype", "given"])] = ""
    reportSimilarity: float = 0.0
    approximationDigest: str = ""
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: Annotated[str, Choice(["auto", "cpu"])] = "auto"
    sides: Annotated[str, Choice(["patient", "image"])] = "patient"
    liveUpdate: bool = True
