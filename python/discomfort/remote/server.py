"""Internal: the node pack's run routes: runs owned by a ComfyUI server process, for HTTP clients.

======================================================  ==========================================
``POST   /discomfort/runs``                             create a run: ``{"run_id", "token", ...}``
``GET    /discomfort/runs/{run_id}``                    its stats, and its PUTs arriving now
``DELETE /discomfort/runs/{run_id}``                    end it (removes its memory and files)
``GET    /discomfort/runs/{run_id}/values``             ``{"keys": [...]}``
``PUT    /discomfort/runs/{run_id}/values/{unique_id}`` store a value (a frame)
``GET    /discomfort/runs/{run_id}/values/{unique_id}`` the value (a frame)
``GET    .../values/{unique_id}/info``                  tier, size and version (JSON)
``DELETE .../values/{unique_id}``                       delete it
``POST   /discomfort/runs/{run_id}/prompts``            ``{"digest"}``: let that prompt use the run
``DELETE /discomfort/runs/{run_id}/prompts/{digest}``   take that back
======================================================  ==========================================

Who may do what: creating a run needs the server secret (``DISCOMFORT_SERVER_SECRET``, header
``X-Discomfort-Secret``) when one is set; without one, only a client on loopback of a ComfyUI
that listens on loopback only. The creator gets the run's token (256 random bits, header
``X-Discomfort-Token``), which every other route of the run requires; the run id that travels
in prompts is not enough. Values are frames of the data-only :mod:`discomfort.datacodec`, never
pickles, in both directions. Errors are JSON ``{"error", "type", "run_id", "unique_id"}`` with
the status of :data:`.web.STATUS`. What a server grants its clients, and how PUTs are counted while
they arrive, is :mod:`.limits`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import ipaddress
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from aiohttp import web

from .. import _settings, codecs, datacodec, errors, sysinfo
from ..context import WorkflowContext
from .framing import (CHUNK, HEAD, SECRET_ENV, SECRET_HEADER, SIZE, TOKEN_HEADER, frame_header, frame_length,
                      parse_fixed, parse_sizes)
from .limits import Arrival, ServerLimits, Upload, Uploads, client_address, extent_bytes, uncancel
from .web import HTTPRefusal, add_route_table, answers_errors, read_json_object

__all__ = ["ServedContext", "RunServer", "ServerLimits", "run_server", "add_routes", "SECRET_ENV"]

log = logging.getLogger("discomfort")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_PROMPTS = 256  # prompts registered at once in one run (an orchestrator has a few in flight)
#: A run route's errors: JSON ``{"error", "type", "run_id", "unique_id"}`` (the path's, or null).
_answered = answers_errors("a run route", "run_id", "unique_id")


class ServedContext(WorkflowContext):
    """A run created for an HTTP client and owned by the server process.

    Its nodes and its GET route read and write with ``pread``/``pwrite`` (``guard_nodes``): a
    chunk another process cut must fail a request, not kill the server with SIGBUS.
    """

    guard_nodes = True

    def __init__(self, client: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.token = secrets.token_urlsafe(32)
        self.client = client
        self.last_used = time.monotonic()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def load(self, unique_id: str) -> Any:
        self.touch()
        return super().load(unique_id)

    def save(self, unique_id: str, data: Any, pass_by: Any = "auto") -> int:
        self.touch()
        return super().save(unique_id, data, pass_by)


# ----------------------------------------------------------------------------------- helpers


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def comfy_listens_on_loopback_only() -> bool:
    """Whether ComfyUI was started to listen on loopback addresses only (its --listen)."""
    try:
        from comfy.cli_args import args  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not inside ComfyUI: assume the worst
        return False
    listen = str(getattr(args, "listen", "") or "")
    return bool(listen) and all(_is_loopback(a.strip()) for a in listen.split(",") if a.strip())


def parse_budget(value: Any, cap: int) -> int:
    """A client's RAM budget (bytes or a size string), capped by the server's own."""
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"ram_budget must be a number of bytes or a size such as '8G', not {value!r:.40}")
    try:
        n = sysinfo.parse_size(value) if isinstance(value, str) else value
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"ram_budget: {exc}") from None
    if n < 0:
        raise ValueError(f"ram_budget must not be negative ({n})")
    return min(n, cap)


# ------------------------------------------------------------------------------------ server


class RunServer:
    """The runs this server process created for HTTP clients, and the route handlers."""

    def __init__(self, limits: ServerLimits | None = None, secret: str | None = None) -> None:
        self.runs: dict[str, ServedContext] = {}
        self.limits = limits or ServerLimits.from_env()
        self.secret = (secret if secret is not None else _settings.get(SECRET_ENV)) or None
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError(f"{SECRET_ENV} must be at least 16 characters")
        self._timer: asyncio.TimerHandle | None = None
        self.uploads = Uploads(self.limits)
        self.sending: collections.Counter = collections.Counter()  # client -> GETs being sent

    def explain(self) -> str:
        """One line for the server log: who may create runs."""
        if self.secret:
            return f"discomfort: HTTP runs need the server secret ({SECRET_ENV}, header {SECRET_HEADER})"
        if comfy_listens_on_loopback_only():
            return (f"discomfort: HTTP runs for clients on loopback only; set {SECRET_ENV} (server and "
                    "client) to serve other machines")
        return (f"discomfort: ComfyUI listens beyond loopback and {SECRET_ENV} is not set: the HTTP run "
                f"routes refuse every client; set {SECRET_ENV} to a random string of 16+ characters "
                "on the server and on each client to enable them")

    # -- runs ----------------------------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, ctx in list(self.runs.items()):
            if ctx.closed:
                self.runs.pop(rid, None)
            elif (now - ctx.last_used > self.limits.idle_seconds and not self._prompt_pending(ctx)
                  and not self.uploads.of_run(rid)):  # a value arriving is a use
                log.warning("discomfort: run %s unused for %.0fs: ended", rid, now - ctx.last_used)
                self._end(rid)

    def _end(self, run_id: str) -> None:
        """End a run: its PUTs in flight stop (404) and give their bytes back, then its store goes."""
        ctx = self.runs.pop(run_id, None)
        if ctx is not None:
            self.uploads.stop_run(run_id, errors.UnknownRunError(f"run {run_id!r} ended while this value arrived"))
            ctx.shutdown()

    @staticmethod
    def _prompt_pending(ctx: ServedContext) -> bool:
        """Whether a prompt of the run is queued or running, which keeps an idle run: in ComfyUI,
        its queue says (a prompt registered and never queued, or whose orchestrator went away
        before revoking it, keeps nothing); without ComfyUI, any registered prompt."""
        comfy = sys.modules.get("server")  # ComfyUI's, already imported when it serves these routes
        queue = getattr(getattr(getattr(comfy, "PromptServer", None), "instance", None), "prompt_queue", None)
        if queue is None or not hasattr(queue, "get_current_queue_volatile"):
            return bool(ctx.prompt_digests())
        running, queued = queue.get_current_queue_volatile()
        for item in [*running, *queued]:
            prompt = item[2] if isinstance(item, (list, tuple)) and len(item) > 2 else None
            for node in prompt.values() if isinstance(prompt, dict) else ():
                if isinstance(node, dict) and isinstance(node.get("inputs"), dict) \
                        and node["inputs"].get("run_id") == ctx.run_id:
                    return True
        return False

    def _schedule_expiry(self) -> None:
        if self._timer is None and self.runs:
            loop = asyncio.get_running_loop()

            def tick() -> None:
                self._timer = None
                self._expire()
                self._schedule_expiry()

            self._timer = loop.call_later(max(1.0, self.limits.idle_seconds / 4), tick)

    def _authorize(self, request: Any) -> ServedContext:
        """The run named in the path, if the request carries its token."""
        self._expire()
        run_id = request.match_info["run_id"]
        token = request.headers.get(TOKEN_HEADER)
        if not token:
            raise HTTPRefusal(401, f"the run routes need the run's token (header {TOKEN_HEADER}), which "
                                   "POST /discomfort/runs gave its creator", errors.AuthenticationError)
        ctx = self.runs.get(run_id)
        if ctx is None or ctx.closed:
            raise errors.UnknownRunError(
                f"no run {run_id!r} on this server (it ended, or was never created with POST /discomfort/runs)")
        if not hmac.compare_digest(token.encode(), ctx.token.encode()):
            raise HTTPRefusal(403, f"wrong token for run {run_id!r}", errors.AuthenticationError)
        ctx.touch()
        return ctx

    def _may_create(self, request: Any) -> None:
        if self.secret:
            given = request.headers.get(SECRET_HEADER)
            if not given:
                raise HTTPRefusal(401, f"creating a run needs the server secret (header {SECRET_HEADER}; "
                                       f"the client reads it from {SECRET_ENV})", errors.AuthenticationError)
            if not hmac.compare_digest(given.encode(), self.secret.encode()):
                raise HTTPRefusal(403, "wrong server secret", errors.AuthenticationError)
            return
        if not comfy_listens_on_loopback_only():
            raise HTTPRefusal(403, f"this ComfyUI listens beyond loopback and has no {SECRET_ENV}: set it on "
                                   "the server and the client to create runs", errors.AuthenticationError)
        if not _is_loopback(request.remote):
            raise HTTPRefusal(403, f"runs are created for clients on loopback only (set {SECRET_ENV})",
                              errors.AuthenticationError)

    # -- handlers (aiohttp) ------------------------------------------------------------------------

    @_answered
    async def create(self, request: Any) -> Any:
        self._may_create(request)
        body = await read_json_object(request, 4096, "the body of POST /discomfort/runs")
        self._expire()
        client = client_address(request.remote)
        if len(self.runs) >= self.limits.max_runs:
            raise HTTPRefusal(503, f"this server holds {len(self.runs)} runs, its limit; try again once "
                                   "some have ended", errors.RemoteLimitError)
        if sum(c.client == client for c in self.runs.values()) >= self.limits.max_runs_per_client:
            raise HTTPRefusal(429, f"{client} holds {self.limits.max_runs_per_client} runs on this server, "
                                   "its limit per client; end some first", errors.RemoteLimitError)
        cap = self.limits.max_budget or sysinfo.ram_budget(None)
        budget = parse_budget(body.get("ram_budget"), cap)
        ctx = ServedContext(client, ram_budget=budget)
        self.runs[ctx.run_id] = ctx
        self._schedule_expiry()
        log.info("discomfort: run %s created for %s", ctx.run_id, client)
        return web.json_response({"run_id": ctx.run_id, "token": ctx.token, "backend": ctx.backend,
                                  "ram_budget": budget, "max_value": self.limits.max_value})

    @_answered
    async def stats(self, request: Any) -> Any:
        ctx = self._authorize(request)
        return web.json_response({**ctx.stats(), **self.uploads.summary(ctx.run_id)})

    @_answered
    async def end(self, request: Any) -> Any:
        run_id = request.match_info["run_id"]
        self._authorize(request)
        self._end(run_id)
        return web.json_response({"run_id": run_id, "ended": True})

    @_answered
    async def keys(self, request: Any) -> Any:
        return web.json_response({"keys": self._authorize(request).keys()})

    @_answered
    async def info(self, request: Any) -> Any:
        return web.json_response(self._authorize(request).info(request.match_info["unique_id"]))

    @_answered
    async def delete(self, request: Any) -> Any:
        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        if not self._authorize(request).delete(key):
            raise errors.UnknownKeyError(f"no object {key!r} in run {run_id!r}")
        return web.json_response({"run_id": run_id, "unique_id": key, "deleted": True})

    @_answered
    async def allow(self, request: Any) -> Any:
        run_id = request.match_info["run_id"]
        ctx = self._authorize(request)
        raw = await request.content.read(257)
        try:
            digest = json.loads(raw).get("digest")
        except (ValueError, AttributeError):
            digest = None
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ValueError("the body must be {\"digest\": <64 lowercase hex digits>}")
        held = ctx.prompt_digests()
        if digest not in held and len(held) >= MAX_PROMPTS:  # each one rewrites the whole set
            raise HTTPRefusal(429, f"run {run_id!r} has {len(held)} prompts registered, its limit: revoke "
                                   "those that have finished", errors.RemoteLimitError)
        ctx.allow_digest(digest)
        return web.json_response({"run_id": run_id, "digest": digest})

    @_answered
    async def revoke(self, request: Any) -> Any:
        run_id, digest = request.match_info["run_id"], request.match_info["digest"]
        self._authorize(request).revoke_prompt(digest)
        return web.json_response({"run_id": run_id, "revoked": digest})

    @_answered
    async def put(self, request: Any) -> Any:
        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        lim = self.limits
        ctx = self._authorize(request)
        length = request.content_length
        if length is None:
            raise HTTPRefusal(411, "send the value with a Content-Length (no chunked bodies)",
                              errors.RemoteLimitError)
        if length > lim.max_value:
            raise HTTPRefusal(413, f"a value of {length} bytes is over this server's limit of "
                                   f"{lim.max_value} (DISCOMFORT_REMOTE_MAX_VALUE)", errors.RemoteLimitError)
        body = Arrival(request.content, lim)
        try:
            up = self.uploads.open(ctx, key, body)  # counted from here until answered
            try:
                version = await self._receive(ctx, up, length)
            finally:
                self.uploads.close(up)
        except asyncio.CancelledError:
            if body.refusal is None:
                raise
            uncancel()
            raise body.refusal from None
        finally:
            body.close()
        return web.json_response({"run_id": run_id, "unique_id": key, "version": version})

    async def _receive(self, ctx: ServedContext, up: Upload, length: int) -> int:
        """Read a frame into a reservation of the store; its version once sealed. Its bytes are
        charged to the run and its client (:class:`.limits.Uploads`) before any is reserved."""
        lim, body = self.limits, up.arrival
        nbuf, meta_len = parse_fixed(await body.exactly(HEAD.size, "frame header"), lim.codec)
        sizes = parse_sizes(await body.exactly(SIZE.size * nbuf, "buffer table"), nbuf, lim.codec)
        if length != frame_length(meta_len, sizes):
            raise ValueError(f"Content-Length {length} but the frame is {frame_length(meta_len, sizes)} bytes")
        mine = [c for c in self.runs.values() if c.client == ctx.client and not c.closed]
        # Charged before the metadata is read into memory (+1: the store's type tag) ...
        self.uploads.charge(up, ctx, extent_bytes(meta_len + 1, sizes), mine)
        meta = await body.exactly(meta_len, "metadata")
        datacodec.check(meta, sizes, lim.codec)  # ... and checked before a byte is reserved
        res = ctx.reserve_data(up.key, meta, sizes)
        try:
            for i, dst in enumerate(res.buffers):
                await body.fill(dst, f"buffer {i}")
            datacodec.decode(meta, res.buffers, lim.codec, place=False)  # contents: bool bytes, Arrow
            return res.seal()
        except BaseException:
            res.abort()
            raise

    @_answered
    async def get(self, request: Any) -> Any:
        """A value as a frame. The copy it is sent from is held until the client has read it, so a
        client sends few at once (429 over ``max_downloads_per_client``) and must read them at the
        rate a PUT must keep (``stall_seconds``, ``min_rate``), or the connection is cut."""
        run_id, key = request.match_info["run_id"], request.match_info["unique_id"]
        ctx = self._authorize(request)
        client, cap = ctx.client, self.limits.max_downloads_per_client
        if self.sending[client] >= cap:
            raise HTTPRefusal(429, f"{client} has {cap} values being sent, its limit "
                                   "(DISCOMFORT_REMOTE_MAX_DOWNLOADS_PER_CLIENT); read them first",
                              errors.RemoteLimitError)
        self.sending[client] += 1
        try:  # (the frame's buffers are held by _send_value alone, and dropped once sent)
            return await self._send_value(request, ctx, run_id, key, *self._encoded(ctx, run_id, key))
        finally:
            self.sending[client] -= 1
            if self.sending[client] <= 0:
                del self.sending[client]

    def _encoded(self, ctx: ServedContext, run_id: str, key: str) -> tuple[Any, list, dict]:
        """The value as data only (meta, buffers, info): what a GET sends."""
        kind, meta, views, info = ctx.load_encoded(key, guarded=True)
        if kind == "ref":
            marker = json.loads(meta)
            raise errors.ReferenceUnavailableError(
                f"{key!r} in run {run_id!r} is a {marker.get('type')} saved by reference in the server "
                "process; references cannot travel over HTTP (save it by value to fetch it)")
        if kind == "val":  # written by this server's own nodes: decode, re-encode as data only
            value = codecs.decode(meta, views)
            try:
                meta, views = datacodec.encode(value, self.limits.codec)
            except errors.SerializationError as exc:
                raise errors.ReferenceUnavailableError(f"{key!r} in run {run_id!r} cannot be sent: {exc}") from None
            del value
        return meta, views, info

    async def _send_value(self, request: Any, ctx: ServedContext, run_id: str, key: str, meta: Any, views: list,
                          info: dict) -> Any:
        """Stream the frame; once it has begun, a failure cuts the connection (no second answer)."""
        sizes = [v.nbytes for v in views]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-Discomfort-Version": str(info.get("version"))})
        resp.content_length = total = frame_length(len(meta), sizes)
        lim, loop = self.limits, asyncio.get_running_loop()
        due = loop.time() + lim.rate_grace + total / lim.min_rate if lim.min_rate > 0 else None

        async def send(data: Any) -> None:
            limit = lim.stall_seconds if due is None else min(lim.stall_seconds, due - loop.time())
            await asyncio.wait_for(resp.write(data), max(0.0, limit))

        try:
            await resp.prepare(request)
            await send(frame_header(len(meta), sizes) + bytes(meta))
            for v in views:
                for off in range(0, v.nbytes, CHUNK):
                    await send(v[off : off + CHUNK])
            await resp.write_eof()
        except (asyncio.TimeoutError, ConnectionError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                log.warning("discomfort: run %s: %r not read fast enough by %s (DISCOMFORT_REMOTE_STALL, "
                            "DISCOMFORT_REMOTE_MIN_RATE): connection closed", run_id, key, ctx.client)
            if request.transport is not None:
                request.transport.abort()
        except Exception:  # noqa: BLE001 - the answer has begun: no error answer can follow it
            log.exception("discomfort: run %s: sending %r failed: connection closed", run_id, key)
            if request.transport is not None:
                request.transport.abort()
        finally:
            del views  # unpin the store's pages, or drop the copy, once sent
        return resp

    def shutdown_all(self) -> None:
        for rid in list(self.runs):
            self._end(rid)


@functools.cache
def run_server() -> RunServer:
    """The process-wide :class:`RunServer` (what the node pack's routes use)."""
    return RunServer()


def add_routes(routes: Any) -> None:
    """Register the run routes on an aiohttp ``RouteTableDef`` (ComfyUI's ``PromptServer.instance.routes``)."""
    srv = run_server()
    open_to = srv.secret or comfy_listens_on_loopback_only()
    (log.info if open_to else log.warning)(srv.explain())
    add_route_table(routes, "/discomfort/runs", [
        ("POST", "", srv.create),
        ("GET", "/{run_id}", srv.stats),
        ("DELETE", "/{run_id}", srv.end),
        ("GET", "/{run_id}/values", srv.keys),
        ("GET", "/{run_id}/values/{unique_id}/info", srv.info),
        ("PUT", "/{run_id}/values/{unique_id}", srv.put),
        ("GET", "/{run_id}/values/{unique_id}", srv.get),
        ("DELETE", "/{run_id}/values/{unique_id}", srv.delete),
        ("POST", "/{run_id}/prompts", srv.allow),
        ("DELETE", "/{run_id}/prompts/{digest}", srv.revoke),
    ])
