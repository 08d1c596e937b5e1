"""Uploads: streamed to disk in the server's private folder, with size limits, never kept in memory whole, and read
as files someone else sent.

Each upload (one file, or the files of one folder) gets its own sub-folder, deleted when it cannot be opened or when
another image replaces it in the page: at most the image shown and the uploads in progress are on disk, together
under twice ``--max-upload``. File names are reduced to their last path component; nothing uploaded is executed,
unpickled or unpacked, only read by the engine's image reader in its confined mode (known formats only, a header's
data files only from the same upload, the voxel count checked from the header first). Messages name the file as the
user chose it, never the server's folders.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import SimpleITK as sitk

from ..errors import LgsegError
from ..fileio import full_suffix
from ..imageio import read_image
from .access import format_size

_CHUNK = 1 << 16  # small enough that the limits are checked as the bytes arrive
# What one file costs on disk at least (a file-system block), counted against the limits: a folder upload of
# millions of empty files would otherwise pass them.
_FILE_BYTES = 4096
_NAME_BYTES = 200  # file systems allow 255 bytes; room is left for the prefix that separates equal names
_SHOWN_CHARS = 80
# A folder upload holding exactly one of these is that image (a header with its data files); otherwise the folder
# is read as a DICOM series.
_HEADER_SUFFIXES = (".mhd", ".mha", ".nhdr", ".nrrd", ".hdr", ".nii", ".nii.gz")
_64_BIT = {sitk.sitkUInt64: "64-bit unsigned integer", sitk.sitkInt64: "64-bit signed integer"}
_NOT_SHOWN = {sitk.sitkVectorUInt64: "64-bit integer vector", sitk.sitkVectorInt64: "64-bit integer vector",
              sitk.sitkComplexFloat32: "complex", sitk.sitkComplexFloat64: "complex"}


class UploadTooLargeError(LgsegError):
    """The upload is larger than the server's limit."""


@dataclass
class Upload:
    """One upload's sub-folder, and the name the user chose for each file in it and for the whole."""

    folder: Path
    name: str = "the upload"
    names: dict[Path, str] = field(default_factory=dict)
    size: int = 0


class UploadFolder:
    """The uploads of one server, in ``uploads/`` of its private folder: limits, and what is kept."""

    def __init__(self, server_folder: Path, max_bytes: int, max_voxels: int):
        self.max_bytes = max_bytes
        self.max_disk = 2 * max_bytes  # the image shown and one upload in progress
        self.max_voxels = max_voxels
        self.path = server_folder / "uploads"
        self.path.mkdir(mode=0o700)
        self._count = 0
        self._uploads: dict[Path, Upload] = {}
        self._shown: Optional[Path] = None

    def new_folder(self) -> Path:
        """A new empty sub-folder (for an upload, or a download being written)."""
        self._count += 1
        folder = self.path / f"upload-{self._count}"
        folder.mkdir()
        return folder

    def new_upload(self) -> Upload:
        upload = Upload(self.new_folder())
        self._uploads[upload.folder] = upload
        return upload

    def discard(self, upload: Upload) -> None:
        self._uploads.pop(upload.folder, None)
        shutil.rmtree(upload.folder, ignore_errors=True)

    def on_disk(self) -> int:
        """Bytes of all uploads on disk, those in progress included."""
        return sum(upload.size for upload in self._uploads.values())

    def show(self, path: Optional[Path]) -> None:
        """``path`` is now the image in the page: the upload that held the image before it is deleted."""
        holder = self._upload_of(path) if path is not None else None
        previous, self._shown = self._shown, holder.folder if holder is not None else None
        if previous is not None and previous != self._shown and previous in self._uploads:
            self.discard(self._uploads[previous])

    def read(self, path: Path) -> tuple[sitk.Image, str]:
        """The image at ``path`` for the page and a note for the user on a conversion ("" for none): its size checked
        from its header against ``--max-voxels`` before any voxel is read; an upload read confined to its own folder;
        voxel types the viewer cannot show refused, or converted where nothing is lost. Errors name the user's file,
        never the server's folders."""
        upload = self._upload_of(path)
        try:
            image = read_image(path, max_voxels=self.max_voxels, confined=upload is not None)
            return _viewable(image, path)
        except LgsegError as exc:
            raise LgsegError(self.public(str(exc))) from None
        except Exception as exc:  # noqa: BLE001 - a reader's failure on a hostile file: one line, no server path
            raise LgsegError(self.public(f"cannot read '{path}' ({exc.__class__.__name__}); check that it is one "
                                         "image file, or a folder with one DICOM series")) from None

    def public(self, message: str) -> str:
        """``message`` with each upload's server path replaced by the name the user chose."""
        replacements = []
        for upload in list(self._uploads.values()):  # a copy: read() runs in a worker thread
            replacements += [(str(stored), name) for stored, name in list(upload.names.items())]
            replacements.append((str(upload.folder), upload.name))
        replacements.append((str(self.path), "the upload"))
        replacements.append((str(self.path.parent), "the server's folder"))
        for server_path, name in sorted(replacements, key=lambda pair: -len(pair[0])):
            message = message.replace(server_path, name)
        return message

    def _upload_of(self, path: Path) -> Optional[Upload]:
        for folder, upload in list(self._uploads.items()):  # a copy: read() runs in a worker thread
            if path == folder or folder in path.parents:
                return upload
        return None


def _viewable(image: sitk.Image, path: Path) -> tuple[sitk.Image, str]:
    """64-bit integer voxels (the slice views show them as a misaligned patch) as 32-bit integers where every value
    fits, so that nothing changes, with a note that says so; refused otherwise, as are complex voxels."""
    pixel = image.GetPixelID()
    if pixel in _NOT_SHOWN:
        raise LgsegError(f"'{path}' has {_NOT_SHOWN[pixel]} voxels, which the viewer cannot show; save it as "
                         "8-, 16- or 32-bit integers or as floats")
    if pixel in _64_BIT:
        limits = sitk.MinimumMaximumImageFilter()
        limits.Execute(image)
        if -2 ** 31 <= limits.GetMinimum() and limits.GetMaximum() < 2 ** 31:
            return sitk.Cast(image, sitk.sitkInt32), (f"its {_64_BIT[pixel]} voxels are shown as 32-bit integers; "
                                                      "every value fits, none is changed")
        raise LgsegError(f"'{path}' has {_64_BIT[pixel]} voxels beyond the 32-bit range, which the viewer cannot "
                         "show; rescale it to 32-bit integers or save it as floats")
    return image, ""


def safe_name(name: str, index: int) -> str:
    """The last path component of a browser-given name (DICOM folders send relative paths), never empty or hidden,
    and short enough for any file system (cut in the middle; the suffix, which says the format, kept)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable())
    if base in ("", ".", "..") or base.startswith("."):
        base = f"file-{index}"
    suffix = full_suffix(base)
    while len(base.encode("utf-8", "surrogateescape")) > _NAME_BYTES:
        stem = base[:len(base) - len(suffix)]
        base = stem[:max(len(stem) - 8, 1)] + suffix if len(stem) > 1 else f"file-{index}{suffix[-20:]}"
    return base


def shown_name(name: str) -> str:
    """A name as messages show it: at most 80 characters, shortened in the middle."""
    name = " ".join(name.split())
    return name if len(name) <= _SHOWN_CHARS else f"{name[:45]}...{name[-(_SHOWN_CHARS - 48):]}"


async def receive_multipart(request: Any, uploads: UploadFolder, upload: Upload) -> list[Path]:
    """Write the files of a multipart POST into the upload's folder; raises UploadTooLargeError past
    ``max_bytes`` in total, or when all uploads together would pass the server's disk limit."""
    if request.content_length is not None and request.content_length > uploads.max_bytes + 64 * 1024:
        raise UploadTooLargeError(_too_large(uploads.max_bytes))
    reader = await request.multipart()
    written: list[Path] = []
    while True:
        part = await reader.next()
        if part is None:
            break
        if part.filename is None:
            await part.release()
            continue
        name = safe_name(part.filename, len(written))
        chosen = part.filename.replace("\\", "/").strip("/")
        if not written and "/" in chosen:  # a folder upload: the folder's name, as the user chose it
            upload.name = shown_name(chosen.split("/")[0])
        target = upload.folder / name
        if target.exists():  # two files of one folder upload with the same name in different sub-folders
            target = upload.folder / f"{len(written)}-{name}"
        upload.names[target] = shown_name(chosen.rsplit("/", 1)[-1] or name)
        upload.size += _FILE_BYTES
        if upload.size > uploads.max_bytes:
            raise UploadTooLargeError(_too_large(uploads.max_bytes))
        try:
            with open(target, "wb") as out:
                while True:
                    chunk = await part.read_chunk(_CHUNK)
                    if not chunk:
                        break
                    upload.size += len(chunk)
                    if upload.size > uploads.max_bytes:
                        raise UploadTooLargeError(_too_large(uploads.max_bytes))
                    if uploads.on_disk() > uploads.max_disk:
                        raise UploadTooLargeError(
                            f"the server holds as much as it keeps on disk ({format_size(uploads.max_disk)}, twice "
                            "--max-upload) while other uploads are in progress; wait for them, then try again")
                    out.write(chunk)
        except OSError as exc:
            raise LgsegError(f"could not store '{upload.names[target]}' on the server ({exc.strerror}); try "
                             "again, or ask whoever runs the server to free disk space") from exc
        written.append(target)
    if not written:
        raise LgsegError("the upload contained no file; choose an image file or a DICOM folder")
    if len(written) == 1:
        upload.name = upload.names[written[0]]
    return written


def image_to_open(upload: Upload, files: list[Path]) -> tuple[Path, str]:
    """What an upload opens, and its name for the page: the one file; in a folder, its one image header (with its
    data files beside it); otherwise the folder, as a DICOM series."""
    if len(files) == 1:
        return files[0], upload.names[files[0]]
    headers = [path for path in files if full_suffix(path.name).lower() in _HEADER_SUFFIXES]
    if len(headers) == 1:
        return headers[0], upload.names[headers[0]]
    return upload.folder, upload.name


def _too_large(max_bytes: int) -> str:
    return (f"the upload is larger than this server's limit of {format_size(max_bytes)}; "
            "choose a smaller file or restart the server with a larger --max-upload")


def upload_handler(uploads: UploadFolder, open_path: Callable[[Path, str], Awaitable[Optional[str]]],
                   on_error: Callable[[str], None]) -> Callable:
    """aiohttp handler for ``POST upload``: save the files, then hand what they hold to ``open_path(path, name)``,
    which opens it (with :meth:`UploadFolder.read`) and returns None or the one-line reason why it cannot be used.

    Failures answer with the one-line message as JSON (and the page shows it); nothing of a failed upload is kept.
    """
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        upload = uploads.new_upload()
        try:
            files = await receive_multipart(request, uploads, upload)
        except LgsegError as exc:
            uploads.discard(upload)
            on_error(str(exc))
            return web.json_response({"error": str(exc)}, status=413 if isinstance(exc, UploadTooLargeError) else 400)
        except Exception as exc:  # noqa: BLE001 - a broken connection or a malformed body
            uploads.discard(upload)
            message = f"the upload failed ({exc.__class__.__name__}); try again"
            on_error(message)
            return web.json_response({"error": message}, status=400)
        try:
            error = await open_path(*image_to_open(upload, files))
        except BaseException:  # an unexpected failure showing it (answered 500): not kept on disk either
            uploads.discard(upload)
            raise
        if error is not None:
            uploads.discard(upload)
            return web.json_response({"error": error}, status=400)
        return web.json_response({"files": len(files)})

    return handle
