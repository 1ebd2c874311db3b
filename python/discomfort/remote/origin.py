"""Internal: which ``Host`` and ``Origin`` a request to a ``/discomfort/*`` route may carry (DNS rebinding).

A page of another site can make a browser send requests to ``http://evil.example:8188`` after
pointing that name at the user's own machine; the request then carries ``Host: evil.example``.
So a route answers only a ``Host`` that is an IP literal (v4 or v6, with or without a port),
``localhost``, or a name allowed by ``DISCOMFORT_ALLOWED_HOSTS`` (comma-separated) or given to
ComfyUI's ``--listen``; and when an ``Origin`` is present (``null`` included) it must name that
same host and port, or be one allowed by ``DISCOMFORT_ALLOWED_ORIGINS`` (comma-separated) or
ComfyUI's ``--enable-cors-header ORIGIN`` (not ``*``). Anything else is a 403
``{"error", "type": "ForbiddenHost"}``.

:func:`guard_routes` wraps a route table so that every handler added through it checks first.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Callable
from urllib.parse import urlsplit

from .. import _settings

__all__ = ["ALLOWED_HOSTS_ENV", "ALLOWED_ORIGINS_ENV", "allowed_names", "allowed_origins", "refusal", "guard",
           "guard_routes"]

ALLOWED_HOSTS_ENV = "DISCOMFORT_ALLOWED_HOSTS"
ALLOWED_ORIGINS_ENV = "DISCOMFORT_ALLOWED_ORIGINS"
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@functools.lru_cache(maxsize=None)
def _comfy_args() -> Any:
    """ComfyUI's parsed command line (fixed once it runs), or None outside ComfyUI: looked up
    once, not on every request (outside ComfyUI the failed import searched sys.path each time)."""
    try:
        from comfy.cli_args import args  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not inside ComfyUI
        return None
    return args


def allowed_names() -> set[str]:
    """Host names (lower case) allowed besides IP literals and ``localhost``: the environment's
    list and the names given to ComfyUI's ``--listen`` when running inside ComfyUI."""
    names = {"localhost"}
    names |= {n.lower().rstrip(".") for n in _settings.get(ALLOWED_HOSTS_ENV)}
    names |= {n.strip().lower().rstrip(".") for n in str(getattr(_comfy_args(), "listen", "") or "").split(",")
              if n.strip()}
    return names


def allowed_origins() -> set[str]:
    """Origins (lower case, no trailing slash) allowed besides the server's own."""
    raw = list(_settings.get(ALLOWED_ORIGINS_ENV))
    raw.append(str(getattr(_comfy_args(), "enable_cors_header", "") or ""))
    return {o.strip().lower().rstrip("/") for o in raw if o.strip() and o.strip() != "*"}


def _split(hostport: str) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6][:port]`` as (host, port); ValueError when malformed."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        host, rest = hostport[1:end], hostport[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ]")
        port = rest[1:] if rest else None
    elif hostport.count(":") > 1:  # a bare IPv6 address
        host, port = hostport, None
    else:
        host, _, port = hostport.partition(":")
        port = port if _ else None
    if port is not None and (not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
        raise ValueError(f"bad port {port!r}")
    if not host:
        raise ValueError("empty host")
    return host.lower().rstrip("."), int(port) if port is not None else None


def _is_ip(host: str) -> bool:
    """An IP literal; a zone (``%eth0``) only on an IPv6 one."""
    try:
        ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
        return True
    except ValueError:
        return False


def refusal(host_header: str | None, origin: str | None, allowed: set[str] | None = None) -> str | None:
    """Why a request with these ``Host`` and ``Origin`` headers is refused, or None when it is not."""
    if not host_header:
        return "a request needs a Host header"
    try:
        host, port = _split(host_header.strip())
    except ValueError as exc:
        return f"Host {host_header[:100]!r} is malformed ({exc})"
    names = allowed_names() if allowed is None else allowed
    if not _is_ip(host) and host not in names:
        return (f"Host {host[:100]!r} is not an IP address, localhost or an allowed name: add it to "
                f"{ALLOWED_HOSTS_ENV} (comma-separated) if this server is reached by that name")
    if origin is None:
        return None
    if origin.strip().lower().rstrip("/") in allowed_origins():
        return None
    if origin.strip().lower() == "null":
        return "Origin 'null' (a sandboxed or file page) may not call these routes"
    parts = urlsplit(origin.strip())
    try:
        o_host, o_port = _split(parts.netloc) if parts.netloc and "@" not in parts.netloc else ("", None)
    except ValueError:
        o_host = ""
    if not o_host or parts.scheme not in _DEFAULT_PORT:
        return f"Origin {origin[:100]!r} is malformed"
    o_port = o_port or _DEFAULT_PORT[parts.scheme]
    # A Host without a port is a default port, of either scheme: behind a proxy that terminates
    # TLS the page is https while this server sees http.
    ports = {port} if port is not None else {80, 443}
    if o_host != host or o_port not in ports:
        return f"Origin {origin[:100]!r} is another site than this server ({host_header[:100]!r})"
    return None


def guard(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``handler``, answering 403 first to a request whose Host or Origin is refused."""

    @functools.wraps(handler)
    async def guarded(request: Any) -> Any:
        origins = request.headers.getall("Origin", [])
        why = ("a request carries one Origin header at most" if len(origins) > 1
               else refusal(request.headers.get("Host"), origins[0] if origins else None))
        if why is not None:
            from aiohttp import web

            return web.json_response({"error": why, "type": "ForbiddenHost"}, status=403)
        return await handler(request)

    return guarded


class _GuardedRoutes:
    """A route table's ``get``/``post``/``put``/``delete``/``route``, each handler wrapped in :func:`guard`."""

    def __init__(self, routes: Any) -> None:
        self._routes = routes

    def route(self, method: str, path: str, **kw: Any) -> Callable[[Any], Any]:
        inner = self._routes.route(method, path, **kw)
        return lambda handler: (inner(guard(handler)), handler)[1]

    def get(self, path: str, **kw: Any) -> Callable[[Any], Any]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Any], Any]:
        return self.route("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable[[Any], Any]:
        return self.route("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Any], Any]:
        return self.route("DELETE", path, **kw)


def guard_routes(routes: Any) -> Any:
    """A view of ``routes`` (an aiohttp ``RouteTableDef``) whose added handlers check Host and Origin."""
    return _GuardedRoutes(routes)
