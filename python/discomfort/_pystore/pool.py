"""The process's pool of RAM chunks that finished runs gave back (docs/FORMAT.md, "Chunk pool");
the twin of cpp/src/pool.cpp. The native core keeps a pool of its own."""

from __future__ import annotations

import atexit
import mmap
import os
import threading

from .._platform import fcntl
from .._runfiles import unlink_own_leftover
from .._types import PoolFile, PoolInfo
from .sys import drop_mapping, rename_noreplace, unlink_quiet

Leased = tuple[int, mmap.mmap, int]  # (fd, mapping, size)


class Pool:
    """RAM chunks that finished runs of this process gave back.

    Their pages exist and are mapped here already, so a later run that leases one writes into it
    without a page fault. Files are named for the pool, held with flock(LOCK_SH) while pooled and
    unlinked at exit.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prefix = ""  # made on first use
        self.counter = 0
        self.entries: list[tuple[str, str, int, mmap.mmap, int]] = []  # (shm_dir, path, fd, mm, size)
        self.bytes = 0
        self.limit: int | None = None  # None: the largest RAM budget of a pooling store
        self.largest_budget = 0
        self.closed = False

    def note_budget(self, ram_budget: int) -> None:
        with self.lock:
            self.largest_budget = max(self.largest_budget, ram_budget)

    def lease(self, shm_dir: str, low: int, high: int, want: int, path: str) -> Leased | None:
        """A pooled file of `shm_dir` of between `low` and `high` bytes (`want`, else the nearest),
        renamed to `path` without replacing anything there: (fd, mapping, size), or None."""
        def rank(size: int) -> tuple[int, int]:  # exact, else the smallest above, else the largest below
            return (0, 0) if size == want else (1, size) if size > want else (2, -size)

        with self.lock:
            fits = [e for e in self.entries if e[0] == shm_dir and low <= e[4] <= high]
            if not fits:
                return None
            entry = min(fits, key=lambda e: rank(e[4]))
            self.entries.remove(entry)
            self.bytes -= entry[4]
            _, pool_path, fd, mm, size = entry
            try:
                try:
                    rename_noreplace(pool_path, path)
                except FileExistsError:
                    # Left by a creator that died before recording it (as in grow); a name
                    # someone else took keeps the pooled file for another name.
                    if not unlink_own_leftover(path):
                        self.entries.append(entry)
                        self.bytes += size
                        return None
                    rename_noreplace(pool_path, path)
            except OSError:
                unlink_quiet(pool_path)
                drop_mapping(fd, mm)
                return None
            return fd, mm, size

    def give(self, shm_dir: str, path: str, fd: int, mm: mmap.mmap, size: int) -> bool:
        """Take the chunk file at `path` into the pool; False when it does not fit or cannot move."""
        with self.lock:
            limit = self.largest_budget if self.limit is None else self.limit
            if self.closed or self.bytes + size > limit:
                return False
            # Locked before it takes the pool's name: a sweeper never sees a pool file nobody holds.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not self.prefix:
                self.prefix = f"dcf-pool-{os.urandom(8).hex()}"
            to = os.path.join(shm_dir, f"{self.prefix}.{self.counter}")
            self.counter += 1
            try:
                rename_noreplace(path, to)
            except OSError:
                return False
            self.entries.append((shm_dir, to, fd, mm, size))
            self.bytes += size
            return True

    def release(self, close: bool = False) -> int:
        with self.lock:
            self.closed = self.closed or close
            released, entries = self.bytes, self.entries
            self.entries, self.bytes = [], 0
            for _, path, fd, mm, _ in entries:
                unlink_quiet(path)
                drop_mapping(fd, mm)
            return released

    def info(self) -> PoolInfo:
        with self.lock:
            files = [PoolFile(path=path, size=size, inode=os.fstat(fd).st_ino)
                     for _, path, fd, _, size in self.entries]
            return PoolInfo(prefix=self.prefix, bytes=self.bytes,
                            limit=self.largest_budget if self.limit is None else self.limit, files=files)

    def forget_in_child(self) -> None:
        """After fork: the parent's files are the parent's (closing our copies of their
        descriptors leaves its flock alone)."""
        self.lock = threading.Lock()
        for _, _, fd, mm, _ in self.entries:
            drop_mapping(fd, mm)
        self.entries, self.bytes, self.prefix = [], 0, ""


POOL = Pool()


def pool_info() -> PoolInfo:
    """This process's pool of chunks given back by finished runs: prefix, bytes, limit, files."""
    return POOL.info()


def release_pool() -> int:
    """Unlink every pooled chunk; returns the bytes given back."""
    return POOL.release()


def set_pool_limit(nbytes: int | None) -> None:
    """The most bytes the pool keeps; None: the largest RAM budget of a pooling store."""
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"limit must be a non-negative int, not {nbytes!r}")
    with POOL.lock:
        POOL.limit = nbytes


# The pool's files go with the process; runs destroyed after this give nothing back.
atexit.register(POOL.release, True)
