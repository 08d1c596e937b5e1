"""``lgseg serve``: the report loop in a web page (trame-slicer), from ``pip install "languageguidedseg[web]"``."""

# trame and trame-slicer ship no type information.
# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import LgsegError
from ..options import add_device_option, add_model_option
from .access import MIN_TOKEN_CHARS, format_size, is_loopback, parse_size, resolve_token, trusted_proxy_address

# A whole-body CT of 2000 slices of 512 x 512 (0.5-1 mm slices, the largest scans in routine use): 1 GB as 16-bit
# voxels, about 3 GB for the server with the viewer's copy. Images past it would not fit the memory of the machines
# the page is meant for, and the header that declares them is what the check reads.
DEFAULT_MAX_VOXELS = 512 * 512 * 2000


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to the ``lgseg`` parser."""
    serve = sub.add_parser("serve", help="open images in a web page and segment them there (needs the [web] extra)")
    serve.add_argument("paths", nargs="*", metavar="IMAGE_OR_FOLDER",
                       help="images to offer in the page: 2D images, NIfTI/NRRD/MHA volumes, DICOM folders")
    add_model_option(serve, auto=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--token", help=f"access token to require, {MIN_TOKEN_CHARS}+ characters (default: a new one, "
                                       "printed in the address to open)")
    serve.add_argument("--no-token", action="store_true",
                       help="no access token (loopback only): every user and process of this machine can open the page")
    serve.add_argument("--trusted-proxy", metavar="ADDRESS",
                       help="the reverse proxy's IP address: its Forwarded / X-Forwarded-Host headers are believed "
                            "(from no one else)")
    serve.add_argument("--max-upload", default="2GB", help="largest upload accepted, e.g. 500MB (default 2GB)")
    serve.add_argument("--max-voxels", default=str(DEFAULT_MAX_VOXELS),
                       help="largest image opened, in voxels, e.g. 512x512x2000 (the default: a large CT); "
                            "checked from the file's header before it is read")
    add_device_option(serve)
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Check the arguments, start the server, block until it stops (Ctrl+C, SIGTERM, SIGHUP or another signal that
    ends it), remove the server's folder."""
    if not 0 <= args.port <= 65535:
        raise LgsegError(f"--port {args.port} is not a port number; give 0 to 65535 (0 picks a free port)")
    _check_address(args.host, args.port)
    max_upload = parse_size(args.max_upload)
    max_voxels = parse_voxels(args.max_voxels)
    token = resolve_token(args.host, args.token, args.no_token)
    trusted_proxy = trusted_proxy_address(args.trusted_proxy)
    paths = [Path(path) for path in args.paths]
    for path in paths:
        if not path.exists():
            raise LgsegError(f"input '{path}' does not exist; check the path")
    try:
        import trame_slicer  # noqa: F401
        from trame.app import get_server  # noqa: F401
    except ImportError as exc:
        raise LgsegError(f"the web page needs the web extra ({exc.name} is missing): "
                         "pip install \"languageguidedseg[web]\"") from exc
    from ..options import AUTO_MODEL
    from ..package import find_model

    if args.model != AUTO_MODEL:
        find_model(args.model)  # an unknown model is an error now, not later in the page

    with _server_environment():
        return _run_server(args, paths, token, trusted_proxy, max_upload, max_voxels)


def parse_voxels(text: str) -> int:
    """A voxel count: ``524288000``, or a size such as ``512x512x2000``."""
    try:
        counts = [int(part) for part in str(text).lower().replace("_", "").split("x")]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0:
        raise LgsegError(f"--max-voxels '{text}' is not a voxel count; give e.g. 512x512x2000 or 524288000")
    return int(np.prod(counts, dtype=np.int64))


def _check_address(host: str, port: int) -> None:
    """Fail now, in one line, where the server could not listen (a port in use, an unknown host), rather than
    after loading the model."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise LgsegError(f"--host '{host}' is not an address of this machine ({exc.strerror}); "
                         "give 127.0.0.1 or a name that resolves") from exc
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LgsegError(f"port {port} on {host} is in use; choose another --port, or 0 for a free "
                                 "one") from exc
            raise LgsegError(f"cannot listen on {host} port {port} ({exc.strerror}); choose another --host or "
                             "--port") from exc


@contextlib.contextmanager
def _server_environment() -> Iterator[None]:
    """While the server runs: off-screen rendering (EGL: no display, no GPU needed) unless the user chose another
    VTK window class, and no trame option parsing of lgseg's own command line. Restored afterwards."""
    saved = {name: os.environ.get(name) for name in ("VTK_DEFAULT_OPENGL_WINDOW", "TRAME_ARGS")}
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ["TRAME_ARGS"] = ""
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_server(args: argparse.Namespace, paths: list[Path], token: Optional[str], trusted_proxy: Optional[str],
                max_upload: int, max_voxels: int) -> int:
    from .storage import ServerDirectory, exit_on_signals, remove_stale, temporary_files_in
    from .uploads import UploadFolder

    remove_stale()  # folders of servers killed before they could remove them
    with exit_on_signals():
        directory = ServerDirectory()
        try:
            uploads = UploadFolder(directory.path, max_upload, max_voxels)
            with temporary_files_in(directory.path / "tmp"):
                from .app import WebApp

                app = WebApp(paths, model=args.model, device=args.device, uploads=uploads, token=token,
                             trusted_proxy=trusted_proxy)

                def announce(**_: object) -> None:
                    # Listening on every address: the machine's name is what other machines can open.
                    host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
                    host = f"[{host}]" if ":" in host else host
                    address = f"http://{host}:{app.server.port}/"
                    if token is not None:
                        address += f"?token={token}"
                    note = (" (no access token: every user and process of this machine can open it)"
                            if token is None else "" if is_loopback(args.host) else
                            " (reachable from other machines: keep the token private)")
                    print(f"LanguageGuidedSeg web page: open {address}{note}", flush=True)
                    print(f"uploads up to {format_size(max_upload)}, images up to {max_voxels:,} voxels, kept in "
                          f"{uploads.path} until the server stops; Ctrl+C stops it", flush=True)

                app.server.controller.on_server_ready.add(announce)
                app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                                 timeout=0, disable_logging=True)
        finally:
            directory.remove()
    print("server stopped", file=sys.stderr)
    return 0
