"""Thin wrappers around the system calls the store uses; the twin of cpp/src/sys.cpp: space
reservation (with the test-only fault injection), mappings, renames, and the disk tier's
directories and files, checked like OpenSSH's StrictModes (docs/FORMAT.md, "Disk tier").

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
import stat
import time
from typing import Any, Callable

from .._platform import PLATFORM
from ..errors import DiskFullError, UnsafeDirectoryError
from .format import PAGE

_KILLPOINT = os.environ.get("DISCOMFORT_TEST_KILLPOINT", "")


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
    fd = os.environ.get("DISCOMFORT_TEST_KILLPOINT_FD")
    if fd:
        os.write(int(fd), b"K")
    while True:
        time.sleep(3600)  # parked until the test kills us; never a synchronisation sleep


# ---- space --------------------------------------------------------------------------------------
_injected_consumed = ""


def fallocate(fd: int, offset: int, length: int) -> None:
    """posix_fallocate, with the test-only fault injection both backends share:
    DISCOMFORT_TEST_FAIL_NEXT_WRITE=ENOSPC|ENOMEM[#tag] fails the next reservation of space in
    this process with that errno, once per distinct value."""
    global _injected_consumed
    value = os.environ.get("DISCOMFORT_TEST_FAIL_NEXT_WRITE", "")
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


def unlink_own_leftover(path: str) -> bool:
    """Unlink path if it is a regular file of this user (a leftover of our own); True when the
    name is free now. False when it is someone else's: the caller must pick another name."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


# ---- the disk tier's directories and files (docs/FORMAT.md, "Disk tier") ----------------------
# Nothing another local user could swap or plant is ever used.
_USE_ANOTHER = "set disk_dir= or DISCOMFORT_DISK_DIR to a directory of your own (mode 0700)"
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _check_root_stat(root: str, st: os.stat_result) -> None:
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(f"disk root {root} is not a directory; {_USE_ANOTHER}")
    if st.st_uid not in (me, 0):
        raise UnsafeDirectoryError(
            f"disk root {root} belongs to uid {st.st_uid}, not to this user (uid {me}) or root; {_USE_ANOTHER}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectoryError(
            f"disk root {root} is writable by group or others without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 700 {root} (or 1777 for a shared temp directory), "
            f"or {_USE_ANOTHER}")


def _check_private_stat(path: str, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UnsafeDirectoryError(
            f"disk directory {path} is not a private directory of this user (uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it")


def _open_dir_checked(path: str, check: Callable[[str, os.stat_result], None], not_a_dir: str) -> int:
    """Open a directory O_DIRECTORY|O_NOFOLLOW and check what was opened by fstat; a link or a
    non-directory there is UnsafeDirectoryError(not_a_dir), other failures OSError."""
    try:
        fd = os.open(path, _O_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectoryError(not_a_dir) from None
        raise
    try:
        check(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_disk_root(root: str) -> int:
    """Open the disk root (made 0700 when missing) after checking it: a real directory, owned by
    this user or root, not writable by group or others unless the sticky bit is set (/tmp)."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(root), exist_ok=True)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectoryError(
            f"disk root {root} is a symbolic link; give the directory it points to, or {_USE_ANOTHER}")
    _check_root_stat(root, st)
    # what was opened is checked again, not what the name meant a moment ago
    return _open_dir_checked(root, _check_root_stat, f"disk root {root} changed while it was checked; {_USE_ANOTHER}")


def disk_root_problem(root: str) -> str | None:
    """Why Store.create would refuse `root` as a disk root, or None (a missing root is made 0700).
    For `discomfort doctor`: nothing is created or opened."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"disk root {root} is a symbolic link; give the directory it points to, or {_USE_ANOTHER}"
    try:
        _check_root_stat(root, st)
    except UnsafeDirectoryError as exc:
        return str(exc)
    return None


def make_private_dir(root_fd: int, root: str, name: str) -> int:
    """Make `name` in the disk root exclusively (never reuse a directory someone made), mode 0700;
    open it O_DIRECTORY|O_NOFOLLOW and check it is ours and private."""
    path = os.path.join(root, name)
    try:
        os.mkdir(name, 0o700, dir_fd=root_fd)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST,
            f"disk directory {path} already exists (left by another run, or made by someone else); "
            "refusing to reuse it") from None
    try:
        fd = os.open(name, _O_DIR, dir_fd=root_fd)
    except OSError:
        raise UnsafeDirectoryError(
            f"disk directory {path} was replaced right after it was made; refusing to use it") from None
    try:
        os.fchmod(fd, 0o700)  # the umask may have taken bits we need; never adds any for others
        _check_private_stat(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_dir(path: str) -> int:
    """Open a run's disk directory O_DIRECTORY|O_NOFOLLOW (OSError when that fails), refused
    unless it is a private directory of this user."""
    return _open_dir_checked(path, _check_private_stat,
                             f"disk directory {path} is not a directory; refusing to use it")


def private_file_problem(fd: int) -> str:
    """"" when fd is a regular file of this user without group or other bits, else what is wrong."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        return ""
    kind = "" if stat.S_ISREG(st.st_mode) else "not a regular file, "
    return f"{kind}owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
