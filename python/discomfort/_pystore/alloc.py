"""RAM allocation (first fit over ranges derived from entries and pins), chunk growth and access,
and the files of the disk tier; the twin of cpp/src/alloc.cpp."""

from __future__ import annotations

import errno
import mmap
import os
import struct

from .._names import object_file_name
from .._runfiles import private_file_problem, unlink_own_leftover
from ..errors import CorruptedStoreError, DiskFullError, StoreAccessError, TruncatedStoreError
from . import pool
from .format import CHUNK_OFF, CHUNK_STRUCT, MAX_CHUNKS, MIN_CHUNK, PAGE
from .memprobe import memory_allows
from .sys import fallocate
from .table import TableStore


class AllocStore(TableStore):
    def _first_fit(self, length: int) -> tuple[int, int] | None:
        used = self._tables()
        for k, size in self._c.chunks:
            pos = 0
            for off, n in sorted(used.get(k, ())):
                if off - pos >= length:
                    return k, pos
                pos = max(pos, off + n)
            if size - pos >= length:
                return k, pos
        return None

    def _install_chunk(self, k: int, size: int) -> None:
        """Record chunk k (its file exists and holds `size` bytes); the state last."""
        CHUNK_STRUCT.pack_into(self._c.mm, CHUNK_OFF + k * 32, 0, 0, size)
        struct.pack_into("<I", self._c.mm, CHUNK_OFF + k * 32, 1)
        self._c.cache_epoch = None  # the table cache lists the chunks: rescan

    def _grow(self, length: int) -> int | None:
        """Create a new chunk that holds `length` bytes, or None when RAM may not grow."""
        # Read in C where most of the 64 entries are unused: the disk tier asks on every put.
        sizes = {k: self._chunk_size(k) for k in self._nonempty(CHUNK_OFF, MAX_CHUNKS, 32)}
        have = sum(sizes.values())
        room = max(0, self._c.hget("ram_budget") - have)
        size = min(room, max(length, MIN_CHUNK, have)) // PAGE * PAGE
        if size < length:
            return None
        free = [k for k in range(MAX_CHUNKS) if not sizes.get(k)]
        if not free:
            return None
        memory_checked = False
        # A chunk's name is known to every local user (the run id shows in /dev/shm): a name that
        # someone else took is skipped, never removed or opened, and the next free index is tried.
        for k in free:
            path = self.chunk_path(k)
            if self._pool:
                # Already allocated and mapped here: no memory to ask for, no page to fault in.
                leased = pool.POOL.lease(self._shm_dir, length, room, size, path)
                if leased is not None:
                    self._chunk_fds[k], self._chunk_maps[k], got = leased
                    self._install_chunk(k, got)
                    return k
            if not memory_checked:
                if not memory_allows(self._probe, size):
                    # Memory is short: what the pool keeps is the first thing to give back.
                    if pool.release_pool() == 0 or not memory_allows(self._probe, size):
                        return None
                memory_checked = True
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                try:
                    fd = os.open(path, flags, 0o600)
                except FileExistsError:
                    if not unlink_own_leftover(path):  # a creator that died before recording it
                        continue  # someone else's: another name
                    fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return None  # no inode left
                raise
            try:
                try:
                    fallocate(fd, 0, size)
                except OSError:
                    if pool.release_pool() == 0:
                        raise
                    fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                return None  # /dev/shm full: the disk tier takes it, never a SIGBUS later
            self._chunk_fds[k] = fd
            self._install_chunk(k, size)
            return k
        return None  # every free name is taken: the disk tier takes it

    def _chunk_fd(self, k: int) -> int:
        fd = self._chunk_fds.get(k)
        if fd is None:
            size = self._chunk_size(k)
            try:
                fd = os.open(self.chunk_path(k), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                self._raise_if_finished()  # the owner removed it
                raise CorruptedStoreError(f"run {self._run_id!r}: chunk {k} is missing") from None
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                os.close(fd)
                raise CorruptedStoreError(f"run {self._run_id!r}: chunk {k} not ours")
            if st.st_size < size:
                os.close(fd)
                raise TruncatedStoreError(f"run {self._run_id!r}: chunk {k} truncated (another process cut it)")
            self._chunk_fds[k] = fd
        return fd

    def _chunk_map(self, k: int) -> mmap.mmap:
        mm = self._chunk_maps.get(k)
        if mm is None:
            mm = mmap.mmap(self._chunk_fd(k), self._chunk_size(k), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
            self._chunk_maps[k] = mm
        return mm

    # ---- the disk tier ------------------------------------------------------------------------
    def _allocate_disk_file(self, fd: int, length: int) -> None:
        """posix_fallocate of an object file: DiskFullError when the disk tier is full."""
        try:
            fallocate(fd, 0, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"run {self._run_id!r}: disk tier {self._disk_dir} is full "
                    f"({length} bytes needed): {exc.strerror}"
                ) from None
            raise

    def _open_disk_file(self, file_id: int, length: int, reused: bool) -> int:
        """An object file for put to pwrite into, space reserved (DiskFullError otherwise); the
        caller closes it. A new file (removed again when it fails its check) or, ``reused``, a
        retired file taken for ``file_id``, checked the same way and cut to ``length``. Writing a
        new file through a mapping faults every page (~11x a memcpy at 12 MiB); pwrite does not
        (~2x), so put writes it that way and only reservations map it."""
        path, name, dir_fd = self._disk_path(file_id), object_file_name(file_id), self._c.disk_fd
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if reused else os.O_CREAT | os.O_EXCL)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except OSError:
            self._raise_if_finished()
            raise
        try:
            problem = private_file_problem(fd)
            if problem:
                raise StoreAccessError(f"run {self._run_id!r}: {'retired' if reused else 'new'} disk file {path} "
                                       f"is {problem}")
            if reused and os.fstat(fd).st_size > length:
                os.ftruncate(fd, length)
            self._allocate_disk_file(fd, length)
            return fd
        except BaseException:
            os.close(fd)
            if not reused:  # a retired file stays, under its new name
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    pass
            raise

    def _take_retired(self, length: int, file_id: int) -> bool:
        """Under the lock, inside an update: the retired file no pin maps that fits ``length`` best
        (the smallest that holds it, else the largest), renamed to ``file_id``'s name."""
        slots = [r for r in self._retired() if r[0]]
        if not slots:
            return False
        newest, pinned = self._c.hget("next_version"), self._pinned_disk_files()
        usable = [r for r in slots if r[0] < newest and r[0] not in pinned]
        if not usable:
            return False
        fits = [r for r in usable if r[1] >= length]
        best = min(fits, key=lambda r: r[1]) if fits else max(usable, key=lambda r: r[1])
        slots.remove(best)
        self._set_retired(slots)
        dir_fd = self._c.disk_fd
        try:
            os.rename(object_file_name(best[0]), object_file_name(file_id), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            return False
        return True

    def _create_disk_object(self, file_id: int, length: int) -> mmap.mmap:
        fd = self._open_disk_file(file_id, length, False)
        try:
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            try:
                os.unlink(object_file_name(file_id), dir_fd=self._c.disk_fd)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def _open_disk_object(self, file_id: int, key: str) -> int:
        """The object's file, opened O_NOFOLLOW in the run directory and checked by fstat (ours,
        a regular file, no group or other bits): StoreAccessError naming key and file otherwise."""
        path, where = self._disk_path(file_id), f"run {self._run_id!r}, object {key!r}"
        try:
            # O_NONBLOCK: a FIFO in its place must not hang us; it is refused below.
            fd = os.open(object_file_name(file_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._c.disk_fd)
        except OSError as exc:
            self._raise_if_finished()
            if exc.errno == errno.ENOENT:
                raise CorruptedStoreError(f"{where}: its disk file {path} is missing") from None
            if exc.errno == errno.ELOOP:
                raise StoreAccessError(f"{where}: disk file {path} is a symbolic link; refusing to read it") from None
            raise
        problem = private_file_problem(fd)
        if problem:
            os.close(fd)
            raise StoreAccessError(
                f"{where}: disk file {path} is not a private file of this user ({problem}); refusing to read it")
        return fd
