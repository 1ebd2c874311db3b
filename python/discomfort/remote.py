"""Values over HTTP, for ComfyUI servers that cannot share memory with the orchestrator.

When ComfyUI runs in a container with its own /dev/shm, on another machine, or as another user,
its nodes cannot attach to a run in this process's shared memory. The run then lives in the
server process instead (a :class:`ServedContext` it creates and owns, registered there so that
``DiscomfortPort`` / ``DiscomfortDataLoader`` find it with ``get_context``), and values travel as
binary HTTP bodies through the node pack's routes:

======================================================  ==========================================
``POST   /discomfort/runs``                             create a run: ``{"run_id": ...}``
``GET    /discomfort/runs/{run_id}``                    its stats
``DELETE /discomfort/runs/{run_id}``                    end it (removes its memory and files)
``GET    /discomfort/runs/{run_id}/values``             ``{"keys": [...]}``
``PUT    /discomfort/runs/{run_id}/values/{unique_id}`` store a value (a frame, below)
``GET    /discomfort/runs/{run_id}/values/{unique_id}`` the value (a frame)
``GET    .../values/{unique_id}/info``                  tier, size and version (JSON)
``DELETE .../values/{unique_id}``                       delete it
======================================================  ==========================================

Errors are JSON ``{"error": message, "type": exception class, "run_id", "unique_id"}`` with HTTP
404 (unknown run or key), 400 (bad key, bad frame), 409 (a value saved by reference), 507 (the
store is full); :class:`RemoteContext` raises the matching :mod:`discomfort.errors` exception.

The frame is what :func:`discomfort.codecs.encode` makes of a value, never base64 or a prompt
field: a fixed header (magic ``DCFV``, format version, buffer count, metadata length), one 64-bit
length per buffer, the metadata (the pickle stream), then the raw buffers back to back. Both
sides stream it: the client sends the tensor's own memory, the server reserves the object in its
store and fills it straight from the request stream.

Trust: the server unpickles what clients send. A value that arrived over HTTP is therefore
decoded on the server with a restricted unpickler that only builds tensors, numpy arrays, Arrow
data and plain Python data (str, numbers, bytes, lists, tuples, dicts, sets, None, ...): anything
else (arbitrary classes, functions) is refused, so a client that can reach the server cannot run
code in it through a value. :class:`RemoteContext` checks this before it sends. Values the
server's own nodes save are not restricted; the client trusts the server it sends workflows to
and decodes its answers without restriction.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import pickle
import struct
import sys
import threading
import time
from typing import Any, Iterator, Sequence

from . import codecs
from .context import WorkflowContext
from .errors import (
    ComfyConnectionError,
    DiscomfortError,
    ReferenceUnavailableError,
    SerializationError,
    UnknownKeyError,
    UnknownRunError,
)

__all__ = [
    "RemoteContext",
    "TransportWarning",
    "frame_header",
    "parse_header",
    "FrameBody",
    "check_sendable",
    "safe_decode",
    "ServedContext",
]

log = logging.getLogger("discomfort")

MAGIC = b"DCFV"
FRAME_VERSION = 1
_HEAD = struct.Struct("<4sHHIQ")  # magic, version, flags (0), buffer count, metadata length
_SIZE = struct.Struct("<Q")
MAX_BUFFERS = 65536  # the store's limit
MAX_META = 1 << 30
CHUNK = 1 << 20  # bytes per socket write / read on either side


class TransportWarning(UserWarning):
    """Shown once per run_sequential call that moves its values over HTTP."""


# ------------------------------------------------------------------------------------- frames


def frame_header(meta_len: int, sizes: Sequence[int]) -> bytes:
    """The bytes in front of the metadata: fixed header plus one length per buffer."""
    if len(sizes) > MAX_BUFFERS:
        raise SerializationError(f"a value of {len(sizes)} out-of-band buffers is too many to send (max {MAX_BUFFERS})")
    return _HEAD.pack(MAGIC, FRAME_VERSION, 0, len(sizes), meta_len) + b"".join(_SIZE.pack(n) for n in sizes)


def frame_length(meta_len: int, sizes: Sequence[int]) -> int:
    return _HEAD.size + _SIZE.size * len(sizes) + meta_len + sum(sizes)


def parse_fixed(head: bytes) -> tuple[int, int]:
    """(buffer count, metadata length) from the fixed header; ValueError if it is not a frame."""
    if len(head) != _HEAD.size:
        raise ValueError(f"truncated frame header ({len(head)} of {_HEAD.size} bytes)")
    magic, version, _flags, nbuf, meta_len = _HEAD.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"not a discomfort value frame (magic {magic!r}, expected {MAGIC!r})")
    if version != FRAME_VERSION:
        raise ValueError(f"frame format version {version}, this side reads {FRAME_VERSION}")
    if nbuf > MAX_BUFFERS:
        raise ValueError(f"frame announces {nbuf} buffers (max {MAX_BUFFERS})")
    if meta_len > MAX_META:
        raise ValueError(f"frame announces {meta_len} bytes of metadata (max {MAX_META})")
    return nbuf, meta_len


def parse_sizes(raw: bytes, nbuf: int) -> list[int]:
    if len(raw) != _SIZE.size * nbuf:
        raise ValueError("truncated buffer table in the frame header")
    return [v for (v,) in _SIZE.iter_unpack(raw)] if nbuf else []


def parse_header(data: bytes) -> tuple[int, list[int], int]:
    """(metadata length, buffer sizes, header length) of a frame that starts ``data``."""
    nbuf, meta_len = parse_fixed(bytes(data[: _HEAD.size]))
    end = _HEAD.size + _SIZE.size * nbuf
    return meta_len, parse_sizes(bytes(data[_HEAD.size : end]), nbuf), end


class FrameBody:
    """A request body that streams a frame: the header, the metadata, then each buffer's memory.

    ``requests`` sends an iterable with a length as a Content-Length body, chunk by chunk, so the
    buffers go to the socket without being joined into one big bytes object first.
    """

    def __init__(self, meta: bytes, buffers: Sequence[memoryview], chunk: int = 8 * CHUNK):
        self._views = [b if isinstance(b, memoryview) and b.format == "B" and b.ndim == 1
                       else memoryview(b).cast("B") for b in buffers]
        self._head = frame_header(len(meta), [v.nbytes for v in self._views]) + bytes(meta)
        self._chunk = chunk
        self._len = len(self._head) + sum(v.nbytes for v in self._views)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        yield self._head
        for v in self._views:
            for off in range(0, v.nbytes, self._chunk):
                yield v[off : off + self._chunk]


# -------------------------------------------------------------------- what a network value may hold

_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_ALLOWED = {
    "discomfort.codecs": {"_rebuild_tensor", "_rebuild_meta_tensor", "_view_as", "_rebuild_arrow"},
    "builtins": {"complex", "set", "frozenset", "bytearray", "slice", "range", "Ellipsis",
                 "NotImplemented"},
    "collections": {"OrderedDict"},
    "datetime": {"datetime", "date", "time", "timedelta", "timezone"},
    "torch": {"Size"},
    "torch.nn.parameter": {"Parameter"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
}


def _allowed(module: str, name: str) -> bool:
    if name in _ALLOWED.get(module, ()):
        return True
    if module == "torch":  # dtypes pickle as globals: torch.float32, torch.bfloat16, ...
        torch = sys.modules.get("torch") or importlib.import_module("torch")
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in ("numpy.dtypes", "numpy") and name.endswith("DType"):  # numpy 2 dtype classes
        return True
    return False


def _refuse(module: str, name: str) -> SerializationError:
    return SerializationError(
        f"the value holds a {module}.{name}: values sent over HTTP may only hold tensors, numpy "
        "arrays, Arrow data and plain Python data (str, numbers, bytes, None, lists, tuples, dicts, sets)"
    )


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise _refuse(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not accepted")


class _Anything:
    """Stands in for every object while :func:`check_sendable` walks a pickle stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Anything":
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


class _CheckingUnpickler(_SafeUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise _refuse(module, name)
        return _Anything


def safe_decode(meta: bytes, buffers: list) -> Any:
    """Decode a frame like :func:`discomfort.codecs.decode`, building only allowed types."""
    try:
        return _SafeUnpickler(io.BytesIO(meta), buffers=buffers).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot decode a value received over HTTP: {exc}") from exc


def check_sendable(meta: bytes, nbuf: int) -> None:
    """Raise SerializationError if the server would refuse to decode this value (builds nothing)."""
    try:
        _CheckingUnpickler(io.BytesIO(meta), buffers=[b""] * nbuf).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"the value's encoding cannot be checked: {exc}") from exc


def encode_for_http(data: Any, pass_by: str, unique_id: str, where: str) -> tuple[bytes, list[memoryview]]:
    """``codecs.encode(data)`` for a value that must cross to the server; clear errors for refs."""
    if pass_by not in ("auto", "val", "ref"):
        raise ValueError(f"pass_by must be 'auto', 'val' or 'ref', not {pass_by!r}")
    mode = codecs.choose_pass_by(data) if pass_by == "auto" else pass_by
    kind = f"{type(data).__module__}.{type(data).__qualname__}"
    if mode == "ref":
        raise ReferenceUnavailableError(
            f"cannot send {unique_id!r} ({kind}) to {where}: it is passed by reference, and references "
            "never leave the process that saved them; this run's store is in the ComfyUI server process "
            "(HTTP transport). Send it by value (pass_by='val', if it can be pickled) or produce it inside "
            "the workflow"
        )
    try:
        meta, buffers = codecs.encode(data)
    except SerializationError as exc:
        raise SerializationError(
            f"cannot send {unique_id!r} ({kind}) to {where}: it cannot be serialized ({exc}), and "
            "references cannot travel over HTTP"
        ) from exc
    try:
        check_sendable(meta, len(buffers))
    except SerializationError as exc:
        raise SerializationError(f"cannot send {unique_id!r} ({kind}) to {where}: {exc}") from exc
    return meta, buffers


# ------------------------------------------------------------------------------------- client


def _error_class(name: Any) -> type[Exception] | None:
    from . import errors

    cls = getattr(errors, str(name), None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, DiscomfortError):
        return cls
    return None


class RemoteContext:
    """A run whose store lives in a ComfyUI server process, reached over HTTP.

    The subset of :class:`~discomfort.WorkflowContext` that ``run_sequential`` uses: ``run_id``,
    ``save``, ``load``, ``info``, ``delete``, ``keys``, ``in``, ``shutdown``, and ``with``. The
    server creates and owns the run (``POST /discomfort/runs``); ``shutdown()`` (or leaving the
    ``with`` block) ends it there. Loaded values are plain copies in this process.

    ``ram_budget`` is passed to the server (a number of bytes or a string such as ``"8G"``); the
    server chooses its own disk tier.
    """

    def __init__(self, server_url: str, *, ram_budget: int | str | None = None, session: Any = None,
                 request_timeout: float = 120.0) -> None:
        try:
            import requests
        except ImportError as exc:  # pragma: no cover
            raise ImportError("discomfort.remote needs the 'requests' package (pip install requests)") from exc
        self._requests = requests
        self.url = server_url.rstrip("/")
        self.request_timeout = request_timeout
        self._own_session = session is None
        self._session = requests.Session() if session is None else session
        self._closed = False
        self._lock = threading.Lock()
        body = {} if ram_budget is None else {"ram_budget": ram_budget}
        try:
            answer = self._json("POST", "/discomfort/runs", json=body)
        except BaseException:
            if self._own_session:
                self._session.close()
            raise
        self.run_id: str = answer["run_id"]
        self.server_pid = answer.get("pid")

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def owner(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> str:
        return "http"

    def _route(self, key: str | None = None, suffix: str = "") -> str:
        from urllib.parse import quote

        base = f"/discomfort/runs/{quote(self.run_id, safe='')}"
        if key is None:
            return base + suffix
        if not isinstance(key, str) or not key:
            from .errors import InvalidKeyError

            raise InvalidKeyError(f"a key is a non-empty str, not {key!r}")
        return f"{base}/values/{quote(key, safe='')}{suffix}"

    def _request(self, method: str, route: str, **kw: Any) -> Any:
        kw.setdefault("timeout", self.request_timeout)
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
        cls = _error_class(data.get("type")) or ComfyConnectionError
        raise cls(f"{data['error']} (server {self.url})")

    def _json(self, method: str, route: str, **kw: Any) -> Any:
        resp = self._request(method, route, **kw)
        self._raise_for(resp, method, route)
        return resp.json()

    def _check(self) -> None:
        if self._closed:
            from .errors import RunFinishedError

            raise RunFinishedError(f"run {self.run_id!r} has finished: its context was shut down")

    # -- data ------------------------------------------------------------------------------------

    def save(self, unique_id: str, data: Any, pass_by: str = "auto") -> int:
        """Send ``data`` to the server's store under ``unique_id``; returns its version there."""
        self._check()
        meta, buffers = encode_for_http(data, pass_by, unique_id, f"the server {self.url}")
        body = FrameBody(meta, buffers)
        route = self._route(unique_id)
        # An iterable with a length: requests sends it with Content-Length, chunk by chunk.
        resp = self._request("PUT", route, data=body, headers={"Content-Type": "application/octet-stream"})
        self._raise_for(resp, "PUT", route)
        return int(resp.json()["version"])

    def load(self, unique_id: str) -> Any:
        """The value stored under ``unique_id`` on the server (read into this process)."""
        self._check()
        route = self._route(unique_id)
        resp = self._request("GET", route, stream=True)
        try:
            self._raise_for(resp, "GET", route)
            raw = resp.raw
            read = _reader(raw)
            nbuf, meta_len = parse_fixed(read(_HEAD.size, f"{unique_id!r}: frame header"))
            sizes = parse_sizes(read(_SIZE.size * nbuf, f"{unique_id!r}: buffer table"), nbuf)
            meta = read(meta_len, f"{unique_id!r}: metadata")
            buffers = []
            for n in sizes:
                buf = bytearray(n)
                _read_into(raw, memoryview(buf), f"{unique_id!r}: buffer of {n} bytes")
                buffers.append(buf)
        except ValueError as exc:
            raise ComfyConnectionError(f"GET {self.url}{route}: bad answer: {exc}") from exc
        finally:
            resp.close()
        return codecs.decode(meta, buffers)

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

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def stats(self) -> dict[str, Any]:
        self._check()
        return self._json("GET", self._route())

    # -- lifecycle ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End the run on the server (its memory and files are removed there). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            route = self._route()
            resp = self._request("DELETE", route)
            if resp.status_code != 404:  # already gone (expired, server restarted): fine
                self._raise_for(resp, "DELETE", route)
        finally:
            if self._own_session:
                self._session.close()

    close = shutdown

    def __enter__(self) -> "RemoteContext":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
            return
        try:  # do not hide the error that ended the block
            self.shutdown()
        except Exception as err:  # noqa: BLE001
            log.warning("could not end run %s on %s: %s", self.run_id, self.url, err)

    def __repr__(self) -> str:
        return f"<RemoteContext run_id={self.run_id!r} server={self.url!r}{' closed' if self._closed else ''}>"


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


# ------------------------------------------------------------------------------------- server


class ServedContext(WorkflowContext):
    """A run created for an HTTP client and owned by the server process.

    Values that arrived over HTTP (and were not overwritten since) are decoded with the
    restricted unpickler; values the server's nodes saved load as usual.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.received: dict[str, int] = {}  # key -> version of the value a client sent
        self.last_used = time.monotonic()

    def load(self, unique_id: str) -> Any:
        kind, meta, views, info = self.load_encoded(unique_id)
        if kind == "val" and self.received.get(unique_id) == info.get("version"):
            try:
                return safe_decode(meta, views)
            except SerializationError as exc:
                raise SerializationError(
                    f"cannot load {unique_id!r} of run {self.run_id!r}: it was sent over HTTP and {exc}"
                ) from exc
        if kind == "ref":
            return self._load_ref(unique_id, json.loads(meta))
        return codecs.decode(meta, views)


class RunServer:
    """The server side of the routes: the runs this server process created for HTTP clients."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}
        self.ttl = float(os.environ.get("DISCOMFORT_REMOTE_RUN_TTL", 24 * 3600))

    # -- helpers ---------------------------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, ctx in list(self.runs.items()):
            if ctx.closed or now - ctx.last_used > self.ttl:
                self.runs.pop(rid, None)
                if not ctx.closed:
                    log.warning("discomfort: run %s unused for %.0fs: ended", rid, now - ctx.last_used)
                    ctx.shutdown()

    def _run(self, run_id: str) -> Any:
        self._expire()
        ctx = self.runs.get(run_id)
        if ctx is None or ctx.closed:
            raise UnknownRunError(
                f"no run {run_id!r} on this server (it ended, or was never created with POST /discomfort/runs)"
            )
        ctx.last_used = time.monotonic()
        return ctx

    @staticmethod
    def _error(exc: BaseException, run_id: str | None = None, key: str | None = None) -> Any:
        from aiohttp import web

        from . import errors

        if isinstance(exc, (errors.UnknownRunError, errors.UnknownKeyError)):
            status = 404
        elif isinstance(exc, errors.ReferenceUnavailableError):
            status = 409
        elif isinstance(exc, (errors.StoreFullError, errors.DiskFullError)):
            status = 507
        elif isinstance(exc, (ValueError, TypeError, errors.DiscomfortError)):
            status = 400
        else:
            status = 500
        body = {"error": str(exc) or type(exc).__name__, "type": type(exc).__name__,
                "run_id": run_id, "unique_id": key}
        return web.json_response(body, status=status)

    # -- handlers (aiohttp) ----------------------------------------------------------------------

    async def create(self, request: Any) -> Any:
        from aiohttp import web

        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return self._error(ValueError("the body of POST /discomfort/runs must be JSON (or empty)"))
        if not isinstance(body, dict):
            body = {}
        self._expire()
        try:
            ctx = ServedContext(ram_budget=body.get("ram_budget"))
        except Exception as exc:  # noqa: BLE001
            return self._error(exc)
        self.runs[ctx.run_id] = ctx
        log.info("discomfort: run %s created for %s", ctx.run_id, request.remote)
        return web.json_response({"run_id": ctx.run_id, "pid": os.getpid(), "backend": ctx.backend})

    async def stats(self, request: Any) -> Any:
        from aiohttp import web

        run_id = request.match_info["run_id"]
        try:
            return web.json_response(self._run(run_id).stats())
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id)

    async def end(self, request: Any) -> Any:
        from aiohttp import web

        run_id = request.match_info["run_id"]
        try:
            ctx = self._run(run_id)
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id)
        self.runs.pop(run_id, None)
        ctx.shutdown()
        return web.json_response({"run_id": run_id, "ended": True})

    async def keys(self, request: Any) -> Any:
        from aiohttp import web

        run_id = request.match_info["run_id"]
        try:
            return web.json_response({"keys": self._run(run_id).keys()})
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id)

    async def info(self, request: Any) -> Any:
        from aiohttp import web

        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        try:
            return web.json_response(self._run(run_id).info(key))
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id, key)

    async def delete(self, request: Any) -> Any:
        from aiohttp import web

        from .errors import UnknownKeyError as _UKE

        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        try:
            ctx = self._run(run_id)
            if not ctx.delete(key):
                raise _UKE(f"no object {key!r} in run {run_id!r}")
            ctx.received.pop(key, None)
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id, key)
        return web.json_response({"run_id": run_id, "unique_id": key, "deleted": True})

    async def put(self, request: Any) -> Any:
        from aiohttp import web

        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        try:
            ctx = self._run(run_id)
            reader = request.content
            try:
                nbuf, meta_len = parse_fixed(await reader.readexactly(_HEAD.size))
                sizes = parse_sizes(await reader.readexactly(_SIZE.size * nbuf), nbuf)
                meta = await reader.readexactly(meta_len)
            except _incomplete() as exc:
                raise ValueError(f"the body ended inside the frame header ({exc})") from None
            total = frame_length(meta_len, sizes)
            if request.content_length is not None and request.content_length != total:
                raise ValueError(f"Content-Length {request.content_length} but the frame is {total} bytes")
            res = ctx.reserve(key, meta, sizes)
            try:
                for dst in res.buffers:
                    await _fill(reader, dst)
                if await reader.read(1):
                    raise ValueError(f"the body is longer than its frame ({total} bytes)")
                version = res.seal()
            except BaseException:
                res.abort()
                raise
            ctx.received[key] = version
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id, key)
        return web.json_response({"run_id": run_id, "unique_id": key, "version": version})

    async def get(self, request: Any) -> Any:
        from aiohttp import web

        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        try:
            ctx = self._run(run_id)
            kind, meta, views, info = ctx.load_encoded(key)
            if kind == "ref":
                marker = json.loads(meta)
                raise ReferenceUnavailableError(
                    f"{key!r} in run {run_id!r} is a {marker.get('type')} saved by reference in the server "
                    "process; references cannot travel over HTTP (save it by value to fetch it)"
                )
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, run_id, key)
        sizes = [v.nbytes for v in views]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-Discomfort-Version": str(info.get("version"))})
        resp.content_length = frame_length(len(meta), sizes)
        await resp.prepare(request)
        await resp.write(frame_header(len(meta), sizes) + bytes(meta))
        try:
            for v in views:
                for off in range(0, v.nbytes, CHUNK):
                    await resp.write(v[off : off + CHUNK])
        finally:
            del views  # unpin the store's pages once sent
        await resp.write_eof()
        return resp

    def shutdown_all(self) -> None:
        for rid, ctx in list(self.runs.items()):
            self.runs.pop(rid, None)
            ctx.shutdown()


def _incomplete() -> tuple[type[BaseException], ...]:
    import asyncio

    return (asyncio.IncompleteReadError,)


async def _fill(reader: Any, dst: memoryview) -> None:
    n = dst.nbytes
    pos = 0
    while pos < n:
        chunk = await reader.read(min(n - pos, CHUNK))
        if not chunk:
            raise ValueError(f"the body ended early ({pos} of {n} bytes of a buffer)")
        dst[pos : pos + len(chunk)] = chunk
        pos += len(chunk)


_server: RunServer | None = None


def run_server() -> RunServer:
    """The process-wide :class:`RunServer` (what the node pack's routes use)."""
    global _server
    if _server is None:
        _server = RunServer()
    return _server


def add_routes(routes: Any) -> None:
    """Register the run routes on an aiohttp ``RouteTableDef`` (ComfyUI's ``PromptServer.instance.routes``)."""
    srv = run_server()
    base = "/discomfort/runs"
    routes.post(base)(srv.create)
    routes.get(base + "/{run_id}")(srv.stats)
    routes.delete(base + "/{run_id}")(srv.end)
    routes.get(base + "/{run_id}/values")(srv.keys)
    routes.get(base + "/{run_id}/values/{unique_id}/info")(srv.info)
    routes.put(base + "/{run_id}/values/{unique_id}")(srv.put)
    routes.get(base + "/{run_id}/values/{unique_id}")(srv.get)
    routes.delete(base + "/{run_id}/values/{unique_id}")(srv.delete)
