"""A handle's life: create or attach, claim a slot, close, destroy; the twin of
cpp/src/store.cpp."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time

from .._names import check_run_id, control_name
from .._platform import SHM_DIR, fcntl, prepare_shm_dir, require_local_store
from .._runfiles import make_private_dir, open_disk_root, open_private_dir, remove_run_files, unlink_own_leftover
from ..errors import (
    CorruptedStoreError, RunFinishedError, StoreAccessError, StoreClosedError, StoreFullError, UnknownRunError,
)
from .control import Control
from .fork import LIVE_STORES
from .format import (
    EXPECTED, FLAG_FINISHED, FORMAT_VERSION, H, HEADER_SIZE, MAGIC, OBJ_OFF, PIN_CAP, PIN_OFF, PIN_STRUCT, RAM,
    RESERVED, ENTRY, ENTRY_HEAD, SLOT_CAP, SLOT_LOCK_BASE, SLOT_OFF, SLOT_STRUCT, TABLE_CAP, TOTAL,
)
from .lock import Locked, lock_try
from .memprobe import memory_allows
from .objects import ObjectStore
from .pool import POOL, release_pool
from .sys import fallocate


class Store(ObjectStore):
    """A run's object store: RAM chunks in shared memory, overflow files on disk."""

    backend = "python"

    def __init__(self, run_id: str, shm_dir: str, fd: int, mm: mmap.mmap, owner: bool,
                 mem_probe: str, pool: bool = False, disk_fd: int = -1):
        self._run_id = run_id
        self._shm_dir = shm_dir
        self._owner = owner
        self._pool = pool
        self._pid = os.getpid()
        self._probe = mem_probe
        self._c = Control(fd, mm, run_id, self._control_path(shm_dir, run_id))
        self._closed = False
        self._chunk_fds = {}
        self._chunk_maps = {}
        n = self._c.hget("disk_dir_len")
        self._disk_dir = os.fsdecode(bytes(mm[256 : 256 + n])) if n else None
        self._c.disk_dir = self._disk_dir
        self._c.disk_fd = disk_fd
        LIVE_STORES.add(self)

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def _control_path(shm_dir: str, run_id: str) -> str:
        return os.path.join(shm_dir, control_name(run_id))

    @classmethod
    def create(cls, run_id: str, *, ram_budget: int, disk_root: str | None = None,
               shm_dir: str = SHM_DIR, mem_probe: str = "/proc/meminfo", pool: bool = False) -> Store:
        """Create a run. `pool`: lease new chunks from this process's pool (see pool_info) and
        give them back at destroy() when no one else can see them."""
        require_local_store()
        check_run_id(run_id)
        if not isinstance(ram_budget, int) or ram_budget < 0:
            raise ValueError(f"ram_budget must be a non-negative int, not {ram_budget!r}")
        disk_dir = root = None
        root_fd = disk_fd = -1
        if disk_root is not None:
            root = os.path.abspath(disk_root)
            disk_dir = os.path.join(root, control_name(run_id))
            if len(os.fsencode(disk_dir)) > 1023:
                raise ValueError(f"disk root path is too long: {disk_root!r}")
        prepare_shm_dir(shm_dir)
        if root is not None:
            root_fd = open_disk_root(root)  # refused before anything of the run exists
        path = cls._control_path(shm_dir, run_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if root_fd >= 0:
                os.close(root_fd)
            raise FileExistsError(errno.EEXIST, f"run {run_id!r} already exists in {shm_dir}") from None
        except BaseException:
            if root_fd >= 0:
                os.close(root_fd)
            raise
        fcntl.flock(fd, fcntl.LOCK_SH)  # before anything else, so a sweeper never takes a run being born
        try:
            try:
                fallocate(fd, 0, TOTAL)
            except OSError as exc:
                raise StoreFullError(f"cannot create run {run_id!r} in {shm_dir}: {exc.strerror}") from None
            if root is not None:
                disk_fd = make_private_dir(root_fd, root, control_name(run_id))
            mm = mmap.mmap(fd, TOTAL, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            for name, value in EXPECTED.items():
                off, fmt = H[name]
                struct.pack_into(fmt, mm, off, value)
            for name, value in (("format_version", FORMAT_VERSION), ("next_version", 1),
                                ("ram_budget", ram_budget), ("creator_uid", os.geteuid()),
                                ("creator_pid", os.getpid()), ("created_ns", time.time_ns())):
                off, fmt = H[name]
                struct.pack_into(fmt, mm, off, value)
            mm[112 : 112 + len(run_id)] = run_id.encode()
            if disk_dir is not None:
                raw = os.fsencode(disk_dir)
                struct.pack_into("<I", mm, 176, len(raw))
                mm[256 : 256 + len(raw)] = raw
            mm[0:8] = MAGIC
        except BaseException:
            os.close(fd)
            os.unlink(path)
            if disk_fd >= 0:
                os.close(disk_fd)
                os.rmdir(control_name(run_id), dir_fd=root_fd)
            raise
        finally:
            if root_fd >= 0:
                os.close(root_fd)
        store = cls(run_id, shm_dir, fd, mm, True, mem_probe, bool(pool), disk_fd)
        if pool:
            POOL.note_budget(ram_budget)
        # The tables are all zeros: known without reading them (and faulting their pages in).
        store._c.used, store._c.nonempty, store._c.live, store._c.cache_epoch = {}, 0, 0, 0
        try:
            store._open()
        except BaseException:
            store.destroy()
            raise
        return store

    @classmethod
    def attach(cls, run_id: str, *, shm_dir: str = SHM_DIR) -> Store:
        require_local_store()
        check_run_id(run_id)
        path = cls._control_path(shm_dir, run_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UnknownRunError(f"no discomfort run {run_id!r} in {shm_dir}") from None
        except PermissionError:
            raise StoreAccessError(f"run {run_id!r} in {shm_dir} is not accessible to this user") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise StoreAccessError(
                    f"run {run_id!r} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); refusing to attach"
                )
            if st.st_size < HEADER_SIZE:
                raise CorruptedStoreError(f"run {run_id!r}: control segment truncated ({st.st_size} bytes)")
            head = os.pread(fd, HEADER_SIZE, 0)
            validate_header(head, st.st_size, run_id)
            if struct.unpack_from("<I", head, 24)[0] & FLAG_FINISHED:
                raise RunFinishedError(f"run {run_id!r} has finished")
            mm = mmap.mmap(fd, TOTAL, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        disk_fd = -1
        n = struct.unpack_from("<I", head, 176)[0]
        if n:
            disk_dir = os.fsdecode(head[256 : 256 + n])
            try:
                disk_fd = open_private_dir(disk_dir)
            except BaseException as exc:
                finished = struct.unpack_from("<I", mm, 24)[0] & FLAG_FINISHED
                mm.close()
                os.close(fd)
                if finished:
                    raise RunFinishedError(f"run {run_id!r} has finished") from None
                if isinstance(exc, FileNotFoundError):
                    raise CorruptedStoreError(
                        f"run {run_id!r}: its disk directory {disk_dir} is missing") from None
                raise
        store = cls(run_id, shm_dir, fd, mm, False, "/proc/meminfo", disk_fd=disk_fd)
        try:
            store._open()
        except BaseException:
            store.close()
            raise
        return store

    def _open(self) -> None:
        """Claim a free slot (its lock first; what a dead holder left is reclaimed)."""
        c = self._c
        fcntl.flock(c.fd, fcntl.LOCK_SH)
        c.lock()
        try:
            self._repair_if_dirty()
            for i in range(SLOT_CAP):
                if lock_try(c, SLOT_LOCK_BASE + i):
                    c.begin()
                    if c.slot_used(i):
                        self._reclaim_slot(i)
                    SLOT_STRUCT.pack_into(c.mm, SLOT_OFF + i * 32, 1, os.getpid(), c.hget("epoch"))
                    c.slot = i
                    c.end()
                    return
            raise StoreFullError(f"run {self._run_id!r}: all {SLOT_CAP} process slots are in use")
        finally:
            c.unlock()

    # ---- properties -------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def finished(self) -> bool:
        if self._c.released:
            return True
        return bool(self._c.hget("flags") & FLAG_FINISHED)

    @property
    def slot(self) -> int:
        return self._c.slot

    @property
    def disk_dir(self) -> str | None:
        return self._disk_dir

    @property
    def shm_dir(self) -> str:
        return self._shm_dir

    # ---- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach. Views handed out stay valid; the slot and pins go when the last one does."""
        if self._closed:
            return
        self._closed = True
        self._finish_close()

    def _finish_close(self) -> None:
        LIVE_STORES.discard(self)
        for fd in self._chunk_fds.values():
            os.close(fd)
        self._chunk_fds.clear()
        for mm in self._chunk_maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a reservation buffer is still held; the mapping goes with it
        self._chunk_maps.clear()
        c = self._c
        c.closing = True
        if os.getpid() != self._pid or c.released:
            return  # a forked child owns nothing of the parent's handle
        with Locked(self):
            pass  # drains released views; the unlock gives the slot back when no pin is left

    def destroy(self) -> None:
        """Remove everything of the run (the creator's job); views handed out stay valid."""
        if not self._owner:
            raise StoreAccessError(f"run {self._run_id!r}: only the process that created it may destroy it")
        if os.getpid() != self._pid:
            raise StoreClosedError(f"run {self._run_id!r} belongs to process {self._pid}, not to this forked child")
        if not self._c.released:
            with self._c.mutex:
                self._c.hset("flags", self._c.hget("flags") | FLAG_FINISHED)
        closing_now, self._closed = not self._closed, True  # other threads' calls fail from here
        if closing_now and self._pool and not self._c.released:
            try:
                self._give_chunks_to_pool()
            except Exception:
                pass  # an optimisation only: the chunks are removed below like any others
        remove_run_files(self._shm_dir, self._run_id, self._disk_dir, self._c.disk_fd)
        if closing_now:
            self._finish_close()

    def _give_chunks_to_pool(self) -> None:
        """Pool the chunks nobody can see any more: no other handle is alive (any of them may map
        any chunk at any time), and no pin or reservation of ours is on the chunk."""
        c = self._c
        with Locked(self):
            c.drain()  # pins of views collected meanwhile go first
            self._reclaim_dead()
            if any(c.slot_used(i) for i in range(SLOT_CAP) if i != c.slot):
                return
            if not memory_allows(self._probe, 0):
                release_pool()  # memory is short: give back what the pool keeps too
                return
            busy = set()
            for i in self._nonempty(OBJ_OFF, TABLE_CAP, ENTRY):
                e = ENTRY_HEAD.unpack_from(c.mm, OBJ_OFF + i * ENTRY)
                if e[0] == RESERVED and e[1] == RAM:
                    busy.add(e[7])
            for p in self._nonempty(PIN_OFF, PIN_CAP, 32):
                state, _, chunk, _, _ = PIN_STRUCT.unpack_from(c.mm, PIN_OFF + p * 32)
                if state == 1:
                    busy.add(chunk)
            for k, state in enumerate(c.chunk_states.tolist()):
                if state != 1 or k in busy:
                    continue
                mm = self._chunk_map(k)
                if POOL.give(self._shm_dir, self.chunk_path(k), self._chunk_fds[k], mm, self._chunk_size(k)):
                    del self._chunk_fds[k], self._chunk_maps[k]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owner:
            self.destroy()
        else:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owner" if self._owner else "attached")
        return f"<discomfort._pystore.Store run_id={self._run_id!r} {state}>"


def validate_header(head: bytes, file_size: int, run_id: str) -> None:
    if head[:8] != MAGIC:
        raise CorruptedStoreError(f"run {run_id!r}: not a discomfort store (bad magic {head[:8]!r})")
    version = struct.unpack_from("<I", head, 8)[0]
    if version != FORMAT_VERSION:
        raise CorruptedStoreError(
            f"run {run_id!r}: segment format version {version}, this build reads version {FORMAT_VERSION}"
        )
    for name, want in EXPECTED.items():
        off, fmt = H[name]
        got = struct.unpack_from(fmt, head, off)[0]
        if got != want:
            raise CorruptedStoreError(f"run {run_id!r}: header field {name} is {got}, expected {want}")
    if file_size != TOTAL:
        raise CorruptedStoreError(f"run {run_id!r}: control segment is {file_size} bytes, expected {TOTAL}")
    n = struct.unpack_from("<I", head, 176)[0]
    if n > 1023:
        raise CorruptedStoreError(f"run {run_id!r}: disk directory length out of range")
    disk_dir = head[256 : 256 + n]
    if n and (not disk_dir.startswith(b"/") or b"\0" in disk_dir
              or not disk_dir.endswith(f"/{control_name(run_id)}".encode())):
        raise CorruptedStoreError(f"run {run_id!r}: disk directory {disk_dir!r} is not this run's")
    stored = head[112:176].rstrip(b"\0")
    if stored != run_id.encode():
        raise CorruptedStoreError(f"run {run_id!r}: header names run {stored!r}")
