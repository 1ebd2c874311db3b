"""Pins keep RAM extents allocated while private views of them are alive in this process; the
twin of cpp/src/pins.cpp. One pin entry per distinct extent, counted in the handle. A view's
finalizer may run on any thread, maybe while that thread is inside an operation, so it never
waits for the lock: the entry is freed now if the lock is free, else by the next holder when it
lets go (Control.unlock drains)."""

from __future__ import annotations

import mmap
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from ..errors import StoreFullError
from .format import LOCK_BYTE, PIN_CAP, PIN_OFF, PIN_STRUCT
from .lock import lock_wait

Extent = tuple[int, int, int]  # (chunk, offset, length)


class Pins:
    """The pin half of control.Control (which provides the update protocol used here)."""

    fd: int
    path: str
    lock_fds: dict[int, int]
    mm: mmap.mmap
    slot: int
    mutex: threading.Lock
    released: bool
    pins: dict[Extent, list[int]]  # extent -> [count, pin index]
    pending: deque
    pin_states: memoryview

    if TYPE_CHECKING:  # provided by control.Control
        def begin(self) -> None: ...
        def end(self) -> None: ...
        def hget(self, name: str) -> int: ...
        def lock(self) -> None: ...
        def unlock(self) -> None: ...
        def set_pin_state(self, index: int, state: int) -> None: ...
        def abort_own(self, index: int, file_id: int, name: str | None) -> None: ...

    def release_pin(self, extent: Extent) -> None:
        """Finalizer of a view: never blocks, so it cannot deadlock with the thread it runs on."""
        self.defer(("unpin", extent))

    def abort_dropped(self, index: int, file_id: int, name: str | None) -> None:
        """Finalizer of a reservation collected without seal() or abort()."""
        self.defer(("abort", index, file_id, name))

    def pin_locked(self, extent: Extent, run_id: str, key: str) -> None:
        """One more reference on the extent's pin, under the lock; the pin entry is made on first use."""
        rec = self.pins.get(extent)
        if rec is None:
            p = _first_free(self.pin_states)
            if p is None:
                raise StoreFullError(
                    f"run {run_id!r}: pin table full ({PIN_CAP} live views of distinct objects); "
                    f"cannot load {key!r} zero-copy: drop views of other loads, or load a copy")
            self.begin()
            PIN_STRUCT.pack_into(self.mm, PIN_OFF + p * 32, 0, self.slot, *extent)
            self.set_pin_state(p, 1)
            self.end()
            rec = self.pins[extent] = [0, p]
        rec[0] += 1

    def defer(self, item: tuple) -> None:
        """Queue a release (a view's unpin, a dropped reservation's abort); run it now if the lock is
        free, else leave it to the holder."""
        self.pending.append(item)
        if self.released or not self.mutex.acquire(blocking=False):
            return  # the holder drains it when it unlocks
        try:
            lock_wait(self, LOCK_BYTE)
        except BaseException:
            self.mutex.release()
            raise
        self.unlock()

    def drain(self) -> None:
        """Run the queued releases (under the lock)."""
        if not self.pending or self.hget("dirty"):
            return  # an interrupted update is repaired by the next operation, which drains then
        began = False
        while self.pending:
            item = self.pending.popleft()
            if item[0] == "abort":
                if not began:
                    self.begin()
                    began = True
                self.abort_own(*item[1:])
                continue
            extent = item[1]
            rec = self.pins.get(extent)
            if rec is None:
                continue
            rec[0] -= 1
            if rec[0] > 0:
                continue
            del self.pins[extent]
            if not began:
                self.begin()
                began = True
            index = rec[1]
            state, slot, chunk, off, length = PIN_STRUCT.unpack_from(self.mm, PIN_OFF + index * 32)
            if state == 1 and slot == self.slot and (chunk, off, length) == extent:
                self.set_pin_state(index, 0)
        if began:
            self.end()

    def unpin_slot(self, slot: int) -> int:
        """Free every pin entry of `slot` (inside an update); returns how many."""
        count = 0
        for p in range(PIN_CAP):
            if self.pin_states[p] == 1 and PIN_STRUCT.unpack_from(self.mm, PIN_OFF + p * 32)[1] == slot:
                self.set_pin_state(p, 0)
                count += 1
        return count


def _first_free(states: Any) -> int | None:
    """The first free pin entry: a short walk when few views are live (the usual case), instead
    of reading all PIN_CAP states."""
    for p in range(len(states)):
        if states[p] == 0:
            return p
    return None
