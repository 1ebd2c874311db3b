"""Internal: what the node pack's HTTP routes share: the run routes (:mod:`.server`) and the editor panel's
(:mod:`discomfort.panel.runner`).

One table from an exception to its HTTP status (:data:`STATUS`), one JSON error answer
(:func:`error_response`), one decorator that gives a handler's exceptions that answer
(:func:`answers_errors`), bounded JSON bodies (:func:`read_json_object`) and route tables
(:func:`add_route_table`). :class:`HTTPRefusal` is a refusal with its own status, raised by the
routes and the limits; it never leaves the server (the client sees the status and the JSON
``type`` of its ``kind``), so it is not part of the package's public errors.

aiohttp is imported when an answer is made: the limits import this module too.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Awaitable, Callable, Iterable

from .. import errors

__all__ = ["STATUS", "error_response", "answers_errors", "read_json_object", "add_route_table"]

log = logging.getLogger("discomfort")


class HTTPRefusal(errors.DiscomfortError):
    """A refusal with its own status (401, 403, 408, 411, 413, 429, 503); the answer names ``kind``."""

    def __init__(self, status: int, message: str, kind: type[errors.DiscomfortError]):
        super().__init__(message)
        self.status = status
        self.kind = kind


#: Exception class -> HTTP status, first match wins. Anything else is a 500 (and a server bug).
STATUS: list[tuple[type[BaseException], int]] = [
    (FileNotFoundError, 404),  # a saved workflow or an input file of the panel
    (errors.UnknownRunError, 404),  # RunFinishedError too
    (errors.UnknownKeyError, 404),
    (errors.ReferenceUnavailableError, 409),
    (errors.StoreFullError, 507),
    (errors.DiskFullError, 507),
    (errors.CorruptedStoreError, 409),  # TruncatedStoreError too: another process cut the run's file
    (errors.ComfyConnectionError, 502),  # the panel's own server did not answer its runner
    (errors.RemoteLimitError, 413),
    (errors.DiscomfortError, 400),  # invalid keys, bad frames, refused values
    (RecursionError, 400),  # JSON nested too deep
    (ValueError, 400),
    (TypeError, 400),
    (KeyError, 400),
]

Handler = Callable[..., Awaitable[Any]]


def error_response(exc: BaseException, where: str, **fields: Any) -> Any:
    """The JSON answer ``{"error", "type", **fields}`` for ``exc``: an HTTPRefusal's own status, else
    the first match in :data:`STATUS`; anything unmatched is a 500, logged as a bug of ``where``."""
    from aiohttp import web

    if isinstance(exc, HTTPRefusal):
        status, kind = exc.status, exc.kind.__name__
    else:
        status = next((s for cls, s in STATUS if isinstance(exc, cls)), 500)
        kind = type(exc).__name__
        if status == 500:
            log.exception("discomfort: unexpected error in %s", where, exc_info=exc)
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return web.json_response({"error": message or kind, "type": kind, **fields}, status=status)


def answers_errors(where: str, *fields: str) -> Callable[[Handler], Handler]:
    """A route handler (a function or method whose last argument is the request) whose exceptions
    are answered with :func:`error_response`; ``fields`` name path parts the answer repeats
    (``None`` where the path has none). The handler's own answer is returned as it is."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answered(*args: Any) -> Any:
            try:
                return await handler(*args)
            except Exception as exc:  # noqa: BLE001 - every error is an answer; unexpected ones are logged
                match = args[-1].match_info
                return error_response(exc, where, **{f: match.get(f) for f in fields})

        return answered

    return wrap


async def read_json_object(request: Any, limit: int, what: str) -> dict:
    """The request's body as a JSON object (an empty body is ``{}``), read up to ``limit`` bytes."""
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise HTTPRefusal(413, f"{what} is at most {limit} bytes", errors.RemoteLimitError)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ValueError(f"{what} must be a JSON object (or empty)")
    return body


def add_route_table(routes: Any, base: str, table: Iterable[tuple[str, str, Handler]]) -> None:
    """Add ``(method, path, handler)`` rows under ``base`` to an aiohttp ``RouteTableDef`` (or a view
    of one with its ``get``/``post``/``put``/``delete``, such as :func:`.origin.guard_routes`)."""
    for method, path, handler in table:
        getattr(routes, method.lower())(base + path)(handler)
