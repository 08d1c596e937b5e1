"""The report loop, shared by the 3D Slicer module and the web page: plain Python, no Qt, no GUI.

A front end (the Slicer widget, the trame web app) wires its widgets to one :class:`ReportLoopController` and
renders what the controller tells its observers. The controller owns the loop a clinician works in:

* an empty report box -> the model approximates the report from the image (prototype bank), the box is filled
  with it and marked as an approximation, with its prototype similarity (how close the nearest prototype report is,
  not a confidence);
* an image outside the model's domain (``in_domain`` False) and no report -> nothing is written and the box stays
  empty: the warning says what the model was made for (:attr:`warnings`), and the user types a report or confirms
  with :meth:`segment_anyway`; a report given on such an image segments as usual, the warning kept;
* the model ``"auto"`` (the default) -> the runner chooses the installed model made for the input, once per input
  volume (:meth:`model_choice`; live edits reuse it);
* an unedited approximation -> approximated again for the current image or slice;
* an edited or typed report -> used as written;
* run / cancel / progress / result, the model choice and import, the device choice with a CPU fallback when the
  GPU runs out of memory, and live refine: in slice mode, a pause in typing (``debounce_s``, 0.3 s) re-segments the
  current slice, dropping a run that a newer edit made stale; moving to another slice while the box holds an
  approximation re-approximates for that slice.

State lives in a plain *parameter object*, read and written through the attributes that
:mod:`languageguidedseg.parameters` declares (names, types, defaults, allowed values, meanings): the Slicer module's
parameter node is built from that declaration; a web app or a script passes its
:class:`~languageguidedseg.parameters.ReportLoopParameters`.

Threading: call every method from one thread, the GUI thread. :meth:`run` snapshots the volume (a copy of the
voxels) and hands it to a *runner* (:mod:`languageguidedseg.runner`) that loads the model and segments away from
the GUI thread: a :class:`~languageguidedseg.runner.ThreadRunner` (the default), or the worker process of
:mod:`languageguidedseg.worker` that the Slicer module passes (3D Slicer's GUI thread holds the GIL while idle, which
would stall a thread). The runner touches no MRML node. The front end calls :meth:`poll` regularly (a ``QTimer``, a
trame periodic callback; no sleeping): it hands the runner's progress to the observers, starts a due live run, and
writes a finished result into MRML on the calling thread. A cancelled or failed run leaves the scene as it was.
:meth:`wait` (poll until idle) is for scripts and tests.

Observers: ``controller.add_observer(callback)``; ``callback(event, payload)`` with event a :class:`LoopEvent`:

========================  ======================================================================================
``LoopEvent.RUNNING``     bool: a run started (True) or ended (False)
``LoopEvent.PROGRESS``    ``(done, total)`` slices
``LoopEvent.STATUS``      a one-line message for the status line
``LoopEvent.REPORT``      :class:`ReportStatus`: the report text or its status changed (sync the box with ``text``,
                          without moving the user's cursor when the text is unchanged)
``LoopEvent.RESULT``      ``languageguidedseg.mrml.NodeSegmentationResult`` (written into the scene)
``LoopEvent.ERROR``       the exception of a failed run (the scene was not changed)
``LoopEvent.CANCELLED``   None (the scene was not changed)
``LoopEvent.PENDING``     None: a live run was scheduled (a report edit, a move to another slice); poll until idle
``LoopEvent.WARNINGS``    :class:`Warnings`: what to show next to the report box (empty when there is nothing)
========================  ======================================================================================

What a front end calls (all from its GUI thread):

* ``set_report(text)`` on every edit of the report box (stores it only when it differs; live: schedules a run),
  ``clear_report()``, ``report_status()`` (what the box holds), ``sides_label()`` (the line beside the box);
* ``settings_changed()`` when the sides convention or the model changed (live: schedules a run, as an edit does);
* ``apply()`` (the run button: run, or after a running live run, or cancel a running Apply: label the button by
  ``apply_cancels``), ``segment_anyway()`` (offered by ``warnings.segment_anyway``), ``run()``, ``cancel()``,
  ``can_run()``,
  ``poll()`` from a timer while ``running`` or ``live_pending``, ``abandon()`` when the scene closes;
* ``watch_slices()`` / ``unwatch_slices()``: follow the slice nodes (a moved slice re-approximates, see above);
* ``available_models()``, ``default_model_name()``, ``select_model(name)``, ``model_choice()``, ``model_title(name)``,
  ``import_model(folder)``, ``user_models_folder()``, ``device_name()``;
* state to read: ``running``, ``run_kind`` ("apply" | "live" | None), ``live_pending``, ``progress``, ``warnings``,
  ``last_result``, ``last_run_kind``, ``fell_back_to_cpu``.

MRML comes through :mod:`languageguidedseg.mrml`, which imports ``slicer`` (3D Slicer, or ``pip install
slicer-core``) on first use; importing this module needs neither ``slicer`` nor PyTorch.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import mrml, package
from .errors import LgsegError
from .options import AUTO_MODEL
from .parameters import SLICE_VIEWS
from .runner import Reply, ReplyKind, Runner, ThreadRunner

logger = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.3


class LoopEvent(enum.Enum):
    """What the controller tells its observers (the payloads: see the module docstring)."""

    RUNNING = "running"
    PROGRESS = "progress"
    STATUS = "status"
    REPORT = "report"
    RESULT = "result"
    ERROR = "error"
    CANCELLED = "cancelled"
    PENDING = "pending"
    WARNINGS = "warnings"


Observer = Callable[[LoopEvent, Any], None]


@dataclass(frozen=True)
class ReportStatus:
    """What the report box holds: ``kind`` "empty" | "approximated" | "given", with a message for the user."""

    kind: str
    text: str
    similarity: float
    message: str


@dataclass(frozen=True)
class Warnings:
    """What to show next to the report box, in plain words (never a dialog: it stays until a result has none).

    ``domain``: the image does not look like the images the model was made for ("" when it does, or when unknown);
    ``report``: where the given report contradicts the image; ``segment_anyway``: a run without a report was held back
    for that reason (nothing written, no report approximated), so offer "Segment anyway"
    (:meth:`ReportLoopController.segment_anyway`) beside the report box.
    """

    domain: str = ""
    report: tuple[str, ...] = ()
    segment_anyway: bool = False


def report_digest(text: Optional[str]) -> str:
    """A digest to recognise an unedited approximation (whitespace-insensitive)."""
    return hashlib.sha256(" ".join((text or "").split()).encode("utf-8")).hexdigest()


def default_slice_node(scene: Any, view: str) -> Any:
    """The slice node of a standard view in ``scene`` (Slicer's IDs: ``vtkMRMLSliceNodeRed`` ...), or None."""
    return scene.GetNodeByID("vtkMRMLSliceNode" + view) if scene is not None else None


class _Run:
    """One run: the job and its request to the runner."""

    def __init__(self, job: Any, kind: str, generation: int, report_text: str, request_id: int,
                 anyway: bool = False):
        self.job = job
        self.kind = kind  # "apply" | "live"
        self.anyway = anyway  # "Segment anyway": written even where the image is outside the model's domain
        self.generation = generation
        self.report_text = report_text  # the box's text when the run started
        self.request_id = request_id
        self.cancelled = False


class ReportLoopController:
    """The report loop over one parameter object (see the module docstring for attributes, events, threading).

    :param parameters: the parameter object (a Slicer parameter node, or :class:`ReportLoopParameters`).
    :param slice_node_for: ``view name -> vtkMRMLSliceNode``; default: the scene's standard slice nodes.
    :param runner: where the model runs, a :class:`languageguidedseg.runner.Runner`: the Slicer module passes a
        :class:`languageguidedseg.worker.ProcessWorker` (3D Slicer's GUI thread holds the GIL while idle); None: a
        new :class:`languageguidedseg.runner.ThreadRunner`.
    :param debounce_s: pause in typing before a live run starts.
    :param clock: monotonic clock in seconds (tests pass their own).
    :param live_allowed: ``() -> bool``: whether live runs may start at all (e.g. the Slicer module allows them once
        the user has installed the dependencies with a first Apply); default always.
    :param run_button: what the front end calls its run button ("Apply" in Slicer, "Segment" in the web page).
    """

    def __init__(self, parameters: Any, *, slice_node_for: Optional[Callable[[str], Any]] = None,
                 runner: Optional[Runner] = None, debounce_s: float = DEBOUNCE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, live_allowed: Callable[[], bool] = lambda: True,
                 run_button: str = "Apply"):
        self.parameters = parameters
        self._live_allowed = live_allowed
        self.run_button = run_button  # the front end's name for its run button, used in messages
        self._runner: Runner = runner if runner is not None else ThreadRunner()
        self._device_name = "CPU"  # where the last run's model ran
        self._slice_node_for = slice_node_for
        self.debounce_s = debounce_s
        self._clock = clock
        self._observers: list[Observer] = []
        self._run: Optional[_Run] = None
        self._generation = 0
        self._due: Optional[float] = None  # when the pending live run may start
        self._apply_queued = False  # Apply pressed during a live run: starts when that run has stopped
        self._watched: list[tuple[Any, int]] = []
        self._last_slice: Optional[tuple[int, int]] = None
        self.fell_back_to_cpu = False
        self.last_result: Any = None
        self._models: Optional[dict[str, dict]] = None  # the last model listing, by name
        self.last_run_kind: Optional[str] = None  # "apply" or "live": the kind of the last finished run
        self.progress: tuple[int, int] = (0, 0)
        # The model "auto" chose, for the input volume it chose it for: live edits and later runs reuse it.
        self._choice: Optional[tuple[Any, str]] = None
        # The last finished run's warnings, for the input volume they are about.
        self._warnings: tuple[Any, Warnings] = (None, Warnings())

    # Observers ------------------------------------------------------------------------------------------------

    def add_observer(self, callback: Observer) -> Observer:
        """Call ``callback(event, payload)`` on every event (from the thread that calls the controller)."""
        self._observers.append(callback)
        return callback

    def _emit(self, event: LoopEvent, payload: Any = None) -> None:
        for callback in list(self._observers):
            callback(event, payload)

    # State ----------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._run is not None

    @property
    def run_kind(self) -> Optional[str]:
        """The kind of the running run: "apply", "live", or None when idle."""
        return self._run.kind if self._run is not None else None

    @property
    def apply_cancels(self) -> bool:
        """What the run button does now: True while a run that it started is going (loading the model included, in
        either scope), when :meth:`apply` cancels it, so the front end labels the button "Cancel"; else it runs (after
        a running live update). Live updates never cancel an Apply: they run after it."""
        return self._run is not None and self._run.kind == "apply"

    @property
    def live_pending(self) -> bool:
        """A live run is scheduled (waiting for the pause in typing, or for the current run to finish)."""
        return self._due is not None

    def can_run(self) -> tuple[bool, str]:
        """Whether a run can start now, and if not, what the user must do."""
        if self.parameters.inputVolume is None:
            return False, "Select an input volume."
        if not self.available_models() and self.parameters.model in ("", AUTO_MODEL):
            return False, "Install or import a model first (Model section)."
        return True, ""

    def report_status(self) -> ReportStatus:
        """What the report box holds, and what the next run does with it."""
        p = self.parameters
        text = p.report or ""
        if not text.strip():
            warnings = self.warnings
            if warnings.domain:
                anyway = ", or press Segment anyway to segment without one" if warnings.segment_anyway else ""
                return ReportStatus("empty", text, 0.0, f"No report approximated: {warnings.domain}. Type a report "
                                                        f"to segment with it{anyway}.")
            return ReportStatus("empty", text, 0.0,
                                f"No report: {self.run_button} approximates one from the image and shows it here.")
        if self._holds_approximation():
            return ReportStatus(
                "approximated", text, float(p.reportSimilarity),
                f"Approximated from the image (prototype similarity {float(p.reportSimilarity):.2f}: how close the "
                "nearest of the model's prototype reports is, not a confidence), not written by a person. Accept "
                "it, or edit it to segment with your text.")
        return ReportStatus("given", text, 0.0, f"{self.run_button} uses this report as written.")

    @property
    def warnings(self) -> Warnings:
        """What to show next to the report box for the current input (see :class:`Warnings`)."""
        volume, warnings = self._warnings
        if volume is None or volume is not self.parameters.inputVolume:
            return Warnings()
        if warnings.segment_anyway and self.report_to_use() is not None:  # a report typed since: it segments
            return Warnings(warnings.domain, warnings.report, False)
        return warnings

    def _set_warnings(self, volume: Any, warnings: Warnings) -> None:
        before = self.warnings
        self._warnings = (volume, warnings)
        if self.warnings != before:
            self._emit(LoopEvent.WARNINGS, self.warnings)

    def _holds_approximation(self) -> bool:
        p = self.parameters
        return bool(p.reportSource == "prototype" and (p.report or "").strip()
                    and report_digest(p.report) == p.approximationDigest)

    def report_to_use(self) -> Optional[str]:
        """The report for the next run: None approximates (an empty box or an unedited approximation)."""
        if self._holds_approximation():
            return None
        text = self.parameters.report or ""
        return text if text.strip() else None

    def live_enabled(self) -> bool:
        p = self.parameters
        return (bool(p.liveUpdate) and p.scope == "slice" and p.inputVolume is not None
                and self._live_allowed())

    # Report box -----------------------------------------------------------------------------------------------

    def set_report(self, text: str) -> None:
        """The user changed the report box: store the text (only when it differs) and, live, schedule a run."""
        p = self.parameters
        if (p.report or "") == text:
            return
        offered = self.warnings.segment_anyway
        p.report = text
        self._emit(LoopEvent.REPORT, self.report_status())
        if self.warnings.segment_anyway != offered:
            self._emit(LoopEvent.WARNINGS, self.warnings)
        if self.live_enabled():
            self._schedule_live()

    def clear_report(self) -> None:
        """Empty the box and forget the approximation; the next run approximates again."""
        self._set_report_fields("", "", 0.0, "")

    def _set_report_fields(self, text: str, source: str, similarity: float, digest: str) -> None:
        p = self.parameters
        p.report, p.reportSource, p.reportSimilarity, p.approximationDigest = text, source, similarity, digest
        self._emit(LoopEvent.REPORT, self.report_status())

    def _schedule_live(self) -> None:
        self._due = self._clock() + self.debounce_s
        run = self._run
        if run is not None and run.kind == "live":
            self._drop_live(run)
        self._emit(LoopEvent.PENDING, None)  # a front end that polls only while busy starts polling

    def _drop_live(self, run: _Run) -> None:
        """A newer edit or an Apply makes the running live run stale: stop it if it has not started its batch, and
        drop its result in any case (the generation check in _finish)."""
        self._cancel_run(run)
        self._generation += 1

    # Slices ---------------------------------------------------------------------------------------------------

    def slice_node(self, view: Optional[str] = None) -> Any:
        """The slice node of ``view`` (default: ``sliceView``, the one slice mode follows), or None."""
        view = view or self.parameters.sliceView
        if self._slice_node_for is not None:
            return self._slice_node_for(view)
        volume = self.parameters.inputVolume
        return default_slice_node(volume.GetScene() if volume is not None else None, view)

    def current_slice(self) -> Optional[tuple[int, int]]:
        """(IJK axis, index) of the input volume shown in ``sliceView``; None when there is none."""
        volume, node = self.parameters.inputVolume, self.slice_node()
        if volume is None or node is None:
            return None
        return mrml.slice_axis_and_index(node, volume)

    def watch_slices(self) -> None:
        """Follow the slice views (a VTK observer on each slice node): see :meth:`slice_changed`. Without a
        ``slice_node_for``, the nodes are found in the input volume's scene: call again after changing the volume."""
        self.unwatch_slices()
        for view in SLICE_VIEWS:
            node = self.slice_node(view)
            if node is not None:
                tag = node.AddObserver("ModifiedEvent", lambda caller, event: self.slice_changed())
                self._watched.append((node, tag))
        self._last_slice = self._safe_current_slice()

    def unwatch_slices(self) -> None:
        for node, tag in self._watched:
            node.RemoveObserver(tag)
        self._watched = []

    def _safe_current_slice(self) -> Optional[tuple[int, int]]:
        try:
            return self.current_slice()
        except LgsegError:
            return None

    def slice_changed(self) -> None:
        """The shown slice may have moved: with the box holding an approximation (or empty) and live refine on,
        approximate again for the new slice."""
        where = self._safe_current_slice()
        if where is None or where == self._last_slice:
            return
        self._last_slice = where
        if self.live_enabled() and self.report_to_use() is None and self.last_result is not None:
            self._schedule_live()

    def settings_changed(self) -> None:
        """A setting that changes the result (the sides convention, the model) changed: with live refine on and a
        result shown, segment again after the same pause as an edit of the report."""
        if self.live_enabled() and self.last_result is not None:
            self._schedule_live()

    def sides_label(self) -> str:
        """The line shown beside the report box: what left and right mean and where the image orientation comes from,
        e.g. "Left/right: patient (image orientation from the volume)", as the next run will report it."""
        p = self.parameters
        sides = p.sides
        info = self._model_info(self._model_to_run() or "")
        if p.inputVolume is not None and info is not None and info.get("report_sides"):
            try:
                where = self.current_slice() if p.scope == "slice" else None
                return mrml.volume_sides_label(p.inputVolume, info["report_sides"], sides, where[0] if where else None)
            except LgsegError:
                pass
        result = self.last_result
        if result is not None and result.sides_label and result.sides in (sides, "none"):
            return result.sides_label
        return "Left/right: patient's sides" if sides == "patient" else "Left/right: image (as displayed)"

    def _model_info(self, model: str) -> Optional[dict]:
        """The listing of an installed model ("" = the default; "auto" before it has chosen: the default, whose
        reports name sides), or None (e.g. a model folder)."""
        if self._models is None:
            self.available_models()
        return (self._models or {}).get(model if model not in ("", AUTO_MODEL) else self.default_model_name())

    # Models and device ----------------------------------------------------------------------------------------

    def available_models(self) -> list[dict]:
        """Installed model packages as dicts (name, task, licence, version, size_mb, path, source, threshold,
        report_sides), read afresh."""
        models = [info.to_dict() for info in package.list_models()]
        self._models = {info["name"]: info for info in models}
        return models

    def default_model_name(self) -> str:
        return package.DEFAULT_MODEL

    def model_choice(self) -> Optional[str]:
        """The model "auto" chose for the current input volume, or None (another model is selected, or none was
        chosen yet: the next run chooses)."""
        if self.parameters.model != AUTO_MODEL or self._choice is None:
            return None
        volume, name = self._choice
        return name if volume is self.parameters.inputVolume else None

    def model_title(self, name: str) -> str:
        """A model's entry in a model selector: "Automatic", "Automatic (qata-cxr)" once chosen, else the name."""
        if name != AUTO_MODEL:
            return name
        chosen = self.model_choice()
        return f"Automatic ({chosen})" if chosen else "Automatic"

    def _model_to_run(self) -> Optional[str]:
        """What the runner is asked for: the remembered choice of "auto" for this input, else the selection."""
        return self.model_choice() or self.parameters.model or None

    def user_models_folder(self) -> str:
        return str(package.user_models_folder())

    def select_model(self, name: str) -> None:
        """Use model ``name``; its own tuned threshold becomes the threshold."""
        info = {m["name"]: m for m in self.available_models()}.get(name) or {}
        self.parameters.model = name or ""
        if info.get("threshold") is not None:
            self.parameters.threshold = min(max(float(info["threshold"]), 0.01), 0.99)

    def import_model(self, folder: str) -> dict:
        """Verify and copy a model folder into the user's models folder, select it; returns its listing."""
        info = package.import_model(folder)
        self.select_model(info.name)
        return info.to_dict()

    def device_name(self) -> str:
        """Where the last run's model ran: "CPU" or "GPU (name)"."""
        return self._device_name

    # Running --------------------------------------------------------------------------------------------------

    def apply(self) -> None:
        """The run button (Apply, Segment): cancel a running Apply (:attr:`apply_cancels`), else start one (raises
        LgsegError when one cannot start).

        A running live run is dropped and the Apply starts as soon as it has stopped (see :meth:`poll`).
        """
        if self.apply_cancels:
            self.cancel()
            return
        if self._run is not None:
            ok, why = self.can_run()
            if not ok:
                raise LgsegError(why)
            self._drop_live(self._run)
            self._due = None
            self._apply_queued = True
            self._emit(LoopEvent.STATUS, "Segmenting as soon as the running update stops...")
            return
        self.run()

    def segment_anyway(self) -> None:
        """Segment once where a run without a report was held back (:attr:`warnings`' ``segment_anyway``): the mask
        is written although the image is outside the model's domain; no report is approximated."""
        if self._run is not None:
            raise LgsegError("a segmentation is already running; wait for it or cancel it")
        self.run(anyway=True)

    def run(self, kind: str = "apply", anyway: bool = False) -> None:
        """Snapshot the input and hand it to the runner (see :meth:`poll`); ``anyway``: see :meth:`segment_anyway`.

        Raises LgsegError (the scene unchanged) when the inputs do not allow a run.
        """
        if self._run is not None:
            raise LgsegError("a segmentation is already running; wait for it or cancel it")
        ok, why = self.can_run()
        if not ok:
            raise LgsegError(why)
        p = self.parameters
        job = mrml.SegmentationJob(
            p.inputVolume, report=self.report_to_use(), model=self._model_to_run(), scope=p.scope,
            slice_node=self.slice_node() if p.scope == "slice" else None, threshold=float(p.threshold),
            device=p.device, sides=p.sides)
        if job.slice_index is not None:
            self._last_slice = (job.axis, job.slice_index)
        if kind == "apply":
            self._due = None
        loaded = self._runner.loaded(job.model, job.device)
        request_id = self._runner.submit(job.model, job.device, job.array, job.segment_options())
        self._run = _Run(job, kind, self._generation, p.report or "", request_id, anyway)
        self.progress = (0, job.dimensions[job.axis] if job.slice_index is None else 1)
        self._emit(LoopEvent.RUNNING, True)
        if job.model == AUTO_MODEL:
            self._emit(LoopEvent.STATUS, "Choosing the model made for this image...")
        else:
            self._emit(LoopEvent.STATUS, "Segmenting..." if loaded else "Loading the model...")

    def cancel(self) -> None:
        """Stop the running run after its current batch; its result is dropped and the scene stays as it was."""
        self._due = None
        self._apply_queued = False
        if self._run is not None:
            self._cancel_run(self._run)
            self._emit(LoopEvent.STATUS, "Cancelling after the current batch...")

    def _cancel_run(self, run: _Run) -> None:
        run.cancelled = True
        self._runner.cancel(run.request_id)

    def abandon(self) -> None:
        """Cancel and forget the running run at once (its scene is closing); no event is emitted for it."""
        self._due = None
        self._apply_queued = False
        self.unwatch_slices()
        if self._run is not None:
            self._cancel_run(self._run)
            self._run = None

    def poll(self) -> bool:
        """Call regularly from the GUI thread: deliver the runner's news, finish a run (writing its result into
        MRML here), start a due live run. Returns True while a run is running or pending. Never blocks."""
        for reply in self._runner.poll():
            run = self._run
            if run is None or reply.request_id not in (run.request_id, -1):
                continue  # a reply to a run that was abandoned or has finished
            if reply.kind is ReplyKind.PROGRESS:
                self.progress = reply.payload
                if not run.cancelled:
                    self._emit(LoopEvent.PROGRESS, reply.payload)
                    if reply.payload[1] > 1:
                        self._emit(LoopEvent.STATUS, f"Segmenting slice {reply.payload[0]} of {reply.payload[1]}...")
                continue
            self._finish(run, reply)
        if self._run is None and self._apply_queued:
            self._apply_queued = False
            try:
                self.run()
            except LgsegError as exc:
                self.last_run_kind = "apply"
                self._emit(LoopEvent.STATUS, str(exc))
                self._emit(LoopEvent.ERROR, exc)
        if self._run is None and self._due is not None and self._clock() >= self._due:
            self._due = None
            if not self.live_enabled():  # switched off (or to whole-volume scope) since it was scheduled
                return False
            try:
                self.run(kind="live")
            except LgsegError as exc:
                self._emit(LoopEvent.STATUS, str(exc))
        return self._run is not None or self._due is not None or self._apply_queued

    def _finish(self, run: _Run, reply: Reply) -> None:
        self._run = None
        self.last_run_kind = run.kind
        stale = run.generation != self._generation
        done = reply.kind is ReplyKind.DONE
        self.fell_back_to_cpu = done and reply.payload.fell_back_to_cpu
        if done:
            run.job.result, run.job.style = reply.payload.result, reply.payload.segment_style
            run.job.model_used = reply.payload.model
            self._device_name = reply.payload.device
            if run.job.model == AUTO_MODEL and reply.payload.model:
                self._choice = (run.job.volume_node, reply.payload.model)
        # A run cancelled after its last batch (the runner finished before it saw the cancel) is dropped too: the user
        # asked for the scene to stay as it was.
        try:
            if reply.kind is ReplyKind.CANCELLED or (done and run.cancelled) or stale:
                if not stale:
                    self._emit(LoopEvent.STATUS, "Cancelled; the scene was not changed.")
                    self._emit(LoopEvent.CANCELLED, None)
                return
            if not done:
                # The engine's errors say what to do in one line (e.g. no installed model fits the image): shown as
                # they are; anything else is a failure.
                what = str(reply.payload) if isinstance(reply.payload, LgsegError) else "Failed"
                self._emit(LoopEvent.STATUS, f"{what}; the scene was not changed.")
                self._emit(LoopEvent.ERROR, reply.payload)
                return
            if self._held_back(run):
                return
            self._write(run)
        finally:
            self._emit(LoopEvent.RUNNING, False)

    def _held_back(self, run: _Run) -> bool:
        """A run without a report on an image outside the model's domain writes nothing (its mask and any report
        approximated from it would be unreliable): the warning is shown instead, with "Segment anyway" offered. An
        approximation still in the box (of another image or slice) is taken out. True when held back."""
        result = run.job.result
        if run.anyway or result.report_source != "prototype" or result.in_domain is not False:
            return False
        p = self.parameters
        self._set_warnings(run.job.volume_node, Warnings(result.domain_warning, (), True))
        if self._holds_approximation() and (p.report or "") == run.report_text:
            self._set_report_fields("", "", 0.0, "")
        else:
            self._emit(LoopEvent.REPORT, self.report_status())
        self._emit(LoopEvent.STATUS, f"Nothing was segmented: {result.domain_warning}.")
        return True

    def _write(self, run: _Run) -> None:
        p = self.parameters
        segmentation = created = None
        try:
            segmentation = p.outputSegmentation
            if segmentation is None:
                segmentation = created = mrml.new_segmentation_node(run.job.volume_node)
            result = run.job.write(segmentation)
        except Exception as exc:
            if created is not None:  # leave the scene as it was
                mrml.remove_node(created)
            self._emit(LoopEvent.STATUS, "Could not write the segment.")
            self._emit(LoopEvent.ERROR, exc)
            return
        p.outputSegmentation = result.segmentation_node
        self._set_warnings(run.job.volume_node, Warnings(result.domain_warning, tuple(result.report_warnings)))
        if result.report_source == "prototype" and not result.report:
            # Segmented anyway, outside the model's domain: no approximation for the box; one still there (of another
            # image or slice) is taken out, unless the user typed meanwhile.
            if self._holds_approximation() and (p.report or "") == run.report_text:
                self._set_report_fields("", "", 0.0, "")
            else:
                self._emit(LoopEvent.REPORT, self.report_status())
        elif result.report_source == "prototype":
            # Fill the box with the approximation, unless the user typed meanwhile.
            if (p.report or "") == run.report_text:
                self._set_report_fields(result.report, "prototype", float(result.similarity or 0.0),
                                        report_digest(result.report))
        elif p.reportSource != "given":
            p.reportSource, p.approximationDigest = "given", ""
            self._emit(LoopEvent.REPORT, self.report_status())
        self.last_result = result
        self._emit(LoopEvent.RESULT, result)
        self._emit(LoopEvent.STATUS, self.describe(result))

    def describe(self, result: Any) -> str:
        """A one-line summary of a result for the status line (no report text: it may identify the patient)."""
        fraction = result.foreground_fraction
        if result.slice_index is not None:
            region = [slice(None)] * 3
            region[2 - result.axis] = result.slice_index
            fraction = float(result.mask[tuple(region)].mean())
            # Counted from 1, as the views count slices; a 2D image is one slice.
            count = result.mask.shape[2 - result.axis]
            where = "the image" if count == 1 else f"slice {result.slice_index + 1} of {count}"
        else:
            where = "the volume"
        if result.report_source == "given":
            guidance = "your report"
        else:  # without a report approximated: segmented anyway, outside the model's domain
            guidance = "the approximated report" if result.report else "the image alone"
        segment = result.segmentation_node.GetSegmentation().GetSegment(result.segment_id).GetName()
        message = (f"Done in {result.seconds:.1f} s on {self.device_name()}, guided by {guidance}: {fraction:.1%} "
                   f"of {where} is in segment '{segment}'.")
        if self.fell_back_to_cpu:
            message += " The GPU ran out of memory, so it ran on the CPU."
        return message

    def wait(self, timeout: float = 60.0) -> None:
        """Poll until no run is running or pending (scripts and tests; a GUI calls :meth:`poll` from a timer)."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the segmentation did not finish within {timeout:.0f} s")
            self._runner.wait(0.02)
