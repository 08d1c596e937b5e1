"""The report loop's parameters, declared once: each one's name, type, default, allowed values and meaning.

:class:`ReportLoopParameters` is the declaration. It is also the parameter object of
:class:`languageguidedseg.controller.ReportLoopController` for front ends without a Slicer parameter node (the web
page, scripts); the 3D Slicer module builds its ``@parameterNodeWrapper`` parameter node from
:func:`parameter_fields` (``LanguageGuidedSegLib/ParameterNode.py``), and a test checks that the node Slicer builds
agrees with this class. Names are camelCase, as Slicer names parameters. A node-typed parameter names the MRML classes
it takes; this module imports neither ``slicer`` nor PyTorch (the Slicer module imports it while Slicer loads modules).

:class:`ReportLoopParameters` does not check the values it is given; the Slicer parameter node refuses a value outside
``choices`` or ``value_range``.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Optional

SLICE_VIEWS = ("Red", "Yellow", "Green")


@dataclass(frozen=True)
class ParameterField:
    """One parameter: ``type`` is the Python type of its value (``typing.Any`` for an MRML node, which may be None),
    ``meaning`` one line for the user; the values it takes are ``choices``, an inclusive ``value_range``, or one of
    the MRML ``node_classes``."""

    name: str
    type: Any
    default: Any
    meaning: str
    choices: tuple = ()
    value_range: Optional[tuple[float, float]] = None
    node_classes: tuple[str, ...] = ()


def _parameter(default: Any, meaning: str, *, choices: tuple = (), value_range: Optional[tuple[float, float]] = None,
               node_classes: tuple[str, ...] = ()) -> Any:
    """A dataclass field that carries the rest of its :class:`ParameterField` in its metadata."""
    return field(default=default, metadata={"meaning": meaning, "choices": choices, "value_range": value_range,
                                            "node_classes": node_classes})


@dataclass
class ReportLoopParameters:
    """The report loop's parameters, and the parameter object of front ends without a Slicer parameter node."""

    inputVolume: Any = _parameter(None, "the volume to segment (grayscale, or an RGB vector volume)",
                                  node_classes=("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"))
    outputSegmentation: Any = _parameter(
        None, "the segmentation written; None: the first run creates one and stores it here",
        node_classes=("vtkMRMLSegmentationNode",))
    model: str = _parameter("auto", '"auto": the installed model made for the input (chosen once per input volume); '
                                    'or an installed model name or model folder; "": the default model')
    scope: str = _parameter("slice", "the slice shown in sliceView, or every slice of the volume",
                            choices=("slice", "volume"))
    sliceView: str = _parameter("Red", "the view whose slice slice mode segments and follows", choices=SLICE_VIEWS)
    report: str = _parameter("", "the report box's text; empty: approximate it from the image (may hold patient "
                                 "information: never logged)")
    reportSource: str = _parameter("", 'what the box holds: "prototype" the approximation, "given" the report the '
                                       'last run used, "" neither', choices=("", "prototype", "given"))
    reportSimilarity: float = _parameter(0.0, "cosine similarity of the approximation in the box")
    approximationDigest: str = _parameter("", "digest of the approximation put in the box, to tell whether the user "
                                              "edited it")
    threshold: float = _parameter(0.5, "probability threshold", value_range=(0.01, 0.99))
    device: str = _parameter("auto", '"auto": the GPU when there is one, else the CPU', choices=("auto", "cpu"))
    sides: str = _parameter("patient", "what left and right mean in the report: the patient's sides or the image's",
                            choices=("patient", "image"))
    liveUpdate: bool = _parameter(True, "in slice mode, segment again about 0.3 s after typing stops")


def parameter_fields() -> dict[str, ParameterField]:
    """Every parameter of :class:`ReportLoopParameters` by name, in declaration order."""
    return {f.name: ParameterField(name=f.name, type=f.type, default=f.default, **f.metadata)
            for f in fields(ReportLoopParameters)}


def describe_parameters() -> str:
    """One line per parameter (name, allowed values, default, meaning), for docstrings and help."""
    lines = []
    for p in parameter_fields().values():
        if p.node_classes:
            allowed = " or ".join(p.node_classes) + ", or None"
        elif p.choices:
            allowed = " | ".join(repr(choice) for choice in p.choices)
        elif p.value_range:
            allowed = f"{p.type.__name__} in [{p.value_range[0]}, {p.value_range[1]}]"
        else:
            allowed = p.type.__name__
        default = "" if p.node_classes else f" = {p.default!r}"
        lines.append(f"{p.name} ({allowed}){default}: {p.meaning}")
    return "\n".join(lines)


ReportLoopParameters.__doc__ = f"{ReportLoopParameters.__doc__}\n\n{describe_parameters()}\n"
