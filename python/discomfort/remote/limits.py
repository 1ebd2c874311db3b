"""Internal: what a run server grants its HTTP clients, and how uploads are held to it while they arrive.

A PUT's bytes count from the moment its frame's sizes are known, not when it is sealed: until it
is stored or dropped, its extent is charged to its run and to the client that created the run,
so concurrent PUTs together cannot reserve more than either limit. Concurrent PUTs are capped per
run and per client (429), and a body must keep up an average rate after a grace period, besides
never pausing for the stall limit (408): a trickling body cannot hold its reservation for long.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .. import _settings, datacodec, errors
from .web import HTTPRefusal

__all__ = ["client_address", "ServerLimits", "Arrival", "Upload", "Uploads", "extent_bytes", "uncancel"]

_PAGE = 4096
_PAGE_ALIGNED = 65536  # buffers from this size start on a page in the store's extent


def client_address(remote: str | None) -> str:
    """The client a per-client limit counts: the TCP peer's address, an IPv4 one written as IPv4
    when it arrives mapped into IPv6, and an IPv6 one as its /64 (one machine or one home is
    handed a whole /64, and may use any address in it)."""
    host = str(remote or "unknown")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_setting = _settings.setting_field  # a field whose default is the setting's (discomfort._settings)


@dataclass
class ServerLimits:
    """What one server grants its HTTP clients: each limit but ``codec`` is a setting, its default
    written once in discomfort._settings (docs/SETTINGS.md); :meth:`from_env` reads them all."""

    max_runs: int = _setting("DISCOMFORT_REMOTE_MAX_RUNS")
    max_runs_per_client: int = _setting("DISCOMFORT_REMOTE_MAX_RUNS_PER_CLIENT")  # by address
    max_budget: int = _setting("DISCOMFORT_REMOTE_MAX_BUDGET")  # 0: this machine's default RAM budget
    max_value: int = _setting("DISCOMFORT_REMOTE_MAX_VALUE")  # bytes of one frame
    max_run_bytes: int = _setting("DISCOMFORT_REMOTE_MAX_RUN_BYTES")  # bytes a run holds, both tiers
    max_client_bytes: int = _setting("DISCOMFORT_REMOTE_MAX_CLIENT_BYTES")  # all runs of one client
    max_uploads_per_run: int = _setting("DISCOMFORT_REMOTE_MAX_UPLOADS_PER_RUN")  # PUTs arriving at once
    max_uploads_per_client: int = _setting("DISCOMFORT_REMOTE_MAX_UPLOADS_PER_CLIENT")
    # GETs being sent at once by one client: each holds a copy of its value until it is sent
    max_downloads_per_client: int = _setting("DISCOMFORT_REMOTE_MAX_DOWNLOADS_PER_CLIENT")
    idle_seconds: float = _setting("DISCOMFORT_REMOTE_RUN_TTL")  # a run nobody used for this long ends
    stall_seconds: float = _setting("DISCOMFORT_REMOTE_STALL")  # a body that sends nothing this long: 408
    min_rate: int = _setting("DISCOMFORT_REMOTE_MIN_RATE")  # bytes/s a body averages after the grace; 0: none
    rate_grace: float = _setting("DISCOMFORT_REMOTE_RATE_GRACE")  # seconds before the rate counts
    codec: datacodec.Limits = field(default_factory=datacodec.Limits)

    @classmethod
    def from_env(cls) -> "ServerLimits":
        lim: ServerLimits = _settings.from_settings(cls)
        lim.codec = datacodec.Limits(max_bytes=lim.max_value)
        return lim


def extent_bytes(meta_len: int, sizes: Sequence[int]) -> int:
    """The bytes a value takes in the store (what its stats count): directory, metadata, buffers
    aligned to 64 bytes (a page from 64 KiB), the whole rounded up to a page."""
    pos = (32 + 16 * len(sizes) + 63) // 64 * 64 + meta_len
    for n in sizes:
        a = _PAGE if n >= _PAGE_ALIGNED else 64
        pos = (pos + a - 1) // a * a + n
    return (pos + _PAGE - 1) // _PAGE * _PAGE


def uncancel() -> None:
    """Take back the cancellation an arrival's timer made (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class Arrival:
    """A request body read chunk by chunk as aiohttp received it: one copy, into the destination.

    ``readchunk`` hands over the parser's own chunks (``read(n)`` would join them first: one more
    copy of every byte). One timer per request, not a ``wait_for`` per chunk, ends a body that
    sends nothing for ``stall_seconds`` or, after ``rate_grace`` seconds, has averaged less than
    ``min_rate`` bytes a second: it cancels the handler, which answers :attr:`refusal`.
    """

    def __init__(self, content: Any, limits: ServerLimits) -> None:
        self._content = content
        self._rest = memoryview(b"")
        self._stall = limits.stall_seconds
        self._rate = limits.min_rate
        self._grace = limits.rate_grace
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._start = self._last = self._loop.time()
        self.received = 0
        self.refusal: BaseException | None = None
        self._timer = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        """When the body is next late if nothing more arrives."""
        due = self._last + self._stall
        if self._rate > 0:
            due = min(due, self._start + self._grace + self.received / self._rate)
        return due

    def _check(self) -> None:
        now = self._loop.time() + 0.01  # the loop runs timers up to its clock resolution early
        if now - self._last >= self._stall:
            self.stop(HTTPRefusal(408, f"the body sent nothing for {self._stall:.0f} s", errors.RemoteLimitError))
        elif self._rate > 0 and now >= self._start + self._grace + self.received / self._rate:
            took = self._loop.time() - self._start
            self.stop(HTTPRefusal(
                408, f"the body sent {self.received} bytes in {took:.1f} s, under this server's minimum of "
                     f"{self._rate} bytes/s after {self._grace:.0f} s (DISCOMFORT_REMOTE_MIN_RATE)",
                errors.RemoteLimitError))
        else:
            self._timer = self._loop.call_at(self._due(), self._check)

    def stop(self, refusal: BaseException) -> None:
        """End the body's handler with ``refusal`` as its answer (the first reason wins)."""
        if self.refusal is None and self._task is not None:
            self.refusal = refusal
            self._task.cancel()

    def close(self) -> None:
        self._timer.cancel()

    async def _chunk(self, what: str) -> memoryview:
        if self._rest.nbytes:
            chunk, self._rest = self._rest, memoryview(b"")
            return chunk
        while True:
            try:
                data, _ = await self._content.readchunk()
            except ConnectionError:  # the client closed its end: nobody reads an answer now
                raise ValueError(f"the connection closed inside the {what}") from None
            self._last = self._loop.time()
            self.received += len(data)
            if data:
                return memoryview(data)
            if self._content.at_eof():
                raise ValueError(f"the body ended inside the {what}")

    async def fill(self, dst: memoryview, what: str) -> None:
        """Fill ``dst`` from the body."""
        pos, n = 0, dst.nbytes
        while pos < n:
            try:
                chunk = await self._chunk(what)
            except ValueError:
                raise ValueError(f"the body ended inside the {what} ({pos} of {n} bytes)") from None
            take = min(chunk.nbytes, n - pos)
            dst[pos : pos + take] = chunk[:take]
            if take < chunk.nbytes:
                self._rest = chunk[take:]
            pos += take

    async def exactly(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        await self.fill(memoryview(buf), what)
        return bytes(buf)


@dataclass(eq=False)
class Upload:
    """A PUT between its start and its answer; ``nbytes`` is 0 until its frame's sizes are read."""

    run_id: str
    client: str
    key: str
    arrival: Arrival
    nbytes: int = 0


class Uploads:
    """The PUTs arriving now, and what the runs and clients they belong to would hold.

    A run's total is what its store holds plus, per key being uploaded, the uploads' bytes less
    what they may replace (at most the largest of them, for a key that exists): never less than
    what the run holds once they all end, stored or dropped, and no end raises it. So a check at
    each upload's start bounds the run, whatever deletes, overwrites and failures come after.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._open: list[Upload] = []

    def of_run(self, run_id: str) -> list[Upload]:
        return [u for u in self._open if u.run_id == run_id]

    def summary(self, run_id: str) -> dict[str, int]:
        mine = self.of_run(run_id)
        return {"in_flight_bytes": sum(u.nbytes for u in mine), "uploads_in_flight": len(mine)}

    def open(self, ctx: Any, key: str, arrival: Arrival) -> Upload:
        """Count a new PUT to ``key`` of run ``ctx``: 429 over the caps on PUTs at once."""
        lim = self.limits
        if len(self.of_run(ctx.run_id)) >= lim.max_uploads_per_run:
            raise HTTPRefusal(429, f"run {ctx.run_id!r} has {lim.max_uploads_per_run} values arriving, its limit "
                                   "(DISCOMFORT_REMOTE_MAX_UPLOADS_PER_RUN); send this one when one of them has "
                                   "been answered", errors.RemoteLimitError)
        if sum(u.client == ctx.client for u in self._open) >= lim.max_uploads_per_client:
            raise HTTPRefusal(429, f"the runs of {ctx.client} have {lim.max_uploads_per_client} values arriving, "
                                   "the limit per client (DISCOMFORT_REMOTE_MAX_UPLOADS_PER_CLIENT); send this "
                                   "one when one of them has been answered", errors.RemoteLimitError)
        up = Upload(ctx.run_id, ctx.client, key, arrival)
        self._open.append(up)
        return up

    def close(self, up: Upload) -> None:
        if up in self._open:
            self._open.remove(up)

    def stop_run(self, run_id: str, refusal: BaseException) -> None:
        """End the PUTs of a run that is ending: they answer ``refusal`` and give their bytes back."""
        for up in self.of_run(run_id):
            up.arrival.stop(refusal)

    def run_total(self, ctx: Any) -> tuple[int, int]:
        """(bytes the run's store holds, bytes its uploads may add): see the class."""
        stats = ctx.stats()
        held = stats["bytes_ram"] + stats["bytes_disk"]
        by_key: dict[str, list[int]] = {}
        for up in self.of_run(ctx.run_id):
            if up.nbytes:
                by_key.setdefault(up.key, []).append(up.nbytes)
        extra = 0
        for key, sizes in by_key.items():
            try:
                old = ctx.info(key)["size"]
            except errors.UnknownKeyError:
                old = 0
            extra += sum(sizes) - min(old, max(sizes))
        return held, extra

    def charge(self, up: Upload, ctx: Any, nbytes: int, client_runs: Iterable[Any]) -> None:
        """Charge ``nbytes`` to the upload, before a byte of it is reserved: 413 if its run or its
        client (``client_runs``: the client's live runs) would then hold more than its limit."""
        lim = self.limits
        up.nbytes = nbytes
        try:
            held, extra = self.run_total(ctx)
            if held + extra > lim.max_run_bytes:
                raise HTTPRefusal(413, f"the run would hold {held + extra} bytes ({held} stored, {extra} more "
                                       f"arriving with this value), over this server's limit of {lim.max_run_bytes} "
                                       "per run (DISCOMFORT_REMOTE_MAX_RUN_BYTES)", errors.RemoteLimitError)
            others = [c for c in client_runs if c is not ctx]
            if (len(others) + 1) * lim.max_run_bytes <= lim.max_client_bytes:
                return  # runs that each stay under their limit cannot pass the client's: no sum needed
            total = sum(sum(self.run_total(c)) for c in others) + held + extra
            if total > lim.max_client_bytes:
                raise HTTPRefusal(413, f"the runs of {ctx.client} would hold {total} bytes, over this server's "
                                       f"limit of {lim.max_client_bytes} per client "
                                       "(DISCOMFORT_REMOTE_MAX_CLIENT_BYTES)", errors.RemoteLimitError)
        except BaseException:
            up.nbytes = 0
            raise
