"""A run's store kept in the process that creates it: the store where no cross-process store can
run (Windows), and by choice anywhere (``WorkflowContext(store="local")``).

Same API and behaviour as the shared store (``discomfort._core`` / ``_pystore``) for everything
but attaching: no other process can reach the run. Objects under the RAM budget live in this
process's memory, in the shared store's extent layout (docs/FORMAT.md), one private buffer each;
larger ones go to one file each in the run's disk directory (``<disk root>/dcf-<run_id>``, 0700).

A save copies; a value's bytes are never written while it is stored. A RAM load is a private
copy; a disk load (64 KiB or more), a private copy-on-write mapping of its file (zero-copy on
every system). A file a load maps is removed at once on POSIX, once the mapping is gone on
Windows. The run's directory holds ``owner.lk``, which its owner holds: a run left by a crash is
swept by the next local run created in that disk root (discomfort._sweep). docs/PLATFORMS.md.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import sys
import threading
import weakref
from typing import Any, Iterator, Sequence

from ._names import check_key, check_run_id, object_file_name
from ._platform import PREFAULT_MIN
from ._pystore.format import PAGE, SMALL_OBJECT_BYTES
from ._pystore.layout import byte_views, layout, parse_extent, write_directory
from ._pystore.memprobe import memory_allows
from ._sweep import make_local_run, remove_local_run
from ._types import LoadInfo, ObjectInfo, StoreStats
from .errors import (
    DiskFullError, StoreClosedError, StoreFullError, TruncatedStoreError, UnknownKeyError, UnsupportedPlatformError,
)

#: Which backend this module is (the shared store's modules say "native" or "python").
BACKEND = "local"
COPY_LOAD_BYTES = SMALL_OBJECT_BYTES  # disk objects below this come back as copies, not mappings
_PROBE_FROM = 1 << 20  # RAM puts from this size ask the memory probe first
_HUGE_PAGE = 2 << 20
_PROBE = "/proc/meminfo" if sys.platform.startswith("linux") else None
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # run id -> this process's live store

_O_BIN = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)  # Windows: no newline translation
_WINDOWS = os.name == "nt"


def attach_error(run_id: str) -> UnsupportedPlatformError:
    """Why another process cannot open a process-local run, and what works instead."""
    return UnsupportedPlatformError(
        f"run {run_id!r} is not a run of this process, and runs are kept in a process-local store (on Windows "
        "every run is: no POSIX shared memory there): only the process that created a run can use it, so it cannot "
        "be attached from another process (and a run that has ended is gone). What works: ComfyUI in the same "
        "process (discomfort.comfy.InProcessComfy), or a ComfyUI server reached over HTTP (run_sequential(..., "
        "transport='http') or discomfort.remote.RemoteContext), whose node pack keeps the run in the server's own "
        "process; or run discomfort under WSL2 (Linux: runs in shared memory)")


def _buffer(n: int) -> memoryview:
    """Private, page-aligned, writable memory: from 2 MiB where there are huge pages, anonymous
    pages advised huge (512 times fewer page faults); else a bytearray up to 32 MiB (the C heap
    serves it, often with pages a freed value left faulted in), anonymous pages beyond."""
    if n >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
        mm.madvise(mmap.MADV_HUGEPAGE)  # a hint: ignored where transparent huge pages are off
        return memoryview(mm)
    if n < PREFAULT_MIN:
        import ctypes

        raw = bytearray(n + PAGE)
        pad = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % PAGE
        return memoryview(raw)[pad : pad + n]
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX: private anonymous (MAP_SHARED would be shmem)
        return memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE))
    return memoryview(mmap.mmap(-1, n))  # Windows: pagefile-backed, private to this process


def _write_all(fd: int, data: Any, where: str) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        try:
            n = os.write(fd, view[: 1 << 30])
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise DiskFullError(f"write of {where}: {exc.strerror}") from None
            raise
        view = view[n:]


def _header(meta: bytes, sizes: Sequence[int]) -> tuple[bytearray, list[int], int]:
    """The extent's directory and meta (bytes up to the first buffer), offsets and length."""
    meta_off, offsets, length = layout(len(meta), sizes)
    head = bytearray(meta_off + len(meta))
    write_directory(head, meta_off, meta, offsets, sizes)
    return head, offsets, length


class _Obj:
    """A sealed object: its region (RAM) or file id (disk), and what info() reports."""

    __slots__ = ("tier", "version", "file_id", "length", "nbuf", "nbytes", "meta_len", "region", "readers")

    def __init__(self, tier: str, file_id: int, length: int, sizes: Sequence[int], meta_len: int,
                 region: memoryview | None):
        self.tier, self.file_id, self.length, self.region = tier, file_id, length, region
        self.nbuf, self.nbytes, self.meta_len, self.version = len(sizes), sum(sizes), meta_len, 0
        self.readers = 0  # loads copying its region now: it is not reused meanwhile


class _Disk:
    """The run's directory and what outlives the store object: files views still map."""

    def __init__(self, path: str, lock_fd: int):
        self.path, self.lock_fd = path, lock_fd
        self.doomed: set[int] = set()  # files of gone values a mapping still holds (Windows)
        self.gone = False  # the store is destroyed: a collected mapping removes its file itself

    def file(self, file_id: int) -> str:
        return os.path.join(self.path, object_file_name(file_id))

    def remove(self, file_id: int) -> None:
        """Unlink an object's file now, or once no mapping holds it (Windows refuses before)."""
        try:
            os.unlink(self.file(file_id))
            self.doomed.discard(file_id)
        except FileNotFoundError:
            self.doomed.discard(file_id)
        except OSError:
            self.doomed.add(file_id)

    def unmapped(self, file_id: int) -> None:
        """A view's mapping was collected: a file it kept is removed now (no lock needed)."""
        if file_id in self.doomed:
            self.remove(file_id)
            if self.gone and not self.doomed:
                remove_local_run(self.path)

    def remove_all(self) -> None:
        self.gone = True
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        remove_local_run(self.path, self.doomed)


class Reservation:
    """A reserved, not yet visible object: fill ``buffers``, then ``seal()`` (or ``abort()``).
    ``key``, ``buffers`` and ``tier`` ("ram" or "disk") as the shared store's; ``buffers`` is
    empty once sealed or aborted."""

    def __init__(self, store: Store, key: str, obj: _Obj, buffers: list[memoryview], mapping: Any):
        self.key, self.tier, self.buffers = key, obj.tier, buffers
        self._store, self._obj, self._mapping, self._done = store, obj, mapping, False
        # Dropped unsealed: retired at the store's next operation (a finalizer never takes its lock).
        self._dropped = weakref.finalize(self, store._queue.append, ("drop", obj.file_id))

    def _finish(self) -> None:
        self._done, self.buffers = True, []
        self._dropped.detach()
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a buffer: the mapping goes with it
                mapping.close()

    def seal(self) -> int:
        """Make the object the key's value; its version."""
        if self._done:
            raise StoreClosedError(f"reservation of {self.key!r} was already sealed or aborted")
        try:
            version = self._store._seal(self.key, self._obj)
        finally:
            self._finish()
        return version

    def abort(self) -> None:
        if not self._done:
            try:
                self._store._abort(self._obj.file_id)
            finally:
                self._finish()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.seal()


class Store:
    """One run's objects, in this process (module doc). The API of the shared store's Store."""

    backend = "local"
    owner = True  # every handle of a local run is its creator's
    slot = 0

    def __init__(self, run_id: str, ram_budget: int, disk: _Disk | None, mem_probe: str | None = None):
        self._run_id, self._budget, self._disk, self._probe = run_id, ram_budget, disk, mem_probe
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()  # finalizers' news, applied under the lock
        self._objects: dict[str, _Obj] = {}
        self._reserved: dict[int, tuple[str, int]] = {}  # file_id -> (tier, length)
        self._pins: dict[int, int] = {}  # disk file_id -> live mappings of it
        self._pinned_bytes = 0
        self._ram_used = 0  # RAM extents, reservations and spare regions included
        # Regions of replaced or deleted values (from 1 MiB), by length: the next value of that
        # length is copied into one, whose pages are faulted in already (a loop's steady state).
        self._spare: dict[int, list[memoryview]] = {}
        self._spare_bytes = 0
        self._next = 1  # versions and file ids, as the shared store takes them (two per save)
        self._closed = self._finished = False
        self._pid = os.getpid()
        self._cleanup = weakref.finalize(self, _cleanup_run, disk, self._pid)

    @classmethod
    def create(cls, run_id: str, *, ram_budget: int, disk_root: str | None = None,
               mem_probe: str | None = _PROBE) -> Store:
        """A new run of this process; ``disk_root``: where its disk directory goes (None: no disk
        tier). Local runs left there by processes that are gone are removed first. ``mem_probe``:
        a file in /proc/meminfo format (None: none, as on Windows); a value of 1 MiB or more goes
        to disk when it says memory runs low."""
        check_run_id(run_id)
        if not isinstance(ram_budget, int) or isinstance(ram_budget, bool) or ram_budget < 0:
            raise ValueError(f"ram_budget must be a non-negative int, not {ram_budget!r}")
        if _LIVE.get(run_id) is not None:
            raise FileExistsError(errno.EEXIST, f"run {run_id!r} already exists in this process")
        disk = _Disk(*make_local_run(os.fspath(disk_root), run_id)) if disk_root is not None else None
        _LIVE[run_id] = store = cls(run_id, ram_budget, disk, mem_probe)
        return store

    @staticmethod
    def attach(run_id: str, **_: Any) -> Store:
        raise attach_error(check_run_id(run_id))

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def finished(self) -> bool:
        return self._closed or self._finished

    @property
    def disk_dir(self) -> str | None:
        return self._disk.path if self._disk is not None else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock (StoreClosedError once closed), with what finalizers queued applied first."""
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                raise StoreClosedError(f"run {self._run_id!r} is closed" if self._closed else
                                       f"run {self._run_id!r} belongs to process {self._pid}, not to this forked child")
            while self._queue:
                what, file_id, *rest = self._queue.popleft()
                if what == "unpin":
                    left = self._pins.pop(file_id, 0) - 1
                    if left > 0:
                        self._pins[file_id] = left
                    self._pinned_bytes -= rest[0]
                elif file_id in self._reserved:  # "drop": a reservation collected unsealed
                    self._retire(file_id)
            if self._disk is not None and self._disk.doomed:
                for file_id in list(self._disk.doomed):  # (one C-level copy: a finalizer may change the set)
                    if file_id not in self._pins:
                        self._disk.remove(file_id)
            yield

    def _take_version(self) -> int:
        self._next += 1
        return self._next - 1  # (under the lock)

    def _retire(self, file_id: int) -> None:
        """Under the lock: a reservation's space goes back (its file too)."""
        tier, length = self._reserved.pop(file_id)
        if tier == "ram":
            self._ram_used -= length
        elif self._disk is not None:
            self._disk.remove(file_id)

    def _new(self, key: str, meta: bytes, sizes: list[int]) -> tuple[_Obj, bytearray, list[int]]:
        """A reserved object of ``sizes`` in the tier it fits (its region made when in RAM); its
        header and meta, and the buffers' offsets."""
        check_key(key)
        meta = bytes(meta)
        head, offsets, length = _header(meta, sizes)
        region = None
        with self._locked():
            spares = self._spare.get(length)
            if spares:
                region, tier = spares.pop(), "ram"  # counted in _ram_used already
                self._spare_bytes -= length
            else:
                if self._ram_used + length > self._budget and self._spare_bytes:
                    self._free_spares()
                if self._ram_used + length <= self._budget and (
                        length < _PROBE_FROM or self._disk is None or self._probe is None
                        or memory_allows(self._probe, length)):
                    tier = "ram"
                    self._ram_used += length
                elif self._disk is not None:
                    tier = "disk"
                else:
                    raise StoreFullError(f"run {self._run_id!r}: object {key!r} of {length} bytes does not fit the "
                                         "RAM budget and the run has no disk tier")
            file_id = self._take_version()
            self._reserved[file_id] = (tier, length)
        obj = _Obj(tier, file_id, length, sizes, len(meta), region)
        if tier == "ram":
            try:
                obj.region = region if region is not None else _buffer(length)
            except BaseException:
                self._abort(file_id)
                raise
            obj.region[: len(head)] = head
        return obj, head, offsets

    def _free_spares(self) -> None:
        """Under the lock: the spare regions go (room for a value of another length)."""
        self._ram_used -= self._spare_bytes
        self._spare.clear()
        self._spare_bytes = 0

    def reserve(self, key: str, meta: bytes, sizes: Sequence[int]) -> Reservation:
        sizes = [int(n) for n in sizes]
        if any(n < 0 for n in sizes) or len(sizes) > 65536:
            raise ValueError("buffer sizes must be non-negative and at most 65536 buffers")
        obj, head, offsets = self._new(key, meta, sizes)
        mapping = None
        try:
            region = obj.region
            if region is None:  # disk: the file, sized, mapped shared for the caller to fill
                assert self._disk is not None
                path = self._disk.file(obj.file_id)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_BIN, 0o600)
                try:
                    _write_all(fd, head, path)
                    os.ftruncate(fd, obj.length)
                    mapping = mmap.mmap(fd, obj.length, access=mmap.ACCESS_WRITE)
                finally:
                    os.close(fd)
                region = memoryview(mapping)
            buffers = [region[o : o + n] for o, n in zip(offsets, sizes)]
        except BaseException:
            self._abort(obj.file_id)
            raise
        return Reservation(self, key, obj, buffers, mapping)

    def _seal(self, key: str, obj: _Obj) -> int:
        with self._locked():
            if obj.file_id not in self._reserved:
                raise StoreClosedError(f"reservation of {key!r} was retired")
            del self._reserved[obj.file_id]
            old = self._objects.get(key)
            if old is not None:
                self._drop(old)
            obj.version = self._take_version()
            self._objects[key] = obj
            return obj.version

    def _abort(self, file_id: int) -> None:
        with contextlib.suppress(StoreClosedError), self._locked():  # (destroyed: everything went with it)
            if file_id in self._reserved:
                self._retire(file_id)

    def put(self, key: str, meta: bytes, buffers: Sequence[Any]) -> int:
        views = byte_views(buffers)
        obj, head, offsets = self._new(key, meta, [v.nbytes for v in views])
        try:
            if obj.region is not None:
                for o, src in zip(offsets, views):
                    obj.region[o : o + src.nbytes] = src
            else:
                self._write_file(obj, head, offsets, views, key)
        except BaseException:
            self._abort(obj.file_id)
            raise
        return self._seal(key, obj)

    put_guarded = put  # nothing of another process can be under a local run's objects

    def _write_file(self, obj: _Obj, head: bytearray, offsets: list[int], views: list[memoryview], key: str) -> None:
        """A disk object's file, written (never mapped): header, meta, buffers, zero padding."""
        assert self._disk is not None
        path = self._disk.file(obj.file_id)
        where = f"run {self._run_id!r}, object {key!r} ({path})"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BIN, 0o600)
        try:
            _write_all(fd, head, where)
            end = len(head)
            for o, src in zip(offsets, views):
                _write_all(fd, bytes(o - end), where)
                _write_all(fd, src, where)
                end = o + src.nbytes
            _write_all(fd, bytes(obj.length - end), where)
        finally:
            os.close(fd)

    def _drop(self, obj: _Obj) -> None:
        """Under the lock: a sealed object replaced or deleted."""
        if obj.tier == "ram":
            region, obj.region = obj.region, None
            if region is not None and not obj.readers and obj.length >= _PROBE_FROM:
                self._spare.setdefault(obj.length, []).append(region)
                self._spare_bytes += obj.length
            else:
                self._ram_used -= obj.length
        elif self._disk is not None:
            self._disk.remove(obj.file_id)

    def _find(self, key: str) -> _Obj:
        obj = self._objects.get(key)
        if obj is None:
            raise UnknownKeyError(f"no object {key!r} in run {self._run_id!r}")
        return obj

    def get(self, key: str) -> tuple[bytes, list[memoryview], LoadInfo]:
        return self._get(key, guarded=False)

    def get_guarded(self, key: str) -> tuple[bytes, list[memoryview], LoadInfo]:
        """get() as a copy read with read(), never a mapping: a disk file another process of the
        user truncated is TruncatedStoreError, not a SIGBUS."""
        return self._get(key, guarded=True)

    def _get(self, key: str, guarded: bool) -> tuple[bytes, list[memoryview], LoadInfo]:
        check_key(key)
        where = f"run {self._run_id!r}, object {key!r}"
        with self._locked():
            obj = self._find(key)
            region, length, version, file_id = obj.region, obj.length, obj.version, obj.file_id
            fd, mapped = -1, False
            if region is not None:
                obj.readers += 1
            else:
                assert self._disk is not None
                fd = os.open(self._disk.file(file_id), os.O_RDONLY | _O_BIN)
                mapped = not guarded and length >= COPY_LOAD_BYTES
                if mapped:
                    self._pins[file_id] = self._pins.get(file_id, 0) + 1
                    self._pinned_bytes += length
        if region is not None:  # RAM: copied outside the lock (no save reuses it while it is read)
            try:
                data = _buffer(length)
                data[:] = region
            finally:
                with self._lock:
                    obj.readers -= 1
            return _views(data, length, where, version, "ram", False)
        try:
            if os.fstat(fd).st_size < length:
                raise TruncatedStoreError(f"{where}: its disk file was truncated (another process cut it)")
            if mapped:
                mm = mmap.mmap(fd, length, access=mmap.ACCESS_COPY)  # private copy-on-write
            else:
                data = _buffer(length)
                done = 0
                while done < length:
                    n = _read_into(fd, data[done:])
                    if n == 0:
                        raise TruncatedStoreError(f"{where}: its file ends at byte {done}, inside the object")
                    done += n
        except BaseException:
            if mapped:
                self._queue.append(("unpin", file_id, length))
            raise
        finally:
            os.close(fd)
        if not mapped:
            return _views(data, length, where, version, "disk", False)
        weakref.finalize(mm, _unmapped, self._queue, self._disk, file_id, length)
        return _views(memoryview(mm), length, where, version, "disk", True)

    def contains(self, key: str) -> bool:
        check_key(key)
        with self._locked():
            return key in self._objects

    __contains__ = contains

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._locked():
            obj = self._objects.pop(key, None)
            if obj is not None:
                self._drop(obj)
            return obj is not None

    def keys(self) -> list[str]:
        with self._locked():
            return sorted(self._objects)

    def info(self, key: str) -> ObjectInfo:
        check_key(key)
        with self._locked():
            o = self._find(key)
            return ObjectInfo(key=key, tier="ram" if o.tier == "ram" else "disk", version=o.version, size=o.length,
                              nbuf=o.nbuf, nbytes=o.nbytes, meta_len=o.meta_len, chunk=None, offset=0)

    def stats(self) -> StoreStats:
        """The shared store's fields: ``ram_capacity`` is the memory the RAM tier holds now,
        reservations included (no chunks here); ``pins``: disk objects mapped by live loads."""
        with self._locked():
            ram = [o.length for o in self._objects.values() if o.tier == "ram"]
            disk = [o.length for o in self._objects.values() if o.tier == "disk"]
            return StoreStats(
                run_id=self._run_id, objects_ram=len(ram), objects_disk=len(disk), bytes_ram=sum(ram),
                bytes_disk=sum(disk), reserved=len(self._reserved), ram_capacity=self._ram_used,
                ram_budget=self._budget, chunks=0, pins=sum(self._pins.values()), pinned_bytes=self._pinned_bytes,
                slots_used=1, epoch=0, next_version=self._next,
            )

    def reclaim(self) -> int:
        return 0  # no other process can die holding anything of a local run

    def mark_finished(self) -> None:  # only a flag: no other process can see the run
        self._finished = True

    def destroy(self) -> None:
        """Remove everything of the run; loads handed out stay valid. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if _LIVE.get(self._run_id) is self:
                del _LIVE[self._run_id]
            self._objects.clear()
            self._reserved.clear()
            self._spare.clear()
            self._ram_used = self._spare_bytes = 0
        self._cleanup()

    close = destroy  # no other process can reach the run, so closing it ends it

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<discomfort._localstore.Store run_id={self._run_id!r} {'closed' if self._closed else 'owner'}>"


def _views(data: memoryview, length: int, where: str, version: int, tier: Any,
           zero_copy: bool) -> tuple[bytes, list[memoryview], LoadInfo]:
    meta, bufs = parse_extent(data, length, where)
    return meta, [data[o : o + n] for o, n in bufs], LoadInfo(version=version, tier=tier, zero_copy=zero_copy)


def _read_into(fd: int, dst: memoryview) -> int:
    if hasattr(os, "readv"):
        return os.readv(fd, [dst])
    chunk = os.read(fd, min(len(dst), 1 << 30))  # Windows: no readv
    dst[: len(chunk)] = chunk
    return len(chunk)


def _unmapped(queue: collections.deque, disk: _Disk | None, file_id: int, length: int) -> None:
    """A load's mapping was collected: its pin goes at the store's next operation."""
    queue.append(("unpin", file_id, length))
    if disk is not None:
        disk.unmapped(file_id)


def _cleanup_run(disk: _Disk | None, pid: int) -> None:
    """destroy()'s file work, also run when a store is collected or the interpreter exits."""
    if disk is not None and os.getpid() == pid:  # a forked child owns nothing of its parent's run
        disk.remove_all()
