import logging
import os
import sys
import tempfile
import unittest

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LanguageGuidedSegLib import DependencyError, LanguageGuidedSegLogic, LanguageGuidedSegParameterNode, importEngine

# Heavy packages (torch, safetensors, tokenizers) are imported inside functions only, by the engine when a run starts:
# the module must load with no PyTorch, no network and no GPU, and install nothing until the user presses Apply and
# agrees. The report loop itself lives in the engine (languageguidedseg.controller), shared with the web page.

POLL_INTERVAL_MS = 20

__all__ = ["LanguageGuidedSeg", "LanguageGuidedSegLogic", "LanguageGuidedSegParameterNode", "LanguageGuidedSegTest",
           "LanguageGuidedSegWidget"]


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
            "approximates one from the image (shown in the report box, with the similarity of the nearest prototype "
            "report, not a confidence): accept it, or edit it to refine; in slice mode the segment follows while you "
            "type. An image unlike the model's training images gets a warning beside the report box instead of an "
            "approximated report: type a report, or press Segment anyway. The model 'Automatic' picks the installed "
            "model made for the input. Left and right mean the patient's sides. The report stays in this scene "
            "only; it is never logged or sent anywhere. See <a "
            "href='https://github.com/LanguageGuidedSeg/SlicerLanguageGuidedSeg/blob/main/docs/slicer.md'>the "
            "tutorial</a>."
        )
        self.parent.acknowledgementText = _(
            "Method after ProLearn (prototype-driven semantic approximation) on a GuideDecoder-style decoder. "
            "Model licences are shown in the Model section."
        )


class LanguageGuidedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the Qt widgets to the parameter node and the report-loop controller; holds no logic of its own."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._updatingModels = False
        self._eventHandlers = {}
        self._shownWarnings = None
        self._shownSides = None  # the sides convention shown last: a change re-runs the live update

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LanguageGuidedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LanguageGuidedSegLogic()
        self.ui.progressBar.setVisible(False)
        LoopEvent = importEngine("controller").LoopEvent  # the controller's events, each with its handler
        self._autoModel = importEngine("options").AUTO_MODEL  # the model selector's "Automatic"
        self._eventHandlers = {
            LoopEvent.RUNNING: self._showRunning,
            LoopEvent.PROGRESS: self._showProgress,
            LoopEvent.STATUS: self._showStatus,
            LoopEvent.REPORT: self._showReportStatus,
            LoopEvent.PENDING: lambda payload: self._startPolling(),
            LoopEvent.RESULT: self._showResult,
            LoopEvent.ERROR: self._showError,
            LoopEvent.WARNINGS: self._showWarnings,
        }

        # The model runs in a worker process (the logic's workerProcess), which never touches Qt or MRML; this timer
        # runs only while a run is running or pending and hands its news to the widgets. No sleeping on the GUI
        # thread.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.clearReportButton.connect("clicked(bool)", lambda: self.controller and self.controller.clear_report())
        self.ui.segmentAnywayButton.connect("clicked(bool)", self.onSegmentAnyway)
        self.ui.reportTextEdit.connect("textChanged()", self.onReportEdited)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.initializeParameterNode()

    def cleanup(self):
        self.setParameterNode(None)
        self.removeObservers()
        self.logic.close()  # returns at once: the worker process stops in the background

    def onReload(self):
        """Reload the library and the engine too, not only this file (Slicer's Reload), as SlicerNNUnet does: their
        modules are imported afresh by the new widget, and this widget's cleanup stops the worker process, so the next
        run starts one that loads the same code from disk."""
        for name in list(sys.modules):
            if name.split(".")[0] in ("LanguageGuidedSegLib", "languageguidedseg"):
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # Keep a running segmentation going, but stop following the slice views while the module is hidden.
        if self.controller:
            self.controller.unwatch_slices()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.inputVolume = firstVolumeNode
        # getParameterNode wraps the scene's node anew each time: compare the MRML nodes, so that re-entering the
        # module keeps the controller and a run in progress.
        if self._parameterNode is None or parameterNode.parameterNode is not self._parameterNode.parameterNode:
            self.setParameterNode(parameterNode)
        elif self.controller:
            self.controller.watch_slices()

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterChanged)
        if self.controller:
            self.controller.abandon()  # its scene is going away: drop the run and its result
            self._pollTimer.stop()
            self._showRunning(False)
        self._parameterNode, self.controller, self._shownSides = parameterNode, None, None
        if not parameterNode:
            return
        # Live refine runs only once the dependencies are there (else the first Apply installs them, after asking).
        self.controller = self.logic.createController(parameterNode, live_allowed=self.logic.installLogic().isReady)
        self.controller.add_observer(self.onControllerEvent)
        self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
        self._setChoiceLabels()
        self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self.refreshModels()
        self._showReportStatus(self.controller.report_status())
        self._showWarnings(self.controller.warnings)
        self.controller.watch_slices()
        self.onParameterChanged()

    def _setChoiceLabels(self):
        """connectGui fills the combo boxes with the stored values; show readable labels for the same items."""
        for comboBox, labels in (
            (self.ui.scopeComboBox, [_("Current slice"), _("Whole volume")]),
            (self.ui.sliceViewComboBox, [_("Red view"), _("Yellow view"), _("Green view")]),
            (self.ui.deviceComboBox, [_("Auto (GPU if available)"), _("CPU")]),
            (self.ui.sidesComboBox, [_("Patient's sides"), _("Image sides")]),
        ):
            for index, label in enumerate(labels[:comboBox.count]):
                comboBox.setItemText(index, label)

    def onParameterChanged(self, caller=None, event=None):
        if not self.controller:
            return
        self.ui.sliceViewComboBox.enabled = self._parameterNode.scope == "slice"
        self.ui.liveUpdateCheckBox.enabled = self._parameterNode.scope == "slice"
        if self._shownSides is not None and self._parameterNode.sides != self._shownSides:
            self._settingsChanged()  # the same words now name the other sides: the mask follows, as after an edit
        self._shownSides = self._parameterNode.sides
        self._showSidesLabel()
        self._showApplyButton()
        if self.controller.warnings != self._shownWarnings:  # e.g. another input volume: its own warnings, or none
            self._showWarnings(self.controller.warnings)
        self._showModelTitle()

    def _showApplyButton(self):
        """The button says what a click does: Cancel while an Apply runs (in both scopes, loading the model included),
        else Apply (after a running live update, which never cancels an Apply)."""
        if self.controller.apply_cancels:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Stop the segmentation after its current batch; the scene stays as it was.")
            return
        ready, why = self.controller.can_run()
        self.ui.applyButton.text = _("Apply")
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = why or _("Segment the input, guided by the report or by its approximation.")

    def _longRun(self):
        """A whole-volume run started with Apply: it locks the inputs and shows its progress."""
        return bool(self.controller and self.controller.apply_cancels and self._parameterNode.scope == "volume")

    # Report box: synced by hand, so the user's cursor never moves while typing -------------------------------------

    def onReportEdited(self):
        if self.controller:
            self.controller.set_report(self.ui.reportTextEdit.toPlainText())
            self._startPolling()

    def _showReportStatus(self, status):
        if self.ui.reportTextEdit.toPlainText() != status.text:
            self.ui.reportTextEdit.setPlainText(status.text)  # only when the controller changed the text
        self.ui.reportStatusLabel.text = status.message
        self.ui.reportStatusLabel.setStyleSheet(
            {"empty": "color: gray", "approximated": "color: #b36b00; font-style: italic"}.get(status.kind, ""))

    # Controller events ----------------------------------------------------------------------------------------------

    def onControllerEvent(self, event, payload):
        handler = self._eventHandlers.get(event)
        if handler:
            handler(payload)

    def _showProgress(self, progress):
        self.ui.progressBar.setMaximum(max(progress[1], 1))
        self.ui.progressBar.setValue(progress[0])

    def _showStatus(self, message):
        self.ui.statusLabel.text = message

    def _showSidesLabel(self):
        self.ui.sidesLabel.text = self.controller.sides_label()

    def _showResult(self, result):
        self._showSidesLabel()
        self._showModelTitle()

    def _showWarnings(self, warnings):
        """Beside the report box, not a dialog: the warnings stay until a result has none; "Segment anyway" is
        offered where a run without a report was held back."""
        self._shownWarnings = warnings
        lines = ([_("Warning: {warning}.").format(warning=warnings.domain)] if warnings.domain else []) + [
            _("Report check: {warning}.").format(warning=warning) for warning in warnings.report]
        self.ui.warningsLabel.text = "\n".join(lines)
        self.ui.warningsLabel.setVisible(bool(lines))
        self.ui.segmentAnywayButton.setVisible(warnings.segment_anyway)

    def _showError(self, error):
        if self.controller.last_run_kind == "apply":  # a failed live update only says so in the status line
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error))

    def _showRunning(self, running):
        longRun = running and self._longRun()
        for widget in (self.ui.outputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.inputVolumeSelector,
                       self.ui.scopeComboBox):
            widget.enabled = not longRun
        self.ui.progressBar.setVisible(longRun)
        self.ui.progressBar.setValue(0)
        if running:
            self._showApplyButton()
            self._startPolling()
        else:
            self.onParameterChanged()

    def _startPolling(self):
        if self.controller and (self.controller.running or self.controller.live_pending):
            self._pollTimer.start()

    def onPoll(self):
        if not self.controller or not self.controller.poll():
            self._pollTimer.stop()

    # Buttons --------------------------------------------------------------------------------------------------------

    def onApplyButton(self):
        if not self.controller.running and not self._ensureInstalled():
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.controller.apply()
            self._startPolling()

    def onSegmentAnyway(self):
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.controller.segment_anyway()
            self._startPolling()

    def _ensureInstalled(self):
        """Check (and with the user's consent install) the dependencies; False when a run cannot start. Install
        errors get their own title and say what to do; the questions are asked without the busy cursor."""
        try:
            if self.logic.installLogic().ensure():
                return True
            self.ui.statusLabel.text = _("Dependencies are not installed; nothing was changed.")
        except DependencyError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("LanguageGuidedSeg - Installing dependencies failed"))
        return False

    # Models ---------------------------------------------------------------------------------------------------------

    def refreshModels(self, select=None):
        """Fill the model selector from the installed packages (their model.json: no PyTorch needed)."""
        models = self.controller.available_models()
        self._updatingModels = True
        try:
            self.ui.modelComboBox.clear()
            # Each item's data is the model's name; its text says which model "auto" chose for the input.
            for name in [self._autoModel] + [info["name"] for info in models]:
                self.ui.modelComboBox.addItem(self.controller.model_title(name), name)
            name = select or self._parameterNode.model or self.controller.default_model_name()
            self.ui.modelComboBox.currentIndex = max(self.ui.modelComboBox.findData(name), 0) if models else -1
        finally:
            self._updatingModels = False
        if not models:
            self.ui.modelInfoLabel.text = _("No model installed. Import a model folder, or copy one into the models "
                                            "folder.")
            return
        self.onModelSelected(self.ui.modelComboBox.currentIndex)

    def onModelSelected(self, index):
        if self._updatingModels or index < 0 or not self.controller:
            return
        name = self.ui.modelComboBox.itemData(index)
        if self._parameterNode.model != name:
            self.controller.select_model(name)
            self._settingsChanged()
        self._showModelInfo()

    def _settingsChanged(self):
        self.controller.settings_changed()
        self._startPolling()

    def _showModelInfo(self):
        name = self._parameterNode.model
        if name == self._autoModel and not self.controller.model_choice():
            self.ui.modelInfoLabel.text = _("Chooses the installed model whose training images the input looks like, "
                                            "when it runs.")
            return
        name = self.controller.model_choice() or name
        info = {m["name"]: m for m in self.controller.available_models()}.get(name, {})
        self.ui.modelInfoLabel.text = _("{task}\nLicence: {licence} | {size:.0f} MB | {source} model").format(
            task=info.get("task") or name, licence=info.get("licence") or _("not stated"),
            size=float(info.get("size_mb") or 0.0), source=info.get("source", ""))

    def _showModelTitle(self):
        """The "Automatic" item names the model chosen for the current input ("Automatic (qata-cxr)")."""
        index = self.ui.modelComboBox.findData(self._autoModel)
        title = self.controller.model_title(self._autoModel)
        if index >= 0 and self.ui.modelComboBox.itemText(index) != title:
            self.ui.modelComboBox.setItemText(index, title)
            self._showModelInfo()

    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Choose a model folder (with model.json and model.safetensors)"))
        if not folder:
            return
        if not self._ensureInstalled():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the model."), waitCursor=True):
            info = self.controller.import_model(folder)
            self.refreshModels(select=info["name"])
            self.ui.statusLabel.text = _("Imported model '{name}'.").format(name=info["name"])

    def onOpenModelsFolder(self):
        folder = self.controller.user_models_folder()
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))


class LanguageGuidedSegTest(ScriptedLoadableModuleTest):
    """The module's self-test: the parameter node and the whole report loop on a small synthetic volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run every test_ method through unittest and report all their failures at once; a skipped test fails too:
        nothing the self-test checks is optional."""
        result = unittest.TestResult()
        unittest.defaultTestLoader.loadTestsFromTestCase(type(self)).run(result)
        problems = result.failures + result.errors + result.skipped
        if problems:
            raise AssertionError("\n".join(f"{test.id()} failed:\n{trace}" for test, trace in problems))
        logging.info(f"LanguageGuidedSeg self-test: {result.testsRun} run, all passed")

    def test_ParameterNodeDefaults(self):
        """The parameter node is created and holds the defaults before any heavy package is imported."""
        moduleNode = LanguageGuidedSegLogic().getParameterNode().parameterNode
        self.assertEqual(moduleNode.GetAttribute("ModuleName"), "LanguageGuidedSeg")
        # A new node: the module's own one is a scene singleton, which keeps an earlier run's values.
        parameterNode = LanguageGuidedSegParameterNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
        self.assertIsNone(parameterNode.inputVolume)
        self.assertEqual((parameterNode.scope, parameterNode.report, parameterNode.sides), ("slice", "", "patient"))
        self.assertTrue(parameterNode.liveUpdate)
        # Every parameter holds the default that the engine declares for the report loop (plain Python, no torch).
        defaults = vars(importEngine("parameters").ReportLoopParameters())
        self.assertEqual({name: getattr(parameterNode, name) for name in defaults}, defaults)

    def _tinyModel(self, folder):
        """A random-weight model package, so the test needs no download and no installed model."""
        import torch

        config, network, package = importEngine("config"), importEngine("network"), importEngine("package")
        generator = torch.Generator().manual_seed(0)
        net = network.LanguageGuidedSegNet(config.NetworkConfig(bank_size=4, decoder_channels=(64, 48, 32, 24, 16)))
        net.bank.fill(torch.randn(4, 384, generator=generator), torch.randn(4, 384, generator=generator),
                      torch.arange(4))
        card = config.ModelCard(task="self-test", licence="Apache-2.0", segment_name="Target",
                                segment_color=(0.2, 0.8, 0.3))
        modelConfig = config.ModelConfig(
            name="selftest", card=card, prototype_reports=[f"report {i}" for i in range(4)], report_sides="image")
        return str(package.save_package(os.path.join(folder, "selftest"), net, modelConfig))

    def test_ReportLoopOnSyntheticVolume(self):
        # A failure, not a skip: a module whose report loop cannot run is broken, whatever the reason.
        missing = LanguageGuidedSegLogic.missingRuntimeModules()
        if missing:
            self.fail("the report loop cannot run; install the module's dependencies (press Apply in the module) "
                      "and test again. Missing: " + "; ".join(missing))
        import numpy as np

        mrml = importEngine("mrml")
        voxels = np.zeros((3, 48, 64), dtype=np.int16)
        voxels[:, 10:30, 20:40] = 800
        ijkToRAS = np.array([[-0.8, 0, 0, 5], [0, -0.6, 0, -3], [0, 0, 2.5, 10], [0, 0, 0, 1]])
        volumeNode = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijkToRAS, name="synthetic")
        logic = LanguageGuidedSegLogic()
        parameterNode = logic.getParameterNode()
        with tempfile.TemporaryDirectory() as folder:
            self.addCleanup(logic.close)  # the worker process, inside Slicer
            parameterNode.inputVolume = volumeNode
            parameterNode.model = self._tinyModel(folder)
            parameterNode.scope = "volume"
            parameterNode.device = "cpu"
            controller = logic.createController(parameterNode)
            errors = []
            error = importEngine("controller").LoopEvent.ERROR
            controller.add_observer(lambda event, payload: errors.append(payload) if event is error else None)

            # An empty box: the approximation fills it, marked as such; a new segmentation node is created.
            controller.run()
            controller.wait(120)
            self.assertEqual(errors, [])
            self.assertEqual(controller.report_status().kind, "approximated")
            self.assertTrue(parameterNode.report.startswith("report "))
            segmentationNode = parameterNode.outputSegmentation
            segmentId = controller.last_result.segment_id
            self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "Target")
            self.assertTrue(np.array_equal(mrml.segment_mask(segmentationNode, segmentId, volumeNode),
                                           controller.last_result.mask))

            # An edited report is used as written; a cancelled run changes nothing.
            controller.set_report("one target, upper left")
            controller.run()
            controller.wait(120)
            self.assertEqual(controller.last_result.report_source, "given")
            nodes = slicer.mrmlScene.GetNumberOfNodes()
            before = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
            controller.set_report("")
            controller.run()
            controller.cancel()
            controller.wait(120)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
            self.assertTrue(np.array_equal(mrml.segment_mask(segmentationNode, segmentId, volumeNode), before))
