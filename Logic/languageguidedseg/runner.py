"""Where the model runs: one contract for a thread of this process and for a worker process.

The report-loop controller (:mod:`languageguidedseg.controller`) hands a snapshot of the input (a numpy array and
the keyword options of ``Segmenter.segment_array``) to a :class:`Runner` and reads its replies without waiting.
Two runners keep the contract:

* :class:`ThreadRunner`: a thread of this process (the web page, scripts, tests);
* :class:`languageguidedseg.worker.ProcessWorker`: a worker process (3D Slicer, whose GUI thread holds Python's GIL
  while it is idle, so that a thread there would only run while the GUI runs Python code).

Both serve a request with :func:`serve_request`, one request at a time: the model from a :class:`ModelCache` (the
model named ``"auto"`` is chosen there for the image with :func:`languageguidedseg.inference.choose_model`), the
fallback of :func:`with_cpu_fallback` when the GPU runs out of memory, the device named by :func:`device_name`; so
both send the same replies (:class:`Reply`). Importing this module needs neither PyTorch nor ``slicer``.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Protocol, TypeVar

from . import mrml
from .options import AUTO_MODEL

logger = logging.getLogger(__name__)

T = TypeVar("T")
LoadSegmenter = Callable[[Optional[str], str], Any]


class ReplyKind(enum.Enum):
    """What a reply says about its request."""

    PROGRESS = "progress"  # payload: (done, total) slices
    DONE = "done"  # payload: a RunResult
    CANCELLED = "cancelled"  # payload: None
    FAILED = "failed"  # payload: the exception


class Reply(NamedTuple):
    """One reply of a runner; request id -1 with FAILED: the runner itself stopped (a worker process died)."""

    request_id: int
    kind: ReplyKind
    payload: Any


@dataclass(frozen=True)
class Request:
    """One segmentation: ``segment_array(array, **options)`` with the model ``model`` ("" or None: the default;
    ``"auto"``: the installed model made for the image) on ``device``."""

    request_id: int
    model: Optional[str]
    device: str
    array: Any  # numpy array
    options: dict


@dataclass(frozen=True)
class RunResult:
    """The payload of a DONE reply."""

    result: Any  # the engine's SegmentationResult
    segment_style: tuple[str, tuple[float, float, float], str]  # segment name, colour and tag of the model
    device: str  # where it ran: "CPU" or "GPU (name)"
    fell_back_to_cpu: bool = False  # the GPU ran out of memory, so it ran on the CPU
    model: str = ""  # the model that ran: the one chosen for the image when the request named "auto"


class Runner(Protocol):
    """Runs segmentation requests away from the calling (GUI) thread. Call it from one thread; nothing blocks except
    :meth:`wait`."""

    def submit(self, model: Optional[str], device: str, array: Any, options: dict) -> int:
        """Queue one request; returns its id (increasing)."""

    def poll(self) -> list[Reply]:
        """The replies that arrived since the last poll, without waiting."""

    def cancel(self, request_id: int) -> None:
        """Cancel request ``request_id`` and every earlier one at their next batch (they reply CANCELLED)."""

    def loaded(self, model: Optional[str], device: str) -> bool:
        """Whether the model for ``(model, device)`` is loaded, so that a request for it starts at once."""

    def wait(self, timeout: float) -> bool:
        """Block until a reply is there or ``timeout`` seconds have passed (scripts and tests; a GUI polls)."""

    def close(self) -> None:
        """Cancel what was submitted and let the loaded model go; a later submit starts afresh."""


def model_key(model: Optional[str], device: str) -> tuple[str, str]:
    """What identifies a loaded model: "" and None both mean the default model."""
    return str(model or ""), device


class ModelCache:
    """The loaded models (loading takes seconds, a slice milliseconds); usable from any thread.

    Every model asked for on one device stays loaded (the shipped models are small, and ``"auto"`` judges the image
    with each installed one): asking for another device lets the others go, and so does a load that fails.

    :param load: ``(model, device) -> Segmenter``; default :func:`languageguidedseg.mrml.load_segmenter`.
    """

    def __init__(self, load: Optional[LoadSegmenter] = None):
        self._load = load or mrml.load_segmenter
        self._lock = threading.Lock()
        self._segmenters: dict[tuple[str, str], Any] = {}

    def get(self, model: Optional[str], device: str) -> Any:
        """The model for ``(model, device)``, loaded now unless it is held."""
        key = model_key(model, device)
        with self._lock:
            if key not in self._segmenters:
                if any(held[1] != device for held in self._segmenters):
                    self._segmenters = {}  # free the other device's models before loading
                try:
                    self._segmenters[key] = self._load(model or None, device)
                except BaseException:
                    self._segmenters = {}
                    raise
            return self._segmenters[key]

    def holds(self, model: Optional[str], device: str) -> bool:
        """Whether :meth:`get` returns at once (read without the lock: a load in progress does not count)."""
        return model_key(model, device) in self._segmenters

    def clear(self) -> None:
        with self._lock:
            self._segmenters = {}


def is_gpu_out_of_memory(exc: BaseException) -> bool:
    """True for PyTorch's CUDA out-of-memory error (checked without importing torch when it is not loaded)."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def with_cpu_fallback(models: ModelCache, model: Optional[str], device: str,
                      compute: Callable[[Any], T]) -> tuple[T, Any, bool]:
    """``compute(segmenter)`` with the model for ``device``; when the GPU runs out of memory, the GPU model is let go
    and ``compute`` runs again on the CPU. Returns compute's value, the segmenter that gave it and whether it fell
    back to the CPU; any other error is raised as it is."""
    segmenter = models.get(model, device)
    try:
        return compute(segmenter), segmenter, False
    except Exception as exc:
        if not is_gpu_out_of_memory(exc) or segmenter.device.type == "cpu":
            raise
    logger.warning("LanguageGuidedSeg: the GPU ran out of memory; running on the CPU")
    segmenter = None  # outside the except block: the error's traceback no longer holds the GPU model
    models.clear()
    import torch

    torch.cuda.empty_cache()
    segmenter = models.get(model, "cpu")
    return compute(segmenter), segmenter, True


def device_name(device: Any) -> str:
    """Where a model runs, for the user: "CPU" or "GPU (name)"."""
    if device.type != "cuda":
        return "CPU"
    import torch

    return f"GPU ({torch.cuda.get_device_name(device)})"


def serve_request(models: ModelCache, request: Request, send: Callable[[Reply], None],
                  is_cancelled: Callable[[int], bool]) -> None:
    """Segment one request and ``send`` its replies: PROGRESS after each batch, then DONE, CANCELLED or FAILED."""
    from .inference import SegmentationCancelled  # imports torch: only where a request is served

    def progress(done: int, total: int) -> None:
        send(Reply(request.request_id, ReplyKind.PROGRESS, (done, total)))

    def cancel() -> bool:
        return is_cancelled(request.request_id)

    def segment(segmenter: Any) -> Any:
        return segmenter.segment_array(request.array, progress=progress, cancel=cancel, **request.options)

    if cancel():  # cancelled while it waited: no model to load for it
        send(Reply(request.request_id, ReplyKind.CANCELLED, None))
        return
    try:
        model = request.model
        if model == AUTO_MODEL:
            model = choose(models, request)
        result, segmenter, fell_back = with_cpu_fallback(models, model, request.device, segment)
        reply = Reply(request.request_id, ReplyKind.DONE, RunResult(
            result, mrml.segment_style(segmenter.config), device_name(segmenter.device), fell_back,
            model or segmenter.config.name))
    except SegmentationCancelled:
        reply = Reply(request.request_id, ReplyKind.CANCELLED, None)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the front end, which reports it
        reply = Reply(request.request_id, ReplyKind.FAILED, exc)
    send(reply)


def choose(models: ModelCache, request: Request) -> str:
    """The installed model made for the request's image (``--model auto``), judged with the models of ``models``, which
    keeps them loaded for the segmentation and the next choice; raises LgsegError listing what the models are for
    when none fits."""
    from .inference import choose_model

    options = request.options
    name, _ = choose_model(request.array, rgb=options.get("rgb", False), axis=options.get("axis", 2),
                           slice_index=options.get("slice_index"), device=request.device,
                           load=lambda name: models.get(name, request.device))
    return name


class ThreadRunner:
    """A :class:`Runner` in a thread of this process: the thread serves the queued requests one at a time and ends
    when none is left (no idle thread stays behind); the model stays loaded in :attr:`models` between requests.

    :param load_segmenter: ``(model, device) -> Segmenter``; default :func:`languageguidedseg.mrml.load_segmenter`.
    """

    def __init__(self, load_segmenter: Optional[LoadSegmenter] = None):
        self.models = ModelCache(load_segmenter)
        self._news = threading.Condition()  # guards everything below; notified when a reply arrives
        self._requests: deque[Request] = deque()
        self._replies: list[Reply] = []
        self._serving = False
        self._next_id = 0
        self._cancelled = -1  # every request up to this id is cancelled

    def submit(self, model: Optional[str], device: str, array: Any, options: dict) -> int:
        with self._news:
            request_id = self._next_id
            self._next_id += 1
            self._requests.append(Request(request_id, model, device, array, options))
            if not self._serving:
                self._serving = True
                threading.Thread(target=self._serve, name="LanguageGuidedSeg", daemon=True).start()
        return request_id

    def _serve(self) -> None:
        while True:
            with self._news:
                if not self._requests:
                    self._serving = False
                    return
                request = self._requests.popleft()
            serve_request(self.models, request, self._send, self._is_cancelled)

    def _send(self, reply: Reply) -> None:
        with self._news:
            self._replies.append(reply)
            self._news.notify_all()

    def _is_cancelled(self, request_id: int) -> bool:
        return request_id <= self._cancelled

    def poll(self) -> list[Reply]:
        with self._news:
            replies, self._replies = self._replies, []
        return replies

    def cancel(self, request_id: int) -> None:
        with self._news:
            self._cancelled = max(self._cancelled, request_id)

    def loaded(self, model: Optional[str], device: str) -> bool:
        return self.models.holds(model, device)

    def wait(self, timeout: float) -> bool:
        with self._news:
            return self._news.wait_for(lambda: bool(self._replies), timeout)

    def close(self) -> None:
        """Cancel every request (the one being served stops after its batch) and let the loaded model go."""
        with self._news:
            self._cancelled = self._next_id - 1
            self._replies = []
        self.models.clear()
