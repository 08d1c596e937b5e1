"""Atomic file writes: an output or model file is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import LgsegError

PathLike = Union[str, os.PathLike]


def full_suffix(path: PathLike) -> str:
    """Lower-case suffix including double suffixes such as ``.nii.gz`` and ``.seg.nrrd``."""
    name = Path(path).name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise LgsegError(f"output folder '{folder}' does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK):
        raise LgsegError(f"cannot write to folder '{folder}'; choose an output path you have write access to")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{full_suffix(target)}", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
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
