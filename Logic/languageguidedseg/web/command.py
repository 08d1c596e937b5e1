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

from ..errors import LgsegError
from ..options import add_device_option, add_model_option
from .access import format_size, is_loopback, parse_size, resolve_token


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to the ``lgseg`` parser."""
    serve = sub.add_parser("serve", help="open images in a web page and segment them there (needs the [web] extra)")
    serve.add_argument("paths", nargs="*", metavar="IMAGE_OR_FOLDER",
                       help="images to offer in the page: 2D images, NIfTI/NRRD/MHA volumes, DICOM folders")
    add_model_option(serve, auto=True)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; any other address requires an access token)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--token", help="access token to require (default: generated when --host is not loopback)")
    serve.add_argument("--max-upload", default="2GB", help="largest upload accepted, e.g. 500MB (default 2GB)")
    add_device_option(serve)
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Check the arguments, start the server, block until it stops (Ctrl+C or SIGTERM), remove the upload folder."""
    if not 0 <= args.port <= 65535:
        raise LgsegError(f"--port {args.port} is not a port number; give 0 to 65535 (0 picks a free port)")
    _check_address(args.host, args.port)
    max_upload = parse_size(args.max_upload)
    token = resolve_token(args.host, args.token)
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
        return _run_server(args, paths, token, max_upload)


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


def _run_server(args: argparse.Namespace, paths: list[Path], token: Optional[str], max_upload: int) -> int:
    from .app import WebApp
    from .uploads import UploadFolder

    uploads = UploadFolder(max_upload)
    try:
        app = WebApp(paths, model=args.model, device=args.device, uploads=uploads, token=token)

        def announce(**_: object) -> None:
            # Listening on every address: the machine's name is what other machines can open.
            host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
            host = f"[{host}]" if ":" in host else host
            address = f"http://{host}:{app.server.port}/"
            if token is not None:
                address += f"?token={token}"
            note = "" if is_loopback(args.host) else " (reachable from other machines: keep the token private)"
            print(f"LanguageGuidedSeg web page: open {address}{note}", flush=True)
            print(f"uploads up to {format_size(max_upload)}, kept in {uploads.path} until the server stops; "
                  "Ctrl+C stops it", flush=True)

        app.server.controller.on_server_ready.add(announce)
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                         timeout=0, disable_logging=True)
    finally:
        uploads.remove()
    print("server stopped", file=sys.stderr)
    return 0
