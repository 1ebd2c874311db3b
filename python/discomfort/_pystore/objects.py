"""The operations on objects: reserve/seal/abort, put, get and the read-only queries; the twin of
cpp/src/objects.cpp."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import weakref
from typing import Any, NamedTuple, Sequence

from .._names import check_key, object_file_name
from .._types import LoadInfo, ObjectInfo, StoreStats
from ..errors import (
    CorruptedStoreError, StoreClosedError, StoreFullError, TruncatedStoreError, UnknownKeyError,
)
from .alloc import AllocStore
from .format import (
    COPY_LOAD_BYTES, DISK, DISK_PIN_CHUNK, ENTRY, EXT_HEAD, FLAG_FINISHED, MAX_CHUNKS,
    OBJ_OFF, PAGE, PIN_OFF, PIN_STRUCT, RAM, RESERVED, SEALED, SLOT_CAP, SMALL_OBJECT_BYTES, TIER_NAMES, TOTAL,
)
from .layout import byte_views, fnv1a64, layout, parse_directory, parse_extent, write_directory
from .sys import killpoint, killpoints_armed, map_private, pwrite_all

#: RAM puts up to this size reserve, copy and seal under one hold of the lock (_put_small).
FUSED_PUT_BYTES = 1 << 20
_VERSION = struct.Struct("<Q")  # an entry's version, at its offset 24
_HUGE_PAGE = 2 << 20


class _DiskWrite(NamedTuple):
    """A disk-tier object that put writes with pwrite (the twin of Store::DiskWrite)."""

    fd: int
    reused: bool  # a retired file: it may hold old bytes, its padding is zeroed
    head_end: int  # where the header and meta (already written) end
    offsets: list[int]
    length: int
    base: int = 0  # a guarded put's RAM object: its offset in the chunk
    owned: bool = True  # False: the chunk's descriptor, which the store keeps


def _aligned_copy(src: Any) -> memoryview:
    """A private copy of a small extent whose start is page-aligned, like the store's."""
    n = len(src)
    raw = bytearray(n + PAGE)
    pad = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % PAGE
    view = memoryview(raw)[pad : pad + n]
    view[:] = src
    return view


def _fresh_buffer(n: int) -> memoryview:
    """Page-aligned private memory for a guarded load: anonymous pages (no memset) when large,
    in huge pages from 2 MiB (a pread into fresh 4 KiB pages takes a fault per page; the twin
    of fresh_region in objects.cpp)."""
    if n < SMALL_OBJECT_BYTES:
        raw = bytearray(n + PAGE)
        pad = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % PAGE
        return memoryview(raw)[pad : pad + n]
    mm = mmap.mmap(-1, n, mmap.MAP_PRIVATE)
    if n >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)  # a hint: ignored where THP is off
    return memoryview(mm)


class Reservation:
    """A reserved object that readers cannot see until `seal()`."""

    def __init__(self, store: ObjectStore, key: str, index: int, file_id: int, tier: int,
                 buffers: list[memoryview], mapping: Any):
        self._store = store
        self._key = key
        self._index = index
        self._file_id = file_id
        self._tier = tier
        self._buffers = buffers
        self._mapping = mapping
        self._done = False
        name = object_file_name(file_id) if tier == DISK else None
        self._dropped = weakref.finalize(self, store._c.abort_dropped, index, file_id, name)

    @property
    def key(self) -> str:
        return self._key

    @property
    def buffers(self) -> list[memoryview]:
        return self._buffers

    @property
    def tier(self) -> str:
        return TIER_NAMES[self._tier]

    def _finish(self) -> None:
        self._done = True
        self._dropped.detach()
        self._buffers = []
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # a caller still holds a buffer; the mapping goes with it
            self._mapping = None

    def seal(self) -> int:
        if self._done:
            raise StoreClosedError(f"reservation of {self._key!r} was already sealed or aborted")
        try:
            return self._store._seal(self._index, self._file_id, self._key)
        finally:
            self._finish()

    def abort(self) -> None:
        if self._done:
            return
        if self._store.closed:  # closing the store retired the reservation already
            self._finish()
            return
        try:
            self._store._abort(self._index, self._file_id)
        finally:
            self._finish()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.seal()


class ObjectStore(AllocStore):
    @property
    def closed(self) -> bool:
        return self._closed

    # ---- writes --------------------------------------------------------------------------------------
    def reserve(self, key: str, meta: bytes, sizes: Sequence[int]) -> Reservation:
        return self._reserve(key, meta, sizes, False)[0]

    def _reserve(self, key: str, meta: bytes, sizes: Sequence[int],
                 disk_file: bool, guarded: bool = False) -> tuple[Reservation, _DiskWrite | None]:
        """reserve(); with ``disk_file``, an object that goes to the disk tier gets no buffers and
        its file's descriptor instead of a mapping (put writes it with pwrite), in a retired file
        when one is free; ``guarded``: a RAM object too, its chunk's descriptor."""
        raw = check_key(key)
        meta = bytes(meta)
        sizes = [int(n) for n in sizes]
        if any(n < 0 for n in sizes) or len(sizes) > 65536:
            raise ValueError("buffer sizes must be non-negative and at most 65536 buffers")
        meta_off, offsets, length = layout(len(meta), sizes)
        c = self._c
        with self._locked():
            place = self._first_fit(length)
            if place is None and self._reclaim_dead():
                place = self._first_fit(length)
            replacing = self._find_sealed(raw) >= 0
            c.begin()
            killpoint("after_lock")
            try:
                if place is None:
                    k = self._grow(length)
                    if k is not None:
                        place = (k, 0)
                if place is None and self._disk_dir is None:
                    raise StoreFullError(
                        f"run {self._run_id!r}: object {key!r} of {length} bytes does not fit the RAM budget "
                        f"and the run has no disk tier"
                    )
                file_id = c.take_version()
                tier = RAM if place is not None else DISK
                chunk, off = place if place is not None else (0, 0)
                index = self._insert(raw, (tier, c.slot, file_id, chunk, off, length), key, replacing)
                reused = tier == DISK and disk_file and self._take_retired(length, file_id)
            finally:
                c.end()
        fd, owned = -1, True
        try:
            mapping = None
            if tier == RAM and guarded:
                fd, owned = self._chunk_fd(chunk), False
                if os.fstat(fd).st_size < off + length:
                    raise TruncatedStoreError(f"run {self._run_id!r}: chunk {chunk} truncated (another process cut it)")
                region = memoryview(bytearray(meta_off + len(meta)))
            elif tier == RAM:
                region = memoryview(self._chunk_map(chunk))[off : off + length]
            elif disk_file:
                fd = self._open_disk_file(file_id, length, reused)
                region = memoryview(bytearray(meta_off + len(meta)))
            else:
                mapping = self._create_disk_object(file_id, length)
                region = memoryview(mapping)
            write_directory(region, meta_off, meta, offsets, sizes)
            if fd >= 0:
                if tier == RAM:
                    pwrite_all(fd, region, off, f"run {self._run_id!r}, object {key!r}")
                else:
                    pwrite_all(fd, region, 0, self._disk_path(file_id))
                buffers = []
            else:
                buffers = [region[o : o + n] for o, n in zip(offsets, sizes)]
        except BaseException:
            if fd >= 0 and owned:
                os.close(fd)
            try:
                with self._locked(running=False):
                    c.begin()
                    self._tombstone(index)
                    c.end()
            except StoreClosedError:
                pass  # closed meanwhile: its release tombstoned the entry
            raise
        killpoint("after_reserve")
        disk = _DiskWrite(fd, bool(reused), meta_off + len(meta), offsets, length, off if tier == RAM else 0,
                          owned) if fd >= 0 else None
        return Reservation(self, key, index, file_id, tier, buffers, mapping), disk

    def _own_reserved(self, index: int, file_id: int) -> tuple:
        e = self._valid(index)
        if e[0] != RESERVED or e[2] != self._c.slot or e[6] != file_id:
            raise CorruptedStoreError(f"run {self._run_id!r}: reservation entry {index} changed under its writer")
        return e

    def _seal(self, index: int, file_id: int, key: str) -> int:
        with self._locked():
            e = self._own_reserved(index, file_id)
            return self._seal_locked(index, bytes(e[10][: e[3]]))

    def _seal_locked(self, index: int, raw: bytes, sealed: list[int] | None = None) -> int:
        """Under the lock: the reserved entry becomes the key's visible version (`sealed`: the
        key's SEALED entries when the caller's _probe_put found them)."""
        c = self._c
        if sealed is None:
            sealed = [i for i in self._probe_path(raw, fnv1a64(raw)) if c.states[i] == SEALED]
        c.begin()
        try:
            for i in sealed:
                if i != index:
                    self._tombstone(i)
            version = c.take_version()
            _VERSION.pack_into(c.mm, OBJ_OFF + index * ENTRY + 24, version)
            c.set_entry_state(index, SEALED)
        finally:
            c.end()
        return version

    def _abort(self, index: int, file_id: int) -> None:
        c = self._c
        with self._locked(running=False):
            self._own_reserved(index, file_id)
            c.begin()
            self._tombstone(index)
            c.end()

    def _put_small(self, key: str, raw: bytes, meta: bytes, views: list[memoryview], sizes: list[int],
                   plan: tuple[int, list[int], int]) -> int | None:
        """Reserve, copy and seal under one hold of the lock, for RAM objects up to
        FUSED_PUT_BYTES (the twin of Store::put_small). None: no room in the chunks as they are."""
        meta_off, offsets, length = plan
        c = self._c
        with self._locked():
            place = self._first_fit(length)
            if place is None and self._reclaim_dead():
                place = self._first_fit(length)
            if place is None:
                return None
            sealed, free = self._probe_put(raw, fnv1a64(raw))  # one walk: what _insert and the seal need
            chunk, off = place
            region = memoryview(self._chunk_map(chunk))[off : off + length]
            c.begin()
            try:
                file_id = c.take_version()
                index = self._insert(raw, (RAM, c.slot, file_id, chunk, off, length), key, bool(sealed), free)
            finally:
                c.end()
            write_directory(region, meta_off, meta, offsets, sizes)
            for o, n, src in zip(offsets, sizes, views):
                region[o : o + n] = src
            return self._seal_locked(index, raw, sealed)

    def put(self, key: str, meta: bytes, buffers: Sequence[Any]) -> int:
        return self._put(key, meta, buffers, False)

    def put_guarded(self, key: str, meta: bytes, buffers: Sequence[Any]) -> int:
        """put() written with pwrite, never through a mapping of a chunk, after an fstat check: a
        chunk another process truncated is TruncatedStoreError, never a SIGBUS."""
        self._locked()  # only its checks: StoreClosedError before the descriptor is used
        self._check_control_size()
        return self._put(key, meta, buffers, True)

    def _put(self, key: str, meta: bytes, buffers: Sequence[Any], guarded: bool) -> int:
        views = byte_views(buffers)
        sizes = [v.nbytes for v in views]
        if not guarded and not killpoints_armed() and len(sizes) <= 65536:
            raw = check_key(key)
            meta = bytes(meta)
            plan = layout(len(meta), sizes)
            if plan[2] <= FUSED_PUT_BYTES:
                version = self._put_small(key, raw, meta, views, sizes, plan)
                if version is not None:
                    return version
        res, disk = self._reserve(key, meta, sizes, True, guarded)
        try:
            if disk is not None:  # the disk tier or a guarded put: pwrite, no mapping (an abort unlinks the file)
                where = f"run {self._run_id!r}, object {key!r}"
                end = disk.head_end
                for o, src in zip(disk.offsets, views):
                    if disk.reused and o > end:  # a reused file holds old bytes: zero the padding
                        pwrite_all(disk.fd, bytes(o - end), end, where)
                    pwrite_all(disk.fd, src, disk.base + o, where)
                    end = o + src.nbytes
                if disk.reused and disk.length > end:
                    pwrite_all(disk.fd, bytes(disk.length - end), end, where)
            else:
                for dst, src in zip(res.buffers, views):
                    dst[:] = src
        except BaseException:
            res.abort()
            raise
        finally:
            if disk is not None and disk.owned:
                os.close(disk.fd)
        return res.seal()

    # ---- reads -------------------------------------------------------------------------------------
    def _sealed_entry(self, raw: bytes, key: str) -> tuple[tuple, str]:
        """The key's valid SEALED entry (UnknownKeyError when there is none) and the object's name
        for messages; under the lock."""
        index = self._find_sealed(raw)
        if index < 0:
            raise UnknownKeyError(f"no object {key!r} in run {self._run_id!r}")
        return self._valid(index), f"run {self._run_id!r}, object {key!r}"

    def get(self, key: str) -> tuple[bytes, list[memoryview], LoadInfo]:
        raw = check_key(key)
        c = self._c
        with self._locked():
            e, where = self._sealed_entry(raw, key)
            tier, version, file_id, chunk, off, length = e[1], e[5], e[6], e[7], e[8], e[9]
            if tier == RAM and length < COPY_LOAD_BYTES:
                data = _aligned_copy(memoryview(self._chunk_map(chunk))[off : off + length])
                return self._views(data, length, where, version, tier, False)
            if tier == RAM:
                extent = (chunk, off, length)
                c.pin_locked(extent, self._run_id, key)
                fd = self._chunk_fd(chunk)
            else:
                fd = self._open_disk_object(file_id, key)
                if length >= SMALL_OBJECT_BYTES:  # mapped: pinned, its file may be reused once unmapped
                    extent = (DISK_PIN_CHUNK, file_id, length)
                    try:
                        c.pin_locked(extent, self._run_id, key)
                    except BaseException:
                        os.close(fd)
                        raise
        if tier == DISK:
            try:
                if os.fstat(fd).st_size < length:
                    raise CorruptedStoreError(f"{where}: disk file truncated")
                if length < SMALL_OBJECT_BYTES:
                    data = _aligned_copy(os.pread(fd, length, 0))
                    return self._views(data, length, where, version, tier, False)
                mm = mmap.mmap(fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                if length >= SMALL_OBJECT_BYTES:
                    c.release_pin(extent)
                raise
            finally:
                os.close(fd)
            weakref.finalize(mm, c.release_pin, extent)
            return self._views(mm, length, where, version, tier, True)
        try:
            mm, data = map_private(fd, off, length)
        except BaseException:
            c.release_pin(extent)
            raise
        weakref.finalize(mm, c.release_pin, extent)
        return self._views(data, length, where, version, tier, True)

    def _check_control_size(self) -> None:
        """fstat of the control segment: TruncatedStoreError when it is shorter than its tables."""
        size = os.fstat(self._c.fd).st_size
        if size < TOTAL:
            raise TruncatedStoreError(
                f"run {self._run_id!r}: control segment truncated to {size} bytes (another process cut it)")

    def _read_object(self, fd: int, dst: memoryview, offset: int, where: str) -> None:
        """pread of all of ``dst``: TruncatedStoreError naming the object when the file ends first."""
        done = 0
        while done < len(dst):
            n = os.preadv(fd, [dst[done:]], offset + done)
            if n == 0:
                self._raise_if_finished()
                raise TruncatedStoreError(f"{where}: its file ends at byte {offset + done}, inside the object "
                                          "(another process truncated it)")
            done += n

    def get_guarded(self, key: str) -> tuple[bytes, list[memoryview], LoadInfo]:
        """get() read with pread into fresh memory, never through a mapping of a chunk or object
        file: a file another process truncated is TruncatedStoreError, not a SIGBUS (the twin of
        Store::get_guarded)."""
        raw = check_key(key)
        c = self._c
        locked = self._locked()  # StoreClosedError before the descriptor is used
        self._check_control_size()
        extent = None
        with locked:
            e, where = self._sealed_entry(raw, key)
            tier, version, file_id, chunk, off, length = e[1], e[5], e[6], e[7], e[8], e[9]
            data = _fresh_buffer(length)
            if tier == RAM:
                fd = self._chunk_fd(chunk)
                if length < COPY_LOAD_BYTES:  # small: read under the lock, like get()
                    self._read_object(fd, data, off, where)
                    return self._views(data, length, where, version, tier, False)
                extent = (chunk, off, length)
                c.pin_locked(extent, self._run_id, key)
            else:
                fd = self._open_disk_object(file_id, key)
                off = 0
                if length >= SMALL_OBJECT_BYTES:  # its file may be reused once retired: pinned while read
                    try:
                        extent = (DISK_PIN_CHUNK, file_id, length)
                        c.pin_locked(extent, self._run_id, key)
                    except BaseException:
                        os.close(fd)
                        raise
        try:
            self._read_object(fd, data, off, where)
        finally:
            if tier == DISK:
                os.close(fd)
            if extent is not None:
                c.release_pin(extent)
        return self._views(data, length, where, version, tier, False)

    def _read_directory(self, fd: int, base: int, length: int, where: str) -> tuple[int, list[tuple[int, int]]]:
        """(meta_len, buffers) of the extent at ``base``, read with pread (never a mapping)."""
        head = _fresh_buffer(min(length, 32))
        self._read_object(fd, head, base, where)
        nbuf = EXT_HEAD.unpack_from(head, 0)[1] if len(head) == 32 else 0
        dir_view = _fresh_buffer(min(length, 32 + 16 * min(nbuf, 65536)))
        self._read_object(fd, dir_view, base, where)
        return parse_directory(dir_view, length, where)[1:]

    @staticmethod
    def _views(data: Any, length: int, where: str, version: int, tier: int,
               zero_copy: bool) -> tuple[bytes, list[memoryview], LoadInfo]:
        meta, bufs = parse_extent(data, length, where)
        whole = memoryview(data)
        views = [whole[o : o + n] for o, n in bufs]
        return meta, views, LoadInfo(version=version, tier=TIER_NAMES[tier], zero_copy=zero_copy)

    def contains(self, key: str) -> bool:
        raw = check_key(key)
        with self._locked():
            return self._find_sealed(raw) >= 0

    __contains__ = contains

    def delete(self, key: str) -> bool:
        raw = check_key(key)
        c = self._c
        with self._locked():
            index = self._find_sealed(raw)
            if index < 0:
                return False
            c.begin()
            self._tombstone(index)
            c.end()
            return True

    def keys(self) -> list[str]:
        with self._locked():
            out = []
            for i, s in enumerate(self._c.states.tolist()):
                if s == SEALED:
                    e = self._valid(i)
                    out.append(bytes(e[10][: e[3]]).decode())
            return sorted(out)

    def info(self, key: str) -> ObjectInfo:
        raw = check_key(key)
        locked = self._locked()
        self._check_control_size()
        with locked:
            e, where = self._sealed_entry(raw, key)
            tier, version, file_id, chunk, off, length = e[1], e[5], e[6], e[7], e[8], e[9]
            # Read with pread, never through a mapping: a file another process truncated is an
            # error here, not a SIGBUS (ComfyUI's IS_CHANGED asks this in a long-lived server).
            if tier == RAM:
                meta_len, bufs = self._read_directory(self._chunk_fd(chunk), off, length, where)
            else:
                fd = self._open_disk_object(file_id, key)
                try:
                    meta_len, bufs = self._read_directory(fd, 0, length, where)
                finally:
                    os.close(fd)
        return ObjectInfo(
            key=key, tier=TIER_NAMES[tier], version=version, size=length, nbuf=len(bufs),
            nbytes=sum(n for _, n in bufs), meta_len=meta_len, chunk=chunk if tier == RAM else None, offset=off,
        )

    def stats(self) -> StoreStats:
        c = self._c
        with self._locked():
            self._reclaim_dead()
            count = {"ram": 0, "disk": 0}
            nbytes = {"ram": 0, "disk": 0}
            reserved = 0
            for i, s in enumerate(c.states.tolist()):
                if s == RESERVED:
                    reserved += 1
                elif s == SEALED:
                    e = self._valid(i)
                    count[TIER_NAMES[e[1]]] += 1
                    nbytes[TIER_NAMES[e[1]]] += e[9]
            sizes = [self._chunk_size(k) for k in range(MAX_CHUNKS)]
            live_pins = [PIN_STRUCT.unpack_from(c.mm, PIN_OFF + p * 32)
                         for p, s in enumerate(c.pin_states.tolist()) if s == 1]
            return StoreStats(
                run_id=self._run_id, objects_ram=count["ram"], objects_disk=count["disk"], bytes_ram=nbytes["ram"],
                bytes_disk=nbytes["disk"], reserved=reserved, ram_capacity=sum(sizes), ram_budget=c.hget("ram_budget"),
                chunks=sum(1 for s in sizes if s), pins=len(live_pins), pinned_bytes=sum(p[4] for p in live_pins),
                slots_used=sum(c.slot_used(i) for i in range(SLOT_CAP)),
                epoch=c.hget("epoch"), next_version=c.hget("next_version"),
            )

    def reclaim(self) -> int:
        with self._locked(running=False):
            return self._reclaim_dead()

    def mark_finished(self) -> None:
        with self._locked(running=False):
            c = self._c
            c.hset("flags", c.hget("flags") | FLAG_FINISHED)
