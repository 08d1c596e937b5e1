"""The server's private folder: everything ``lgseg serve`` writes (uploads, downloads, other libraries' temporary
files), in one place that goes when the server goes.

It is ``lgseg-serve-XXXXXXXX`` in the system's temporary folder, mode 0700, with a ``pid`` file naming the process
that owns it. The owner removes it when it stops, on Ctrl+C and on every signal that would end it and that a process
can catch (SIGHUP from a closed terminal included); a server killed outright (SIGKILL, a power cut) cannot, so the
next ``lgseg serve`` of the same user removes every such folder whose process is gone (on Linux and macOS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Optional

PREFIX = "lgseg-serve-"
PID_FILE = "pid"
# The signals whose default action ends the process and that a handler can catch. SIGINT is left to Python (it
# raises KeyboardInterrupt, which unwinds the same way) and SIGPIPE is ignored by Python.
EXIT_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGHUP", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF")
    if hasattr(signal, name))


class ServerDirectory:
    """A new private folder for this process, with its pid file; :meth:`remove` deletes it."""

    def __init__(self, parent: Optional[Path] = None):
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        start = _process_start(os.getpid())
        (self.path / PID_FILE).write_text(f"{os.getpid()} {start if start is not None else ''}\n")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_stale(parent: Optional[Path] = None) -> list[Path]:
    """Remove this user's server folders whose process has ended (killed before it could remove them); the removed
    folders."""
    if os.name == "nt":
        return []  # Windows: os.kill(pid, 0) would send Ctrl+C; its temporary folder is the user's own anyway
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            info = folder.lstat()
            if not folder.is_dir() or folder.is_symlink() or info.st_uid != os.getuid():
                continue
            words = (folder / PID_FILE).read_text().split()
        except (OSError, ValueError):
            continue  # another user's, or one being created this instant: not ours to judge
        if words and words[0].isdigit() and not _alive(int(words[0]), words[1] if len(words) > 1 else None):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int, start: Optional[str]) -> bool:
    """Whether process ``pid`` runs and is the one that wrote the pid file (the same start time where the system
    tells it: a pid reused by another process does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process now has that pid: ours is gone unless the start time says otherwise
    now = _process_start(pid)
    return start is None or now is None or now == start


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), or None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """While inside: each of :data:`EXIT_SIGNALS` raises SystemExit (128 + its number) in the main thread, so that
    ``finally`` blocks and context managers run (and remove the server's folder). The handlers before are restored
    afterwards."""

    def leave(signum: int, _: Optional[FrameType]) -> None:
        raise SystemExit(128 + signum)

    saved = {number: signal.signal(number, leave) for number in EXIT_SIGNALS}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """While inside, Python's temporary files and folders (``tempfile``) go into ``folder``: trame-slicer makes a
    cache folder for every scene and never removes it; inside the server's folder it goes with it."""
    folder.mkdir(mode=0o700, exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved
