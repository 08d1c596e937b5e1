"""Uploads: streamed to disk in the server's private folder, with a size limit, never kept in memory whole.

Each upload (one file, or the files of one DICOM folder) gets its own sub-folder. File names are reduced to their
last path component; nothing uploaded is executed or unpickled, only read by the engine's image readers.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import LgsegError
from .access import format_size

_CHUNK = 1 << 20


class UploadTooLargeError(LgsegError):
    """The upload is larger than the server's limit."""


class UploadFolder:
    """The server's private temporary folder (mode 0700), removed by :meth:`remove` (at exit)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.path = Path(tempfile.mkdtemp(prefix="lgseg-web-"))
        self._count = 0

    def new_folder(self) -> Path:
        self._count += 1
        folder = self.path / f"upload-{self._count}"
        folder.mkdir()
        return folder

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def safe_name(name: str, index: int) -> str:
    """The last path component of a browser-given name (DICOM folders send relative paths), never empty or hidden."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable())
    if base in ("", ".", "..") or base.startswith("."):
        base = f"file-{index}"
    return base


async def receive_multipart(request: Any, folder: Path, max_bytes: int) -> list[Path]:
    """Write the files of a multipart POST into ``folder``; raises UploadTooLargeError past ``max_bytes`` in total."""
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise UploadTooLargeError(_too_large(max_bytes))
    reader = await request.multipart()
    written: list[Path] = []
    total = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if part.filename is None:
            await part.release()
            continue
        name = safe_name(part.filename, len(written))
        target = folder / name
        if target.exists():  # two files of one folder upload with the same name in different sub-folders
            target = folder / f"{len(written)}-{name}"
        with open(target, "wb") as out:
            while True:
                chunk = await part.read_chunk(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise UploadTooLargeError(_too_large(max_bytes))
                out.write(chunk)
        written.append(target)
    if not written:
        raise LgsegError("the upload contained no file; choose an image file or a DICOM folder")
    return written


def _too_large(max_bytes: int) -> str:
    return (f"the upload is larger than this server's limit of {format_size(max_bytes)}; "
            "choose a smaller file or restart the server with a larger --max-upload")


def upload_handler(folder: UploadFolder, on_upload: Callable[[list[Path]], Awaitable[Optional[str]]],
                   on_error: Callable[[str], None]) -> Callable:
    """aiohttp handler for ``POST upload``: save the files, then hand them to ``on_upload``, which opens them and
    returns None or the one-line reason why they cannot be used.

    Failures answer with the one-line message as JSON (and the page shows it); nothing of a failed upload is kept.
    """
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        target = folder.new_folder()
        try:
            files = await receive_multipart(request, target, folder.max_bytes)
        except UploadTooLargeError as exc:
            shutil.rmtree(target, ignore_errors=True)
            on_error(str(exc))
            return web.json_response({"error": str(exc)}, status=413)
        except LgsegError as exc:
            shutil.rmtree(target, ignore_errors=True)
            on_error(str(exc))
            return web.json_response({"error": str(exc)}, status=400)
        except Exception as exc:  # noqa: BLE001 - a broken connection or a malformed body
            shutil.rmtree(target, ignore_errors=True)
            message = f"the upload failed ({exc.__class__.__name__}); try again"
            on_error(message)
            return web.json_response({"error": message}, status=400)
        error = await on_upload(files)
        if error is not None:
            shutil.rmtree(target, ignore_errors=True)
            return web.json_response({"error": error}, status=400)
        return web.json_response({"files": len(files)})

    return handle
