import logging
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .Engine import MODULE_DIR, importEngine
from .InstallLogic import LanguageGuidedSegInstallLogic
from .ParameterNode import LanguageGuidedSegParameterNode

# What a run imports, checked in a fresh interpreter of Slicer's Python: the packages of Resources/requirements.txt
# (the engine's core dependencies; Testing/test_slicer_module.py checks that the two agree) and the engine's modules
# that the worker loads.
RUNTIME_MODULES = ("torch", "numpy", "SimpleITK", "safetensors.torch", "tokenizers", "slicerio", "tqdm",
                   "languageguidedseg.inference", "languageguidedseg.bert", "languageguidedseg.imageio",
                   "languageguidedseg.worker")


def sliceNodeForView(viewName):
    """The slice node of a slice view: from the layout when there is one, else the scene's standard node."""
    layoutManager = slicer.app.layoutManager() if hasattr(slicer, "app") else None
    sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager else None
    if sliceWidget:
        return sliceWidget.mrmlSliceNode()
    return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNode" + viewName)


class LanguageGuidedSegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: its parameter node, the dependency installer and the report-loop controller.

    Usable without the widget, e.g. from the Python console:

    >>> logic = LanguageGuidedSegLogic()
    >>> result = logic.process(volumeNode, report="bilateral pulmonary infection ...", scope="volume")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.installer = None
        self.worker = None

    def getParameterNode(self):
        return LanguageGuidedSegParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath():
        return os.path.join(MODULE_DIR, "Resources", "requirements.txt")

    @staticmethod
    def engineFolder():
        """The folder that holds the ``languageguidedseg`` package."""
        return os.path.dirname(os.path.dirname(os.path.abspath(importEngine().__file__)))

    def installLogic(self):
        if self.installer is None:
            self.installer = LanguageGuidedSegInstallLogic.forSlicer(
                self.requirementsPath(), RUNTIME_MODULES, self.engineFolder())
        return self.installer

    @staticmethod
    def missingRuntimeModules():
        """What stops a run, as "name: reason" (empty when a run can start): the runtime packages and what they need
        at allowed versions, and every module a run imports, checked in a fresh interpreter of Slicer's Python."""
        return LanguageGuidedSegInstallLogic(
            LanguageGuidedSegLogic.requirementsPath(), RUNTIME_MODULES,
            LanguageGuidedSegLogic.engineFolder()).missingRuntimeModules()

    def workerProcess(self):
        """The process that runs the model inside the Slicer application, started on the first run; None elsewhere.

        Slicer's GUI thread holds Python's GIL while Qt's event loop waits, so a worker thread would only run while
        the GUI thread runs Python; a process (Slicer's own PythonSlicer interpreter) computes while the GUI is idle.
        """
        if self.worker is None and hasattr(slicer, "app"):
            self.worker = importEngine("worker").find_worker()
            if self.worker is None:
                logging.warning("LanguageGuidedSeg: PythonSlicer not found; the model runs in a thread")
        return self.worker

    def createController(self, parameters, sliceNodeFor=sliceNodeForView, **kwargs):
        """The report-loop controller (``languageguidedseg.controller``) over ``parameters``; inside the Slicer
        application the model runs in :meth:`workerProcess` (elsewhere, or with ``runner=None``, in a thread)."""
        controller = importEngine("controller")
        kwargs.setdefault("runner", self.workerProcess())
        return controller.ReportLoopController(parameters, slice_node_for=sliceNodeFor, **kwargs)

    def close(self):
        """Stop the worker process, if one was started; returns at once (the process stops in the background)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def process(self, inputVolume, outputSegmentation=None, report="", model="", scope="volume", sliceView="Red",
                threshold=0.5, device="auto", sides="patient", timeout=600.0, segmentAnyway=False):
        """Segment ``inputVolume`` (scripted use; blocks until done) and return the result.

        An empty ``report`` approximates it from the image. ``model``: a name, a folder, "auto" (the installed model
        made for the image) or "" (the default model). Returns ``languageguidedseg.mrml.NodeSegmentationResult``, whose
        ``in_domain``, ``domain_warning`` and ``report_warnings`` say when not to trust it; raises the run's error (the
        scene unchanged) when it fails, and LgsegError when the image is outside the model's domain and no report is
        given, unless ``segmentAnyway`` (then the mask is written, without an approximated report).
        """
        controllerModule = importEngine("controller")
        parameters = importEngine("parameters").ReportLoopParameters(
            inputVolume=inputVolume, outputSegmentation=outputSegmentation, report=report or "", model=model or "",
            scope=scope, sliceView=sliceView, threshold=threshold, device=device, sides=sides, liveUpdate=False)
        controller = self.createController(parameters, runner=None)  # this call blocks: a thread is enough
        errors = []
        error = controllerModule.LoopEvent.ERROR
        controller.add_observer(lambda event, payload: errors.append(payload) if event is error else None)
        controller.run(anyway=segmentAnyway)
        try:
            controller.wait(timeout)
        except TimeoutError:
            controller.abandon()  # the worker stops after its current batch; nothing is written
            raise
        if errors:
            raise errors[0]
        if controller.warnings.segment_anyway:
            raise importEngine("errors").LgsegError(
                f"nothing was segmented: {controller.warnings.domain}; give a report, or pass segmentAnyway=True")
        return controller.last_result
