"""Removes what runs nobody uses any more left behind (an owner killed with SIGKILL, say).

A run is swept only when its control segment carries the store's magic, belongs to this user,
and an exclusive flock on it succeeds: every live owner or attacher holds a shared one.
A chunk pool file (dcf-pool-{random}.{n}) is swept when it belongs to this user and an exclusive
flock on it succeeds: the process that pools it holds a shared one until it exits.
Process ids are never used: they are reused, and containers have their own.
In portable mode the same holds for the segment directory (regular files), whose runs also have
lock files (dcf-{run_id}.lk, .lk{slot}): they go with their run.

Process-local runs (discomfort._localstore) have only a directory in the disk root,
dcf-{run_id}, with their object files and owner.lk, which the owner holds open (and flock'd
where flock is: POSIX systems). One whose owner is gone is swept by the next local run created
in that disk root: with flock, when an exclusive flock succeeds; on Windows, when owner.lk can
be removed (Windows refuses while a process holds it open); elsewhere never.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct

from ._names import CONTROL_FILE, POOL_FILE, RUN_FILE, control_name
from ._platform import PLATFORM, SHM_DIR, fcntl
from ._runfiles import CONTROL_SIZE, MAGIC, disk_root_problem, remove_run_files
from .errors import UnsafeDirectoryError


def sweep(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove stale runs in shm_dir; return their run ids."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    swept = []
    controls = set()
    for name in names:
        m = CONTROL_FILE.match(name)
        if not m:
            continue
        controls.add(m.group(1))
        if _sweep_one(shm_dir, m.group(1)):
            swept.append(m.group(1))
    for name in names:  # files whose control segment is gone: a destroy that died half-way
        m = RUN_FILE.match(name)
        if m and m.group(1) not in controls:
            path = os.path.join(shm_dir, name)
            try:
                # (a run born while the directory was read has its control segment by now)
                if os.lstat(path).st_uid == os.geteuid() and not os.path.lexists(
                        os.path.join(shm_dir, control_name(m.group(1)))):
                    os.unlink(path)
            except OSError:
                pass
    for name in names:
        if POOL_FILE.match(name):
            _sweep_pool_file(os.path.join(shm_dir, name))
    return swept


def _sweep_pool_file(path: str) -> None:
    """Unlink a chunk pool file whose process is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its process is alive and keeps it
        # Still the file we locked? A live process may have leased it away and pooled another.
        if os.stat(path, follow_symlinks=False).st_ino == st.st_ino:
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sweep_one(shm_dir: str, run_id: str) -> bool:
    path = os.path.join(shm_dir, control_name(run_id))
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_size != CONTROL_SIZE:
            return False
        head = os.pread(fd, 1280, 0)
        if head[:8] != MAGIC:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # someone alive still uses it
        n = struct.unpack_from("<I", head, 176)[0]
        disk_dir = os.fsdecode(head[256 : 256 + n]) if 0 < n <= 1023 else None
        remove_run_files(shm_dir, run_id, disk_dir)
        return True
    finally:
        os.close(fd)


# ---- process-local runs ---------------------------------------------------------------------------
LOCAL_LOCK = "owner.lk"
_FLOCK = fcntl if fcntl is not None and PLATFORM != "win32" else None  # not where Windows is simulated
_WINDOWS = os.name == "nt"
_O_BIN = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
_OBJECT_FILE = re.compile(r"^[0-9a-f]{16}\.obj$")  # _names.object_file_name


def local_root_problem(root: str) -> str | None:
    """Why a local run would refuse ``root`` as its disk root (None: fine; a missing one is made):
    as the shared store refuses one; without uids (Windows), a link or a non-directory only."""
    if hasattr(os, "geteuid"):
        return disk_root_problem(root)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return (f"disk root {root} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a directory'}; "
                "set disk_dir= or DISCOMFORT_DISK_DIR to a directory of your own")
    return None


def make_local_run(disk_root: str, run_id: str) -> tuple[str, int]:
    """The directory of a new local run in ``disk_root`` (made 0700 when missing, refused as the
    shared store refuses one; local runs left there by processes that are gone are removed
    first), made exclusively (0700), and its owner.lk, held (the descriptor) until the run is
    removed: (its path, the descriptor)."""
    root = os.path.abspath(disk_root)
    if not os.path.lexists(root):
        os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
    problem = local_root_problem(root)
    if problem:
        raise UnsafeDirectoryError(problem)
    sweep_local(root)
    path = os.path.join(root, control_name(run_id))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"disk directory {path} already exists (left by another run, "
                                            "or made by someone else); refusing to reuse it") from None
    fd = -1
    try:
        if not _WINDOWS:
            os.chmod(path, 0o700)  # the umask may have taken bits; never adds any for others
        fd = os.open(os.path.join(path, LOCAL_LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_BIN, 0o600)
        if _FLOCK is not None:
            _FLOCK.flock(fd, _FLOCK.LOCK_SH)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        remove_local_run(path)
        raise
    return path, fd


def remove_local_run(path: str, kept: set[int] | None = None) -> None:
    """Unlink a local run directory's object files, then owner.lk and the directory (our names
    only). ``kept``: receives the ids of object files the system refused to remove (Windows: a
    live view maps them); owner.lk and the directory then stay, so that a sweep finds the run
    if this process ends first."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    refused = False
    for name in names:
        if _OBJECT_FILE.match(name):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass
            except OSError:
                refused = True
                if kept is not None:
                    kept.add(int(name[:-4], 16))
    if refused:
        return
    for remove, what in ((os.unlink, os.path.join(path, LOCAL_LOCK)), (os.rmdir, path)):
        try:
            remove(what)
        except FileNotFoundError:
            pass
        except OSError:
            return  # someone else's file in it: left alone


def _local_owner_gone(path: str) -> bool:
    lock = os.path.join(path, LOCAL_LOCK)
    if _FLOCK is not None:
        try:
            fd = os.open(lock, os.O_RDONLY | _O_BIN | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return False
        try:
            if hasattr(os, "geteuid") and os.fstat(fd).st_uid != os.geteuid():
                return False
            _FLOCK.flock(fd, _FLOCK.LOCK_EX | _FLOCK.LOCK_NB)
            return True
        except OSError:
            return False  # held: its owner is alive
        finally:
            os.close(fd)
    if _WINDOWS:
        try:
            os.unlink(lock)  # refused while the owner keeps it open
            return True
        except OSError:
            return False
    return False


def sweep_local(root: str) -> list[str]:
    """Remove the local runs in disk root ``root`` whose owner is gone; their run ids."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    swept = []
    for name in names:
        m = CONTROL_FILE.match(name)
        path = os.path.join(root, name)
        if m and os.path.lexists(os.path.join(path, LOCAL_LOCK)) and _local_owner_gone(path):
            remove_local_run(path)
            swept.append(m.group(1))
    return swept
