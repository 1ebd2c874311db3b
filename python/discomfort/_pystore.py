"""The pure-Python store: the same segment format and behaviour as the C++ core.

docs/FORMAT.md is the contract both follow. This module is the fallback where the core
cannot be built, and the reference the core is tested against.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no local store there (MODE "unsupported")
    fcntl = None  # type: ignore[assignment]

from .errors import (
    CorruptedStoreError,
    DiskFullError,
    InvalidKeyError,
    InvalidRunIdError,
    RunFinishedError,
    StoreAccessError,
    StoreClosedError,
    StoreFullError,
    UnknownKeyError,
    UnknownRunError,
    UnsafeDirectoryError,
    UnsupportedPlatformError,
)

__version__ = "0.1.0"
FORMAT_VERSION = 1
SMALL_OBJECT_BYTES = 65536

MAGIC = b"DCFSTORE"
OBJ_MAGIC = 0x4F464344
PAGE = 4096
HEADER_SIZE = 4096
MAX_CHUNKS = 64
SLOT_CAP = 128
TABLE_CAP = 4096
PIN_CAP = 4096
CHUNK_OFF = 4096
SLOT_OFF = 6144
OBJ_OFF = 12288
ENTRY = 320
PIN_OFF = OBJ_OFF + TABLE_CAP * ENTRY
TOTAL = PIN_OFF + PIN_CAP * 32
LOCK_BYTE = 1 << 40
SLOT_LOCK_BASE = LOCK_BYTE + 4096
MIN_CHUNK = 64 << 20
FLAG_FINISHED = 1

EMPTY, RESERVED, SEALED, TOMBSTONE = 0, 1, 2, 3
RAM, DISK = 0, 1
TIER_NAMES = ("ram", "disk")

# Header fields: name -> (offset, struct format).
_H = {
    "format_version": (8, "<I"),
    "header_size": (12, "<I"),
    "total_size": (16, "<Q"),
    "flags": (24, "<I"),
    "dirty": (28, "<I"),
    "epoch": (32, "<Q"),
    "next_version": (40, "<Q"),
    "ram_budget": (48, "<Q"),
    "creator_uid": (56, "<I"),
    "creator_pid": (60, "<I"),
    "max_chunks": (64, "<I"),
    "slot_capacity": (68, "<I"),
    "table_capacity": (72, "<I"),
    "pin_capacity": (76, "<I"),
    "chunk_table_off": (80, "<Q"),
    "slot_table_off": (88, "<Q"),
    "obj_table_off": (96, "<Q"),
    "pin_table_off": (104, "<Q"),
    "disk_dir_len": (176, "<I"),
    "created_ns": (184, "<Q"),
}
_EXPECTED = {
    "header_size": HEADER_SIZE,
    "total_size": TOTAL,
    "max_chunks": MAX_CHUNKS,
    "slot_capacity": SLOT_CAP,
    "table_capacity": TABLE_CAP,
    "pin_capacity": PIN_CAP,
    "chunk_table_off": CHUNK_OFF,
    "slot_table_off": SLOT_OFF,
    "obj_table_off": OBJ_OFF,
    "pin_table_off": PIN_OFF,
}
_ENTRY = struct.Struct("<IIIIQQQQQQ256s")
_ENTRY_HEAD = struct.Struct("<IIIIQQQQQQ")
_PIN = struct.Struct("<IIQQQ")
_CHUNK = struct.Struct("<IIQ")
_SLOT = struct.Struct("<IIQ")
_EXT_HEAD = struct.Struct("<IIQQQ")
_BUFDESC = struct.Struct("<QQ")
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (64-bit off_t)
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RUN_FILE_SUFFIX = re.compile(r"c\d+|lk\d*")  # after "dcf-{run_id}.": a RAM chunk, a lock file
_NONZERO = re.compile(rb"[^\x00]")

# Test-only hooks (environment variables):
#   DISCOMFORT_TEST_KILLPOINT=NAME, DISCOMFORT_TEST_KILLPOINT_FD=FD: park the process at a named
#     point so a test can SIGKILL it there (_killpoint; read once at import).
#   DISCOMFORT_TEST_FAIL_NEXT_WRITE=ENOSPC|ENOMEM[#tag]: fail the next reservation of space
#     (_fallocate; read at each reservation).
#   DISCOMFORT_TEST_PLATFORM=darwin|win32: behave as on that system (read once at import; sets
#     PLATFORM, hence MODE): "darwin" runs the portable mode on Linux, "win32" refuses local stores.
_KILLPOINT = os.environ.get("DISCOMFORT_TEST_KILLPOINT", "")
PLATFORM = os.environ.get("DISCOMFORT_TEST_PLATFORM", "").strip() or sys.platform


def _store_mode() -> str:
    """How this system keeps a run (docs/FORMAT.md, "Portable mode"):

    "shm": Linux: segments in /dev/shm, OFD byte-range locks, posix_fallocate.
    "portable": another POSIX system (macOS), or Linux without /dev/shm or OFD locks: segments are
        regular files in a private temp directory, locks are flock() on lock files.
    "unsupported": Windows (no fcntl, no POSIX shared mappings): no local store.
    """
    if PLATFORM == "win32" or fcntl is None:
        return "unsupported"
    if PLATFORM.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and os.path.isdir("/dev/shm"):
        return "shm"
    return "portable"


MODE = _store_mode()


def user_temp_dir() -> str:
    """This user's folder in the temp directory (not created here)."""
    return os.path.join(tempfile.gettempdir(), f"discomfort-{os.geteuid()}")


#: Where runs keep their control segments and RAM chunks by default.
SHM_DIR = os.path.join(user_temp_dir(), "segments") if MODE == "portable" else "/dev/shm"


def private_dir(path: str) -> str:
    """Make `path` (mode 0700) unless it exists; refuse it unless it is a real directory of ours."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or not os.path.isdir(path) or os.path.islink(path):
        raise PermissionError(f"{path} is not a private directory of this user")
    return path


# ---- the disk tier's directories and files (docs/FORMAT.md, "Disk tier") ----------------------
# Checked like OpenSSH's StrictModes, as the core does (cpp/src/sys.cpp): nothing another local
# user could swap or plant is ever used.
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
    try:
        fd = os.open(root, _O_DIR)
    except (NotADirectoryError, OSError) as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectoryError(f"disk root {root} changed while it was checked; {_USE_ANOTHER}") from None
        raise
    try:
        _check_root_stat(root, os.fstat(fd))  # what was opened, not what the name meant a moment ago
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    try:
        fd = os.open(path, _O_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectoryError(f"disk directory {path} is not a directory; refusing to use it") from None
        raise
    try:
        _check_private_stat(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file_problem(fd: int) -> str:
    """"" when fd is a regular file of this user without group or other bits, else what is wrong."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        return ""
    kind = "" if stat.S_ISREG(st.st_mode) else "not a regular file, "
    return f"{kind}owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


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


def prepare_shm_dir(shm_dir: str) -> None:
    """In portable mode, make the default segment directory (and its parent) on first use."""
    if MODE == "portable" and shm_dir == SHM_DIR:
        private_dir(os.path.dirname(shm_dir))
        private_dir(shm_dir)


def require_local_store() -> None:
    """Raise UnsupportedPlatformError where no local store can run (Windows)."""
    if MODE == "unsupported":
        name = "Windows" if PLATFORM == "win32" else PLATFORM
        raise UnsupportedPlatformError(
            f"discomfort cannot keep a local store on {name} ({PLATFORM}): it needs POSIX shared "
            "file mappings and fcntl locks. Run it under WSL2, or run ComfyUI on a Linux machine and "
            "reach it over HTTP (discomfort.remote.RemoteContext, or run_sequential(..., "
            "executor=SERVER_URL, transport='http'))"
        )


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@lru_cache(maxsize=4096)
def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def check_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if "\0" in key:
        raise InvalidKeyError(f"key {key!r} contains a NUL character")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} is not valid UTF-8: {exc}") from None
    if len(raw) > 255:
        raise InvalidKeyError(f"key is {len(raw)} UTF-8 bytes long; the limit is 255")
    return raw


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidRunIdError(f"run id {run_id!r} is not 1-64 characters of [A-Za-z0-9_-]")
    return run_id


def layout(meta_len: int, sizes: Sequence[int]) -> tuple[int, list[int], int]:
    """Offsets of the meta and of each buffer inside an extent, and the extent's length."""
    meta_off = _align(32 + 16 * len(sizes), 64)
    pos = meta_off + meta_len
    offsets = []
    for n in sizes:
        pos = _align(pos, PAGE if n >= SMALL_OBJECT_BYTES else 64)
        offsets.append(pos)
        pos += n
    return meta_off, offsets, _align(pos, PAGE)


def parse_directory(view: Any, length: int, where: str) -> tuple[int, int, list[tuple[int, int]]]:
    """Validate an extent's directory; return (meta_off, meta_len, [(off, len)])."""
    if length < 32:
        raise CorruptedStoreError(f"{where}: extent of {length} bytes is too short")
    magic, nbuf, meta_off, meta_len, _ = _EXT_HEAD.unpack_from(view, 0)
    if magic != OBJ_MAGIC:
        raise CorruptedStoreError(f"{where}: bad object magic {magic:#x}")
    if nbuf > 65536 or 32 + 16 * nbuf > length:
        raise CorruptedStoreError(f"{where}: buffer count {nbuf} does not fit the extent")
    if meta_off < 32 + 16 * nbuf or meta_off > length or meta_len > length - meta_off:
        raise CorruptedStoreError(f"{where}: metadata range out of bounds")
    bufs = []
    for i in range(nbuf):
        off, n = _BUFDESC.unpack_from(view, 32 + 16 * i)
        if off > length or n > length - off:
            raise CorruptedStoreError(f"{where}: buffer {i} out of bounds")
        bufs.append((off, n))
    return meta_off, meta_len, bufs


def parse_extent(view: Any, length: int, where: str) -> tuple[bytes, list[tuple[int, int]]]:
    """The meta bytes and buffer ranges of a validated extent."""
    meta_off, meta_len, bufs = parse_directory(view, length, where)
    return bytes(view[meta_off : meta_off + meta_len]), bufs


_injected_consumed = ""


def _fallocate(fd: int, offset: int, length: int) -> None:
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
_map_private = _map_extent if _MAP_GRANULARITY == PAGE else _map_extent_coarse


def _aligned_copy(src: Any) -> memoryview:
    """A private copy of a small extent whose start is 64-byte aligned, like the store's."""
    n = len(src)
    raw = bytearray(n + 64)
    pad = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 64
    view = memoryview(raw)[pad : pad + n]
    view[:] = src
    return view


# ---- locks --------------------------------------------------------------------------------------
# Each lock is named by a byte of the control segment (LOCK_BYTE, SLOT_LOCK_BASE + slot) and taken
# through the handle's _Control. The implementation is chosen once, at import, by MODE:
# "shm": open-file-description byte-range locks on the control segment (Linux);
# "portable": flock() on one lock file per lock byte, opened once per handle (an flock belongs to
#   an open file description too, so handles exclude each other even inside one process).
# _lock_wait(c, byte) blocks; _lock_try(c, byte) -> taken?; _unlock(c, byte);
# _lock_held(c, byte) -> does another handle hold it? (slot liveness).

def _ofd(fd: int, cmd: int, ltype: int, start: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    return _FLOCK.unpack(res)[0]


def _ofd_lock_wait(c: _Control, start: int) -> None:
    while True:
        try:
            _ofd(c.fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, start)
            return
        except InterruptedError:
            continue


def _ofd_try(c: _Control, start: int) -> bool:
    try:
        _ofd(c.fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _ofd_unlock(c: _Control, start: int) -> None:
    _ofd(c.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start)


def _ofd_held(c: _Control, start: int) -> bool:
    return _ofd(c.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start) != fcntl.F_UNLCK


def _lock_file_path(control_path: str, start: int) -> str:
    """Portable mode: the file whose flock stands for lock byte `start` of a control segment:
    {control}.lk for the metadata lock, {control}.lk{i} for slot i."""
    return control_path + (".lk" if start == LOCK_BYTE else f".lk{start - SLOT_LOCK_BASE}")


def _lock_file(c: _Control, start: int, create: bool = True) -> int:
    """The handle's descriptor of a lock file, opened (and made) on first use."""
    fd = c.lock_fds.get(start)
    if fd is None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = c.lock_fds[start] = os.open(_lock_file_path(c.path, start), flags, 0o600)
    return fd


def _flock_lock_wait(c: _Control, start: int) -> None:
    fcntl.flock(_lock_file(c, start), fcntl.LOCK_EX)


def _flock_try(c: _Control, start: int) -> bool:
    try:
        fcntl.flock(_lock_file(c, start), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _flock_unlock(c: _Control, start: int) -> None:
    fcntl.flock(_lock_file(c, start), fcntl.LOCK_UN)


def _flock_held(c: _Control, start: int) -> bool:
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


_lock_wait: Callable[[_Control, int], None]
_lock_try: Callable[[_Control, int], bool]
_unlock: Callable[[_Control, int], None]
_lock_held: Callable[[_Control, int], bool]
if MODE == "portable":
    _lock_wait, _lock_try, _unlock, _lock_held = _flock_lock_wait, _flock_try, _flock_unlock, _flock_held
else:
    _lock_wait, _lock_try, _unlock, _lock_held = _ofd_lock_wait, _ofd_try, _ofd_unlock, _ofd_held


def _killpoint(name: str) -> None:
    """Test-only: park the process at a named point so a test can SIGKILL it there."""
    if _KILLPOINT != name:
        return
    fd = os.environ.get("DISCOMFORT_TEST_KILLPOINT_FD")
    if fd:
        os.write(int(fd), b"K")
    while True:
        time.sleep(3600)  # parked until the test kills us; never a synchronisation sleep


def read_meminfo(path: str) -> dict[str, int]:
    out = {}
    try:
        with open(path, "rb") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(b":"):
                    mult = 1024 if len(parts) > 2 and parts[2] == b"kB" else 1
                    out[parts[0][:-1].decode()] = int(parts[1]) * mult
    except (OSError, ValueError):
        pass
    return out


def memory_allows(probe: str, nbytes: int) -> bool:
    info = read_meminfo(probe)
    avail, total = info.get("MemAvailable"), info.get("MemTotal")
    if avail is None or total is None:
        return True
    reserve = min(1 << 30, total // 10)
    if avail - nbytes < reserve:
        return False
    if probe == "/proc/meminfo":
        try:
            with open("/sys/fs/cgroup/memory.max") as fh:
                limit = fh.read().strip()
            if limit != "max":
                with open("/sys/fs/cgroup/memory.current") as fh:
                    current = int(fh.read())
                if int(limit) - current - nbytes < reserve:
                    return False
        except (OSError, ValueError):
            pass
    return True


class _Control:
    """What outlives a closed handle while its views are alive: the fd, its locks and pins."""

    def __init__(self, fd: int, mm: mmap.mmap, run_id: str, path: str):
        self.fd = fd
        self.mm = mm
        self.run_id = run_id
        self.path = path  # of the control segment
        self.lock_fds: dict[int, int] = {}  # portable mode: lock byte -> its lock file
        self.mutex = threading.Lock()
        self.slot = -1
        self.pins: dict[tuple[int, int, int], list[int]] = {}  # extent -> [count, pin index]
        self.pending: deque = deque()
        self.closing = False
        self.released = False
        self.disk_dir: str | None = None
        self.disk_fd = -1  # the run's disk directory, O_DIRECTORY|O_NOFOLLOW, for *at() calls
        mv = memoryview(mm)
        self.states = mv[OBJ_OFF : OBJ_OFF + TABLE_CAP * ENTRY].cast("I")[0 :: ENTRY // 4]
        self.pin_states = mv[PIN_OFF : PIN_OFF + PIN_CAP * 32].cast("I")[0 :: 8]
        self.chunk_states = mv[CHUNK_OFF : CHUNK_OFF + MAX_CHUNKS * 32].cast("I")[0 :: 8]
        # What this handle knows of the tables, valid while the header's epoch equals
        # cache_epoch (None: rescan): every update, by any process, bumps the epoch, and our
        # own updates keep the cache in step. Spares each reservation a scan of both tables.
        self.cache_epoch: int | None = None
        self.nonempty = 0  # object entries whose state is not EMPTY
        self.live = 0  # object entries RESERVED or SEALED
        self.used: dict[int, dict[tuple[int, int], int]] = {}  # chunk -> {(offset, length): count}

    def _cache_fresh(self) -> bool:
        if self.cache_epoch is not None and self.cache_epoch != self.hget("epoch"):
            self.cache_epoch = None
        return self.cache_epoch is not None

    def _note_extent(self, chunk: int, off: int, length: int, add: bool) -> None:
        extents = self.used.setdefault(chunk, {})
        n = extents.get((off, length), 0) + (1 if add else -1)
        if n > 0:
            extents[(off, length)] = n
        elif n == 0:
            del extents[(off, length)]
        else:
            self.cache_epoch = None  # cannot happen while the cache is right: rescan

    def set_entry_state(self, index: int, state: int) -> None:
        """Write an entry's state (its other fields first: "state last")."""
        off = OBJ_OFF + index * ENTRY
        if self._cache_fresh():
            before = self.states[index]
            if (before == EMPTY) != (state == EMPTY):
                self.nonempty += 1 if before == EMPTY else -1
            if (before in (RESERVED, SEALED)) != (state in (RESERVED, SEALED)):
                self.live += 1 if state in (RESERVED, SEALED) else -1
                e = _ENTRY_HEAD.unpack_from(self.mm, off)
                if e[1] == RAM:
                    self._note_extent(e[7], e[8], e[9], state in (RESERVED, SEALED))
        struct.pack_into("<I", self.mm, off, state)

    def set_pin_state(self, index: int, state: int) -> None:
        off = PIN_OFF + index * 32
        if self._cache_fresh():
            before, _, chunk, poff, length = _PIN.unpack_from(self.mm, off)
            if (before == 1) != (state == 1) and chunk < MAX_CHUNKS:
                self._note_extent(chunk, poff, length, state == 1)
        struct.pack_into("<I", self.mm, off, state)

    # header fields
    def hget(self, name: str) -> int:
        off, fmt = _H[name]
        return struct.unpack_from(fmt, self.mm, off)[0]

    def hset(self, name: str, value: int) -> None:
        off, fmt = _H[name]
        struct.pack_into(fmt, self.mm, off, value)

    # locking
    def lock(self) -> None:
        self.mutex.acquire()
        try:
            _lock_wait(self, LOCK_BYTE)
        except BaseException:
            self.mutex.release()
            raise

    def unlock(self) -> None:
        try:
            self._drain()
        finally:
            try:
                _unlock(self, LOCK_BYTE)
            finally:
                self.mutex.release()
        if self.closing and not self.pins and not self.released:
            self.release()

    def release_pin(self, extent: tuple[int, int, int]) -> None:
        """Finalizer of a view: never blocks, so it cannot deadlock with the thread it runs on."""
        self._defer(("unpin", extent))

    def abort_dropped(self, index: int, file_id: int, name: str | None) -> None:
        """Finalizer of a reservation collected without seal() or abort()."""
        self._defer(("abort", index, file_id, name))

    def _defer(self, item: tuple) -> None:
        self.pending.append(item)
        if self.released or not self.mutex.acquire(blocking=False):
            return  # the holder drains it when it unlocks
        try:
            _lock_wait(self, LOCK_BYTE)
        except BaseException:
            self.mutex.release()
            raise
        self.unlock()

    def _drain(self) -> None:
        if not self.pending or self.hget("dirty"):
            return  # an interrupted update is repaired by the next operation, which drains then
        began = False
        while self.pending:
            item = self.pending.popleft()
            if item[0] == "abort":
                if not began:
                    self.begin()
                    began = True
                self._abort_own(*item[1:])
                continue
            extent = item[1]
            rec = self.pins.get(extent)
            if rec is None:
                continue
            rec[0] -= 1
            if rec[0] > 0:
                continue
            del self.pins[extent]
            if not began:
                self.begin()
                began = True
            index = rec[1]
            state, slot, chunk, off, length = _PIN.unpack_from(self.mm, PIN_OFF + index * 32)
            if state == 1 and slot == self.slot and (chunk, off, length) == extent:
                self.set_pin_state(index, 0)
        if began:
            self.end()

    def _file_id_at(self, index: int) -> int:
        return struct.unpack_from("<Q", self.mm, OBJ_OFF + index * ENTRY + 32)[0]

    def _abort_own(self, index: int, file_id: int, name: str | None) -> None:
        """Retire one of this handle's reservations (inside an update); `name`: its disk file."""
        off = OBJ_OFF + index * ENTRY
        state, _, owner, _, _, _, fid = _ENTRY_HEAD.unpack_from(self.mm, off)[:7]
        if state == RESERVED and owner == self.slot and fid == file_id:
            self.set_entry_state(index, TOMBSTONE)
            if name and self.disk_fd >= 0:
                try:
                    os.unlink(name, dir_fd=self.disk_fd)
                except OSError:
                    pass  # the entry goes regardless; the file goes with the disk directory

    def begin(self) -> None:
        self.hset("dirty", 1)

    def end(self) -> None:
        epoch = self.hget("epoch")
        # A cache that followed this update stays valid for the epoch it ends with.
        self.cache_epoch = epoch + 1 if self.cache_epoch == epoch else None
        self.hset("epoch", epoch + 1)
        self.hset("dirty", 0)

    def release(self) -> None:
        """Give back the slot and every lock; after this the handle is gone for good."""
        if self.released:
            return
        self.released = True
        try:
            self.mutex.acquire()
            try:
                _lock_wait(self, LOCK_BYTE)
                try:
                    if self.slot >= 0 and not self.hget("dirty"):
                        self.hset("dirty", 1)
                        for index in range(TABLE_CAP):
                            if self.states[index] == RESERVED:
                                file_id = self._file_id_at(index)
                                tier = struct.unpack_from("<I", self.mm, OBJ_OFF + index * ENTRY + 4)[0]
                                name = f"{file_id:016x}.obj" if tier == DISK else None
                                self._abort_own(index, file_id, name)
                        for index in range(PIN_CAP):
                            if self.pin_states[index] == 1:
                                _, slot, *_ = _PIN.unpack_from(self.mm, PIN_OFF + index * 32)
                                if slot == self.slot:
                                    self.set_pin_state(index, 0)
                        struct.pack_into("<I", self.mm, SLOT_OFF + self.slot * 32, 0)
                        self.end()
                    if self.slot >= 0:
                        _unlock(self, SLOT_LOCK_BASE + self.slot)
                finally:
                    _unlock(self, LOCK_BYTE)
            finally:
                self.mutex.release()
        finally:
            self.states.release()
            self.pin_states.release()
            self.chunk_states.release()
            try:
                self.mm.close()
            except BufferError:
                pass
            self.close_fds()

    def close_fds(self) -> None:
        """Close the control segment and lock files (which drops this handle's locks)."""
        os.close(self.fd)
        if self.disk_fd >= 0:
            os.close(self.disk_fd)
            self.disk_fd = -1
        for fd in self.lock_fds.values():
            os.close(fd)
        self.lock_fds.clear()


class Reservation:
    """A reserved object that readers cannot see until `seal()`."""

    def __init__(self, store: Store, key: str, index: int, file_id: int, tier: int,
                 buffers: list[memoryview], mapping: Any):
        self._store = store
        self._key = key
        self._index = index
        self._file_id = file_id
        self._tier = tier
        self._buffers = buffers
        self._mapping = mapping
        self._done = False
        name = f"{file_id:016x}.obj" if tier == DISK else None
        self._dropped = weakref.finalize(self, store._c.abort_dropped, index, file_id, name)

    @property
    def key(self) -> str:
        return self._key

    @property
    def buffers(self) -> list[memoryview]:
        return self._buffers

    @property
    def tier(self) -> str:
        return TIER_NAMES[self._tier]

    def _finish(self) -> None:
        self._done = True
        self._dropped.detach()
        self._buffers = []
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # a caller still holds a buffer; the mapping goes with it
            self._mapping = None

    def seal(self) -> int:
        if self._done:
            raise StoreClosedError(f"reservation of {self._key!r} was already sealed or aborted")
        try:
            return self._store._seal(self._index, self._file_id, self._key)
        finally:
            self._finish()

    def abort(self) -> None:
        if self._done:
            return
        if self._store.closed:  # closing the store retired the reservation already
            self._finish()
            return
        try:
            self._store._abort(self._index, self._file_id)
        finally:
            self._finish()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.seal()


class Store:
    """A run's object store: RAM chunks in shared memory, overflow files on disk."""

    def __init__(self, run_id: str, shm_dir: str, fd: int, mm: mmap.mmap, owner: bool,
                 mem_probe: str, pool: bool = False, disk_fd: int = -1):
        self._run_id = run_id
        self._shm_dir = shm_dir
        self._owner = owner
        self._pool = pool
        self._pid = os.getpid()
        self._probe = mem_probe
        self._c = _Control(fd, mm, run_id, self._control_path(shm_dir, run_id))
        self._closed = False
        self._chunk_fds: dict[int, int] = {}
        self._chunk_maps: dict[int, mmap.mmap] = {}
        n = self._c.hget("disk_dir_len")
        self._disk_dir = os.fsdecode(bytes(mm[256 : 256 + n])) if n else None
        self._c.disk_dir = self._disk_dir
        self._c.disk_fd = disk_fd
        _live_stores.add(self)

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def _control_path(shm_dir: str, run_id: str) -> str:
        return os.path.join(shm_dir, f"dcf-{run_id}")

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
            disk_dir = os.path.join(root, f"dcf-{run_id}")
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
                _fallocate(fd, 0, TOTAL)
            except OSError as exc:
                raise StoreFullError(f"cannot create run {run_id!r} in {shm_dir}: {exc.strerror}") from None
            if root is not None:
                disk_fd = make_private_dir(root_fd, root, f"dcf-{run_id}")
            mm = mmap.mmap(fd, TOTAL, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            for name, value in _EXPECTED.items():
                off, fmt = _H[name]
                struct.pack_into(fmt, mm, off, value)
            for name, value in (("format_version", FORMAT_VERSION), ("next_version", 1),
                                ("ram_budget", ram_budget), ("creator_uid", os.geteuid()),
                                ("creator_pid", os.getpid()), ("created_ns", time.time_ns())):
                off, fmt = _H[name]
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
                os.rmdir(f"dcf-{run_id}", dir_fd=root_fd)
            raise
        finally:
            if root_fd >= 0:
                os.close(root_fd)
        store = cls(run_id, shm_dir, fd, mm, True, mem_probe, bool(pool), disk_fd)
        if pool:
            _pool.note_budget(ram_budget)
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
            _validate_header(head, st.st_size, run_id)
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
        c = self._c
        fcntl.flock(c.fd, fcntl.LOCK_SH)
        c.lock()
        try:
            self._repair_if_dirty()
            for i in range(SLOT_CAP):
                if _lock_try(c, SLOT_LOCK_BASE + i):
                    c.begin()
                    if struct.unpack_from("<I", c.mm, SLOT_OFF + i * 32)[0] == 1:
                        self._reclaim_slot(i)
                    _SLOT.pack_into(c.mm, SLOT_OFF + i * 32, 1, os.getpid(), c.hget("epoch"))
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
    def closed(self) -> bool:
        return self._closed

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

    def chunk_path(self, index: int) -> str:
        return os.path.join(self._shm_dir, f"dcf-{self._run_id}.c{index}")

    def _disk_path(self, file_id: int) -> str:
        if self._disk_dir is None:
            raise CorruptedStoreError(f"run {self._run_id!r}: a disk object in a run without a disk tier")
        return os.path.join(self._disk_dir, f"{file_id:016x}.obj")

    # ---- locking ------------------------------------------------------------------------------
    def _locked(self, running: bool = True) -> _Locked:
        """The metadata lock for an operation; `running`: RunFinishedError once the run has ended."""
        if self._closed:
            raise StoreClosedError(f"store of run {self._run_id!r} is closed")
        if os.getpid() != self._pid:
            raise StoreClosedError(
                f"store handle of run {self._run_id!r} belongs to process {self._pid}; attach again in this process"
            )
        return _Locked(self, running)

    def _repair_if_dirty(self) -> None:
        if self._c.hget("dirty"):
            self._repair()

    # ---- table access -------------------------------------------------------------------------
    def _entry(self, index: int) -> tuple:
        return _ENTRY.unpack_from(self._c.mm, OBJ_OFF + index * ENTRY)

    def _set_state(self, index: int, state: int) -> None:
        self._c.set_entry_state(index, state)

    def _chunk_size(self, k: int) -> int:
        state, _, size = _CHUNK.unpack_from(self._c.mm, CHUNK_OFF + k * 32)
        return size if state == 1 else 0

    def _entry_problem(self, e: tuple) -> str | None:
        state, tier, owner, key_len, h, _v, file_id, chunk, off, length, key = e
        if not 1 <= key_len <= 255:
            return f"key length {key_len}"
        if fnv1a64(bytes(key[:key_len])) != h:
            return "key hash mismatch"
        if owner >= SLOT_CAP:
            return f"owner slot {owner}"
        if length == 0:
            return "zero length"
        if tier == RAM:
            if chunk >= MAX_CHUNKS:
                return f"chunk {chunk}"
            size = self._chunk_size(chunk)
            if size == 0 or off % PAGE or length % PAGE or off + length > size:
                return f"extent {off}+{length} outside chunk {chunk}"
        elif tier == DISK:
            if file_id == 0 or self._disk_dir is None:
                return "disk object without a disk tier"
        else:
            return f"tier {tier}"
        return None

    def _valid(self, index: int) -> tuple:
        e = self._entry(index)
        problem = self._entry_problem(e)
        if problem:
            raise CorruptedStoreError(f"run {self._run_id!r}: object table entry {index} is corrupted ({problem})")
        return e

    def _probe_path(self, raw: bytes, h: int) -> Iterator[int]:
        """Indices of live entries on the key's probe path with this key."""
        states = self._c.states
        start = h % TABLE_CAP
        for step in range(TABLE_CAP):
            i = (start + step) % TABLE_CAP
            s = states[i]
            if s == EMPTY:
                return
            if s in (RESERVED, SEALED):
                _, _, _, key_len, eh = _ENTRY_HEAD.unpack_from(self._c.mm, OBJ_OFF + i * ENTRY)[:5]
                if eh == h and key_len == len(raw):
                    koff = OBJ_OFF + i * ENTRY + 64
                    if self._c.mm[koff : koff + key_len] == raw:
                        yield i

    def _find_sealed(self, raw: bytes) -> int:
        for i in self._probe_path(raw, fnv1a64(raw)):
            if self._c.states[i] == SEALED:
                return i
        return -1

    def _first_free(self, h: int) -> int:
        """The first EMPTY or TOMBSTONE entry on a probe path from h's home; -1 when none."""
        states = self._c.states
        start = h % TABLE_CAP
        for step in range(TABLE_CAP):
            i = (start + step) % TABLE_CAP
            if states[i] in (EMPTY, TOMBSTONE):
                return i
        return -1

    def _insert(self, raw: bytes, fields: tuple, key: str, replacing: bool) -> int:
        """Take the first EMPTY or TOMBSTONE entry on the key's probe path (state written last).

        New keys: at most 3/4 of the table live. An overwrite (`replacing`: the key has a SEALED
        entry, which its seal retires) may go past that. Any insertion leaves one EMPTY entry,
        which ends every probe; tombstones that no probe needs are made EMPTY first when it comes
        to that."""
        states = self._c.states
        h = fnv1a64(raw)
        self._tables()
        if not replacing and self._c.live + 1 > TABLE_CAP * 3 // 4:
            raise StoreFullError(f"run {self._run_id!r}: object table full ({TABLE_CAP * 3 // 4} keys at most); "
                                 f"cannot add key {key!r}")

        def fits(i: int) -> bool:
            # Reusing a TOMBSTONE leaves the count of non-EMPTY entries as it is.
            self._tables()
            return i >= 0 and self._c.nonempty + (states[i] == EMPTY) <= TABLE_CAP - 1

        i = self._first_free(h)
        if not fits(i) and self._purge_tombstones():
            i = self._first_free(h)
        if not fits(i):
            raise StoreFullError(
                f"run {self._run_id!r}: object table full ({self._c.nonempty} of {TABLE_CAP} entries in use); "
                f"cannot add key {key!r}")
        tier, owner, file_id, chunk, off, length = fields
        _ENTRY.pack_into(self._c.mm, OBJ_OFF + i * ENTRY, states[i], tier, owner, len(raw), h,
                         0, file_id, chunk, off, length, raw)
        self._set_state(i, RESERVED)
        return i

    def _purge_tombstones(self) -> int:
        """TOMBSTONEs that no live entry's probe path crosses become EMPTY, without moving any
        entry (writers name theirs by index). A tombstone at position p of a cluster (a run of
        non-EMPTY entries) is crossed when a live entry after it has its home at or before p.
        Same rule as the core's Store::purge_tombstones; returns how many became EMPTY."""
        c = self._c
        states = c.states.tolist()
        try:
            start = states.index(EMPTY)
        except ValueError:
            return 0  # no EMPTY entry: no cluster boundary to start from
        c.begin()
        freed = 0
        cluster: list[int] = []

        def flush() -> None:
            nonlocal freed
            min_home = 1 << 62
            for p in range(len(cluster) - 1, -1, -1):
                j = cluster[p]
                s = states[j]
                if s == TOMBSTONE and min_home > p:
                    self._set_state(j, EMPTY)
                    states[j] = EMPTY
                    freed += 1
                elif s in (RESERVED, SEALED):
                    home = struct.unpack_from("<Q", c.mm, OBJ_OFF + j * ENTRY + 16)[0] % TABLE_CAP
                    dist = (j - home) % TABLE_CAP
                    min_home = min(min_home, -1 if dist > p else p - dist)
                elif s != TOMBSTONE:
                    min_home = -1  # an unknown state: keep everything before it as it is
            cluster.clear()

        try:
            for n in range(1, TABLE_CAP + 1):
                i = (start + n) % TABLE_CAP
                if n < TABLE_CAP and states[i] != EMPTY:
                    cluster.append(i)
                else:
                    flush()
        finally:
            c.end()
        return freed

    def _tombstone(self, index: int) -> None:
        """Retire an entry; unlink its disk file. Keeps every probe path intact."""
        e = self._entry(index)
        if e[1] == DISK and self._c.disk_fd >= 0 and e[6]:
            try:
                os.unlink(f"{e[6]:016x}.obj", dir_fd=self._c.disk_fd)
            except OSError:
                pass  # the entry goes regardless; the file goes with the disk directory
        self._set_state(index, TOMBSTONE)
        states = self._c.states
        if states[(index + 1) % TABLE_CAP] == EMPTY:
            i = index
            while states[i] == TOMBSTONE:
                self._set_state(i, EMPTY)
                i = (i - 1) % TABLE_CAP

    # ---- liveness -------------------------------------------------------------------------------
    def _slot_alive(self, i: int) -> bool:
        if i == self._c.slot:
            return True
        return _lock_held(self._c, SLOT_LOCK_BASE + i)

    def _reclaim_slot(self, slot: int) -> int:
        """Free what a dead handle held: its reservations and its pins (inside an update)."""
        count = 0
        states = self._c.states
        for i in range(TABLE_CAP):
            if states[i] == RESERVED and self._entry(i)[2] == slot:
                self._tombstone(i)
                count += 1
        for p in range(PIN_CAP):
            if self._c.pin_states[p] == 1 and _PIN.unpack_from(self._c.mm, PIN_OFF + p * 32)[1] == slot:
                self._c.set_pin_state(p, 0)
                count += 1
        struct.pack_into("<I", self._c.mm, SLOT_OFF + slot * 32, 0)
        return count

    def _reclaim_dead(self) -> int:
        dead = [
            i for i in range(SLOT_CAP)
            if struct.unpack_from("<I", self._c.mm, SLOT_OFF + i * 32)[0] == 1 and not self._slot_alive(i)
        ]
        if not dead:
            return 0
        self._c.begin()
        count = sum(self._reclaim_slot(i) for i in dead)
        self._c.end()
        return count

    def _repair(self) -> None:
        """A handle died inside an update: rebuild a consistent table from what is valid."""
        c = self._c
        c.hset("dirty", 1)
        c.cache_epoch = None  # rescanned after the repair
        sealed: dict[bytes, list[tuple[int, int]]] = {}
        for i in range(TABLE_CAP):
            s = c.states[i]
            if s in (EMPTY, TOMBSTONE):
                continue
            if s not in (RESERVED, SEALED):
                self._set_state(i, TOMBSTONE)
                continue
            e = self._entry(i)
            if self._entry_problem(e) is not None:
                self._set_state(i, TOMBSTONE)
            elif s == RESERVED and not self._slot_alive(e[2]):
                self._tombstone(i)
            elif s == SEALED:
                sealed.setdefault(bytes(e[10][: e[3]]), []).append((e[5], i))
        for versions in sealed.values():
            for _, i in sorted(versions)[:-1]:
                self._tombstone(i)
        for p in range(PIN_CAP):
            if c.pin_states[p] == 0:
                continue
            state, slot, chunk, off, length = _PIN.unpack_from(c.mm, PIN_OFF + p * 32)
            size = self._chunk_size(chunk) if chunk < MAX_CHUNKS else 0
            if state != 1 or slot >= SLOT_CAP or off + length > size:
                c.set_pin_state(p, 0)
        c.end()

    # ---- allocation -------------------------------------------------------------------------------
    def _nonempty(self, offset: int, count: int, stride: int) -> list[int]:
        """Indices of table entries whose state is not 0, at C speed (most entries are empty).

        States are small little-endian u32s, so their first byte alone tells empty from used.
        """
        firsts = self._c.mm[offset : offset + count * stride : stride]
        return [m.start() for m in _NONZERO.finditer(firsts)]

    def _tables(self) -> dict[int, dict[tuple[int, int], int]]:
        """The used RAM extents per chunk (entries and pins), from the cache or a rescan."""
        c = self._c
        if c._cache_fresh():
            return c.used
        c.cache_epoch = None
        used: dict[int, dict[tuple[int, int], int]] = {}
        states = c.states
        nonempty = self._nonempty(OBJ_OFF, TABLE_CAP, ENTRY)
        live = 0
        for i in nonempty:
            if states[i] in (RESERVED, SEALED):
                live += 1
                e = _ENTRY_HEAD.unpack_from(c.mm, OBJ_OFF + i * ENTRY)
                if e[1] == RAM:
                    extents = used.setdefault(e[7], {})
                    extents[(e[8], e[9])] = extents.get((e[8], e[9]), 0) + 1
        for p in self._nonempty(PIN_OFF, PIN_CAP, 32):
            state, _, chunk, off, length = _PIN.unpack_from(c.mm, PIN_OFF + p * 32)
            if state == 1 and chunk < MAX_CHUNKS:
                extents = used.setdefault(chunk, {})
                extents[(off, length)] = extents.get((off, length), 0) + 1
        c.used, c.nonempty, c.live, c.cache_epoch = used, len(nonempty), live, c.hget("epoch")
        return used

    def _first_fit(self, length: int) -> tuple[int, int] | None:
        used = self._tables()
        for k, state in enumerate(self._c.chunk_states.tolist()):
            if state != 1:
                continue
            size = self._chunk_size(k)
            pos = 0
            for off, n in sorted(used.get(k, ())):
                if off - pos >= length:
                    return k, pos
                pos = max(pos, off + n)
            if size - pos >= length:
                return k, pos
        return None

    def _grow(self, length: int) -> int | None:
        """Create a new chunk that holds `length` bytes, or None when RAM may not grow."""
        sizes = [self._chunk_size(k) for k in range(MAX_CHUNKS)]
        free = [i for i, s in enumerate(sizes) if s == 0]
        if not free:
            return None
        have = sum(sizes)
        room = max(0, self._c.hget("ram_budget") - have)
        size = min(room, max(length, MIN_CHUNK, have)) // PAGE * PAGE
        if size < length:
            return None
        memory_checked = False
        # A chunk's name is known to every local user (the run id shows in /dev/shm): a name that
        # someone else took is skipped, never removed or opened, and the next free index is tried.
        for k in free:
            path = self.chunk_path(k)
            if self._pool:
                # Already allocated and mapped here: no memory to ask for, no page to fault in.
                leased = _pool.lease(self._shm_dir, length, room, size, path)
                if leased is not None:
                    self._chunk_fds[k], self._chunk_maps[k], got = leased
                    _CHUNK.pack_into(self._c.mm, CHUNK_OFF + k * 32, 0, 0, got)
                    struct.pack_into("<I", self._c.mm, CHUNK_OFF + k * 32, 1)
                    return k
            if not memory_checked:
                if not memory_allows(self._probe, size):
                    # Memory is short: what the pool keeps is the first thing to give back.
                    if release_pool() == 0 or not memory_allows(self._probe, size):
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
                    _fallocate(fd, 0, size)
                except OSError:
                    if release_pool() == 0:
                        raise
                    _fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                return None  # /dev/shm full: the disk tier takes it, never a SIGBUS later
            self._chunk_fds[k] = fd
            _CHUNK.pack_into(self._c.mm, CHUNK_OFF + k * 32, 0, 0, size)
            struct.pack_into("<I", self._c.mm, CHUNK_OFF + k * 32, 1)
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
            if st.st_size < size or st.st_uid != os.geteuid():
                os.close(fd)
                raise CorruptedStoreError(f"run {self._run_id!r}: chunk {k} truncated or not ours")
            self._chunk_fds[k] = fd
        return fd

    def _chunk_map(self, k: int) -> mmap.mmap:
        mm = self._chunk_maps.get(k)
        if mm is None:
            mm = mmap.mmap(self._chunk_fd(k), self._chunk_size(k), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
            self._chunk_maps[k] = mm
        return mm

    # ---- writes --------------------------------------------------------------------------------------
    def reserve(self, key: str, meta: bytes, sizes: Sequence[int]) -> Reservation:
        raw = check_key(key)
        meta = bytes(meta)
        sizes = [int(n) for n in sizes]
        if any(n < 0 for n in sizes) or len(sizes) > 65536:
            raise ValueError("buffer sizes must be non-negative and at most 65536 buffers")
        meta_off, offsets, length = layout(len(meta), sizes)
        c = self._c
        with self._locked():
            place = self._first_fit(length)
            if place is None and self._reclaim_dead():
                place = self._first_fit(length)
            replacing = self._find_sealed(raw) >= 0
            c.begin()
            _killpoint("after_lock")
            try:
                if place is None:
                    k = self._grow(length)
                    if k is not None:
                        place = (k, 0)
                if place is None and self._disk_dir is None:
                    raise StoreFullError(
                        f"run {self._run_id!r}: object {key!r} of {length} bytes does not fit the RAM budget "
                        f"and the run has no disk tier"
                    )
                file_id = c.hget("next_version")
                c.hset("next_version", file_id + 1)
                tier = RAM if place is not None else DISK
                chunk, off = place if place is not None else (0, 0)
                index = self._insert(raw, (tier, c.slot, file_id, chunk, off, length), key, replacing)
            finally:
                c.end()
        try:
            if tier == RAM:
                region = memoryview(self._chunk_map(chunk))[off : off + length]
                mapping = None
            else:
                mapping = self._create_disk_object(file_id, length)
                region = memoryview(mapping)
            _EXT_HEAD.pack_into(region, 0, OBJ_MAGIC, len(sizes), meta_off, len(meta), 0)
            for i, (o, n) in enumerate(zip(offsets, sizes)):
                _BUFDESC.pack_into(region, 32 + 16 * i, o, n)
            region[meta_off : meta_off + len(meta)] = meta
            buffers = [region[o : o + n] for o, n in zip(offsets, sizes)]
        except BaseException:
            try:
                with self._locked(running=False):
                    c.begin()
                    self._tombstone(index)
                    c.end()
            except StoreClosedError:
                pass  # closed meanwhile: its release tombstoned the entry
            raise
        _killpoint("after_reserve")
        return Reservation(self, key, index, file_id, tier, buffers, mapping)

    def _create_disk_object(self, file_id: int, length: int) -> mmap.mmap:
        path, name, dir_fd = self._disk_path(file_id), f"{file_id:016x}.obj", self._c.disk_fd
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        except OSError:
            self._raise_if_finished()
            raise
        try:
            problem = private_file_problem(fd)
            if problem:
                raise StoreAccessError(f"run {self._run_id!r}: new disk file {path} is {problem}")
            try:
                _fallocate(fd, 0, length)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(
                        f"run {self._run_id!r}: disk tier {self._disk_dir} is full "
                        f"({length} bytes needed): {exc.strerror}"
                    ) from None
                raise
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            try:
                os.unlink(name, dir_fd=dir_fd)
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
            fd = os.open(f"{file_id:016x}.obj", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
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

    def _raise_if_finished(self) -> None:
        """RunFinishedError when the owner has ended the run (its files go right after the flag)."""
        if not self._c.released and self._c.hget("flags") & FLAG_FINISHED:
            raise RunFinishedError(f"run {self._run_id!r} has finished: its owner ended it")

    def _own_reserved(self, index: int, file_id: int) -> tuple:
        e = self._valid(index)
        if e[0] != RESERVED or e[2] != self._c.slot or e[6] != file_id:
            raise CorruptedStoreError(f"run {self._run_id!r}: reservation entry {index} changed under its writer")
        return e

    def _seal(self, index: int, file_id: int, key: str) -> int:
        c = self._c
        with self._locked():
            e = self._own_reserved(index, file_id)
            c.begin()
            try:
                raw = bytes(e[10][: e[3]])
                for i in self._probe_path(raw, e[4]):
                    if i != index and c.states[i] == SEALED:
                        self._tombstone(i)
                version = c.hget("next_version")
                c.hset("next_version", version + 1)
                struct.pack_into("<Q", c.mm, OBJ_OFF + index * ENTRY + 24, version)
                self._set_state(index, SEALED)
            finally:
                c.end()
        return version

    def _abort(self, index: int, file_id: int) -> None:
        c = self._c
        with self._locked(running=False):
            self._own_reserved(index, file_id)
            c.begin()
            self._tombstone(index)
            c.end()

    def put(self, key: str, meta: bytes, buffers: Sequence[Any]) -> int:
        views = []
        for b in buffers:
            v = memoryview(b)
            if not v.c_contiguous:
                raise ValueError("put() needs C-contiguous buffers")
            views.append(v if v.ndim == 1 and v.format == "B" else v.cast("B"))
        res = self.reserve(key, meta, [v.nbytes for v in views])
        try:
            for dst, src in zip(res.buffers, views):
                dst[:] = src
        except BaseException:
            res.abort()
            raise
        return res.seal()

    # ---- reads -------------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, list[memoryview], dict[str, Any]]:
        raw = check_key(key)
        c = self._c
        with self._locked():
            index = self._find_sealed(raw)
            if index < 0:
                raise UnknownKeyError(f"no object {key!r} in run {self._run_id!r}")
            e = self._valid(index)
            tier, version, file_id, chunk, off, length = e[1], e[5], e[6], e[7], e[8], e[9]
            where = f"run {self._run_id!r}, object {key!r}"
            if tier == RAM and length < SMALL_OBJECT_BYTES:
                data = _aligned_copy(memoryview(self._chunk_map(chunk))[off : off + length])
                return self._views(data, length, where, version, tier, False)
            if tier == RAM:
                extent = (chunk, off, length)
                rec = c.pins.get(extent)
                if rec is None:
                    p = next((i for i, s in enumerate(c.pin_states.tolist()) if s == 0), None)
                    if p is None:
                        raise StoreFullError(
                            f"run {self._run_id!r}: pin table full ({PIN_CAP} live views of distinct objects); "
                            f"cannot load {key!r} zero-copy: drop views of other loads, or load a copy")
                    c.begin()
                    _PIN.pack_into(c.mm, PIN_OFF + p * 32, 0, c.slot, chunk, off, length)
                    c.set_pin_state(p, 1)
                    c.end()
                    rec = c.pins[extent] = [0, p]
                rec[0] += 1
                fd = self._chunk_fd(chunk)
            else:
                fd = self._open_disk_object(file_id, key)
        if tier == DISK:
            try:
                if os.fstat(fd).st_size < length:
                    raise CorruptedStoreError(f"{where}: disk file truncated")
                if length < SMALL_OBJECT_BYTES:
                    data = _aligned_copy(os.pread(fd, length, 0))
                    return self._views(data, length, where, version, tier, False)
                mm = mmap.mmap(fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            return self._views(mm, length, where, version, tier, True)
        try:
            mm, data = _map_private(fd, off, length)
        except BaseException:
            c.release_pin(extent)
            raise
        weakref.finalize(mm, c.release_pin, extent)
        return self._views(data, length, where, version, tier, True)

    @staticmethod
    def _views(data: Any, length: int, where: str, version: int, tier: int, zero_copy: bool):
        meta, bufs = parse_extent(data, length, where)
        whole = memoryview(data)
        views = [whole[o : o + n] for o, n in bufs]
        return meta, views, {"version": version, "tier": TIER_NAMES[tier], "zero_copy": zero_copy}

    def contains(self, key: str) -> bool:
        raw = check_key(key)
        with self._locked():
            return self._find_sealed(raw) >= 0

    __contains__ = contains

    def delete(self, key: str) -> bool:
        raw = check_key(key)
        c = self._c
        with self._locked():
            index = self._find_sealed(raw)
            if index < 0:
                return False
            c.begin()
            self._tombstone(index)
            c.end()
            return True

    def keys(self) -> list[str]:
        with self._locked():
            out = []
            for i, s in enumerate(self._c.states.tolist()):
                if s == SEALED:
                    e = self._valid(i)
                    out.append(bytes(e[10][: e[3]]).decode())
            return sorted(out)

    def info(self, key: str) -> dict[str, Any]:
        raw = check_key(key)
        with self._locked():
            index = self._find_sealed(raw)
            if index < 0:
                raise UnknownKeyError(f"no object {key!r} in run {self._run_id!r}")
            e = self._valid(index)
            tier, version, file_id, chunk, off, length = e[1], e[5], e[6], e[7], e[8], e[9]
            where = f"run {self._run_id!r}, object {key!r}"
            if tier == RAM:
                meta_len, bufs = parse_directory(memoryview(self._chunk_map(chunk))[off : off + length], length, where)[1:]
            else:
                with open(self._open_disk_object(file_id, key), "rb") as fh:
                    if os.fstat(fh.fileno()).st_size < length:
                        raise CorruptedStoreError(f"{where}: disk file truncated")
                    with mmap.mmap(fh.fileno(), length, mmap.MAP_PRIVATE, mmap.PROT_READ) as mm:
                        meta_len, bufs = parse_directory(mm, length, where)[1:]
        return {
            "key": key, "tier": TIER_NAMES[tier], "version": version, "size": length, "nbuf": len(bufs),
            "nbytes": sum(n for _, n in bufs), "meta_len": meta_len,
            "chunk": chunk if tier == RAM else None, "offset": off,
        }

    def stats(self) -> dict[str, Any]:
        c = self._c
        with self._locked():
            self._reclaim_dead()
            out: dict[str, Any] = {"run_id": self._run_id, "objects_ram": 0, "objects_disk": 0, "bytes_ram": 0,
                   "bytes_disk": 0, "reserved": 0}
            for i, s in enumerate(c.states.tolist()):
                if s == RESERVED:
                    out["reserved"] += 1
                elif s == SEALED:
                    e = self._valid(i)
                    name = TIER_NAMES[e[1]]
                    out[f"objects_{name}"] += 1
                    out[f"bytes_{name}"] += e[9]
            sizes = [self._chunk_size(k) for k in range(MAX_CHUNKS)]
            pins = [_PIN.unpack_from(c.mm, PIN_OFF + p * 32) for p, s in enumerate(c.pin_states.tolist()) if s == 1]
            out.update(
                ram_capacity=sum(sizes), ram_budget=c.hget("ram_budget"), chunks=sum(1 for s in sizes if s),
                pins=len(pins), pinned_bytes=sum(p[4] for p in pins),
                slots_used=sum(struct.unpack_from("<I", c.mm, SLOT_OFF + i * 32)[0] == 1 for i in range(SLOT_CAP)),
                epoch=c.hget("epoch"), next_version=c.hget("next_version"),
            )
            return out

    def reclaim(self) -> int:
        with self._locked(running=False):
            return self._reclaim_dead()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def mark_finished(self) -> None:
        with self._locked(running=False):
            c = self._c
            c.hset("flags", c.hget("flags") | FLAG_FINISHED)

    def close(self) -> None:
        """Detach. Views handed out stay valid; the slot and pins go when the last one does."""
        if self._closed:
            return
        self._closed = True
        self._finish_close()

    def _finish_close(self) -> None:
        _live_stores.discard(self)
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
        with _Locked(self):
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
        with _Locked(self):
            c._drain()  # pins of views collected meanwhile go first
            self._reclaim_dead()
            if any(struct.unpack_from("<I", c.mm, SLOT_OFF + i * 32)[0] == 1
                   for i in range(SLOT_CAP) if i != c.slot):
                return
            if not memory_allows(self._probe, 0):
                release_pool()  # memory is short: give back what the pool keeps too
                return
            busy = set()
            for i in self._nonempty(OBJ_OFF, TABLE_CAP, ENTRY):
                e = _ENTRY_HEAD.unpack_from(c.mm, OBJ_OFF + i * ENTRY)
                if e[0] == RESERVED and e[1] == RAM:
                    busy.add(e[7])
            for p in self._nonempty(PIN_OFF, PIN_CAP, 32):
                state, _, chunk, _, _ = _PIN.unpack_from(c.mm, PIN_OFF + p * 32)
                if state == 1:
                    busy.add(chunk)
            for k, state in enumerate(c.chunk_states.tolist()):
                if state != 1 or k in busy:
                    continue
                mm = self._chunk_map(k)
                if _pool.give(self._shm_dir, self.chunk_path(k), self._chunk_fds[k], mm, self._chunk_size(k)):
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


class _Locked:
    __slots__ = ("_store", "_running")

    def __init__(self, store: Store, running: bool = False):
        self._store = store
        self._running = running

    def __enter__(self) -> None:
        c = self._store._c
        c.lock()
        try:
            self._store._repair_if_dirty()
            if self._running:
                self._store._raise_if_finished()
        except BaseException:
            c.unlock()
            raise

    def __exit__(self, *exc: object) -> None:
        self._store._c.unlock()


def _validate_header(head: bytes, file_size: int, run_id: str) -> None:
    if head[:8] != MAGIC:
        raise CorruptedStoreError(f"run {run_id!r}: not a discomfort store (bad magic {head[:8]!r})")
    version = struct.unpack_from("<I", head, 8)[0]
    if version != FORMAT_VERSION:
        raise CorruptedStoreError(
            f"run {run_id!r}: segment format version {version}, this build reads version {FORMAT_VERSION}"
        )
    for name, want in _EXPECTED.items():
        off, fmt = _H[name]
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
              or not disk_dir.endswith(f"/dcf-{run_id}".encode())):
        raise CorruptedStoreError(f"run {run_id!r}: disk directory {disk_dir!r} is not this run's")
    stored = head[112:176].rstrip(b"\0")
    if stored != run_id.encode():
        raise CorruptedStoreError(f"run {run_id!r}: header names run {stored!r}")


def remove_run_files(shm_dir: str, run_id: str, disk_dir: str | None, disk_fd: int = -1) -> None:
    """Unlink a run's chunks, lock files (portable mode), disk directory and control segment: only
    our own names, and only files of ours (a name another user planted stays; it must not stop
    the removal of the rest). `disk_fd`: the run directory, when the caller has it open.

    The control segment goes last, so a sweep that dies half-way is finished by the next one.
    """
    prefix = f"dcf-{run_id}."
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith(prefix) and _RUN_FILE_SUFFIX.fullmatch(name, len(prefix)):
            unlink_own_leftover(os.path.join(shm_dir, name))
    if disk_dir and os.path.basename(disk_dir) == f"dcf-{run_id}":
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
        os.unlink(os.path.join(shm_dir, f"dcf-{run_id}"))
    except FileNotFoundError:
        pass


# ---- the chunk pool -------------------------------------------------------------------------------
class _Pool:
    """RAM chunks that finished runs of this process gave back (docs/FORMAT.md, "Chunk pool").

    Their pages exist and are mapped here already, so a later run that leases one writes into it
    without a page fault. Files are named for the pool, held with flock(LOCK_SH) while pooled and
    unlinked at exit. The native core keeps a pool of its own.
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

    def lease(self, shm_dir: str, low: int, high: int, want: int, path: str):
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
                    _rename_noreplace(pool_path, path)
                except FileExistsError:
                    # Left by a creator that died before recording it (as in _grow); a name
                    # someone else took keeps the pooled file for another name.
                    if not unlink_own_leftover(path):
                        self.entries.append(entry)
                        self.bytes += size
                        return None
                    _rename_noreplace(pool_path, path)
            except OSError:
                _unlink_quiet(pool_path)
                _drop_mapping(fd, mm)
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
                _rename_noreplace(path, to)
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
                _unlink_quiet(path)
                _drop_mapping(fd, mm)
            return released

    def info(self) -> dict[str, Any]:
        with self.lock:
            files = [{"path": path, "size": size, "inode": os.fstat(fd).st_ino}
                     for _, path, fd, _, size in self.entries]
            return {"prefix": self.prefix, "bytes": self.bytes,
                    "limit": self.largest_budget if self.limit is None else self.limit, "files": files}

    def forget_in_child(self) -> None:
        """After fork: the parent's files are the parent's (closing our copies of their
        descriptors leaves its flock alone)."""
        self.lock = threading.Lock()
        for _, _, fd, mm, _ in self.entries:
            _drop_mapping(fd, mm)
        self.entries, self.bytes, self.prefix = [], 0, ""


_renameat2: Any = None
if PLATFORM.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        pass


def _rename_noreplace(src: str, dst: str) -> None:
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


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _drop_mapping(fd: int, mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # still exported somewhere: it goes when that does
    os.close(fd)


_pool = _Pool()


def pool_info() -> dict[str, Any]:
    """This process's pool of chunks given back by finished runs: prefix, bytes, limit, files."""
    return _pool.info()


def release_pool() -> int:
    """Unlink every pooled chunk; returns the bytes given back."""
    return _pool.release()


def set_pool_limit(nbytes: int | None) -> None:
    """The most bytes the pool keeps; None: the largest RAM budget of a pooling store."""
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"limit must be a non-negative int, not {nbytes!r}")
    with _pool.lock:
        _pool.limit = nbytes


# The pool's files go with the process; runs destroyed after this give nothing back.
atexit.register(_pool.release, True)


_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _forget_in_child() -> None:
    """A forked child inherits descriptors that share the parent's locks: let go of them."""
    _pool.forget_in_child()
    for store in list(_live_stores):
        store._closed = True
        c = store._c
        c.released = True
        for fd in store._chunk_fds.values():
            os.close(fd)
        store._chunk_fds.clear()
        c.states.release()
        c.pin_states.release()
        c.chunk_states.release()
        try:
            c.mm.close()
        except BufferError:
            pass
        c.close_fds()  # our copies only: the parent's locks stay (its descriptors remain open)
    _live_stores.clear()


# The pool's lock is held across fork() so that the child's copy of the pool is consistent; the
# child then gets a new lock (looked up at each fork: the child replaces it). No fork on Windows.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _pool.lock.acquire(), after_in_parent=lambda: _pool.lock.release(),
                        after_in_child=_forget_in_child)
