"""The locks of a run and the guard of an operation; the twin of cpp/src/lock.cpp (and of the
lock calls of cpp/src/sys.cpp).

Each lock is named by a byte of the control segment (LOCK_BYTE, SLOT_LOCK_BASE + slot) and taken
through the handle's Control. The implementation is chosen once, at import, by the store mode:
"shm": open-file-description byte-range locks on the control segment (Linux);
"portable": flock() on one lock file per lock byte, opened once per handle (an flock belongs to
  an open file description too, so handles exclude each other even inside one process).
lock_wait(c, byte) blocks; lock_try(c, byte) -> taken?; unlock(c, byte);
lock_held(c, byte) -> does another handle hold it? (slot liveness).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable, Protocol

from .._platform import MODE, fcntl
from .format import LOCK_BYTE, SLOT_LOCK_BASE


class Control(Protocol):
    """What the locks need of a handle's control.Control."""

    fd: int  # the control segment
    path: str  # of the control segment
    lock_fds: dict[int, int]  # portable mode: lock byte -> its lock file

    def lock(self) -> None: ...
    def unlock(self) -> None: ...


class StoreBase(Protocol):
    """What Locked needs of a store handle (control.StoreBase)."""

    @property
    def _c(self) -> Control: ...
    def _repair_if_dirty(self) -> None: ...
    def _raise_if_finished(self) -> None: ...

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (64-bit off_t)


def _ofd(fd: int, cmd: int, ltype: int, start: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    return _FLOCK.unpack(res)[0]


# The metadata lock is taken and given back twice per operation: its struct flock, packed once.
_META_WRLCK = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LOCK_BYTE, 1, 0) if MODE == "shm" else b""
_META_UNLCK = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, LOCK_BYTE, 1, 0) if MODE == "shm" else b""


def _ofd_lock_wait(c: Control, start: int) -> None:
    # fcntl() retries by itself when a signal interrupts the wait (PEP 475).
    if start == LOCK_BYTE:
        fcntl.fcntl(c.fd, fcntl.F_OFD_SETLKW, _META_WRLCK)
    else:
        _ofd(c.fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, start)


def _ofd_try(c: Control, start: int) -> bool:
    try:
        _ofd(c.fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _ofd_unlock(c: Control, start: int) -> None:
    if start == LOCK_BYTE:
        fcntl.fcntl(c.fd, fcntl.F_OFD_SETLK, _META_UNLCK)
    else:
        _ofd(c.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start)


def _ofd_held(c: Control, start: int) -> bool:
    return _ofd(c.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start) != fcntl.F_UNLCK


def _lock_file_path(control_path: str, start: int) -> str:
    """Portable mode: the file whose flock stands for lock byte `start` of a control segment:
    {control}.lk for the metadata lock, {control}.lk{i} for slot i."""
    return control_path + (".lk" if start == LOCK_BYTE else f".lk{start - SLOT_LOCK_BASE}")


def _lock_file(c: Control, start: int, create: bool = True) -> int:
    """The handle's descriptor of a lock file, opened (and made) on first use."""
    fd = c.lock_fds.get(start)
    if fd is None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = c.lock_fds[start] = os.open(_lock_file_path(c.path, start), flags, 0o600)
    return fd


def _flock_lock_wait(c: Control, start: int) -> None:
    fcntl.flock(_lock_file(c, start), fcntl.LOCK_EX)


def _flock_try(c: Control, start: int) -> bool:
    try:
        fcntl.flock(_lock_file(c, start), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _flock_unlock(c: Control, start: int) -> None:
    fcntl.flock(_lock_file(c, start), fcntl.LOCK_UN)


def _flock_held(c: Control, start: int) -> bool:
    # Only asked under the metadata lock, which every taker of a slot lock holds: probing by
    # taking the lock for a moment races with no one.
    try:
        fd = _lock_file(c, start, create=False)
    except FileNotFoundError:
        return False  # made by whoever takes the lock: nobody ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


lock_wait: Callable[[Control, int], None]
lock_try: Callable[[Control, int], bool]
unlock: Callable[[Control, int], None]
lock_held: Callable[[Control, int], bool]
if MODE == "portable":
    lock_wait, lock_try, unlock, lock_held = _flock_lock_wait, _flock_try, _flock_unlock, _flock_held
else:
    lock_wait, lock_try, unlock, lock_held = _ofd_lock_wait, _ofd_try, _ofd_unlock, _ofd_held


class Locked:
    """The metadata lock for one operation: repairs an interrupted update first; `running`:
    RunFinishedError once the run has ended. The twin of Store::Guard."""

    __slots__ = ("_store", "_running")

    def __init__(self, store: StoreBase, running: bool = False):
        self._store = store
        self._running = running

    def __enter__(self) -> None:
        store = self._store
        c = store._c
        c.lock()
        try:
            store._repair_if_dirty()
            if self._running:
                store._raise_if_finished()
        except BaseException:
            c.unlock()
            raise

    def __exit__(self, *exc: object) -> None:
        self._store._c.unlock()
