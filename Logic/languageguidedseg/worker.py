"""A persistent worker process that loads the model and segments, for GUIs whose thread holds Python's GIL when idle.

Inside 3D Slicer the GUI thread keeps Python's GIL while Qt's event loop waits (PythonQt is built without thread
support), so a Python worker *thread* only runs while the GUI thread runs Python code. A worker *process* has its
own interpreter: it computes while the GUI is idle, and the GUI thread only reads its replies without blocking
(:meth:`ProcessWorker.poll`). The process is started on first use with the ``spawn`` method (a fresh interpreter,
``executable``: e.g. Slicer's ``PythonSlicer``), keeps the loaded model between requests, and serves one request at
a time. PyTorch is imported in the worker only.
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any, Optional

from .errors import LgsegError


@dataclass
class WorkerResult:
    """What the worker sends back for a finished request."""

    result: Any  # the engine's SegmentationResult
    segment_name: str
    segment_color: tuple
    package_name: str
    device: str  # "CPU" or "GPU (name)"
    fell_back_to_cpu: bool = False


class ProcessWorker:
    """A worker process serving segmentation requests (see the module docstring). Not thread-safe: use it from one
    thread (the controller's GUI thread)."""

    def __init__(self, executable: Optional[str] = None):
        self._context = multiprocessing.get_context("spawn")
        self._executable = executable
        self._process: Any = None
        self._connection: Any = None
        self._cancelled_up_to: Any = None
        self._next_id = 0
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        if self._executable:
            self._context.set_executable(self._executable)
        parent, child = self._context.Pipe()
        self._cancelled_up_to = self._context.Value("q", -1)
        self._process = self._context.Process(target=_serve, args=(child, self._cancelled_up_to),
                                              name="LanguageGuidedSeg worker", daemon=True)
        self._process.start()
        child.close()
        self._connection = parent

    def submit(self, model: Any, device: str, array: Any, options: dict) -> int:
        """Send one request (``segment_array``'s keyword ``options``); returns its id."""
        self.start()
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
        self._connection.send((request_id, str(model) if model is not None else None, device, array, options))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Cancel request ``request_id`` (and any earlier one) at its next batch."""
        if self._cancelled_up_to is not None:
            with self._cancelled_up_to.get_lock():
                self._cancelled_up_to.value = max(self._cancelled_up_to.value, request_id)

    def poll(self) -> list[tuple[int, str, Any]]:
        """The replies that arrived, without waiting: ``(request_id, kind, payload)`` with kind "progress" (done,
        total), "done" (:class:`WorkerResult`), "cancelled" or "failed" (the exception). A worker that died is
        reported as a failure of every pending request id (-1)."""
        replies = []
        if self._connection is None:
            return replies
        try:
            while self._connection.poll(0):
                replies.append(self._connection.recv())
        except (EOFError, OSError):
            replies.append((-1, "failed", LgsegError("the segmentation worker process stopped; try again")))
            self.close()
        if self._process is not None and not self._process.is_alive() and not replies:
            replies.append((-1, "failed", LgsegError(
                f"the segmentation worker process stopped (exit code {self._process.exitcode}); try again")))
            self.close()
        return replies

    def wait(self, timeout: float) -> bool:
        """Block until a reply is there (scripts and tests only; a GUI calls :meth:`poll` from a timer)."""
        return self._connection is not None and self._connection.poll(timeout)

    def close(self) -> None:
        """Stop the worker process (the loaded model goes with it)."""
        connection, process = self._connection, self._process
        self._connection = self._process = None
        if connection is not None:
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
            connection.close()
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)


def _serve(connection: Any, cancelled_up_to: Any) -> None:
    """The worker process: load models on demand (cached), segment, reply. Runs until it receives None."""
    from .inference import SegmentationCancelled, Segmenter

    segmenters: dict = {}

    def segmenter(model: Optional[str], device: str) -> Segmenter:
        key = (model, device)
        if key not in segmenters:
            segmenters.clear()  # one model in memory at a time
            segmenters[key] = Segmenter(model, device=device)
        return segmenters[key]

    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        request_id, model, device, array, options = request

        def progress(done: int, total: int) -> None:
            connection.send((request_id, "progress", (done, total)))

        def cancel() -> bool:
            return cancelled_up_to.value >= request_id

        try:
            fell_back = False
            try:
                loaded = segmenter(model, device)
                result = loaded.segment_array(array, progress=progress, cancel=cancel, **options)
            except Exception as exc:
                if not _is_cuda_out_of_memory(exc) or device == "cpu":
                    raise
                import torch

                segmenters.clear()
                torch.cuda.empty_cache()
                loaded = segmenter(model, "cpu")
                fell_back = True
                result = loaded.segment_array(array, progress=progress, cancel=cancel, **options)
            config = loaded.package.config
            connection.send((request_id, "done", WorkerResult(
                result=result, segment_name=str(config.segment_name or loaded.package.name),
                segment_color=tuple(config.segment_color or (1.0, 0.0, 0.0)), package_name=loaded.package.name,
                device=_device_name(loaded.device), fell_back_to_cpu=fell_back)))
        except SegmentationCancelled:
            connection.send((request_id, "cancelled", None))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the GUI, which reports it
            connection.send((request_id, "failed", _picklable(exc)))


def _is_cuda_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _device_name(device: Any) -> str:
    if getattr(device, "type", "cpu") != "cuda":
        return "CPU"
    import torch

    return f"GPU ({torch.cuda.get_device_name(device)})"


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - some library errors cannot be pickled: keep their message
        return RuntimeError(f"{type(exc).__name__}: {exc}")
