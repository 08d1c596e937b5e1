import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Heavy packages (torch, monai, transformers, the engine itself) are imported inside functions only: the module must
# load with no PyTorch, no network and no GPU, and install nothing until the user presses Apply and agrees.

TORCH_REQUIREMENT = ">=2.1"
# Packages Slicer or the PyTorch extension provide; a dependency install must never replace them.
PROTECTED_PACKAGES = ["torch", "numpy", "SimpleITK"]
POLL_INTERVAL_MS = 100
# Where the GUI thread holds Python's GIL while idle, the worker only runs Python code when the GUI thread lets go:
# each poll sleeps this long so the worker always gets its share (invisible to the user).
GIL_YIELD_SECONDS = 0.02


#
# LanguageGuidedSeg
#


class LanguageGuidedSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Language Guided Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LanguageGuidedSeg contributors"]
        self.parent.helpText = _(
            "Segment the target a radiology report describes, e.g. <i>bilateral pulmonary infection, two infected "
            "areas, lower left lung and middle lower right lung.</i> Leave the report empty and the model "
            "approximates one from the image (shown in the report box, with its similarity): accept it, or edit "
            "it and Apply again to refine. The report stays in this scene only; it is never logged or sent "
            "anywhere. See <a href='https://github.com/LanguageGuidedSeg/SlicerLanguageGuidedSeg/blob/main/docs/"
            "slicer.md'>the tutorial</a>."
        )
        self.parent.acknowledgementText = _(
            "Method after ProLearn (prototype-driven semantic approximation) on a GuideDecoder-style decoder. "
            "Model licences are shown in the Model section."
        )


#
# Engine access: the engine package is installed next to this file by CMake (or found in ../Logic in a source tree).
#


def enginePaths():
    """Folders that may hold the ``languageguidedseg`` package, most specific first."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [here, os.path.join(os.path.dirname(here), "Logic")]


def importEngine(name=""):
    """Import ``languageguidedseg`` (or one of its submodules), adding its folder to ``sys.path`` if needed."""
    for folder in enginePaths():
        if os.path.isfile(os.path.join(folder, "languageguidedseg", "__init__.py")):
            if folder not in sys.path:
                # In front, so the engine shipped with this module wins over any other installed copy.
                sys.path.insert(0, folder)
            break
    return importlib.import_module("languageguidedseg" + ("." + name if name else ""))


def reportDigest(text):
    """A digest to recognise an unedited approximation without keeping a second copy of the report."""
    return hashlib.sha256(" ".join((text or "").split()).encode("utf-8")).hexdigest()


def isOutOfMemory(exc):
    """True for PyTorch's CUDA out-of-memory error (only called after PyTorch raised, so importing it is free)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


#
# LanguageGuidedSegParameterNode
#


@parameterNodeWrapper
class LanguageGuidedSegParameterNode:
    """Parameters of the module, saved with the scene.

    inputVolume - the image to segment (grayscale or RGB).
    outputSegmentation - where the segment is written; None = a new segmentation node is created.
    model - installed model package name; "" = the default model.
    scope - "slice" (the slice shown in sliceView) or "volume" (every slice).
    report - the report text; empty = approximate it from the image. Kept here only, where the user can clear it.
    reportSource - "" | "prototype" (the box holds the approximation) | "given" (the box held the report used).
    reportSimilarity - cosine similarity of the approximation.
    approximationDigest - digest of the approximation put in the box, to tell whether the user edited it.
    threshold - probability threshold.
    device - "auto" (GPU if available) or "cpu".
    """

    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    scope: Annotated[str, Choice(["slice", "volume"])] = "slice"
    sliceView: Annotated[str, Choice(["Red", "Yellow", "Green"])] = "Red"
    report: str = ""
    reportSource: str = ""
    reportSimilarity: float = 0.0
    approximationDigest: str = ""
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: Annotated[str, Choice(["auto", "cpu"])] = "auto"


#
# LanguageGuidedSegWidget
#


class LanguageGuidedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's GUI: binds widgets to the parameter node and drives the logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._pollTimer = None
        self._updatingModels = False
        self._models = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LanguageGuidedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LanguageGuidedSegLogic()
        self.ui.progressBar.setVisible(False)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.clearReportButton.connect("clicked(bool)", self.onClearReport)
        self.ui.reportTextEdit.connect("textChanged()", self.updateReportStatus)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self._abandonRun()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self._abandonRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._setChoiceLabels()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModelInComboBox(self._parameterNode.model)
            self._checkCanApply()

    def _setChoiceLabels(self):
        """connectGui fills the combo boxes with the stored values; show readable labels for the same items."""
        for comboBox, labels in (
            (self.ui.scopeComboBox, [_("Current slice"), _("Whole volume")]),
            (self.ui.sliceViewComboBox, [_("Red view"), _("Yellow view"), _("Green view")]),
            (self.ui.deviceComboBox, [_("Auto (GPU if available)"), _("CPU")]),
        ):
            for index, label in enumerate(labels):
                if index < comboBox.count:
                    comboBox.setItemText(index, label)

    def _checkCanApply(self, caller=None, event=None):
        if self._run is not None:
            return
        node = self._parameterNode
        ready = bool(node and node.inputVolume and self.ui.modelComboBox.count and self._currentModelName() is not None)
        self.ui.applyButton.enabled = ready
        if not node or not node.inputVolume:
            self.ui.applyButton.toolTip = _("Select an input volume.")
        elif not ready:
            self.ui.applyButton.toolTip = _("Install or import a model first (Model section).")
        else:
            self.ui.applyButton.toolTip = _("Segment the input, guided by the report or by its approximation.")
        if node:
            self.ui.sliceViewComboBox.enabled = node.scope == "slice"
        self.updateReportStatus()

    # Report ----------------------------------------------------------------------------------------------------

    def _reportIsUneditedApproximation(self):
        node = self._parameterNode
        return bool(
            node
            and node.reportSource == "prototype"
            and node.report.strip()
            and reportDigest(node.report) == node.approximationDigest
        )

    def updateReportStatus(self):
        node = self._parameterNode
        if not node:
            return
        text = self.ui.reportTextEdit.toPlainText()
        if not text.strip():
            message = _("No report: Apply approximates one from the image and shows it here.")
            style = "color: gray"
        elif node.reportSource == "prototype" and reportDigest(text) == node.approximationDigest:
            message = _(
                "Approximated from the image (similarity {similarity:.2f}), not written by a person. Accept it, or "
                "edit it and Apply again to segment with your text."
            ).format(similarity=node.reportSimilarity)
            style = "color: #b36b00; font-style: italic"
        else:
            message = _("Apply uses this report as written.")
            style = ""
        self.ui.reportStatusLabel.text = message
        self.ui.reportStatusLabel.setStyleSheet(style)

    def onClearReport(self):
        if not self._parameterNode:
            return
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.report = ""
            self._parameterNode.reportSource = ""
            self._parameterNode.reportSimilarity = 0.0
            self._parameterNode.approximationDigest = ""

    # Models ----------------------------------------------------------------------------------------------------

    def refreshModels(self, select=None):
        """Fill the model selector from the installed packages (reads their model.json: no PyTorch needed)."""
        self._updatingModels = True
        try:
            self.ui.modelComboBox.clear()
            models = self.logic.availableModels()
            self._models = {info["name"]: info for info in models}
            for info in models:
                self.ui.modelComboBox.addItem(info["name"])
            if not models:
                self.ui.modelInfoLabel.text = _(
                    "No model installed. Import a model folder, or copy one into the models folder."
                )
        finally:
            self._updatingModels = False
        name = select if select is not None else (self._parameterNode.model if self._parameterNode else "")
        self._selectModelInComboBox(name)

    def _selectModelInComboBox(self, name):
        if self.ui.modelComboBox.count:
            index = self.ui.modelComboBox.findText(name) if name else -1
            if index < 0:
                index = max(self.ui.modelComboBox.findText(self.logic.defaultModelName()), 0)
            self._updatingModels = True
            try:
                self.ui.modelComboBox.currentIndex = index
            finally:
                self._updatingModels = False
            self._showModelInfo()
            if self._parameterNode and self._parameterNode.model != self._currentModelName():
                self._useSelectedModel()
        self._checkCanApply()

    def _currentModelName(self):
        if self.ui.modelComboBox.currentIndex < 0:
            return None
        return self.ui.modelComboBox.currentText

    def _showModelInfo(self):
        info = self._models.get(self._currentModelName())
        if not info:
            return
        self.ui.modelInfoLabel.text = _("{task}\nLicence: {licence} | {size:.0f} MB | {source} model").format(
            task=info.get("task") or info["name"],
            licence=info.get("licence") or _("not stated"),
            size=float(info.get("size_mb") or 0.0),
            source=info.get("source", ""),
        )

    def onModelSelected(self, index):
        if self._updatingModels or index < 0:
            return
        self._showModelInfo()
        self._useSelectedModel()

    def _useSelectedModel(self):
        """Store the selected model; its own tuned threshold becomes the starting threshold."""
        if not self._parameterNode:
            return
        info = self._models.get(self._currentModelName()) or {}
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.model = self._currentModelName() or ""
            if info.get("threshold") is not None:
                self._parameterNode.threshold = min(max(float(info["threshold"]), 0.01), 0.99)

    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Choose a model folder (with model.json and model.safetensors)")
        )
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the model."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            info = self.logic.importModel(folder)
            self.refreshModels(select=info["name"])
            self.ui.statusLabel.text = _("Imported model '{name}'.").format(name=info["name"])

    def onOpenModelsFolder(self):
        folder = self.logic.userModelsFolder()
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # Running ---------------------------------------------------------------------------------------------------

    def _sliceNode(self, viewName):
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager else None
        if sliceWidget:
            return sliceWidget.mrmlSliceNode()
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNode" + viewName)

    def _reportToUse(self):
        """The report for the next run: None re-approximates (empty box or an unedited approximation)."""
        if self._reportIsUneditedApproximation():
            return None
        text = self._parameterNode.report
        return text if text.strip() else None

    def onApplyButton(self):
        if self._run is not None:
            self._run.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current batch...")
            return
        node = self._parameterNode
        self.ui.statusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("Dependencies are not installed; nothing was changed.")
                return
            options = dict(
                report=self._reportToUse(),
                model=self._currentModelName(),
                threshold=node.threshold,
                device=node.device,
            )
            if node.scope == "slice":
                # One slice is fast enough to run in the GUI thread: no dialog, no progress bar.
                result = self.logic.process(
                    node.inputVolume, node.outputSegmentation, scope="slice",
                    sliceNode=self._sliceNode(node.sliceView), **options
                )
                self._showResult(result)
            else:
                job = self.logic.createJob(node.inputVolume, scope="volume", **options)
                self._startRun(job)

    def _abandonRun(self):
        """Cancel a running job and drop its result: its volume belongs to a scene that is going away."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._run is not None:
            self._run.cancel()
            self._run = None
            self._setRunning(False)

    def _startRun(self, job):
        self._run = LanguageGuidedSegRun(self.logic, job)
        self._setRunning(True)
        self._run.start()
        self._pollTimer.start()

    def _setRunning(self, running):
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.modelCollapsibleButton):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.setMaximum(max(self._run.job.dimensions[self._run.job.axis], 1))
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Loading the model...")

    def onPollRun(self):
        """Timer slot: mirror the worker's progress; on completion write the result (main thread only)."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        if run.total:
            self.ui.progressBar.setMaximum(run.total)
            self.ui.progressBar.setValue(run.done)
            if not run.cancelRequested:
                self.ui.statusLabel.text = _("Segmenting slice {done} of {total}...").format(
                    done=run.done, total=run.total
                )
        if not run.finished:
            time.sleep(GIL_YIELD_SECONDS)
            return
        self._pollTimer.stop()
        self._run = None
        self._setRunning(False)
        try:
            if run.cancelled:
                self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
                return
            if run.error is not None:
                if isinstance(run.error, Exception):
                    slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=run.error))
                    self.ui.statusLabel.text = _("Failed; the scene was not changed.")
                    return
                raise run.error
            with slicer.util.tryWithErrorDisplay(_("Could not write the segment."), waitCursor=True):
                result = self.logic.writeJob(run.job, self._parameterNode.outputSegmentation)
                self._showResult(result)
        finally:
            self._checkCanApply()

    def _showResult(self, result):
        node = self._parameterNode
        with slicer.util.NodeModify(node):
            node.outputSegmentation = result.segmentation_node
            if result.report_source == "prototype":
                node.report = result.report
                node.reportSource = "prototype"
                node.reportSimilarity = float(result.similarity or 0.0)
                node.approximationDigest = reportDigest(result.report)
            else:
                node.reportSource = "given"
                node.approximationDigest = ""
        fraction = result.foreground_fraction
        if result.slice_index is not None:
            where = _("slice {index}").format(index=result.slice_index)
            region = [slice(None)] * 3
            region[2 - result.axis] = result.slice_index
            fraction = float(result.mask[tuple(region)].mean())
        else:
            where = _("the volume")
        guidance = _("your report") if result.report_source == "given" else _("the approximated report")
        message = _("Done in {seconds:.1f} s on {device}, guided by {guidance}: {fraction:.1%} of {where} is "
                    "in segment '{segment}'.").format(
            seconds=result.seconds, device=self.logic.deviceName(), guidance=guidance, fraction=fraction,
            where=where, segment=result.segmentation_node.GetSegmentation().GetSegment(result.segment_id).GetName(),
        )
        if self.logic.fellBackToCpu:
            message += " " + _("The GPU ran out of memory, so it ran on the CPU.")
        self.ui.statusLabel.text = message
        self.updateReportStatus()


class LanguageGuidedSegRun:
    """Runs a segmentation job's compute step in a worker thread; the widget polls it from a QTimer.

    The worker touches no MRML node (the job holds a copy of the voxels), so the GUI stays responsive and a cancelled
    or failed run leaves the scene as it was. The timer's Python calls also give the worker regular GIL time.
    """

    def __init__(self, logic, job):
        self.logic = logic
        self.job = job
        self.done = 0
        self.total = 0
        self.finished = False
        self.cancelled = False
        self.error = None
        self._cancelEvent = threading.Event()
        self._thread = threading.Thread(target=self._work, name="LanguageGuidedSeg", daemon=True)

    @property
    def cancelRequested(self):
        return self._cancelEvent.is_set()

    def start(self):
        self._thread.start()

    def cancel(self):
        self._cancelEvent.set()

    def _progress(self, done, total):
        self.done, self.total = done, total

    def _work(self):
        try:
            self.logic.computeJob(self.job, progress=self._progress, cancel=self._cancelEvent.is_set)
        except BaseException as exc:  # handed to the GUI thread, which reports it
            if type(exc).__name__ == "SegmentationCancelled":
                self.cancelled = True
            else:
                self.error = exc
        finally:
            self.finished = True


#
# LanguageGuidedSegLogic
#


class LanguageGuidedSegLogic(ScriptedLoadableModuleLogic):
    """Delegates to the engine (``languageguidedseg``); usable without the widget, e.g. from the Python console:

    >>> logic = LanguageGuidedSegLogic()
    >>> result = logic.process(volumeNode, None, report="bilateral pulmonary infection ...")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None
        self._segmenterKey = None
        self._segmenterLock = threading.Lock()
        self.dependenciesReady = False
        self.fellBackToCpu = False

    def getParameterNode(self):
        return LanguageGuidedSegParameterNode(super().getParameterNode())

    # Dependencies ----------------------------------------------------------------------------------------------

    def ensureDependencies(self):
        """PyTorch through the PyTorch extension, then the engine's other packages, only if the user agrees.

        Returns False when the user declines; raises with a message when an install fails.
        """
        if self.dependenciesReady:
            return True
        if not self._ensureTorch():
            return False
        if not self._ensurePackages():
            return False
        self.dependenciesReady = True
        return True

    def _ensureTorch(self):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            PyTorchUtils = None
        if PyTorchUtils is None:
            if importlib.util.find_spec("torch") is not None:
                return True
            raise RuntimeError(
                _("This module needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, restart "
                  "Slicer, and press Apply again.")
            )
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        return torch is not None

    def requirementsPath(self):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def _ensurePackages(self):
        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            requirements = packaging.load_requirements(self.requirementsPath())
            kwargs = {"requester": "LanguageGuidedSeg"}
            import inspect

            if "skip_packages" in inspect.signature(packaging.pip_ensure).parameters:
                kwargs["skip_packages"] = PROTECTED_PACKAGES
            try:
                packaging.pip_ensure(requirements, **kwargs)  # asks the user before installing anything
            except RuntimeError:  # the user declined
                return False
            return True
        missing = self.missingRequirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("LanguageGuidedSeg needs these Python packages, which will be downloaded and installed into Slicer's "
              "Python: {packages}. Continue?").format(packages=", ".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return False
        slicer.util.pip_install(missing)
        return True

    def missingRequirements(self):
        """Requirement lines of requirements.txt that are not installed or too old (no pip needed to check)."""
        from importlib import metadata

        try:
            from packaging.requirements import Requirement
        except ImportError:
            Requirement = None
        missing = []
        with open(self.requirementsPath(), encoding="utf-8") as requirementsFile:
            for line in requirementsFile:
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if Requirement is None:
                    name = line.split(">")[0].split("=")[0].split("<")[0].strip()
                    try:
                        metadata.version(name)
                    except metadata.PackageNotFoundError:
                        missing.append(line)
                    continue
                requirement = Requirement(line)
                try:
                    installed = metadata.version(requirement.name)
                except metadata.PackageNotFoundError:
                    missing.append(line)
                    continue
                if installed not in requirement.specifier:
                    missing.append(line)
        return missing

    # Models ----------------------------------------------------------------------------------------------------

    # The engine's package module imports no PyTorch, so the list is shown before PyTorch is installed (the weights
    # are verified, with PyTorch, only when a model is loaded).

    def defaultModelName(self):
        return importEngine("package").DEFAULT_MODEL

    def userModelsFolder(self):
        """The user's models folder (``LGSEG_MODELS``, else the platform's data folder)."""
        return str(importEngine("package").user_models_folder())

    def availableModels(self):
        """Installed model packages as dicts (name, task, licence, version, size_mb, path, source, threshold).

        A user model shadows an installed one of the same folder name.
        """
        return [info.to_dict() for info in importEngine("package").list_models()]

    def importModel(self, folder):
        info = importEngine("package").import_model(folder)
        return {"name": info.name, "licence": info.licence, "path": str(info.path)}

    # Segmenting ------------------------------------------------------------------------------------------------

    def segmenter(self, model=None, device="auto"):
        """The loaded model, cached: loading takes seconds, a slice takes milliseconds."""
        key = (model or "", device)
        with self._segmenterLock:
            if self._segmenter is None or self._segmenterKey != key:
                self._segmenter = None  # free the old model before loading another
                self._segmenter = importEngine("mrml").load_segmenter(model, device)
                self._segmenterKey = key
            return self._segmenter

    def deviceName(self):
        """Where the loaded model runs: "CPU" or "GPU (name)"."""
        device = getattr(self._segmenter, "device", None)
        if device is None or getattr(device, "type", "cpu") != "cuda":
            return "CPU"
        import torch

        return f"GPU ({torch.cuda.get_device_name(device)})"

    def createJob(self, inputVolume, report=None, model=None, scope="volume", sliceNode=None, sliceIndex=None,
                  axis=None, threshold=None, device="auto"):
        """Snapshot the volume (main thread); see ``languageguidedseg.mrml.SegmentationJob``."""
        mrml = importEngine("mrml")
        return mrml.SegmentationJob(
            inputVolume, report=report, model=model, scope=scope, slice_index=sliceIndex, axis=axis,
            threshold=threshold, device=device, slice_node=sliceNode,
        )

    def computeJob(self, job, progress=None, cancel=None):
        """Run the model (any thread); if the GPU runs out of memory, run again on the CPU instead of failing."""
        self.fellBackToCpu = False
        job.segmenter = self.segmenter(job.model, job.device)
        try:
            return job.compute(progress=progress, cancel=cancel)
        except Exception as exc:
            if not isOutOfMemory(exc) or str(getattr(job.segmenter, "device", "cpu")).startswith("cpu"):
                raise
        logging.warning("LanguageGuidedSeg: the GPU ran out of memory; running on the CPU")
        with self._segmenterLock:
            self._segmenter = None
        job.segmenter = None
        import torch

        torch.cuda.empty_cache()
        job.segmenter = self.segmenter(job.model, "cpu")
        self.fellBackToCpu = True
        return job.compute(progress=progress, cancel=cancel)

    def writeJob(self, job, outputSegmentation=None):
        """Write the result (main thread); a new segmentation node is created when none is given."""
        if outputSegmentation is None:
            outputSegmentation = importEngine("mrml").new_segmentation_node(job.volume_node)
        return job.write(outputSegmentation)

    def process(self, inputVolume, outputSegmentation, report=None, model=None, scope="volume", sliceNode=None,
                sliceIndex=None, axis=None, threshold=None, device="auto", progress=None, cancel=None):
        """Segment ``inputVolume`` into one segment of ``outputSegmentation`` (created if None) and return the result.

        :param report: the report text; None or empty = approximate it from the image (prototype bank).
        :param model: installed model name or model folder; None = the default model.
        :param scope: "volume" (every slice along ``axis``) or "slice" (``sliceIndex`` along ``axis``, or the slice
            that ``sliceNode`` shows; only that slice of the segment changes).
        :returns: ``languageguidedseg.mrml.NodeSegmentationResult`` (mask, report, report_source, segment_id,
            similarity, segmentation_node, ...). Nothing in the scene changes when it fails or is cancelled.
        """
        if not inputVolume:
            raise ValueError(_("Select an input volume."))
        job = self.createJob(inputVolume, report=report, model=model, scope=scope, sliceNode=sliceNode,
                             sliceIndex=sliceIndex, axis=axis, threshold=threshold, device=device)
        self.computeJob(job, progress=progress, cancel=cancel)
        return self.writeJob(job, outputSegmentation)


#
# LanguageGuidedSegTest
#


class LanguageGuidedSegTest(ScriptedLoadableModuleTest):
    """Runs the logic on a small synthetic volume inside Slicer (a tiny random model when none is installed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleLoadsWithoutEngine()
        self.setUp()
        self.test_LogicOnSyntheticVolume()

    def test_ModuleLoadsWithoutEngine(self):
        """The logic and the parameter node work before any heavy package is imported."""
        logic = LanguageGuidedSegLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.scope, "slice")
        self.assertEqual(parameterNode.report, "")
        self.assertTrue(os.path.isfile(logic.requirementsPath()))

    def _engineAvailable(self):
        try:
            importEngine("mrml")
            importEngine("inference")
            return True
        except ImportError as exc:
            logging.info(f"LanguageGuidedSeg self-test: engine dependencies missing ({exc}); install them first")
            return False

    def _tinyModel(self, folder):
        """A random-weight model package, so the test needs no download and no installed model."""
        import torch

        network = importEngine("network")
        package = importEngine("package")
        preprocess = importEngine("preprocess")
        torch.manual_seed(0)
        net = network.LanguageGuidedSegNet(network.NetworkConfig(bank_size=4, decoder_channels=(64, 48, 32, 24, 16)))
        net.bank.fill(torch.randn(4, 384), torch.randn(4, 384), torch.arange(4))
        config = package.ModelConfig(
            name="selftest", task="self-test", licence="Apache-2.0",
            preprocessing=preprocess.PreprocessConfig().to_dict(), segment_name="Target",
            segment_color=(0.2, 0.8, 0.3), prototype_reports=[f"report {i}" for i in range(4)],
        )
        return str(package.save_package(os.path.join(folder, "selftest"), net, config))

    def test_LogicOnSyntheticVolume(self):
        self.delayDisplay("Starting the logic test")
        if not self._engineAvailable():
            self.skipTest("the engine's Python dependencies are not installed")
        import numpy as np

        mrml = importEngine("mrml")
        inference = importEngine("inference")
        voxels = np.zeros((3, 48, 64), dtype=np.int16)
        voxels[:, 10:30, 20:40] = 800
        ijkToRAS = np.array([[-0.8, 0, 0, 5], [0, -0.6, 0, -3], [0, 0, 2.5, 10], [0, 0, 0, 1]])
        volumeNode = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijkToRAS, name="synthetic")
        logic = LanguageGuidedSegLogic()
        with tempfile.TemporaryDirectory() as folder:
            model = self._tinyModel(folder)

            # Whole volume, no report: the approximation is returned, a new segmentation node is created.
            result = logic.process(volumeNode, None, model=model, threshold=0.5, device="cpu")
            self.assertEqual(result.report_source, "prototype")
            self.assertTrue(result.report.startswith("report "))
            segmentationNode = result.segmentation_node
            self.assertIsNotNone(segmentationNode)
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), 1)
            segment = segmentation.GetSegment(result.segment_id)
            self.assertEqual(segment.GetName(), "Target")
            stored = mrml.segment_mask(segmentationNode, result.segment_id, volumeNode)
            self.assertTrue(np.array_equal(stored, result.mask))
            self.assertTrue(np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(
                segmentationNode, result.segment_id, volumeNode), result.mask))

            # Slice mode with a report: only that slice changes, the same segment is reused.
            before = stored.copy()
            second = logic.process(volumeNode, segmentationNode, report="one target, upper left", model=model,
                                   scope="slice", sliceIndex=1, axis=2, threshold=0.45, device="cpu")
            self.assertEqual(second.segment_id, result.segment_id)
            self.assertEqual(second.report_source, "given")
            after = mrml.segment_mask(segmentationNode, second.segment_id, volumeNode)
            self.assertTrue(np.array_equal(after[[0, 2]], before[[0, 2]]))

            # A cancelled run changes nothing.
            nodes = slicer.mrmlScene.GetNumberOfNodes()
            with self.assertRaises(inference.SegmentationCancelled):
                logic.process(volumeNode, None, model=model, device="cpu", cancel=lambda: True)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        self.delayDisplay("Test passed")
