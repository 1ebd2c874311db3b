"""Removes what runs nobody uses any more left behind (an owner killed with SIGKILL, say).

A run is swept only when its control segment carries the store's magic, belongs to this user,
and an exclusive flock on it succeeds: every live owner or attacher holds a shared one.
A chunk pool file (dcf-pool-{random}.{n}) is swept when it belongs to this user and an exclusive
flock on it succeeds: the process that pools it holds a shared one until it exits.
Process ids are never used: they are reused, and containers have their own.
In portable mode the same holds for the segment directory (regular files), whose runs also have
lock files (dcf-{run_id}.lk, .lk{slot}): they go with their run.
"""

from __future__ import annotations

import os
import stat
import struct

from ._names import CONTROL_FILE, POOL_FILE, RUN_FILE, control_name
from ._platform import SHM_DIR, fcntl
from ._runfiles import CONTROL_SIZE, MAGIC, remove_run_files


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
