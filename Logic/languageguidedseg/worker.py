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

As Slicer's ``slicer.util.launchConsoleProcess`` runs a console program: no console window on Windows, and the
process's output (stdout and stderr) read by a thread and logged by the thread that polls (Slicer's log handlers
write to Qt widgets, so not from another thread). Closing never waits on the calling (GUI) thread: the process is
asked to stop, and a thread reaps it, or kills it after a grace period.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import IO, Any, Optional

from .errors import LgsegError
from .options import AUTO_MODEL
from .runner import ModelCache, Reply, ReplyKind, Request, model_key, serve_request

logger = logging.getLogger(__name__)

OUTPUT_LINES = 10  # the worker's last output lines, shown when it stops
STOP_GRACE_SECONDS = 5.0  # how long a closed worker may take to stop before it is killed


def find_worker(executable: str = "PythonSlicer") -> Optional[ProcessWorker]:
    """The worker process as the 3D Slicer module runs it: ``executable`` (Slicer's own Python, ``PythonSlicer``)
    found on the PATH, not started yet; None when it is not there."""
    path = shutil.which(executable)
    return ProcessWorker(path) if path else None


class ProcessWorker:
    """A worker process serving segmentation requests (see the module docstring), a
    :class:`languageguidedseg.runner.Runner`. Use it from one thread (the controller's GUI thread); nothing here
    blocks except :meth:`wait` (and :meth:`poll`, at most 0.1 s, once, for the last output of a process that
    stopped)."""

    def __init__(self, executable: Optional[str] = None, stop_grace_s: float = STOP_GRACE_SECONDS):
        self._executable = executable or sys.executable
        self._stop_grace_s = stop_grace_s
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None  # reads the process's output into _output_queue
        self._output_queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._last_output: deque[str] = deque(maxlen=OUTPUT_LINES)
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
        # Unbuffered output: its lines reach the log in order, and a crash loses none.
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [engine_folder, os.environ.get("PYTHONPATH")])))
        try:
            process = subprocess.Popen(
                [self._executable, "-m", "languageguidedseg.worker", host, str(port)], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                **_no_console_window())
        except BaseException:
            self.close()
            raise
        self._process = process
        self._last_output.clear()
        self._output_queue = queue.SimpleQueue()
        self._reader = threading.Thread(target=_read_lines, args=(process.stdout, self._output_queue),
                                        name="LanguageGuidedSeg worker output", daemon=True)
        self._reader.start()
        assert process.stdin is not None  # Popen(stdin=PIPE)
        try:
            process.stdin.write(key.hex() + "\n")  # not on the command line: others can read that
            process.stdin.close()
        except OSError:
            pass  # the process stopped at once: poll() reports it, with its output
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
                model = reply.payload.model if key[0] == AUTO_MODEL else key[0]  # "auto": the model it chose
                self._loaded = (model, "cpu" if reply.payload.fell_back_to_cpu else key[1])
            elif key != self._loaded:  # it may have let the loaded model go before it failed or was cancelled
                self._loaded = None
        if not replies and self._process.poll() is not None:
            if self._reader is not None:
                self._reader.join(0.1)  # its last lines; a child process that keeps the pipe open is not waited for
            self._log_output()
            code = self._process.returncode
            output = "\n".join(self._last_output)
            replies.append(Reply(-1, ReplyKind.FAILED, LgsegError(
                f"the segmentation worker process stopped (exit code {code}). Its last output:\n{output}"
                if output else f"the segmentation worker process stopped (exit code {code}) without output")))
            self.close()
        else:
            self._log_output()
        return replies

    def _log_output(self) -> None:
        """Log the lines the process wrote since the last call, on the calling thread; keep the last ones."""
        while True:
            try:
                line = self._output_queue.get_nowait()
            except queue.Empty:
                return
            self._last_output.append(line)
            logger.warning("LanguageGuidedSeg worker: %s", line)

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
        """Stop the worker process (the loaded model goes with it) without waiting for it: its running request is
        cancelled and the process asked to stop; a thread reaps it, or kills it after ``stop_grace_s`` seconds."""
        connection, process, listener = self._connection, self._process, self._listener
        self._connection = self._process = self._listener = None
        self._pending = []
        self._keys = {}
        self._loaded = None
        if process is not None:
            self._log_output()
        if connection is not None:
            try:
                connection.send(("cancel", self._next_id - 1))
                connection.send(None)
            except (OSError, ValueError):
                pass
            connection.close()
        elif listener is not None:
            listener.close()
        if process is not None:
            threading.Thread(target=_stop, args=(process, self._stop_grace_s), name="LanguageGuidedSeg worker stop",
                             daemon=True).start()


def _no_console_window() -> dict[str, Any]:
    """Popen's keywords that start a console program without a console window on Windows, as Slicer's
    ``slicer.util.launchConsoleProcess`` does (its STARTUPINFO, hidden window), and with ``CREATE_NO_WINDOW``:
    ``PythonSlicer`` is a console launcher, and its window would stay open for the worker's whole life (closing it
    kills the worker)."""
    if sys.platform != "win32":
        return {}
    info = subprocess.STARTUPINFO(dwFlags=subprocess.STARTF_USESHOWWINDOW, wShowWindow=0)  # 0: SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}


def _read_lines(stream: IO[str], lines: queue.SimpleQueue[str]) -> None:
    """A thread: queue each line the process writes until it closes its output."""
    with stream:
        for line in stream:
            lines.put(line.rstrip())


def _stop(process: subprocess.Popen, grace_s: float) -> None:
    """A thread: wait for a process asked to stop, kill it after ``grace_s`` seconds."""
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
