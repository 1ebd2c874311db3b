"""A run's files, whichever backend made them: how a control segment is recognised, how a run's
files are removed, and whether a disk-tier directory is safe to use (docs/FORMAT.md, "Disk tier":
nothing another local user could swap or plant is ever used, checked like OpenSSH's StrictModes).

The sweep, ``discomfort doctor`` and the Python twin share these, so that neither the sweep nor
doctor loads the Python twin on the native backend. The bottom layer: imports nothing of
discomfort but names and errors. The C++ core has its own (cpp/src/store.cpp, sys.cpp).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable

from ._names import control_name, is_run_file
from .errors import UnsafeDirectoryError

#: The first 8 bytes of every control segment, and its size in bytes (format version 2:
#: ``_pystore.format.TOTAL``, the table offsets and capacities of cpp/include/discomfort/format.hpp).
MAGIC = b"DCFSTORE"
CONTROL_SIZE = 12288 + 4096 * 320 + 4096 * 32


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


def remove_run_files(shm_dir: str, run_id: str, disk_dir: str | None, disk_fd: int = -1) -> None:
    """Unlink a run's chunks, lock files (portable mode), disk directory and control segment: only
    our own names, and only files of ours (a name another user planted stays; it must not stop
    the removal of the rest). `disk_fd`: the run directory, when the caller has it open.

    The control segment goes last, so a sweep that dies half-way is finished by the next one.
    """
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        names = []
    for name in names:
        if is_run_file(name, run_id):
            unlink_own_leftover(os.path.join(shm_dir, name))
    if disk_dir and os.path.basename(disk_dir) == control_name(run_id):
        opened = -1
        if disk_fd < 0:
            try:
                disk_fd = opened = open_private_dir(disk_dir)  # never a directory others could change
            except OSError:  # UnsafeDirectoryError included
                pass
        if disk_fd >= 0:
            try:
                for name in os.listdir(disk_fd):
                    if name.endswith(".obj"):
                        try:
                            os.unlink(name, dir_fd=disk_fd)
                        except OSError:
                            pass
                try:
                    os.rmdir(disk_dir)
                except OSError:
                    pass  # someone left other files there
            finally:
                if opened >= 0:
                    os.close(opened)
    try:
        os.unlink(os.path.join(shm_dir, control_name(run_id)))
    except FileNotFoundError:
        pass
