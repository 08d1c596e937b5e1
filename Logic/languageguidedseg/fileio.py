"""Atomic file writes: an output or model file is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from .errors import LgsegError

PathLike = Union[str, os.PathLike]  # the one path type of the engine's functions


def full_suffix(path: PathLike) -> str:
    """Lower-case suffix including double suffixes such as ``.nii.gz`` and ``.seg.nrrd``."""
    name = Path(path).name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def _output_folder(target: Path) -> Path:
    """The folder of an output path, after checking that it exists and looks writable."""
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise LgsegError(f"'{folder}' is a file, not a folder; choose an output path inside a folder")
    if not folder.is_dir():
        raise LgsegError(f"output folder '{folder}' does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK):
        raise LgsegError(f"cannot write to folder '{folder}'; choose an output path you have write access to")
    try:
        is_folder = target.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise LgsegError(f"cannot create a file named '{target.name}' in folder '{folder}' "
                         f"({exc.strerror or exc.__class__.__name__}); choose another output path") from exc
    if is_folder:
        raise LgsegError(f"output '{target}' is a folder; give a file name such as '{target / 'mask.nii.gz'}'")
    return folder


def _temporary_file(folder: Path, prefix: str, suffix: str) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as exc:
        raise LgsegError(f"cannot create a file in folder '{folder}' ({exc.strerror or exc.__class__.__name__}); "
                         "choose an output path you have write access to") from exc
    os.close(fd)
    return Path(name)


def check_writable(path: PathLike) -> Path:
    """Check, before any work is done, that ``path`` can be written; return its folder.

    Raises LgsegError when the folder is missing or read-only, or when ``path`` is an existing folder. A probe file
    is created and removed at once, so the answer holds where permission bits do not tell (read-only mounts, root).
    """
    target = Path(path)
    folder = _output_folder(target)
    probe = _temporary_file(folder, f".{target.name}.", ".probe")
    with contextlib.suppress(OSError):
        probe.unlink()
    return folder


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    tmp_path = _temporary_file(_output_folder(target), f".{target.name}.", f".tmp{full_suffix(target)}")
    try:
        yield tmp_path
        # mkstemp creates private files; give the result the permissions a normal write would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
