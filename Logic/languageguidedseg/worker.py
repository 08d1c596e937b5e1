"""A persistent worker process that loads the model and segments, for GUIs whose thread holds Python's GIL when idle.

Inside 3D Slicer the GUI thread keeps Python's GIL while Qt's event loop waits (PythonQt is built without thread
support), so a Python worker *thread* only runs while the GUI thread runs Python code. A worker *process* has its
own interpreter: it computes while the GUI is idle, and the GUI thread only reads its replies without blocking
(:meth:`ProcessWorker.poll`).

The process is a plain ``python -m languageguidedseg.worker`` (``executable``: e.g. Slicer's ``PythonSlicer``), not a
``multiprocessing`` child: Slicer's ``__main__`` is its startup script, which the ``spawn`` method would run again in
the child. It connects back to a local socket with a random key, keeps the loaded model between requests and serves
one request at a time; PyTorch is imported there only.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
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
    """A worker process serving segmentation requests (see the module docstring). Use it from one thread (the
    controller's GUI thread); nothing here blocks except :meth:`wait` and :meth:`close`."""

    def __init__(self, executable: Optional[str] = None):
        self._executable = executable or sys.executable
        self._process: Optional[subprocess.Popen] = None
        self._listener: Any = None
        self._connection: Any = None  # set by the accepting thread once the worker has connected
        self._accepted = threading.Event()
        self._pending: list = []  # messages sent before the worker connected
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process (returns at once; it connects back in the background)."""
        if self.alive:
            return
        self.close()
        key = os.urandom(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        engine_folder = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [engine_folder, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen([self._executable, "-m", "languageguidedseg.worker", host, str(port)],
                                         stdin=subprocess.PIPE, env=env)
        stdin = self._process.stdin
        assert stdin is not None  # Popen(stdin=PIPE)
        stdin.write(key.hex().encode("ascii") + b"\n")  # not on the command line: others can read that
        stdin.close()
        self._accepted.clear()
        threading.Thread(target=self._accept, name="LanguageGuidedSeg worker connection", daemon=True).start()

    def _accept(self) -> None:
        listener = self._listener
        try:
            self._connection = listener.accept()
        except (OSError, EOFError, ValueError):
            self._connection = None  # the worker never connected: poll() reports the process's exit
        finally:
            listener.close()
            self._accepted.set()

    def _send(self, message: Any) -> None:
        self._pending.append(message)
        self._flush()

    def _flush(self) -> None:
        """Send what waited for the connection, in order."""
        if self._connection is None:
            return
        while self._pending:
            self._connection.send(self._pending.pop(0))

    def submit(self, model: Any, device: str, array: Any, options: dict) -> int:
        """Send one request (``segment_array``'s keyword ``options``); returns its id."""
        self.start()
        request_id = self._next_id
        self._next_id += 1
        self._send(("request", request_id, str(model) if model is not None else None, device, array, options))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Cancel request ``request_id`` (and any earlier one) at its next batch."""
        if self._process is not None:
            self._send(("cancel", request_id))

    def poll(self) -> list[tuple[int, str, Any]]:
        """The replies that arrived, without waiting: ``(request_id, kind, payload)`` with kind "progress" (done,
        total), "done" (:class:`WorkerResult`), "cancelled" or "failed" (the exception). A worker that stopped is
        reported as a failure with request id -1."""
        replies: list = []
        if self._process is None:
            return replies
        if self._connection is not None:
            try:
                self._flush()
                while self._connection.poll(0):
                    replies.append(self._connection.recv())
            except (EOFError, OSError):
                pass
        if not replies and self._process.poll() is not None:
            code = self._process.returncode
            replies.append((-1, "failed", LgsegError(f"the segmentation worker process stopped (exit code {code}); "
                                                     "see the application log, then try again")))
            self.close()
        return replies

    def wait(self, timeout: float) -> bool:
        """Block until a reply is there (scripts and tests only; a GUI calls :meth:`poll` from a timer)."""
        if self._process is None:
            return False
        if self._connection is None:
            self._accepted.wait(timeout)
            return False
        return self._connection.poll(timeout)

    def close(self) -> None:
        """Stop the worker process (the loaded model goes with it)."""
        connection, process, listener = self._connection, self._process, self._listener
        self._connection = self._process = self._listener = None
        self._pending = []
        if connection is not None:
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
            connection.close()
        elif listener is not None:
            listener.close()
        if process is not None:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# ----------------------------------------------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    """``python -m languageguidedseg.worker HOST PORT``, with the connection key on stdin."""
    host, port = (argv or sys.argv[1:])[:2]
    key = bytes.fromhex(sys.stdin.readline().strip())
    # Import the engine (numpy, torch) before the reader thread unpickles requests that hold numpy arrays: two
    # threads importing numpy at once can fail.
    from . import inference  # noqa: F401

    connection = Client((host, int(port)), authkey=key)
    requests: queue.Queue = queue.Queue()
    cancelled = [-1]

    def read() -> None:  # a thread: cancels must arrive while the main thread computes
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                message = None
            if message is None:
                requests.put(None)
                return
            if message[0] == "cancel":
                cancelled[0] = max(cancelled[0], message[1])
            else:
                requests.put(message[1:])

    threading.Thread(target=read, daemon=True).start()
    _serve(connection, requests, lambda request_id: cancelled[0] >= request_id)
    connection.close()
    return 0


def _serve(connection: Any, requests: queue.Queue, is_cancelled: Any) -> None:
    """Load models on demand (one at a time), segment, reply; until the request queue yields None."""
    from .inference import SegmentationCancelled, Segmenter

    segmenters: dict = {}

    def segmenter(model: Optional[str], device: str) -> Segmenter:
        key = (model, device)
        if key not in segmenters:
            segmenters.clear()
            segmenters[key] = Segmenter(model, device=device)
        return segmenters[key]

    while True:
        request = requests.get()
        if request is None:
            return
        request_id, model, device, array, options = request

        # The request's id bound now: these run during this request only, but say so to the reader (and to ruff).
        def progress(done: int, total: int, request_id: int = request_id) -> None:
            connection.send((request_id, "progress", (done, total)))

        def cancel(request_id: int = request_id) -> bool:
            return is_cancelled(request_id)

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


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: replies must unpickle as languageguidedseg.worker classes.
    from languageguidedseg.worker import main as package_main

    sys.exit(package_main())
