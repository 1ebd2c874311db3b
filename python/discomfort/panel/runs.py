"""The panel's runs: who owns each (a token), where its progress goes, and how many may go at once.

A run belongs to whoever holds its token: 256 random bits returned by the start request and
compared in constant time. ComfyUI's ``client_id`` is no owner: ComfyUI publishes it in
``/history``, and anyone may open ``/ws?clientId=`` with it. So progress is not sent over
ComfyUI's websocket either: each run keeps its last events, read by long-polling
``GET /discomfort/panel/runs/{run_id}/events?after=N`` with the token.

Slots are counted per client address (not per client id, which anyone can make up) and for the
whole server. A cancelled run stops its slot counting after :attr:`RunBook.cancel_grace` seconds
even when its thread is still stuck in a node that ignores ComfyUI's interrupt.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import errors
from ..remote.web import HTTPRefusal

__all__ = ["PanelRun", "RunBook", "TOKEN_HEADER", "EVENTS_KEPT", "MAX_POLLS", "new_token"]

TOKEN_HEADER = "X-Discomfort-Panel-Token"
EVENTS_KEPT = 512  # progress events a run keeps for its readers
MAX_POLLS = 16  # long polls waiting at once on one run (each event answers them all)


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class PanelRun:
    """One run started from the panel, its owner's token and its progress events."""

    run_id: str
    token: str
    address: str
    workflows: list[str]
    iterations: int
    until: str | None
    state: str = "running"  # running, finished, cancelled, failed
    progress: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    history: list = field(default_factory=list)  # per iteration: {"iteration", "outputs", "files"}, bounded
    history_note: str | None = None  # why later iterations show nothing (the history cap)
    error: str | None = None
    error_type: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    cancel: Any = None
    cancel_asked: float | None = None  # time.monotonic() of the first cancel
    thread: Any = None
    loop: Any = None  # the server's event loop, woken when an event is published
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT))
    seq: int = 0
    done: bool = False  # its "finished" event is published
    polls: int = 0  # long polls waiting now
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: Any = None

    def summary(self) -> dict:
        return {"run_id": self.run_id, "state": self.state, "workflows": self.workflows,
                "iterations": self.iterations, "until": self.until, "progress": self.progress,
                "outputs": self.outputs, "history": self.history, "history_note": self.history_note,
                "error": self.error, "error_type": self.error_type,
                "started": self.started, "ended": self.ended}

    def owned_by(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.token.encode(), str(token).encode())

    def publish(self, data: dict) -> None:
        """Keep an event for the readers (from any thread) and wake those waiting."""
        with self._lock:
            self.seq += 1
            self.events.append((self.seq, data))
            self.done = self.done or data.get("kind") == "finished"
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: the server is going away
                pass

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def after(self, n: int) -> tuple[list[dict], int, int]:
        """Events after number ``n``: (events, the last number, how many were dropped unread)."""
        with self._lock:
            got = [dict(d, seq=s) for s, d in self.events if s > n]
            first = self.events[0][0] if self.events else self.seq + 1
            return got, self.seq, max(0, first - n - 1)

    async def wait_after(self, n: int, timeout: float) -> tuple[list[dict], int, int]:
        """:meth:`after`, waiting up to ``timeout`` seconds for one (on the server's loop); at once
        when the run's "finished" event is out."""
        got = self.after(n)
        if got[0] or self.done:
            return got
        if self.polls >= MAX_POLLS:
            raise HTTPRefusal(429, f"{self.polls} polls are waiting on run {self.run_id!r}, the most there may be: "
                                   "end one first", errors.RemoteLimitError)
        if self._changed is None:
            self._changed = asyncio.Event()
        self.polls += 1
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.polls -= 1
        return self.after(n)


class RunBook:
    """The runs of one server: slots by client address and in all, lookup by token."""

    def __init__(self, max_runs: int, per_address: int, kept: int, cancel_grace: float) -> None:
        self.max_runs, self.per_address, self.kept, self.cancel_grace = max_runs, per_address, kept, cancel_grace
        self.runs: dict[str, PanelRun] = {}
        self.starting: collections.Counter = collections.Counter()  # address -> runs being prepared

    def holds_slot(self, run: PanelRun, now: float | None = None) -> bool:
        """Whether ``run`` counts against the limits: running, and not cancelled more than
        ``cancel_grace`` seconds ago."""
        if run.state != "running":
            return False
        if run.cancel_asked is None:
            return True
        return (time.monotonic() if now is None else now) - run.cancel_asked < self.cancel_grace

    def check_room(self, address: str) -> None:
        """Refuse a run over the address's limit or the server's (429). Handlers run on the event
        loop's thread: no lock needed between this check and the registration."""
        going = [r for r in self.runs.values() if self.holds_slot(r)]
        mine = sum(r.address == address for r in going) + self.starting[address]
        if mine >= self.per_address:
            raise HTTPRefusal(429, f"{mine} panel run(s) from this address are going, its limit "
                                   "(DISCOMFORT_PANEL_MAX_RUNS_PER_ADDRESS): cancel one or wait",
                              errors.RemoteLimitError)
        if len(going) + sum(self.starting.values()) >= self.max_runs:
            raise HTTPRefusal(429, f"{len(going)} panel runs are going on this server, its limit "
                                   "(DISCOMFORT_PANEL_MAX_RUNS)", errors.RemoteLimitError)

    def add(self, run: PanelRun) -> None:
        self.runs[run.run_id] = run
        done = sorted((r for r in self.runs.values() if r.state != "running"), key=lambda r: r.ended or 0)
        for r in done[: max(0, len(done) - self.kept)]:
            self.runs.pop(r.run_id, None)
        stuck = [r for r in self.runs.values() if r.state == "running" and not self.holds_slot(r)]
        for r in stuck[: max(0, len(stuck) - self.kept)]:  # stuck threads are not remembered for ever
            self.runs.pop(r.run_id, None)

    def find(self, run_id: str, token: str | None) -> PanelRun:
        """The run ``run_id`` if ``token`` is its owner's; 404 (not 403: its existence is not told)."""
        run = self.runs.get(run_id)
        if run is None or not run.owned_by(token):
            raise errors.UnknownRunError(f"no panel run {run_id!r} for this token (header {TOKEN_HEADER})")
        return run

    def owned(self, tokens: Iterable[str]) -> list[PanelRun]:
        """The runs whose token is among ``tokens``, oldest first."""
        given = [t for t in tokens if t][:64]
        return sorted((r for r in self.runs.values() if any(r.owned_by(t) for t in given)), key=lambda r: r.started)
