"""The report-loop controller (``languageguidedseg.controller``) on a real MRML scene, without Qt, and the two
runners it runs the model in (``languageguidedseg.runner``).

The same controller drives the Slicer module and the web page: every behaviour of the loop is tested here, on
``slicer-core``'s MRML library, with a real (tiny, random-weight) model, in a thread of this process (the web page's
runner) and, for the loop's main paths, in the worker process that the Slicer module starts. Both runners pass the
same contract tests. Only time is the test's: the live-refine debounce reads a clock that the test advances.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the controller tests need the slicer-core package")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module has no MRML library (install slicer-core)", allow_module_level=True)

import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from languageguidedseg import mrml  # noqa: E402
from languageguidedseg.controller import LoopEvent, ReportLoopController  # noqa: E402
from languageguidedseg.errors import LgsegError  # noqa: E402
from languageguidedseg.parameters import ReportLoopParameters  # noqa: E402
from languageguidedseg.runner import ReplyKind, RunResult, ThreadRunner  # noqa: E402
from languageguidedseg.worker import ProcessWorker, find_worker  # noqa: E402

DIMS = (48, 40, 6)  # i, j, k


class Clock:
    """The debounce's clock, advanced by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _volume(scene, dims=DIMS):
    voxels = np.zeros(dims[::-1], dtype=np.int16)
    voxels[:, 8:30, 10:40] = 900
    voxels[2:4, 12:20, 14:22] = 300
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 2.5)
    node.SetOrigin(-20.0, 15.0, 7.0)
    return node


def _red_slice_node(scene, volume, k):
    """Slicer's Red (axial) slice node, showing slice ``k`` of ``volume``."""
    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName("Red")
    node.SetSingletonTag("Red")
    scene.AddNode(node)
    assert node.GetID() == "vtkMRMLSliceNodeRed"
    node.SetSliceToRASByNTP(0, 0, 1, 1, 0, 0, 0, 0, 0, 0)  # axial (the presets are the application's)
    _show_slice(node, volume, k)
    return node


def _show_slice(slice_node, volume, k):
    ijk_to_ras = mrml.ijk_to_ras_matrix(volume)
    centre = ijk_to_ras @ np.array([DIMS[0] / 2, DIMS[1] / 2, k, 1.0])
    slice_node.JumpSliceByCentering(*centre[:3])


def _controller(parameters, segmenter=None, **kwargs):
    """A controller with its events recorded; by default its runner is a thread whose model is ``segmenter``."""
    kwargs.setdefault("runner", ThreadRunner(load_segmenter=lambda model, device: segmenter))
    controller = ReportLoopController(parameters, **kwargs)
    events = []
    controller.add_observer(lambda event, payload: events.append((event, payload)))
    return controller, events


def _gated_live_loop(scene, segmenter):
    """Slice mode on slice 3 of the Red view, with the test's clock and a runner that holds each model load until the
    test sets ``release``: (parameters, clock, controller, events, release)."""
    volume = _volume(scene)
    _red_slice_node(scene, volume, 3)
    clock = Clock()
    parameters = ReportLoopParameters(inputVolume=volume, scope="slice", device="cpu", model="")
    release = threading.Event()

    def gated_loader(model, device):
        release.wait(60)
        return segmenter

    controller, events = _controller(parameters, runner=ThreadRunner(load_segmenter=gated_loader), clock=clock)
    return parameters, clock, controller, events, release


class Buffered:
    """A runner whose replies the test can wait for before the controller polls them (the GUI thread idling)."""

    def __init__(self, runner):
        self.runner = runner
        self.replies = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def poll(self):
        replies, self.replies = self.replies + self.runner.poll(), []
        return replies

    def wait_until_finished(self, timeout):
        """Wait (without polling the controller) until the runner has finished a request."""
        deadline = time.monotonic() + timeout
        while not any(reply.kind is not ReplyKind.PROGRESS for reply in self.replies):
            assert time.monotonic() < deadline, "the runner did not finish in time"
            self.runner.wait(0.05)
            self.replies += self.runner.poll()


class Loop(NamedTuple):
    """A runner for the report loop's tests and the model to name: the web page's thread with the tiny model loaded
    once, or the Slicer module's worker process, which loads the tiny model from its folder."""

    runner: object
    model: str


@pytest.fixture(params=["thread", "process"])
def loop(request, segmenter, tiny_model):
    if request.param == "thread":
        return Loop(ThreadRunner(load_segmenter=lambda model, device: segmenter), "")
    return Loop(request.getfixturevalue("process_worker"), str(tiny_model))


def _names(events):
    return [event for event, _ in events]


def _scene_state(scene, parameters):
    """Node IDs, and the segment's voxels when there is one: what a cancelled or failed run must leave alone."""
    ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    node = parameters.outputSegmentation
    if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
        return ids, None
    segment_id = node.GetSegmentation().GetNthSegmentID(0)
    return ids, mrml.segment_mask(node, segment_id, parameters.inputVolume)


def _assert_cancel_leaves_scene(controller, events, scene, parameters, report, timeout):
    """A run cancelled at once reports "cancelled", no result, and leaves the segment as it was (returned)."""
    before = _scene_state(scene, parameters)
    events.clear()
    controller.set_report(report)
    controller.run()
    controller.cancel()
    controller.wait(timeout)
    assert LoopEvent.CANCELLED in _names(events) and LoopEvent.RESULT not in _names(events)
    ids, mask = _scene_state(scene, parameters)
    assert ids == before[0]
    np.testing.assert_array_equal(mask, before[1])
    return before


def test_importing_the_controller_needs_neither_slicer_nor_torch():
    """The engine's controller imports without slicer, VTK or torch; MRML use without slicer is a one-line error."""
    script = """
import sys
for name in ("slicer", "vtk", "torch"):
    sys.modules[name] = None
from languageguidedseg import controller, mrml
from languageguidedseg.errors import LgsegError
try:
    mrml.ijk_to_ras_matrix(object())
except LgsegError as exc:
    print("error:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert message.startswith("error: MRML needs the 'vtk' package") and "pip install slicer-core" in message
    assert "3D Slicer" in message and "\n" not in message


def test_empty_box_approximates_unedited_approximates_again_edited_is_used(scene, loop):
    volume = _volume(scene)
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", model=loop.model)
    controller, events = _controller(parameters, runner=loop.runner)
    assert controller.report_status().kind == "empty" and controller.report_to_use() is None

    controller.run()
    assert controller.running
    controller.wait(120)
    result = controller.last_result
    assert _names(events)[0] is LoopEvent.RUNNING and _names(events)[-1] is LoopEvent.RUNNING
    assert (LoopEvent.PROGRESS, (DIMS[2], DIMS[2])) in events
    # The box holds the approximation, marked as such, with its similarity.
    assert result.report_source == "prototype" and parameters.report == result.report
    status = controller.report_status()
    assert status.kind == "approximated" and status.similarity == pytest.approx(result.similarity)
    assert f"{result.similarity:.2f}" in status.message and (LoopEvent.REPORT, status) in events
    segmentation = parameters.outputSegmentation
    assert segmentation is result.segmentation_node and segmentation.GetScene() is scene
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, result.segment_id, volume), result.mask)

    # Unedited (even re-spaced): approximated again, not used as a report.
    controller.set_report("  " + parameters.report.replace(" ", "  ") + " ")
    assert controller.report_to_use() is None and controller.report_status().kind == "approximated"
    controller.run()
    controller.wait(120)
    assert controller.last_result.report_source == "prototype"

    # Edited: used as written, the same segment is updated.
    controller.set_report("bilateral infection, lower left lung")
    assert controller.report_status().kind == "given"
    controller.run()
    controller.wait(120)
    assert controller.last_result.report_source == "given"
    assert controller.last_result.report == "bilateral infection, lower left lung"
    assert controller.last_result.segment_id == result.segment_id
    assert parameters.report == "bilateral infection, lower left lung" and parameters.reportSource == "given"
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1

    # The box is synced by hand: the same text again writes nothing and tells nobody (no cursor reset in the box).
    events.clear()
    controller.set_report("bilateral infection, lower left lung")
    assert events == []

    controller.clear_report()
    assert (parameters.report, parameters.reportSource, controller.report_status().kind) == ("", "", "empty")


def test_cancel_and_failure_leave_the_scene_unchanged(scene, loop, segmenter, tmp_path):
    volume = _volume(scene)
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", model=loop.model)
    runner = Buffered(loop.runner)
    controller, events = _controller(parameters, runner=runner)
    controller.run()
    controller.wait(120)
    before = _assert_cancel_leaves_scene(controller, events, scene, parameters, "right lower lobe", 120)

    # Cancelled after the model finished but before the GUI thread took the result: dropped all the same.
    events.clear()
    controller.set_report("left upper lobe")
    controller.run()
    runner.wait_until_finished(120)
    controller.cancel()
    controller.wait(120)
    assert LoopEvent.CANCELLED in _names(events) and LoopEvent.RESULT not in _names(events)
    ids, mask = _scene_state(scene, parameters)
    assert ids == before[0]
    np.testing.assert_array_equal(mask, before[1])

    # A failing run (a model that does not exist): the error is reported, nothing is written.
    events.clear()
    failing = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu",
                                   model=str(tmp_path / "no-such-model"))
    failing_controller, failing_events = _controller(failing, runner=ThreadRunner())  # the real loader, which fails
    failing_controller.run()
    failing_controller.wait(60)
    errors = [payload for event, payload in failing_events if event is LoopEvent.ERROR]
    assert len(errors) == 1 and isinstance(errors[0], LgsegError) and "does not exist" in str(errors[0])
    assert failing.outputSegmentation is None and failing.report == ""
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before[0]

    # A write that fails (the volume lost its voxels while the model ran) leaves no new node behind.
    emptied = _volume(scene)
    nodes = scene.GetNumberOfNodes()
    lost, lost_events = _controller(
        ReportLoopParameters(inputVolume=emptied, scope="volume", device="cpu", model=""), segmenter)
    lost.run()
    emptied.SetAndObserveImageData(None)
    lost.wait(60)
    errors = [payload for event, payload in lost_events if event is LoopEvent.ERROR]
    assert len(errors) == 1 and "has no voxels" in str(errors[0])
    assert scene.GetNumberOfNodes() == nodes and lost.parameters.outputSegmentation is None

    # A run that cannot start says why, and starts nothing.
    with pytest.raises(LgsegError, match="Select an input volume"):
        ReportLoopController(ReportLoopParameters()).run()


def test_slice_mode_follows_the_slice_view_and_reapproximates_when_it_moves(scene, loop):
    volume = _volume(scene)
    red = _red_slice_node(scene, volume, 2)
    clock = Clock()
    parameters = ReportLoopParameters(inputVolume=volume, scope="slice", device="cpu", model=loop.model)
    controller, events = _controller(parameters, runner=loop.runner, clock=clock)
    controller.watch_slices()
    controller.run()
    controller.wait(120)
    first = controller.last_result
    assert first.slice_index == 2 and first.axis == 2 and first.report_source == "prototype"
    segment = mrml.segment_mask(parameters.outputSegmentation, first.segment_id, volume)
    assert not segment[[0, 1, 3, 4, 5]].any()

    # Moving to another slice with the box holding the approximation: approximated again there. The front end
    # hears of it ("pending"), so one that polls only while busy (the Slicer module's timer) starts polling.
    events.clear()
    _show_slice(red, volume, 4)
    assert controller.live_pending and _names(events) == [LoopEvent.PENDING]
    clock.now += 0.31
    controller.wait(120)
    second = controller.last_result
    assert second.slice_index == 4 and second.report_source == "prototype"
    assert controller.report_status().kind == "approximated"
    segment = mrml.segment_mask(parameters.outputSegmentation, first.segment_id, volume)
    np.testing.assert_array_equal(segment[2], first.mask[2])  # slice 2 kept, slice 4 added
    np.testing.assert_array_equal(segment[4], second.mask[4])

    # With the user's own report, moving does not re-run (the report is the user's, not the slice's).
    controller.set_report("left lower lobe")
    clock.now += 0.31
    controller.wait(120)
    assert controller.last_result.report_source == "given" and controller.last_result.slice_index == 4
    _show_slice(red, volume, 1)
    assert not controller.live_pending
    controller.unwatch_slices()
    _show_slice(red, volume, 3)
    assert not controller.live_pending


def test_live_refine_waits_for_a_pause_and_drops_stale_runs(scene, segmenter):
    parameters, clock, controller, events, release = _gated_live_loop(scene, segmenter)

    # Typing: nothing runs until 0.3 s after the last keystroke.
    controller.set_report("l")
    clock.now = 0.1
    controller.set_report("le")
    clock.now = 0.35
    assert controller.poll() and not controller.running
    clock.now = 0.41
    controller.poll()
    assert controller.running and controller.run_kind == "live"

    # An edit while that run works makes it stale: its result is dropped, the newer text runs after the pause.
    controller.set_report("left lower lobe")
    release.set()
    clock.now = 0.8
    controller.wait(120)
    results = [payload for event, payload in events if event is LoopEvent.RESULT]
    assert [r.report for r in results] == ["left lower lobe"]
    assert results[0].slice_index == 3 and parameters.reportSource == "given"

    # Live refine is for slice mode only, and can be switched off.
    parameters.liveUpdate = False
    controller.set_report("right upper lobe")
    assert not controller.live_pending
    parameters.liveUpdate, parameters.scope = True, "volume"
    controller.set_report("right middle lobe")
    assert not controller.live_pending
    # ... and only where the front end allows it (the Slicer module: once the dependencies are installed).
    parameters.scope = "slice"
    gated = ReportLoopController(parameters, live_allowed=lambda: False)
    gated.set_report("left upper lobe")
    assert not gated.live_pending and parameters.report == "left upper lobe"
    # A live run scheduled before the user switched to the whole volume does not start (it would segment it all).
    controller.set_report("left lower lobe, again")
    assert controller.live_pending
    parameters.scope = "volume"
    clock.now = 10.0
    assert not controller.poll() and not controller.running and not controller.live_pending


def test_changing_the_sides_or_the_model_runs_the_live_update_again(scene, segmenter):
    parameters, clock, controller, events, release = _gated_live_loop(scene, segmenter)
    release.set()
    controller.settings_changed()
    assert not controller.live_pending  # nothing shown yet: nothing to update
    controller.set_report("left lower lobe")
    clock.now = 1.0
    controller.poll()
    controller.wait(120)
    assert [p.report for e, p in events if e is LoopEvent.RESULT] == ["left lower lobe"]
    parameters.sides = "image"
    controller.settings_changed()
    assert controller.live_pending and not controller.running  # after the same pause as an edit
    clock.now = 2.0
    controller.poll()
    controller.wait(120)
    results = [p for e, p in events if e is LoopEvent.RESULT]
    assert len(results) == 2 and results[1].report == "left lower lobe"
    parameters.liveUpdate = False  # live update off: the setting waits for the next Segment
    controller.settings_changed()
    assert not controller.live_pending


def test_apply_during_a_live_run_drops_it_and_runs_once_it_stops(scene, segmenter):
    """Apply pressed while a live update works (e.g. the model still loading): no error; the live result is
    dropped and the Apply run follows with the box's report."""
    parameters, clock, controller, events, release = _gated_live_loop(scene, segmenter)
    controller.set_report("left lower lobe")
    clock.now = 0.5
    controller.poll()
    assert controller.run_kind == "live"
    controller.apply()
    assert controller.running and not controller.live_pending
    release.set()
    controller.wait(120)
    results = [payload for event, payload in events if event is LoopEvent.RESULT]
    assert len(results) == 1 and results[0].report == "left lower lobe"
    assert controller.last_run_kind == "apply" and LoopEvent.ERROR not in _names(events)
    # Cancel after such an Apply: nothing runs and nothing is written.
    controller.set_report("right lower lobe")
    release.clear()
    clock.now = 1.0
    controller.poll()
    assert controller.run_kind == "live"
    controller.apply()
    controller.cancel()
    release.set()
    controller.wait(120)
    assert len([e for e in _names(events) if e is LoopEvent.RESULT]) == 1 and not controller.running


def test_while_an_apply_loads_the_model_the_button_cancels_it_and_typing_waits(scene, segmenter):
    """Apply means one thing in slice mode too: from the moment an Apply starts (its model still loading) until it
    ends, ``apply_cancels`` (the button's label, Cancel) holds and a click cancels it; an edit meanwhile never
    cancels it: the Apply's result is written and the live update runs after it."""
    parameters, clock, controller, events, release = _gated_live_loop(scene, segmenter)
    parameters.report = "left lower lobe"
    controller.apply()
    assert controller.run_kind == "apply" and controller.apply_cancels
    controller.set_report("right lower lobe")
    clock.now = 1.0
    controller.poll()
    assert controller.run_kind == "apply" and controller.apply_cancels and controller.live_pending
    release.set()
    controller.wait(120)
    results = [payload for event, payload in events if event is LoopEvent.RESULT]
    assert [r.report for r in results] == ["left lower lobe", "right lower lobe"]
    assert LoopEvent.CANCELLED not in _names(events) and not controller.apply_cancels

    # A click while the Apply runs is Cancel: the run stops and nothing is written.
    events.clear()
    controller.apply()
    assert controller.apply_cancels
    controller.apply()
    controller.wait(120)
    assert LoopEvent.CANCELLED in _names(events) and LoopEvent.RESULT not in _names(events)


def test_worker_progresses_while_the_gui_thread_is_idle(scene, loop):
    """No sleeping on the GUI thread: the runner finishes while the GUI thread only waits (as in an idle event
    loop) and never calls into the controller; one poll afterwards delivers progress and writes the result."""
    volume = _volume(scene, dims=(48, 40, 12))
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", report="left lung",
                                      model=loop.model)
    runner = Buffered(loop.runner)
    controller, events = _controller(parameters, runner=runner)
    controller.run()
    runner.wait_until_finished(120)  # the GUI thread idles: it waits on the runner, no poll of the controller
    assert _names(events) == [LoopEvent.RUNNING, LoopEvent.STATUS]  # nothing delivered yet: the GUI thread did not poll
    assert not controller.poll()
    assert (LoopEvent.PROGRESS, (12, 12)) in events and controller.last_result.report == "left lung"
    np.testing.assert_array_equal(
        mrml.segment_mask(parameters.outputSegmentation, controller.last_result.segment_id, volume),
        controller.last_result.mask)


def test_gpu_out_of_memory_falls_back_to_the_cpu(scene, segmenter):
    """CUDA running out of memory is not a crash: the same job runs again on the CPU and the user is told. (There
    is no GPU here: the GPU model is the real one whose segment_array raises PyTorch's CUDA out-of-memory error.)"""
    import torch

    class GpuModel:
        device = torch.device("cuda", 0)
        config = segmenter.config

        def __init__(self, error):
            self.error = error

        def segment_array(self, *args, **kwargs):
            raise self.error

    requested = []

    def loader(model, device):
        requested.append(device)
        return segmenter if device == "cpu" else GpuModel(torch.cuda.OutOfMemoryError("CUDA out of memory."))

    volume = _volume(scene)
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="auto", model="")
    controller, events = _controller(parameters, runner=ThreadRunner(load_segmenter=loader))
    controller.run()
    controller.wait(120)
    assert requested == ["auto", "cpu"] and controller.fell_back_to_cpu
    assert controller.last_result is not None and "ran on the CPU" in events[-2][1]

    # Any other error is reported as it is, not retried.
    controller2, events2 = _controller(
        ReportLoopParameters(inputVolume=volume, scope="volume", model=""),
        runner=ThreadRunner(load_segmenter=lambda model, device: GpuModel(RuntimeError("something else"))))
    controller2.run()
    controller2.wait(60)
    errors = [payload for event, payload in events2 if event is LoopEvent.ERROR]
    assert [str(e) for e in errors] == ["something else"] and not controller2.fell_back_to_cpu


def test_sides_reach_the_engine_and_the_label(scene, segmenter):
    """What left and right mean is passed to the engine, and the label beside the report box says it."""
    volume = _volume(scene)
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", report="left lower lobe",
                                      model="")
    controller, _ = _controller(parameters, segmenter)
    # Before any run, from the volume's geometry and the (default) model's convention.
    assert controller.sides_label() == "Left/right: patient (image orientation from the volume)"
    parameters.inputVolume = None
    assert controller.sides_label() == "Left/right: patient's sides"
    parameters.inputVolume = volume
    controller.run()
    controller.wait(120)
    assert controller.last_result.sides == "patient"
    assert controller.sides_label() == "Left/right: patient (image orientation from the volume)"
    parameters.sides = "image"
    assert controller.sides_label() == "Left/right: image (as displayed)"
    controller.run()
    controller.wait(120)
    assert controller.last_result.sides == "image"


def test_models_are_listed_and_selected_with_their_threshold(tiny_model, own_models_folder, tmp_path):
    import shutil

    shutil.copytree(tiny_model, own_models_folder / "mine")
    parameters = ReportLoopParameters()
    controller = ReportLoopController(parameters)
    listed = {m["name"]: m for m in controller.available_models()}
    assert listed["mine"]["source"] == "user" and controller.user_models_folder() == str(own_models_folder)
    controller.select_model("mine")
    assert parameters.model == "mine" and parameters.threshold == pytest.approx(listed["mine"]["threshold"])
    imported = controller.import_model(str(tiny_model))
    assert parameters.model == imported["name"] == "tiny"


def test_benchmark_measures_edit_to_mask_through_the_controller(segmenter):
    """``lgseg benchmark``'s edit_to_mask_ms: every edit reaches the segment on the real MRML path."""
    from languageguidedseg import benchmark

    volume = benchmark._synthetic_volume(4, size=96)
    milliseconds, path = benchmark._edit_to_mask_ms(segmenter, volume, repeats=2)
    assert path == "mrml" and milliseconds > 0
    edits = benchmark._edits(6)
    assert len(set(edits)) == 6  # each edit is new text: the report is encoded every time


@pytest.fixture(scope="module")
def process_worker(tmp_path_factory):
    """The worker process as the Slicer module starts it (``find_worker``: ``PythonSlicer`` found on the PATH, here
    a launcher of this test's Python), started; a test that closes it has it started again by its next request."""
    folder = tmp_path_factory.mktemp("slicer-bin")
    launcher = folder / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    launcher.chmod(0o755)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(folder), os.environ.get("PATH", "")]))
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread, like the test process (conftest): the worker inherits it
        worker = find_worker()
        assert worker is not None
        worker.start()
        yield worker
        worker.close()


def test_worker_close_returns_at_once_and_a_hung_worker_is_killed_later(hung_worker):
    """Closing (the module's cleanup, a scene close) never waits on the GUI thread: a worker that does not stop
    when asked is killed by a thread after the grace period."""
    worker = ProcessWorker(str(hung_worker), stop_grace_s=0.5)
    worker.start()
    pid_file = Path(f"{hung_worker}.pid")
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    start = time.perf_counter()
    worker.close()
    assert time.perf_counter() - start < 0.1 and not worker.alive
    pid = int(pid_file.read_text())
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break  # killed and reaped
        assert time.monotonic() < deadline, "the hung worker is still running"
        time.sleep(0.05)


def test_worker_output_goes_to_the_log_and_a_stopped_worker_shows_its_last_lines(tmp_path, caplog):
    """What the worker process writes (stdout and stderr) is logged by the polling thread under the module's
    logger, and when the process stops, the failure shows its last lines."""
    crashing = tmp_path / "crashing-worker"
    crashing.write_text(f"#!{sys.executable}\nimport sys\nprint('loading the engine')\n"
                        "sys.stderr.write('ImportError: no module named torch\\n')\nsys.exit(3)\n")
    crashing.chmod(0o755)
    worker = ProcessWorker(str(crashing))
    replies = []
    with caplog.at_level("INFO", logger="languageguidedseg.worker"):
        worker.submit("", "cpu", np.zeros((1, 4, 4), dtype=np.int16), {})
        deadline = time.monotonic() + 60
        while not replies:
            assert time.monotonic() < deadline, "the stopped worker was not reported"
            worker.wait(0.05)
            replies = worker.poll()
    assert [(r.request_id, r.kind) for r in replies] == [(-1, ReplyKind.FAILED)] and not worker.alive
    message = str(replies[0].payload)
    assert "exit code 3" in message and message.endswith("loading the engine\nImportError: no module named torch")
    logged = [r.getMessage() for r in caplog.records if r.name == "languageguidedseg.worker"]
    assert logged == ["LanguageGuidedSeg worker: loading the engine",
                      "LanguageGuidedSeg worker: ImportError: no module named torch"]


def test_worker_starts_without_a_console_window_on_windows(monkeypatch):
    """On Windows the process starts with Slicer's hidden-window STARTUPINFO (``launchConsoleProcess``) and
    ``CREATE_NO_WINDOW``. (Not on Windows here: the platform check and Windows' constants are the test's; the Popen
    call is recorded, not made.)"""
    import types

    for name, value in (("STARTUPINFO", types.SimpleNamespace), ("STARTF_USESHOWWINDOW", 1),
                        ("CREATE_NO_WINDOW", 0x08000000)):
        monkeypatch.setattr(subprocess, name, value, raising=False)
    calls = []

    class RecordedError(Exception):
        pass

    def record(args, **kwargs):
        calls.append(kwargs)
        raise RecordedError

    monkeypatch.setattr(subprocess, "Popen", record)
    monkeypatch.setattr(sys, "platform", "win32")
    worker = ProcessWorker("PythonSlicer")
    with pytest.raises(RecordedError):
        worker.start()
    monkeypatch.undo()
    assert calls[0]["creationflags"] == 0x08000000
    info = calls[0]["startupinfo"]
    assert (info.dwFlags, info.wShowWindow) == (1, 0)  # STARTF_USESHOWWINDOW, SW_HIDE: as launchConsoleProcess
    assert not worker.alive


def _hold_the_gil_until(ready, timeout: float) -> None:
    """Keep this thread inside C calls that hold the GIL (about 0.2 s each, no other thread of this process runs
    meanwhile), as the GUI thread of 3D Slicer does while Qt's event loop waits, until ``ready()`` or ``timeout``."""
    import time

    start = time.perf_counter()
    sum(range(1_000_000))
    count = int(1_000_000 * 0.2 / max(time.perf_counter() - start, 1e-6))
    deadline = time.perf_counter() + timeout
    while not ready() and time.perf_counter() < deadline:
        sum(range(count))


def test_report_loop_in_a_worker_process_runs_while_the_gui_thread_holds_the_gil(scene, tiny_model, process_worker):
    """In Slicer the model runs in a worker process: it computes while the GUI thread is busy in native code
    holding the GIL, and the loop behaves as with a thread (approximation, edited text, cancel, failure)."""
    volume = _volume(scene, dims=(48, 40, 12))
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", model=str(tiny_model))
    controller = ReportLoopController(parameters, runner=process_worker)
    events = []
    controller.add_observer(lambda event, payload: events.append((event, payload)))
    controller.run()  # the first run starts the process and loads the model
    controller.wait(180)
    result = controller.last_result
    assert result.report_source == "prototype" and parameters.report == result.report
    assert controller.report_status().kind == "approximated" and (LoopEvent.PROGRESS, (12, 12)) in events
    assert result.segmentation_node.GetSegmentation().GetSegment(result.segment_id).GetName() == "Infection"
    np.testing.assert_array_equal(mrml.segment_mask(parameters.outputSegmentation, result.segment_id, volume),
                                  result.mask)

    _red_slice_node(scene, volume, 3)
    parameters.scope = "slice"
    controller.set_report("right lower lobe")
    controller.run()
    # The GUI thread is busy in native code the whole time: the worker process is not.
    _hold_the_gil_until(lambda: process_worker.wait(0), 60)
    controller.wait(60)
    assert controller.last_result.report == "right lower lobe" and controller.last_result.report_source == "given"

    parameters.scope = "volume"
    before = _assert_cancel_leaves_scene(controller, events, scene, parameters, "left upper lobe", 60)

    events.clear()
    parameters.model = str(scene.GetURL() or "/no/such/model-folder")
    controller.run()
    controller.wait(60)
    errors = [payload for event, payload in events if event is LoopEvent.ERROR]
    assert len(errors) == 1 and isinstance(errors[0], LgsegError) and "does not exist" in str(errors[0])
    assert _scene_state(scene, parameters)[0] == before[0]


# ----------------------------------------------------------------------------------------------------------------
# The runner contract: the same tests for the thread and the worker process
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["thread", "process"])
def runner(request):
    """A runner that loads models with the engine's loader: a new thread runner that counts its loads, or the
    Slicer module's worker process."""
    if request.param == "process":
        return request.getfixturevalue("process_worker")
    loads = []

    def counting_loader(model, device):
        loads.append((model, device))
        return mrml.load_segmenter(model, device)

    thread_runner = ThreadRunner(load_segmenter=counting_loader)
    thread_runner.loads = loads
    return thread_runner


def _options(**changes):
    """``segment_array``'s options for a volume snapshot (what ``SegmentationJob.segment_options`` gives)."""
    return {"rgb": False, "report": None, "axis": 2, "slice_index": None, "threshold": None, "sides": "patient",
            "geometry": None, **changes}


def _finish(runner, *request_ids, timeout=180):
    """Every reply until the requests have finished (done, cancelled or failed: the last reply is the last of
    these), or until the runner has stopped (a failure of request -1)."""
    replies = []
    deadline = time.monotonic() + timeout
    while not ({-1} & {r.request_id for r in replies} or set(request_ids) <= {
            r.request_id for r in replies if r.kind is not ReplyKind.PROGRESS}):
        assert time.monotonic() < deadline, f"requests {request_ids} did not finish: {replies}"
        runner.wait(0.1)
        replies += runner.poll()
    return replies


def test_runner_segments_with_progress_and_keeps_the_model_loaded(runner, tiny_model, segmenter):
    model = str(tiny_model)
    array = np.random.default_rng(1).integers(0, 900, (6, 40, 48)).astype(np.int16)
    first = runner.submit(model, "cpu", array, _options())
    replies = _finish(runner, first)
    progress = [r.payload for r in replies if r.kind is ReplyKind.PROGRESS]
    assert progress and progress[-1] == (6, 6) and progress == sorted(progress)
    assert all(r.request_id == first for r in replies) and replies[-1].kind is ReplyKind.DONE
    done = replies[-1].payload
    assert isinstance(done, RunResult) and done.device == "CPU" and not done.fell_back_to_cpu
    assert done.segment_style == ("Infection", (0.9, 0.2, 0.1), "tiny")
    expected = segmenter.segment_array(array, **_options())
    np.testing.assert_array_equal(done.result.mask, expected.mask)
    assert done.result.report == expected.report and done.result.report_source == "prototype"

    # The next request for the same model starts at once: the model stayed loaded.
    assert runner.loaded(model, "cpu") and not runner.loaded(model, "auto") and not runner.loaded("", "cpu")
    second = runner.submit(model, "cpu", array, _options(report="left lower lung", slice_index=2))
    replies = _finish(runner, second)
    assert [r.payload for r in replies if r.kind is ReplyKind.PROGRESS] == [(1, 1)]
    expected = segmenter.segment_array(array, **_options(report="left lower lung", slice_index=2))
    np.testing.assert_array_equal(replies[-1].payload.result.mask, expected.mask)
    assert replies[-1].payload.result.report_source == "given"
    if isinstance(runner, ThreadRunner):
        assert runner.loads == [(model, "cpu")]


def test_runner_cancels_and_reports_failures_with_their_message(runner, tiny_model, tmp_path):
    model = str(tiny_model)
    volume = np.random.default_rng(2).integers(0, 900, (40, 40, 48)).astype(np.int16)
    # Cancelling a request cancels the earlier ones too: both reply "cancelled", neither "done".
    first = runner.submit(model, "cpu", volume, _options())
    second = runner.submit(model, "cpu", volume, _options(report="right upper lung"))
    runner.cancel(second)
    replies = _finish(runner, first, second)
    finished = {r.request_id: r.kind for r in replies if r.kind is not ReplyKind.PROGRESS}
    assert finished == {first: ReplyKind.CANCELLED, second: ReplyKind.CANCELLED}

    # Bad input: the request fails with the engine's message; the runner goes on.
    bad = runner.submit(model, "cpu", volume[:2], _options(threshold=1.5))
    reply = _finish(runner, bad)[-1]
    assert reply.kind is ReplyKind.FAILED and isinstance(reply.payload, LgsegError)
    assert "threshold must lie between 0 and 1, not 1.5" in str(reply.payload)
    missing = runner.submit(str(tmp_path / "no-such-model"), "cpu", volume[:2], _options())
    reply = _finish(runner, missing)[-1]
    assert reply.kind is ReplyKind.FAILED and "does not exist" in str(reply.payload)
    assert not runner.loaded(model, "cpu")  # the failed load let the loaded model go
    good = runner.submit(model, "cpu", volume[:2], _options())
    assert _finish(runner, good)[-1].kind is ReplyKind.DONE


def test_runner_close_lets_the_model_go_and_a_new_request_starts_afresh(runner, tiny_model):
    model = str(tiny_model)
    array = np.random.default_rng(3).integers(0, 900, (1, 40, 48)).astype(np.int16)
    assert _finish(runner, runner.submit(model, "cpu", array, _options()))[-1].kind is ReplyKind.DONE
    assert runner.loaded(model, "cpu")
    runner.close()
    assert not runner.loaded(model, "cpu") and runner.poll() == []
    if not isinstance(runner, ThreadRunner):
        assert not runner.alive  # the process has stopped
    request_id = runner.submit(model, "cpu", array, _options())
    assert _finish(runner, request_id)[-1].kind is ReplyKind.DONE and runner.loaded(model, "cpu")


# Applicability, report warnings and the automatic model choice, with the shipped models on real images
# ----------------------------------------------------------------------------------------------------------------

# A unilateral QaTa val case (Testing/test_consistency.py): its true report, in the image's sides.
UNILATERAL_ID = "cxr_s11236-e25185-r1"
UNILATERAL_REPORT = "unilateral pulmonary infection, one infected area, lower left lung."


@pytest.fixture(scope="module")
def shipped_runner():
    """One thread runner for these tests: it keeps every shipped model loaded once."""
    runner = ThreadRunner()
    yield runner
    runner.close()


def _image_node(scene, path):
    from languageguidedseg.imageio import read_image

    return mrml.add_volume_node(scene, read_image(path), Path(path).stem, source=path)


def _kvasir_frame(kvasir):
    from languageguidedseg.data import load_split

    return load_split(kvasir, "val", validate=False)[0].image_path


class Recording:
    """A runner that records the model each request names."""

    def __init__(self, runner):
        self.runner = runner
        self.models = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def submit(self, model, device, array, options):
        self.models.append(model)
        return self.runner.submit(model, device, array, options)


def test_an_image_outside_the_models_domain_is_not_segmented_without_a_report_until_the_user_asks(
        scene, kvasir, shipped_runner):
    """A colonoscopy frame with the chest X-ray model: no approximated report and no mask, the warning instead;
    "Segment anyway" writes the mask once, still without a report in the box; a typed report segments, warned."""
    from languageguidedseg.controller import Warnings

    volume = _image_node(scene, _kvasir_frame(kvasir))
    parameters = ReportLoopParameters(inputVolume=volume, scope="volume", device="cpu", model="qata-cxr")
    controller, events = _controller(parameters, runner=shipped_runner)
    assert controller.warnings == Warnings()
    before = _scene_state(scene, parameters)
    controller.run()
    controller.wait(120)
    warning = ("this image does not look like a frontal chest X-ray (the images qata-cxr was trained on); its mask and "
               "approximated report are unreliable")
    assert controller.warnings == Warnings(warning, (), True)
    assert (LoopEvent.WARNINGS, Warnings(warning, (), True)) in events
    assert LoopEvent.RESULT not in _names(events) and LoopEvent.ERROR not in _names(events)
    assert _scene_state(scene, parameters)[0] == before[0] and parameters.outputSegmentation is None
    status = controller.report_status()
    assert parameters.report == "" and status.kind == "empty"
    assert status.message == (f"No report approximated: {warning}. Type a report to segment with it, or press "
                              "Segment anyway to segment without one.")
    assert (LoopEvent.STATUS, f"Nothing was segmented: {warning}.") in events

    events.clear()
    controller.segment_anyway()
    controller.wait(120)
    result = controller.last_result
    assert result is not None and result.in_domain is False and result.domain_warning == warning
    assert result.model == "qata-cxr" and result.report == "" and result.similarity is None
    assert parameters.outputSegmentation is not None and parameters.report == ""
    np.testing.assert_array_equal(mrml.segment_mask(parameters.outputSegmentation, result.segment_id, volume),
                                  result.mask)
    assert controller.warnings == Warnings(warning, (), False)  # still shown, nothing more to confirm
    assert "guided by the image alone" in controller.describe(result)

    # Typing a report: "Segment anyway" is no longer offered; the report segments as usual, the warning kept.
    events.clear()
    controller.set_report("bilateral pulmonary infection, two infected areas.")
    assert controller.warnings == Warnings(warning, (), False)
    controller.run()
    controller.wait(120)
    assert controller.last_result.report_source == "given" and controller.warnings.domain == warning
    assert LoopEvent.RESULT in _names(events)


def test_an_in_domain_image_fills_the_box_the_similarity_is_labelled_and_report_warnings_come_and_go(
        scene, qata, kvasir, shipped_runner):
    from languageguidedseg.controller import Warnings

    xray = _image_node(scene, qata / "images" / f"{UNILATERAL_ID}.png")
    parameters = ReportLoopParameters(inputVolume=xray, scope="volume", device="cpu", model="qata-cxr", sides="image")
    controller, events = _controller(parameters, runner=shipped_runner)
    controller.run()
    controller.wait(120)
    result = controller.last_result
    assert result.in_domain is True and result.report_source == "prototype" and result.report
    status = controller.report_status()
    assert status.kind == "approximated" and parameters.report == result.report
    assert f"prototype similarity {result.similarity:.2f}: how close the nearest of the model's prototype reports " \
           "is, not a confidence" in status.message
    assert controller.warnings == Warnings()

    # The report names the other side from the one the image shows: warned about, beside the box; the mask follows it.
    controller.set_report(UNILATERAL_REPORT.replace("left", "right"))
    controller.run()
    controller.wait(120)
    assert controller.warnings == Warnings("", ("the report names the right lung only; the image shows findings on "
                                                "the left lung",))
    assert controller.last_result.report_warnings == list(controller.warnings.report)
    events.clear()
    controller.set_report(UNILATERAL_REPORT)  # the true report: the warning goes
    controller.run()
    controller.wait(120)
    assert controller.warnings == Warnings() and (LoopEvent.WARNINGS, Warnings()) in events

    # Another input outside the model's domain: the approximation of the X-ray is not left in the box for it.
    controller.clear_report()
    controller.run()
    controller.wait(120)
    assert parameters.report == result.report
    parameters.inputVolume = _image_node(scene, _kvasir_frame(kvasir))
    controller.run()
    controller.wait(120)
    assert parameters.report == "" and controller.warnings.segment_anyway
    parameters.inputVolume = xray  # the warnings are about the frame, not about the X-ray
    assert controller.warnings == Warnings()


def test_auto_chooses_the_model_once_per_input_and_says_when_none_fits(scene, qata, kvasir, shipped_runner):
    recording = Recording(shipped_runner)
    frame = _image_node(scene, _kvasir_frame(kvasir))
    parameters = ReportLoopParameters(inputVolume=frame, scope="volume", device="cpu")
    assert parameters.model == "auto"
    controller, events = _controller(parameters, runner=recording)
    assert controller.model_title("auto") == "Automatic" and controller.model_choice() is None
    controller.run()
    controller.wait(120)
    assert controller.last_result.model == "kvasir-polyp" and controller.last_result.in_domain is True
    assert controller.model_choice() == "kvasir-polyp" and controller.model_title("auto") == "Automatic (kvasir-polyp)"
    assert controller.model_title("qata-cxr") == "qata-cxr"
    controller.set_report("one polyp")
    controller.run()
    controller.wait(120)
    assert recording.models == ["auto", "kvasir-polyp"]  # the next run reuses the choice

    # A new input chooses again.
    parameters.inputVolume = _image_node(scene, qata / "images" / f"{UNILATERAL_ID}.png")
    assert controller.model_choice() is None
    controller.clear_report()
    controller.run()
    controller.wait(120)
    assert recording.models[-1] == "auto" and controller.model_choice() == "qata-cxr"

    # No installed model is made for a flat grey image: one line saying what the models are for; nothing written.
    flat = _volume(scene)
    flat.GetImageData().GetPointData().GetScalars().Fill(500)
    parameters.inputVolume, parameters.outputSegmentation = flat, None
    events.clear()
    controller.run()
    controller.wait(120)
    errors = [payload for event, payload in events if event is LoopEvent.ERROR]
    assert len(errors) == 1 and isinstance(errors[0], LgsegError)
    assert str(errors[0]).startswith("no installed model is made for this image; the models are for: ")
    assert "qata-cxr" in str(errors[0]) and "kvasir-polyp" in str(errors[0])
    assert (LoopEvent.STATUS, f"{errors[0]}; the scene was not changed.") in events
    assert parameters.outputSegmentation is None and controller.model_choice() is None


def test_runner_chooses_the_model_for_auto_and_keeps_every_model_it_judged_with(runner, kvasir):
    """``"auto"`` is resolved where the model runs (thread or worker process): the reply names the model chosen, and
    the installed models stay loaded, so that choosing again loads nothing."""
    from languageguidedseg.imageio import image_array, read_image
    from languageguidedseg.package import list_models

    frame = image_array(read_image(_kvasir_frame(kvasir)))
    for _ in range(2):
        reply = _finish(runner, runner.submit("auto", "cpu", frame, _options(rgb=True)))[-1]
        assert reply.kind is ReplyKind.DONE and reply.payload.model == "kvasir-polyp"
        assert reply.payload.result.in_domain is True and reply.payload.segment_style[2] == "kvasir-polyp"
    assert runner.loaded("kvasir-polyp", "cpu")
    if isinstance(runner, ThreadRunner):
        assert sorted(runner.loads) == sorted((info.name, "cpu") for info in list_models())
