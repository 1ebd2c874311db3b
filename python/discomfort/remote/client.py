"""RemoteContext: a run whose store lives in a ComfyUI server process, reached over HTTP."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from .. import _settings, codecs, datacodec, errors
from .._platform import receive_buffer
from ..runs import RunBase
from ..errors import (ComfyConnectionError, ReferenceUnavailableError, SerializationError, TransportWarning,
                      UnknownKeyError)
from .framing import (CHUNK, HEAD, SECRET_ENV, SECRET_HEADER, SIZE, TOKEN_HEADER, FrameBody, frame_length,
                      parse_fixed, parse_sizes)

__all__ = ["RemoteContext", "TransportWarning", "encode_for_http"]

log = logging.getLogger("discomfort")

_STATUS_ERRORS: dict[int, type[Exception]] = {401: errors.AuthenticationError, 403: errors.AuthenticationError,
                                              408: errors.RemoteLimitError, 411: errors.RemoteLimitError,
                                              413: errors.RemoteLimitError, 429: errors.RemoteLimitError,
                                              503: errors.RemoteLimitError}


def encode_for_http(data: Any, pass_by: str, unique_id: str, where: str,
                    limits: datacodec.Limits = datacodec.DEFAULT_LIMITS) -> tuple[bytes, list[memoryview]]:
    """The data-only encoding of a value that must cross to a server; clear errors otherwise."""
    if pass_by not in ("auto", "val", "ref"):
        raise ValueError(f"pass_by must be 'auto', 'val' or 'ref', not {pass_by!r}")
    mode = codecs.choose_pass_by(data) if pass_by == "auto" else pass_by
    kind = f"{type(data).__module__}.{type(data).__qualname__}"
    if mode == "ref":
        raise ReferenceUnavailableError(
            f"cannot send {unique_id!r} ({kind}) to {where}: it is passed by reference, and references "
            "never leave the process that saved them; this run's store is in the ComfyUI server process "
            "(HTTP transport). Produce it inside the workflow instead"
        )
    try:
        return datacodec.encode(data, limits)
    except SerializationError as exc:
        raise SerializationError(f"cannot send {unique_id!r} to {where}: {exc}") from exc


class RemoteContext(RunBase):
    """A run whose store lives in a ComfyUI server process, reached over HTTP.

    The subset of :class:`~discomfort.WorkflowContext` that ``run_sequential`` uses: ``run_id``,
    ``save``, ``load``, ``info``, ``delete``, ``keys``, ``in``, ``allow_prompt``,
    ``revoke_prompt``, ``shutdown``, and ``with``. The server creates and owns the run and gives
    this object its token; ``shutdown()`` (or leaving the ``with`` block) ends it there. Values
    travel in the data-only encoding of :mod:`discomfort.datacodec` both ways; loaded values are
    plain copies in this process.

    ``ram_budget`` is passed to the server, which caps it by its own. ``secret``: the server's
    secret, needed when it serves clients beyond loopback (default ``$DISCOMFORT_SERVER_SECRET``).
    ``max_value``: the largest answer this side accepts (bytes).
    """

    def __init__(self, server_url: str, *, ram_budget: int | str | None = None, session: Any = None,
                 request_timeout: float = 120.0, secret: str | None = None, max_value: int = 8 << 30) -> None:
        try:
            import requests
        except ImportError as exc:  # pragma: no cover
            raise ImportError("discomfort.remote needs the 'requests' package (pip install requests)") from exc
        self._requests = requests
        self.url = server_url.rstrip("/")
        self.request_timeout = request_timeout
        self.limits = datacodec.Limits(max_bytes=max_value)
        self._own_session = session is None
        self._session = requests.Session() if session is None else session
        self._start(owner=True)
        self.run_id = ""
        self._token = ""
        secret = secret if secret is not None else _settings.get(SECRET_ENV)
        headers = {SECRET_HEADER: secret} if secret else {}
        body = {} if ram_budget is None else {"ram_budget": ram_budget}
        try:
            answer = self._json("POST", "/discomfort/runs", json=body, headers=headers)
        except BaseException:
            if self._own_session:
                self._session.close()
            raise
        self.run_id = answer["run_id"]
        self._token = answer["token"]

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return "http"

    def _route(self, key: str | None = None, suffix: str = "") -> str:
        base = f"/discomfort/runs/{quote(self.run_id, safe='')}"
        if key is None:
            return base + suffix
        if not isinstance(key, str) or not key:
            raise errors.InvalidKeyError(f"a key is a non-empty str, not {key!r}")
        return f"{base}/values/{quote(key, safe='')}{suffix}"

    def _request(self, method: str, route: str, **kw: Any) -> Any:
        kw.setdefault("timeout", self.request_timeout)
        if self._token:
            kw["headers"] = {**kw.get("headers", {}), TOKEN_HEADER: self._token}
        try:
            return self._session.request(method, self.url + route, **kw)
        except self._requests.RequestException as exc:
            raise ComfyConnectionError(f"{method} {self.url}{route} failed: {exc}") from exc

    def _raise_for(self, resp: Any, method: str, route: str) -> None:
        if resp.status_code < 400:
            return
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "error" not in data:
            hint = ""
            if resp.status_code in (404, 405):
                hint = (" (the server has no such route: is this version of the discomfort node pack "
                        "installed in its custom_nodes?)")
            raise ComfyConnectionError(
                f"{method} {self.url}{route} answered HTTP {resp.status_code}{hint}: {resp.text[:300]}"
            )
        cls = _STATUS_ERRORS.get(resp.status_code) or _error_class(data.get("type")) or ComfyConnectionError
        raise cls(f"{data['error']} (server {self.url})")

    def _json(self, method: str, route: str, **kw: Any) -> Any:
        resp = self._request(method, route, **kw)
        self._raise_for(resp, method, route)
        return resp.json()

    def _check(self) -> None:
        if self._closed:
            raise self._finished()

    # -- data ------------------------------------------------------------------------------------

    def save(self, unique_id: str, data: Any, pass_by: str = "auto") -> int:
        """Send ``data`` to the server's store under ``unique_id``; returns its version there."""
        self._check()
        meta, buffers = encode_for_http(data, pass_by, unique_id, f"the server {self.url}", self.limits)
        route = self._route(unique_id)
        # An iterable with a length: requests sends it with Content-Length, chunk by chunk.
        resp = self._request("PUT", route, data=FrameBody(meta, buffers),
                             headers={"Content-Type": "application/octet-stream"})
        self._raise_for(resp, "PUT", route)
        return int(resp.json()["version"])

    def load(self, unique_id: str) -> Any:
        """The value stored under ``unique_id`` on the server (read into this process)."""
        self._check()
        route = self._route(unique_id)
        resp = self._request("GET", route, stream=True)
        try:
            self._raise_for(resp, "GET", route)
            meta, buffers = self._read_frame(resp, unique_id)
        except (ValueError, SerializationError) as exc:
            raise ComfyConnectionError(f"GET {self.url}{route}: bad answer: {exc}") from exc
        finally:
            resp.close()
        return datacodec.decode(meta, buffers, self.limits)

    def _read_frame(self, resp: Any, unique_id: str) -> tuple[bytes, list[Any]]:
        """A frame from the answer, every size checked before it is allocated."""
        raw = resp.raw
        length = resp.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > self.limits.max_bytes + (16 << 20):
            raise ValueError(f"Content-Length {length!r}: missing or over this side's limit")
        read = _reader(raw)
        nbuf, meta_len = parse_fixed(read(HEAD.size, f"{unique_id!r}: frame header"), self.limits)
        sizes = parse_sizes(read(SIZE.size * nbuf, f"{unique_id!r}: buffer table"), nbuf, self.limits)
        if frame_length(meta_len, sizes) != int(length):
            raise ValueError(f"Content-Length {length} but the frame is {frame_length(meta_len, sizes)} bytes")
        meta = read(meta_len, f"{unique_id!r}: metadata")
        datacodec.check(meta, sizes, self.limits)
        buffers = []
        for n in sizes:
            buf = receive_buffer(n)
            _read_into(raw, memoryview(buf), f"{unique_id!r}: buffer of {n} bytes")
            buffers.append(buf)
        return meta, buffers

    def info(self, unique_id: str) -> dict[str, Any]:
        self._check()
        return self._json("GET", self._route(unique_id, "/info"))

    def version(self, unique_id: str) -> int | None:
        """The stored version of ``unique_id``, or None when there is none (one request)."""
        try:
            return self.info(unique_id)["version"]
        except UnknownKeyError:
            return None

    def delete(self, unique_id: str) -> bool:
        self._check()
        try:
            return bool(self._json("DELETE", self._route(unique_id)).get("deleted", True))
        except UnknownKeyError:
            return False

    def keys(self) -> list[str]:
        self._check()
        return list(self._json("GET", self._route(None, "/values"))["keys"])

    def __contains__(self, unique_id: object) -> bool:
        if not isinstance(unique_id, str):
            return False
        return self.version(unique_id) is not None

    def stats(self) -> dict[str, Any]:
        self._check()
        return self._json("GET", self._route())

    # -- prompts ---------------------------------------------------------------------------------

    def allow_prompt(self, prompt: Any) -> str:
        """Let the server's nodes use this run for ``prompt``; returns its digest."""
        self._check()
        digests = self._prompt_digests_to_allow(prompt)
        for digest in digests:
            self._json("POST", self._route(None, "/prompts"), json={"digest": digest})
        return digests[0]

    def revoke_prompt(self, digest: str) -> None:
        self._check()
        for each in self._prompt_digests_to_revoke(digest):
            self._json("DELETE", self._route(None, f"/prompts/{each}"))

    # -- lifecycle ----------------------------------------------------------------------------------

    def _release(self) -> None:
        """End the run on the server (its memory and files are removed there)."""
        try:
            route = self._route()
            resp = self._request("DELETE", route)
            if resp.status_code != 404:  # already gone (expired, server restarted): fine
                self._raise_for(resp, "DELETE", route)
        finally:
            if self._own_session:
                self._session.close()

    def __repr__(self) -> str:
        return f"<RemoteContext run_id={self.run_id!r} server={self.url!r}{' closed' if self._closed else ''}>"


def _error_class(name: Any) -> type[Exception] | None:
    cls = getattr(errors, str(name), None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, errors.DiscomfortError):
        return cls
    return None


def _reader(raw: Any):
    def read(n: int, what: str) -> bytes:
        if n == 0:
            return b""
        buf = bytearray(n)
        _read_into(raw, memoryview(buf), what)
        return bytes(buf)

    return read


def _read_into(raw: Any, dst: memoryview, what: str) -> None:
    """Fill ``dst`` from a urllib3 response, straight from the socket when it can."""
    n = dst.nbytes
    pos = 0
    fp = getattr(raw, "_fp", None)
    direct = fp is not None and callable(getattr(fp, "readinto", None)) \
        and not raw.headers.get("Content-Encoding") and not getattr(raw, "_decoded_buffer", None)
    while pos < n:
        if direct:
            assert fp is not None
            got = fp.readinto(dst[pos : min(n, pos + 8 * CHUNK)])
        else:
            chunk = raw.read(min(n - pos, CHUNK), decode_content=True)
            got = len(chunk)
            dst[pos : pos + got] = chunk
        if not got:
            raise ValueError(f"the answer ended early ({what}: {pos} of {n} bytes)")
        pos += got
