"""Thin wrappers around the system calls the store uses; the twin of cpp/src/sys.cpp: space
reservation (with the test-only fault injection), mappings and renames. The disk tier's directory
and file checks are backend-neutral: discomfort._runfiles.

Test-only hooks (environment variables):
  DISCOMFORT_TEST_KILLPOINT=NAME, DISCOMFORT_TEST_KILLPOINT_FD=FD: park the process at a named
    point so a test can SIGKILL it there (killpoint; read once at import).
  DISCOMFORT_TEST_FAIL_NEXT_WRITE=ENOSPC|ENOMEM[#tag]: fail the next reservation of space
    (fallocate; read at each reservation).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from typing import Any, Callable

from .. import _settings
from .._platform import PLATFORM
from ..errors import DiskFullError
from .format import PAGE

_KILLPOINT = _settings.get("DISCOMFORT_TEST_KILLPOINT") or ""


# ---- the process id -----------------------------------------------------------------------------
# os.getpid() is a system call, and every store operation checks it: cached, refreshed in a
# forked child (the twin of current_pid in cpp/src/fork.cpp).
_pid = [os.getpid()]


def current_pid() -> int:
    return _pid[0]


def _refresh_pid() -> None:
    _pid[0] = os.getpid()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_refresh_pid)


def killpoints_armed() -> bool:
    """Whether this process was started with a kill point: operations then keep the lock-release
    points the kill points name."""
    return bool(_KILLPOINT)


def killpoint(name: str) -> None:
    """Test-only: park the process at a named point so a test can SIGKILL it there."""
    if _KILLPOINT != name:
        return
    fd = _settings.get("DISCOMFORT_TEST_KILLPOINT_FD")
    if fd is not None:
        os.write(fd, b"K")
    while True:
        time.sleep(3600)  # parked until the test kills us; never a synchronisation sleep


# ---- space --------------------------------------------------------------------------------------
_injected_consumed = ""


def fallocate(fd: int, offset: int, length: int) -> None:
    """posix_fallocate, with the test-only fault injection both backends share:
    DISCOMFORT_TEST_FAIL_NEXT_WRITE=ENOSPC|ENOMEM[#tag] fails the next reservation of space in
    this process with that errno, once per distinct value."""
    global _injected_consumed
    value = _settings.get("DISCOMFORT_TEST_FAIL_NEXT_WRITE") or ""
    if value and value != _injected_consumed:
        _injected_consumed = value
        code = {"ENOSPC": errno.ENOSPC, "ENOMEM": errno.ENOMEM}.get(value.split("#", 1)[0])
        if code:
            raise OSError(code, os.strerror(code))
    _allocate(fd, offset, length)


def pwrite_all(fd: int, data: Any, offset: int, what: str) -> None:
    """Write all of ``data`` at ``offset`` (a pwrite may write less); DiskFullError when full."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"write of {what}: {exc.strerror}") from None
            raise
        view = view[n:]
        offset += n


def _zero_fill(fd: int, offset: int, length: int) -> None:
    """posix_fallocate where there is none (macOS): size the file, then write zeros over the range
    so that the filesystem allocates its blocks now. A full disk is ENOSPC here, never a SIGBUS
    when a mapping of the file is written later. Only ever used on a new, empty range."""
    end = offset + length
    os.ftruncate(fd, max(end, os.fstat(fd).st_size))
    zeros = memoryview(bytes(min(length, 1 << 20)))
    pos = offset
    while pos < end:
        pos += os.pwrite(fd, zeros[: end - pos], pos)


_allocate: Callable[[int, int, int], None] = (
    os.posix_fallocate if PLATFORM.startswith("linux") and hasattr(os, "posix_fallocate") else _zero_fill
)


# ---- mappings -----------------------------------------------------------------------------------
def _map_extent(fd: int, off: int, length: int) -> tuple[mmap.mmap, Any]:
    """A private, writable mapping of a RAM extent: (the mapping, the extent's bytes in it)."""
    mm = mmap.mmap(fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
    return mm, mm


def _map_extent_coarse(fd: int, off: int, length: int) -> tuple[mmap.mmap, Any]:
    """_map_extent where a mapping must start at a multiple of more than 4 KiB (16 KiB pages:
    macOS on Apple silicon), which an extent need not: map from the boundary before it."""
    skip = off % _MAP_GRANULARITY
    mm = mmap.mmap(fd, skip + length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=off - skip)
    return mm, memoryview(mm)[skip:]


# Where mappings may start; the simulated darwin takes Apple silicon's 16 KiB.
_MAP_GRANULARITY = max(mmap.ALLOCATIONGRANULARITY, 16384 if PLATFORM == "darwin" else 0)
map_private = _map_extent if _MAP_GRANULARITY == PAGE else _map_extent_coarse


def drop_mapping(fd: int, mm: mmap.mmap) -> None:
    """Close a mapping (unless still exported somewhere: it goes when that does) and its fd."""
    try:
        mm.close()
    except BufferError:
        pass
    os.close(fd)


# ---- names --------------------------------------------------------------------------------------
_renameat2: Any = None
if PLATFORM.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        pass


def rename_noreplace(src: str, dst: str) -> None:
    """Rename without replacing dst (FileExistsError). renameat2 moves the name the kernel shows
    for existing mappings too (/proc/self/maps); link + unlink where it is missing."""
    if _renameat2 is not None:
        if _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src, None, dst)
    os.link(src, dst)
    os.unlink(src)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
