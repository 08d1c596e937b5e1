"""The module's parameter node, built from the engine's declaration of the report loop's parameters
(``languageguidedseg.parameters``: names, types, defaults, allowed values, meanings), so that it cannot drift from
the controller's ``ReportLoopParameters``."""

from typing import Annotated, Union

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from .Engine import importEngine

DOC = """Parameters of the module, saved with the scene; the parameter object of ``languageguidedseg.controller``.

The report is kept here only, where the user can clear it. It is not bound to the report box through
SlicerParameterName: the wrapper's QTextEdit connector rewrites the box on every keystroke and moves the cursor to the
start, so the widget syncs the box by hand.

"""


def parameterAnnotation(field):
    """The ``@parameterNodeWrapper`` annotation of one ``languageguidedseg.parameters.ParameterField``."""
    if field.node_classes:
        nodeClasses = tuple(getattr(slicer, name) for name in field.node_classes)
        if len(nodeClasses) == 1:
            return nodeClasses[0]
        # A Union of node types must include None, or Slicer's serializer cannot write the default and creating the
        # parameter node fails (5.8 to 5.12).
        return Union[nodeClasses + (type(None),)]
    validators = ((Choice(list(field.choices)),) if field.choices else ()) + \
        ((WithinRange(*field.value_range),) if field.value_range else ())
    return Annotated[(field.type,) + validators] if validators else field.type


def parameterNodeClass():
    """The ``@parameterNodeWrapper`` class of the module's parameters: the wrapper reads a class's annotations and
    its class attributes as defaults."""
    parameters = importEngine("parameters")
    fields = parameters.parameter_fields().values()
    namespace = {"__module__": __name__, "__doc__": DOC + parameters.describe_parameters(),
                 "__annotations__": {field.name: parameterAnnotation(field) for field in fields}}
    namespace.update({field.name: field.default for field in fields})
    return parameterNodeWrapper(type("LanguageGuidedSegParameterNode", (), namespace))


LanguageGuidedSegParameterNode = parameterNodeClass()
