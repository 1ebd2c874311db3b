"""Facts about the system a run lives on: the store mode, where segments go, private
directories, the host's memory, and memory for bytes arriving from a socket. The bottom layer: imports nothing of discomfort but errors and _settings.

Test hook: DISCOMFORT_TEST_PLATFORM=darwin|win32 behaves as on that system (read once at import;
sets PLATFORM, hence MODE): "darwin" runs the portable mode on Linux, "win32" refuses local stores.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no local store there (MODE "unsupported")
    fcntl = None  # type: ignore[assignment]

from . import _settings
from .errors import UnsupportedPlatformError

PLATFORM = _settings.get("DISCOMFORT_TEST_PLATFORM") or sys.platform


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


# ---- memory -------------------------------------------------------------------------------------

def read_meminfo(path: str) -> dict[str, int]:
    """A file in /proc/meminfo format as {field: bytes}; {} when it cannot be read."""
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


@dataclass(frozen=True)
class Cgroup:
    limit: int | None
    usage: int | None


def cgroup_memory(root: str = "/sys/fs/cgroup") -> Cgroup:
    """The cgroup v2 memory limit and usage of this process, when there is a limit."""
    try:
        with open(os.path.join(root, "memory.max")) as fh:
            raw = fh.read().strip()
        limit = None if raw == "max" else int(raw)
        with open(os.path.join(root, "memory.current")) as fh:
            usage = int(fh.read())
        return Cgroup(limit, usage)
    except (OSError, ValueError):
        return Cgroup(None, None)


# Smaller buffers: a bytearray. glibc serves them from its heap up to its largest mmap threshold
# (32 MiB), where a freed value's pages are often reused already faulted: faster than either.
PREFAULT_MIN = 32 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_madvise: Any = None


def receive_buffer(n: int) -> bytearray | mmap.mmap:
    """Writable, private memory for ``n`` bytes that a socket is about to fill.

    Fresh pages cost more than the copy into them (a fault and zeroing per 4 KiB: ~1.5–2 µs,
    i.e. under 2 GB/s). For a large buffer a helper thread populates the pages
    (``MADV_POPULATE_WRITE``, which never changes their contents) while the socket fills them
    from the front, so the faults run beside the copy instead of inside it.
    """
    if n < PREFAULT_MIN or not PLATFORM.startswith("linux"):
        return bytearray(n)
    # private anonymous (the default, MAP_SHARED, is shmem: slower faults), page-aligned, no memset
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    threading.Thread(target=_populate, args=(buf, n), name="discomfort-prefault", daemon=True).start()
    return buf


def _populate(buf: mmap.mmap, n: int, step: int = 4 << 20) -> None:
    global _madvise
    import ctypes

    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _madvise = fn
    anchor = ctypes.c_char.from_buffer(buf)  # holds the mapping for as long as this runs
    try:
        base = ctypes.addressof(anchor)
        for off in range(0, n, step):
            if _madvise(base + off, min(step, n - off), _MADV_POPULATE_WRITE) != 0:
                return  # an older kernel (EINVAL): the copy faults the pages itself
    finally:
        del anchor
