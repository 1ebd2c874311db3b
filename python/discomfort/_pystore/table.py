"""The object table (open addressing, linear probing), slot liveness, reclaim and repair; the
twin of cpp/src/table.cpp."""

from __future__ import annotations

import os
import struct
from typing import Iterator

from .._names import object_file_name
from ..errors import StoreFullError
from .control import StoreBase
from .format import (
    DISK, DISK_PIN_CHUNK, EMPTY, ENTRY, ENTRY_HEAD, ENTRY_STRUCT, MAX_CHUNKS, OBJ_OFF, PIN_CAP, PIN_OFF, PIN_STRUCT,
    RESERVED, RETIRED_OFF, RETIRED_SLOTS, RETIRED_STRUCT, SEALED, SLOT_CAP, SLOT_LOCK_BASE, SLOT_OFF, SMALL_OBJECT_BYTES,
    TABLE_CAP, TOMBSTONE,
)
from .layout import fnv1a64
from .lock import lock_held

_KEY_LEN_HASH = struct.Struct("<IQ")  # an entry's key_len and hash, from its offset 12


class TableStore(StoreBase):
    def _probe_path(self, raw: bytes, h: int) -> Iterator[int]:
        """Indices of live entries on the key's probe path with this key."""
        states = self._c.states
        start = h % TABLE_CAP
        for step in range(TABLE_CAP):
            i = (start + step) % TABLE_CAP
            s = states[i]
            if s == EMPTY:
                return
            if s in (RESERVED, SEALED):
                _, _, _, key_len, eh = ENTRY_HEAD.unpack_from(self._c.mm, OBJ_OFF + i * ENTRY)[:5]
                if eh == h and key_len == len(raw):
                    koff = OBJ_OFF + i * ENTRY + 64
                    if self._c.mm[koff : koff + key_len] == raw:
                        yield i

    def _probe_put(self, raw: bytes, h: int) -> tuple[list[int], int]:
        """One walk of the key's probe path for a put: its SEALED entries with this key, and the
        first EMPTY or TOMBSTONE entry (where _insert puts it; -1 when none). What _probe_path,
        _find_sealed and _first_free find, in one pass: nothing of the key lies past an EMPTY."""
        c = self._c
        states, mm, n = c.states, c.mm, len(raw)
        sealed: list[int] = []
        free = -1
        i = start = h % TABLE_CAP
        while True:
            s = states[i]
            if s == EMPTY:
                return sealed, i if free < 0 else free
            if s == TOMBSTONE:
                if free < 0:
                    free = i
            elif s == SEALED:
                off = OBJ_OFF + i * ENTRY
                key_len, eh = _KEY_LEN_HASH.unpack_from(mm, off + 12)
                if eh == h and key_len == n and mm[off + 64 : off + 64 + n] == raw:
                    sealed.append(i)
            i = (i + 1) % TABLE_CAP
            if i == start:
                return sealed, free

    def _find_sealed(self, raw: bytes) -> int:
        for i in self._probe_path(raw, fnv1a64(raw)):
            if self._c.states[i] == SEALED:
                return i
        return -1

    def _first_free(self, h: int) -> int:
        """The first EMPTY or TOMBSTONE entry on a probe path from h's home; -1 when none."""
        states = self._c.states
        start = h % TABLE_CAP
        for step in range(TABLE_CAP):
            i = (start + step) % TABLE_CAP
            if states[i] in (EMPTY, TOMBSTONE):
                return i
        return -1

    def _insert(self, raw: bytes, fields: tuple, key: str, replacing: bool, free: int | None = None) -> int:
        """Take the first EMPTY or TOMBSTONE entry on the key's probe path (state written last;
        `free`: that entry when the caller's _probe_put found it, -1 for none).

        New keys: at most 3/4 of the table live. An overwrite (`replacing`: the key has a SEALED
        entry, which its seal retires) may go past that. Any insertion leaves one EMPTY entry,
        which ends every probe; tombstones that no probe needs are made EMPTY first when it comes
        to that."""
        c = self._c
        states = c.states
        h = fnv1a64(raw)
        self._tables()
        if not replacing and c.live + 1 > TABLE_CAP * 3 // 4:
            raise StoreFullError(f"run {self._run_id!r}: object table full ({TABLE_CAP * 3 // 4} keys at most); "
                                 f"cannot add key {key!r}")

        # The entry must leave one EMPTY entry in the table (reusing a TOMBSTONE leaves the count
        # of non-EMPTY entries as it is).
        i = self._first_free(h) if free is None else free
        if (i < 0 or c.nonempty + (states[i] == EMPTY) > TABLE_CAP - 1) and self._purge_tombstones():
            self._tables()
            i = self._first_free(h)
        if i < 0 or c.nonempty + (states[i] == EMPTY) > TABLE_CAP - 1:
            raise StoreFullError(
                f"run {self._run_id!r}: object table full ({c.nonempty} of {TABLE_CAP} entries in use); "
                f"cannot add key {key!r}")
        tier, owner, file_id, chunk, off, length = fields
        ENTRY_STRUCT.pack_into(c.mm, OBJ_OFF + i * ENTRY, states[i], tier, owner, len(raw), h,
                               0, file_id, chunk, off, length, raw)
        c.set_entry_state(i, RESERVED)
        return i

    def _purge_tombstones(self) -> int:
        """TOMBSTONEs that no live entry's probe path crosses become EMPTY, without moving any
        entry (writers name theirs by index). A tombstone at position p of a cluster (a run of
        non-EMPTY entries) is crossed when a live entry after it has its home at or before p.
        Same rule as the core's Store::purge_tombstones; returns how many became EMPTY."""
        c = self._c
        states = c.states.tolist()
        try:
            start = states.index(EMPTY)
        except ValueError:
            return 0  # no EMPTY entry: no cluster boundary to start from
        c.begin()
        freed = 0
        cluster: list[int] = []

        def flush() -> None:
            nonlocal freed
            min_home = 1 << 62
            for p in range(len(cluster) - 1, -1, -1):
                j = cluster[p]
                s = states[j]
                if s == TOMBSTONE and min_home > p:
                    self._set_state(j, EMPTY)
                    states[j] = EMPTY
                    freed += 1
                elif s in (RESERVED, SEALED):
                    home = struct.unpack_from("<Q", c.mm, OBJ_OFF + j * ENTRY + 16)[0] % TABLE_CAP
                    dist = (j - home) % TABLE_CAP
                    min_home = min(min_home, -1 if dist > p else p - dist)
                elif s != TOMBSTONE:
                    min_home = -1  # an unknown state: keep everything before it as it is
            cluster.clear()

        try:
            for n in range(1, TABLE_CAP + 1):
                i = (start + n) % TABLE_CAP
                if n < TABLE_CAP and states[i] != EMPTY:
                    cluster.append(i)
                else:
                    flush()
        finally:
            c.end()
        return freed

    def _tombstone(self, index: int) -> None:
        """Retire an entry; unlink its disk file, or keep a sealed object's mapped-size file for the
        next disk save (small ones are read with pread outside the lock: never rewritten). Keeps
        every probe path intact."""
        e = ENTRY_HEAD.unpack_from(self._c.mm, OBJ_OFF + index * ENTRY)
        if e[1] == DISK and self._c.disk_fd >= 0 and e[6]:
            if e[0] == SEALED and e[9] >= SMALL_OBJECT_BYTES:
                self._retire_disk_file(e[6], e[9])
            else:
                self._unlink_disk_file(e[6])
        c = self._c
        c.set_entry_state(index, TOMBSTONE)
        states = c.states
        if states[(index + 1) % TABLE_CAP] == EMPTY:
            i = index
            while states[i] == TOMBSTONE:
                c.set_entry_state(i, EMPTY)
                i = (i - 1) % TABLE_CAP

    def _unlink_disk_file(self, file_id: int) -> None:
        try:
            os.unlink(object_file_name(file_id), dir_fd=self._c.disk_fd)
        except OSError:
            pass  # the entry goes regardless; the file goes with the disk directory

    # ---- retired disk files (under the lock, inside an update) ----------------------------------
    def _retired(self) -> list[tuple[int, int]]:
        return [RETIRED_STRUCT.unpack_from(self._c.mm, RETIRED_OFF + 16 * k) for k in range(RETIRED_SLOTS)]

    def _set_retired(self, slots: list[tuple[int, int]]) -> None:
        slots = (slots + [(0, 0)] * RETIRED_SLOTS)[:RETIRED_SLOTS]
        for k, (file_id, length) in enumerate(slots):
            RETIRED_STRUCT.pack_into(self._c.mm, RETIRED_OFF + 16 * k, file_id, length)

    def _retire_disk_file(self, file_id: int, length: int) -> None:
        """Keep a file for the next disk save; the oldest retired one goes when the slots are full."""
        slots = [r for r in self._retired() if r[0]]
        if len(slots) == RETIRED_SLOTS:
            self._unlink_disk_file(slots.pop(0)[0])
        self._set_retired(slots + [(file_id, length)])

    def _forget_retired(self) -> None:
        for file_id, _ in self._retired():
            if file_id and self._c.disk_fd >= 0:
                self._unlink_disk_file(file_id)
        self._set_retired([])

    def _pinned_disk_files(self) -> set[int]:
        """The file ids of the disk objects some view maps (one pass over the pin table)."""
        c = self._c
        pinned = set()
        for p in self._nonempty(PIN_OFF, PIN_CAP, 32):
            state, _, chunk, off, _ = PIN_STRUCT.unpack_from(c.mm, PIN_OFF + p * 32)
            if state == 1 and chunk == DISK_PIN_CHUNK:
                pinned.add(off)
        return pinned

    # ---- liveness -------------------------------------------------------------------------------
    def _slot_alive(self, i: int) -> bool:
        if i == self._c.slot:
            return True
        return lock_held(self._c, SLOT_LOCK_BASE + i)

    def _reclaim_slot(self, slot: int) -> int:
        """Free what a dead handle held: its reservations and its pins (inside an update)."""
        count = 0
        states = self._c.states
        for i in range(TABLE_CAP):
            if states[i] == RESERVED and self._entry(i)[2] == slot:
                self._tombstone(i)
                count += 1
        count += self._c.unpin_slot(slot)
        self._c.free_slot(slot)
        return count

    def _reclaim_dead(self) -> int:
        c = self._c  # the slot table read in C: most of its entries are unused
        dead = [i for i in self._nonempty(SLOT_OFF, SLOT_CAP, 32) if c.slot_used(i) and not self._slot_alive(i)]
        if not dead:
            return 0
        c.begin()
        count = sum(self._reclaim_slot(i) for i in dead)
        c.end()
        return count

    def _repair(self) -> None:
        """A handle died inside an update: rebuild a consistent table from what is valid."""
        c = self._c
        c.hset("dirty", 1)
        c.cache_epoch = None  # rescanned after the repair
        sealed: dict[bytes, list[tuple[int, int]]] = {}
        for i in range(TABLE_CAP):
            s = c.states[i]
            if s in (EMPTY, TOMBSTONE):
                continue
            if s not in (RESERVED, SEALED):
                self._set_state(i, TOMBSTONE)
                continue
            e = self._entry(i)
            if self._entry_problem(e) is not None:
                self._set_state(i, TOMBSTONE)
            elif s == RESERVED and not self._slot_alive(e[2]):
                self._tombstone(i)
            elif s == SEALED:
                sealed.setdefault(bytes(e[10][: e[3]]), []).append((e[5], i))
        for versions in sealed.values():
            for _, i in sorted(versions)[:-1]:
                self._tombstone(i)
        for p in range(PIN_CAP):
            if c.pin_states[p] == 0:
                continue
            state, slot, chunk, off, length = PIN_STRUCT.unpack_from(c.mm, PIN_OFF + p * 32)
            if chunk == DISK_PIN_CHUNK:  # a disk object's file: off is its file_id
                if state != 1 or slot >= SLOT_CAP:
                    c.set_pin_state(p, 0)
                continue
            size = self._chunk_size(chunk) if chunk < MAX_CHUNKS else 0
            if state != 1 or slot >= SLOT_CAP or off + length > size:
                c.set_pin_state(p, 0)
        self._forget_retired()  # their slots may be half-written: their files go
        c.end()
