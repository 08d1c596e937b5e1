"""Who may talk to the web server: bind address, access token, upload size.

The server binds to 127.0.0.1 unless told otherwise. On any other address it requires an access token; a request
without it, for the page, a static file, the websocket or an upload, gets an empty 403. The token is given once in
the address the server prints (``?token=...``); the server answers that request with a cookie for the page's later
requests (static files, websocket, uploads) and a redirect to the same address without the token, so the token does
not stay in the browser's address bar or history.

Other web sites open in the same browser must not drive the page either (browsers let any site open a websocket to
127.0.0.1 or post a form to it): a request whose ``Origin`` is not the page's own host is refused, and a server on
loopback without a token answers only to loopback host names (no DNS rebinding of another name onto 127.0.0.1).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Awaitable
from typing import Any, Callable, Optional
from urllib.parse import urlencode, urlsplit

from ..errors import LgsegError

COOKIE = "lgseg_token"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any address in 127.0.0.0/8 or ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_token(host: str, token: Optional[str]) -> Optional[str]:
    """The token the server requires: the one given, a new one off loopback, or None (loopback, none given)."""
    if token is not None:
        if len(token) < 8 or not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
            raise LgsegError("--token must be at least 8 characters of letters, digits and . _ ~ -")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def parse_size(text: str) -> int:
    """Bytes in ``2GB``, ``500MB``, ``750k`` or ``1048576`` (binary units)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise LgsegError(f"--max-upload '{text}' is not a size; give e.g. 2GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    """``2 GB``, ``500 MB``, ``12 kB`` or ``300 bytes``."""
    for unit, factor in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} bytes"


def token_middleware(token: str) -> Callable:
    """aiohttp middleware: every request needs ``token`` (query parameter once, then the cookie)."""
    from aiohttp import web

    expected = token.encode()

    def matches(value: Optional[str]) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), expected)

    @web.middleware
    async def check_token(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        if matches(request.query.get("token")) and (websocket or request.method != "GET"):
            return await handler(request)
        if matches(request.query.get("token")):
            # A page request: trade the token in the address for a cookie, and drop it from the address. The
            # redirect is relative and the cookie has no Path, so that both stay under a reverse proxy's prefix
            # (the browser scopes the cookie to the page's folder: two servers behind one proxy keep their own).
            query = [(key, value) for key, value in request.query.items() if key != "token"]
            location = (request.path.rsplit("/", 1)[-1] or "./") + (f"?{urlencode(query)}" if query else "")
            return web.Response(status=302, headers={
                "Location": location, "Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict"})
        if not matches(request.cookies.get(COOKIE)):
            return web.Response(status=403)  # nothing: no page, no hint
        return await handler(request)

    return check_token


def same_origin_middleware(loopback_names_only: bool) -> Callable:
    """aiohttp middleware: refuse cross-site requests (``Origin`` of another host) and, with
    ``loopback_names_only``, any ``Host`` that is not a loopback name or address.

    Behind a reverse proxy the page's host is what the proxy puts in ``X-Forwarded-Host`` (else ``Host``).
    """
    from aiohttp import web

    @web.middleware
    async def check_origin(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if loopback_names_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return web.Response(status=403)
        origin = request.headers.get("Origin")
        page_host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
        if origin is not None and urlsplit(origin).netloc.lower() != page_host.lower():
            return web.Response(status=403)
        return await handler(request)

    return check_origin


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no other site may embed the page (clickjacking)
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the address never leaves with a link
    "X-Content-Type-Options": "nosniff",
}


def add_security_headers(app: Any) -> None:
    """Send :data:`SECURITY_HEADERS` with every response of the aiohttp ``app``."""

    async def add(request: Any, response: Any) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)

    app.on_response_prepare.append(add)
