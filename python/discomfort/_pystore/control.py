"""Typed access to the control segment and the validation of what is read from it; the twin of
cpp/src/control.cpp. Control is what outlives a closed handle while its views are alive (the
descriptor, its locks and pins); StoreBase is the part of Store the other modules build on."""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import deque

from .._names import chunk_name, object_file_name
from ..errors import CorruptedStoreError, RunFinishedError, StoreClosedError
from .format import (
    CHUNK_OFF, CHUNK_STRUCT, DISK, EMPTY, ENTRY, ENTRY_HEAD, ENTRY_STRUCT, FLAG_FINISHED, H, LOCK_BYTE,
    MAX_CHUNKS, NONZERO_TO_1, OBJ_OFF, PAGE, PIN_CAP, PIN_OFF, PIN_STRUCT, RAM, RESERVED, SEALED, SLOT_CAP,
    SLOT_LOCK_BASE, SLOT_OFF, TABLE_CAP, TOMBSTONE,
)
from .layout import fnv1a64
from .lock import Locked, lock_wait, unlock
from .pins import Extent, Pins
from .sys import current_pid

UsedExtents = dict[int, dict[tuple[int, int], int]]  # chunk -> {(offset, length): count}


#: Header fields with their compiled structs.
_HEADER = {name: (off, struct.Struct(fmt)) for name, (off, fmt) in H.items()}
# The fields every operation touches (lock, update, version), read without the name lookup.
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_DIRTY, _EPOCH, _NEXT_VERSION, _FLAGS = H["dirty"][0], H["epoch"][0], H["next_version"][0], H["flags"][0]
_STATE = struct.Struct("<I")  # an entry's state, its first field (and its tier, at offset 4)
_EXTENT = struct.Struct("<QQQ")  # an entry's chunk, offset and length, at its offset 40


class Control(Pins):
    """What outlives a closed handle while its views are alive: the fd, its locks and pins."""

    def __init__(self, fd: int, mm: mmap.mmap, run_id: str, path: str):
        self.fd = fd
        self.mm = mm
        self.run_id = run_id
        self.path = path  # of the control segment
        self.lock_fds: dict[int, int] = {}  # portable mode: lock byte -> its lock file
        self.mutex = threading.Lock()
        self.slot = -1
        self.pins: dict[Extent, list[int]] = {}  # extent -> [count, pin index]
        self.pending: deque = deque()
        self.closing = False
        self.released = False
        self.disk_dir: str | None = None
        self.disk_fd = -1  # the run's disk directory, O_DIRECTORY|O_NOFOLLOW, for *at() calls
        mv = memoryview(mm)
        self.states = mv[OBJ_OFF : OBJ_OFF + TABLE_CAP * ENTRY].cast("I")[0 :: ENTRY // 4]
        self.pin_states = mv[PIN_OFF : PIN_OFF + PIN_CAP * 32].cast("I")[0 :: 8]
        self.chunk_states = mv[CHUNK_OFF : CHUNK_OFF + MAX_CHUNKS * 32].cast("I")[0 :: 8]
        # What this handle knows of the tables (and of the chunk table), valid while the
        # header's epoch equals cache_epoch (None: rescan): every update, by any process, bumps
        # the epoch, and our own updates keep the cache in step (a chunk installed: a rescan).
        # Spares each reservation a scan of the tables.
        self.cache_epoch: int | None = None
        self.nonempty = 0  # object entries whose state is not EMPTY
        self.live = 0  # object entries RESERVED or SEALED
        self.used: UsedExtents = {}
        self.chunks: list[tuple[int, int]] = []  # (index, size) of the installed chunks
        # While this handle holds the lock no other process updates the tables, and our own
        # updates keep cache_epoch in step (end()): one epoch check per hold is enough.
        self.holding = False
        self.epoch_checked = False

    def cache_fresh(self) -> bool:
        if self.cache_epoch is not None and not self.epoch_checked:
            if self.cache_epoch != _U64.unpack_from(self.mm, _EPOCH)[0]:
                self.cache_epoch = None
            else:
                self.epoch_checked = self.holding
        return self.cache_epoch is not None

    def _note_extent(self, chunk: int, off: int, length: int, add: bool) -> None:
        extents = self.used.setdefault(chunk, {})
        n = extents.get((off, length), 0) + (1 if add else -1)
        if n > 0:
            extents[(off, length)] = n
        elif n == 0:
            del extents[(off, length)]
        else:
            self.cache_epoch = None  # cannot happen while the cache is right: rescan

    def set_entry_state(self, index: int, state: int) -> None:
        """Write an entry's state (its other fields first: "state last")."""
        off = OBJ_OFF + index * ENTRY
        if self.cache_epoch is not None and (self.epoch_checked or self.cache_fresh()):
            before = self.states[index]
            if (before == EMPTY) != (state == EMPTY):
                self.nonempty += 1 if before == EMPTY else -1
            live = state == RESERVED or state == SEALED
            if (before == RESERVED or before == SEALED) != live:
                self.live += 1 if live else -1
                if _STATE.unpack_from(self.mm, off + 4)[0] == RAM:  # its tier
                    chunk, eoff, length = _EXTENT.unpack_from(self.mm, off + 40)
                    self._note_extent(chunk, eoff, length, live)
        _STATE.pack_into(self.mm, off, state)

    def set_pin_state(self, index: int, state: int) -> None:
        off = PIN_OFF + index * 32
        if self.cache_fresh():
            before, _, chunk, poff, length = PIN_STRUCT.unpack_from(self.mm, off)
            if (before == 1) != (state == 1) and chunk < MAX_CHUNKS:
                self._note_extent(chunk, poff, length, state == 1)
        struct.pack_into("<I", self.mm, off, state)

    def slot_used(self, i: int) -> bool:
        return struct.unpack_from("<I", self.mm, SLOT_OFF + i * 32)[0] == 1

    def free_slot(self, i: int) -> None:
        struct.pack_into("<I", self.mm, SLOT_OFF + i * 32, 0)

    # header fields
    def hget(self, name: str) -> int:
        off, st = _HEADER[name]
        return st.unpack_from(self.mm, off)[0]

    def hset(self, name: str, value: int) -> None:
        off, st = _HEADER[name]
        st.pack_into(self.mm, off, value)

    # locking and the update protocol (dirty flag, epoch)
    def lock(self) -> None:
        self.mutex.acquire()
        try:
            lock_wait(self, LOCK_BYTE)
        except BaseException:
            self.mutex.release()
            raise
        self.holding, self.epoch_checked = True, False

    def unlock(self) -> None:
        try:
            if self.pending:
                self.drain()
        finally:
            self.holding = self.epoch_checked = False
            try:
                unlock(self, LOCK_BYTE)
            finally:
                self.mutex.release()
        if self.closing and not self.pins and not self.released:
            self.release()

    def dirty(self) -> bool:
        return _U32.unpack_from(self.mm, _DIRTY)[0] != 0

    def finished(self) -> bool:
        return _U32.unpack_from(self.mm, _FLAGS)[0] & FLAG_FINISHED != 0

    def begin(self) -> None:
        _U32.pack_into(self.mm, _DIRTY, 1)

    def end(self) -> None:
        mm = self.mm
        epoch = _U64.unpack_from(mm, _EPOCH)[0]
        # A cache that followed this update stays valid for the epoch it ends with.
        self.cache_epoch = epoch + 1 if self.cache_epoch == epoch else None
        _U64.pack_into(mm, _EPOCH, epoch + 1)
        _U32.pack_into(mm, _DIRTY, 0)

    def take_version(self) -> int:
        """The next version (object versions and disk file ids share the counter); inside an update."""
        version = _U64.unpack_from(self.mm, _NEXT_VERSION)[0]
        _U64.pack_into(self.mm, _NEXT_VERSION, version + 1)
        return version

    def abort_own(self, index: int, file_id: int, name: str | None) -> None:
        """Retire one of this handle's reservations (inside an update); `name`: its disk file."""
        off = OBJ_OFF + index * ENTRY
        state, _, owner, _, _, _, fid = ENTRY_HEAD.unpack_from(self.mm, off)[:7]
        if state == RESERVED and owner == self.slot and fid == file_id:
            self.set_entry_state(index, TOMBSTONE)
            if name and self.disk_fd >= 0:
                try:
                    os.unlink(name, dir_fd=self.disk_fd)
                except OSError:
                    pass  # the entry goes regardless; the file goes with the disk directory

    def release(self) -> None:
        """Give back the slot and every lock; after this the handle is gone for good."""
        if self.released:
            return
        self.released = True
        try:
            self.mutex.acquire()
            try:
                lock_wait(self, LOCK_BYTE)
                try:
                    if self.slot >= 0 and not self.hget("dirty"):
                        self.hset("dirty", 1)
                        for index in range(TABLE_CAP):
                            if self.states[index] == RESERVED:
                                e = ENTRY_HEAD.unpack_from(self.mm, OBJ_OFF + index * ENTRY)
                                self.abort_own(index, e[6], object_file_name(e[6]) if e[1] == DISK else None)
                        self.unpin_slot(self.slot)
                        self.free_slot(self.slot)
                        self.end()
                    if self.slot >= 0:
                        unlock(self, SLOT_LOCK_BASE + self.slot)
                finally:
                    unlock(self, LOCK_BYTE)
            finally:
                self.mutex.release()
        finally:
            self.teardown()

    def teardown(self) -> None:
        """Drop the control mapping and close every descriptor (which drops this handle's locks;
        in a forked child, only our copies: the parent's locks stay)."""
        self.states.release()
        self.pin_states.release()
        self.chunk_states.release()
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        if self.disk_fd >= 0:
            os.close(self.disk_fd)
            self.disk_fd = -1
        for fd in self.lock_fds.values():
            os.close(fd)
        self.lock_fds.clear()


class StoreBase:
    """The state of a handle and typed reads of its control segment; Store is built on it
    (table.py, alloc.py, objects.py, store.py add the rest, like the C++ Store's files)."""

    _run_id: str
    _shm_dir: str
    _owner: bool
    _pool: bool
    _pid: int
    _probe: str
    _c: Control
    _closed: bool
    _chunk_fds: dict[int, int]
    _chunk_maps: dict[int, mmap.mmap]
    _disk_dir: str | None

    def _repair(self) -> None:  # table.py
        raise NotImplementedError

    def chunk_path(self, index: int) -> str:
        return os.path.join(self._shm_dir, chunk_name(self._run_id, index))

    def _disk_path(self, file_id: int) -> str:
        if self._disk_dir is None:
            raise CorruptedStoreError(f"run {self._run_id!r}: a disk object in a run without a disk tier")
        return os.path.join(self._disk_dir, object_file_name(file_id))

    def _locked(self, running: bool = True) -> Locked:
        """The metadata lock for an operation; `running`: RunFinishedError once the run has ended."""
        if self._closed:
            raise StoreClosedError(f"store of run {self._run_id!r} is closed")
        if current_pid() != self._pid:
            raise StoreClosedError(
                f"store handle of run {self._run_id!r} belongs to process {self._pid}; attach again in this process"
            )
        return Locked(self, running)

    def _repair_if_dirty(self) -> None:
        if self._c.dirty():
            self._repair()

    def _raise_if_finished(self) -> None:
        """RunFinishedError when the owner has ended the run (its files go right after the flag)."""
        if not self._c.released and self._c.finished():
            raise RunFinishedError(f"run {self._run_id!r} has finished: its owner ended it")

    # ---- table access -------------------------------------------------------------------------
    def _entry(self, index: int) -> tuple:
        return ENTRY_STRUCT.unpack_from(self._c.mm, OBJ_OFF + index * ENTRY)

    def _set_state(self, index: int, state: int) -> None:
        self._c.set_entry_state(index, state)

    def _chunk_size(self, k: int) -> int:
        state, _, size = CHUNK_STRUCT.unpack_from(self._c.mm, CHUNK_OFF + k * 32)
        return size if state == 1 else 0

    def _entry_problem(self, e: tuple) -> str | None:
        state, tier, owner, key_len, h, _v, file_id, chunk, off, length, key = e
        if not 1 <= key_len <= 255:
            return f"key length {key_len}"
        if fnv1a64(bytes(key[:key_len])) != h:
            return "key hash mismatch"
        if owner >= SLOT_CAP:
            return f"owner slot {owner}"
        if length == 0:
            return "zero length"
        if tier == RAM:
            if chunk >= MAX_CHUNKS:
                return f"chunk {chunk}"
            size = self._chunk_size(chunk)
            if size == 0 or off % PAGE or length % PAGE or off + length > size:
                return f"extent {off}+{length} outside chunk {chunk}"
        elif tier == DISK:
            if file_id == 0 or self._disk_dir is None:
                return "disk object without a disk tier"
        else:
            return f"tier {tier}"
        return None

    def _valid(self, index: int) -> tuple:
        e = self._entry(index)
        problem = self._entry_problem(e)
        if problem:
            self._c.cache_epoch = None  # written behind the protocol's back: rescan from now on
            raise CorruptedStoreError(f"run {self._run_id!r}: object table entry {index} is corrupted ({problem})")
        return e

    def _nonempty(self, offset: int, count: int, stride: int) -> list[int]:
        """Indices of table entries whose state is not 0, at C speed (most entries are empty).

        States are small little-endian u32s, so their first byte alone tells empty from used.
        """
        firsts = self._c.mm[offset : offset + count * stride : stride].translate(NONZERO_TO_1)
        used = []
        i = firsts.find(1)
        while i >= 0:  # memchr from one used entry to the next (a regex took ~3 ns per entry)
            used.append(i)
            i = firsts.find(1, i + 1)
        return used

    def _tables(self) -> UsedExtents:
        """The used RAM extents per chunk (entries and pins), from the cache or a rescan."""
        c = self._c
        if c.cache_epoch is not None and (c.epoch_checked or c.cache_fresh()):
            return c.used
        c.cache_epoch = None
        used: UsedExtents = {}
        states = c.states
        nonempty = self._nonempty(OBJ_OFF, TABLE_CAP, ENTRY)
        live = 0
        for i in nonempty:
            if states[i] in (RESERVED, SEALED):
                live += 1
                e = self._valid(i)  # an extent we cannot trust could overlap a new one
                if e[1] == RAM:
                    extents = used.setdefault(e[7], {})
                    extents[(e[8], e[9])] = extents.get((e[8], e[9]), 0) + 1
        for p in self._nonempty(PIN_OFF, PIN_CAP, 32):
            state, _, chunk, off, length = PIN_STRUCT.unpack_from(c.mm, PIN_OFF + p * 32)
            if state == 1 and chunk < MAX_CHUNKS:
                extents = used.setdefault(chunk, {})
                extents[(off, length)] = extents.get((off, length), 0) + 1
        c.chunks = [(k, self._chunk_size(k)) for k in self._nonempty(CHUNK_OFF, MAX_CHUNKS, 32)
                    if c.chunk_states[k] == 1]
        c.used, c.nonempty, c.live, c.cache_epoch = used, len(nonempty), live, c.hget("epoch")
        return used
