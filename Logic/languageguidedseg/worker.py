"""A persistent worker process that loads the model and segments, for GUIs whose thread holds Python's GIL when idle.

Inside 3D Slicer the GUI thread keeps Python's GIL while Qt's event loop waits (PythonQt is built without thread
support), so a Python worker *thread* only runs while the GUI thread runs Python code. A worker *process* has its
own interpreter: it computes while the GUI is idle, and the GUI thread only reads its replies without blocking
(:meth:`ProcessWorker.poll`).

The process is a plain ``python -m languageguidedseg.worker`` (``executable``: e.g. Slicer's ``PythonSlicer``), not a
``multiprocessing`` child: Slicer's ``__main__`` is its startup script, which the ``spawn`` method would run again in
the child. It connects back to a local socket with a random key, keeps the loaded model between requests and serves
one request at a time with :func:`languageguidedseg.runner.serve_request`, as
:class:`~languageguidedseg.runner.ThreadRunner` does in a thread; PyTorch is imported there only.
:class:`ProcessWorker` keeps the runner contract (:class:`languageguidedseg.runner.Runner`); :func:`find_worker` gives
it as the 3D Slicer module runs it.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Optional

from .errors import LgsegError
from .runner import ModelCache, Reply, ReplyKind, Request, model_key, serve_request


def find_worker(executable: str = "PythonSlicer") -> Optional[ProcessWorker]:
    """The worker process as the 3D Slicer module runs it: ``executable`` (Slicer's own Python, ``PythonSlicer``)
    found on the PATH, not started yet; None when it is not there."""
    path = shutil.which(executable)
    return ProcessWorker(path) if path else None


class ProcessWorker:
    """A worker process serving segmentation requests (see the module docstring), a
    :class:`languageguidedseg.runner.Runner`. Use it from one thread (the controller's GUI thread); nothing here
    blocks except :meth:`wait` and :meth:`close`."""

    def __init__(self, executable: Optional[str] = None):
        self._executable = executable or sys.executable
        self._process: Optional[subprocess.Popen] = None
        self._listener: Any = None
        self._connection: Any = None  # set by the accepting thread once the worker has connected
        self._accepted = threading.Event()
        self._pending: list = []  # messages sent before the worker connected
        self._next_id = 0
        self._keys: dict[int, tuple[str, str]] = {}  # the model each unanswered request asked for
        self._loaded: Optional[tuple[str, str]] = None  # the model the process holds

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

    def submit(self, model: Optional[str], device: str, array: Any, options: dict) -> int:
        """Send one request (``segment_array``'s keyword ``options``); returns its id."""
        self.start()
        request_id = self._next_id
        self._next_id += 1
        model = str(model) if model is not None else None
        self._keys[request_id] = model_key(model, device)
        self._send(("request", Request(request_id, model, device, array, options)))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Cancel request ``request_id`` (and any earlier one) at its next batch."""
        if self._process is not None:
            self._send(("cancel", request_id))

    def poll(self) -> list[Reply]:
        """The replies that arrived, without waiting. A worker that stopped is reported as a failure with request
        id -1."""
        replies: list[Reply] = []
        if self._process is None:
            return replies
        if self._connection is not None:
            try:
                self._flush()
                while self._connection.poll(0):
                    replies.append(self._connection.recv())
            except (EOFError, OSError):
                pass
        for reply in replies:
            if reply.kind is ReplyKind.PROGRESS or reply.request_id not in self._keys:
                continue
            key = self._keys.pop(reply.request_id)
            if reply.kind is ReplyKind.DONE:
                self._loaded = (key[0], "cpu") if reply.payload.fell_back_to_cpu else key
            elif key != self._loaded:  # it may have let the loaded model go before it failed or was cancelled
                self._loaded = None
        if not replies and self._process.poll() is not None:
            code = self._process.returncode
            replies.append(Reply(-1, ReplyKind.FAILED, LgsegError(
                f"the segmentation worker process stopped (exit code {code}); see the application log, then try "
                "again")))
            self.close()
        return replies

    def loaded(self, model: Optional[str], device: str) -> bool:
        return self.alive and self._loaded == model_key(model, device)

    def wait(self, timeout: float) -> bool:
        """Block until a reply is there or ``timeout`` seconds have passed (scripts and tests only; a GUI calls
        :meth:`poll` from a timer)."""
        if self._process is None:
            time.sleep(timeout)  # nothing can arrive
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
        self._keys = {}
        self._loaded = None
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
    requests: queue.Queue[Optional[Request]] = queue.Queue()
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
                requests.put(message[1])

    def send(reply: Reply) -> None:
        if reply.kind is ReplyKind.FAILED:
            reply = reply._replace(payload=_picklable(reply.payload))
        connection.send(reply)

    threading.Thread(target=read, daemon=True).start()
    models = ModelCache()
    for request in iter(requests.get, None):
        serve_request(models, request, send, lambda request_id: request_id <= cancelled[0])
    connection.close()
    return 0


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - some library errors cannot be pickled: keep their message
        return RuntimeError(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: replies must unpickle as languageguidedseg classes.
    from languageguidedseg.worker import main as package_main

    sys.exit(package_main())
