"""Who may talk to the web server: bind address, access token, Host and Origin, proxies, upload size.

The server binds to 127.0.0.1 unless told otherwise, and requires an access token on every address, loopback
included (other users and processes of the same machine can reach loopback too); ``--no-token`` switches it off,
on loopback only. A request without the token, for the page, a static file, the websocket or an upload, gets an
empty 403. The token is given once in the address the server prints (``?token=...``); the server answers that
request with a cookie for the page's later requests (static files, websocket, uploads) and a redirect to the same
address without the token, so the token does not stay in the browser's address bar or history. The cookie's name
holds the server's port: two servers on one host keep their own cookies.

Other web sites open in the same browser must not drive the page either (browsers let any site open a websocket to
127.0.0.1 or post a form to it): a request whose ``Origin`` is not the page's own host is refused, and a server on
loopback without a token answers only to loopback host names (no DNS rebinding of another name onto 127.0.0.1).
The page's host is the request's ``Host``; a reverse proxy's ``Forwarded`` / ``X-Forwarded-Host`` count only
from the address given with ``--trusted-proxy`` (from anyone else they would let a client choose the host the
Origin is compared with).
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
MIN_TOKEN_CHARS = 32
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


def resolve_token(host: str, token: Optional[str], no_token: bool = False) -> Optional[str]:
    """The token the server requires: the one given, else a new one; None only with ``no_token`` on loopback."""
    if no_token:
        if token is not None:
            raise LgsegError("give either --token or --no-token, not both")
        if not is_loopback(host):
            raise LgsegError(f"--no-token is for loopback addresses only (127.0.0.1, ::1, localhost), not '{host}'; "
                             "on other addresses the server needs its token")
        return None
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS or not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
            raise LgsegError(f"--token must be at least {MIN_TOKEN_CHARS} characters of letters, digits and . _ ~ -; "
                             "leave it out and the server makes one")
        return token
    return secrets.token_urlsafe(32)


def trusted_proxy_address(text: Optional[str]) -> Optional[str]:
    """The ``--trusted-proxy`` address, normalised (``::ffff:`` forms of IPv4 addresses included), or None."""
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError as exc:
        raise LgsegError(f"--trusted-proxy '{text}' is not an IP address; give the address the proxy connects "
                         "from, e.g. 127.0.0.1") from exc
    return str(getattr(address, "ipv4_mapped", None) or address)


def _address(text: Optional[str]) -> Optional[str]:
    try:
        return trusted_proxy_address(text)
    except LgsegError:
        return None  # not an IP address (a Unix socket): never the proxy


def cookie_name(port: int) -> str:
    """The token cookie of the server on ``port``: browsers send a host's cookies to all its ports."""
    return f"{COOKIE}_{port}"


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
        socket_name = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if not socket_name:
            return web.Response(status=403)
        cookie = cookie_name(socket_name[1])  # the port this server listens on, whatever the proxy's
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
                "Location": location, "Set-Cookie": f"{cookie}={token}; HttpOnly; SameSite=Strict"})
        if not matches(request.cookies.get(cookie)):
            return web.Response(status=403)  # nothing: no page, no hint
        return await handler(request)

    return check_token


def same_origin_middleware(loopback_names_only: bool, trusted_proxy: Optional[str] = None) -> Callable:
    """aiohttp middleware: refuse cross-site requests (``Origin`` of another host) and, with
    ``loopback_names_only``, any ``Host`` that is not a loopback name or address.

    The page's host is ``Host``; from the ``trusted_proxy`` address only, the host a reverse proxy forwards
    (``Forwarded: host=``, else ``X-Forwarded-Host``).
    """
    from aiohttp import web

    @web.middleware
    async def check_origin(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if loopback_names_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return web.Response(status=403)
        origin = request.headers.get("Origin")
        page_host = host
        if trusted_proxy is not None and _address(request.remote) == trusted_proxy:
            forwarded = request.forwarded[0].get("host") if request.forwarded else None
            page_host = forwarded or request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
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
