"""Facts about the system a run lives on: the store mode, where segments go, private
directories, the host's memory, and memory for bytes arriving from a socket. The bottom layer: imports nothing of discomfort but errors and _settings.

Test hook: DISCOMFORT_TEST_PLATFORM=darwin|win32 behaves as on that system (read once at import;
sets PLATFORM, hence MODE): "darwin" runs the portable mode on Linux, "win32" keeps every run in
the process-local store (discomfort._localstore).
"""

from __future__ import annotations

import mmap
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no shared store there (MODE "local")
    fcntl = None  # type: ignore[assignment]

from . import _settings
from .errors import UnsupportedPlatformError

PLATFORM = _settings.get("DISCOMFORT_TEST_PLATFORM") or sys.platform


def _store_mode() -> str:
    """How this system keeps a run (docs/FORMAT.md, "Portable mode"; docs/PLATFORMS.md):

    "shm": Linux: segments in /dev/shm, OFD byte-range locks, posix_fallocate.
    "portable": another POSIX system (macOS), or Linux without /dev/shm or OFD locks: segments are
        regular files in a private temp directory, locks are flock() on lock files.
    "local": Windows (no fcntl, no POSIX shared mappings): no cross-process store; every run is
        kept in the process that creates it (discomfort._localstore).
    """
    if PLATFORM == "win32" or fcntl is None:
        return "local"
    if PLATFORM.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and os.path.isdir("/dev/shm"):
        return "shm"
    return "portable"


MODE = _store_mode()
#: Whether another process can attach to this system's runs (the shared store runs here).
SHARED = MODE != "local"


def user_tag() -> str:
    """This user, for names in the temp directory: the effective uid on POSIX, else (Windows) the
    login name made safe for a file name."""
    if hasattr(os, "geteuid"):
        return str(os.geteuid())
    try:
        import getpass

        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in the environment: the temp dir is the user's own
        name = ""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "user"


def user_temp_dir() -> str:
    """This user's folder in the temp directory (not created here)."""
    return os.path.join(tempfile.gettempdir(), f"discomfort-{user_tag()}")


#: Where runs keep their control segments and RAM chunks by default.
SHM_DIR = os.path.join(user_temp_dir(), "segments") if MODE == "portable" else "/dev/shm"


def private_dir(path: str) -> str:
    """Make `path` (mode 0700) unless it exists; refuse it unless it is a real directory of ours
    (on Windows, where there are no uids, a real directory: the temp directory is the user's)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    mine = st.st_uid == os.geteuid() if hasattr(os, "geteuid") else True
    if not mine or not os.path.isdir(path) or os.path.islink(path):
        raise PermissionError(f"{path} is not a private directory of this user")
    return path


def prepare_shm_dir(shm_dir: str) -> None:
    """In portable mode, make the default segment directory (and its parent) on first use."""
    if MODE == "portable" and shm_dir == SHM_DIR:
        private_dir(os.path.dirname(shm_dir))
        private_dir(shm_dir)


def require_local_store() -> None:
    """Raise UnsupportedPlatformError where no shared (cross-process) store can run (Windows)."""
    if MODE == "local":
        name = "Windows" if PLATFORM == "win32" else PLATFORM
        raise UnsupportedPlatformError(
            f"discomfort cannot keep a shared (cross-process) store on {name} ({PLATFORM}): it needs POSIX "
            "shared file mappings and fcntl locks. Runs there are kept in the process that creates them "
            "(WorkflowContext(store='local'), the default there): use ComfyUI in that process "
            "(discomfort.comfy.InProcessComfy), or reach a ComfyUI server over HTTP (run_sequential(..., "
            "transport='http'), discomfort.remote.RemoteContext); or run discomfort under WSL2"
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
    """The cgroup v2 memory limit and usage of this process, when there is a limit (Linux)."""
    if not sys.platform.startswith("linux") and root == "/sys/fs/cgroup":
        return Cgroup(None, None)
    try:
        with open(os.path.join(root, "memory.max")) as fh:
            raw = fh.read().strip()
        limit = None if raw == "max" else int(raw)
        with open(os.path.join(root, "memory.current")) as fh:
            usage = int(fh.read())
        return Cgroup(limit, usage)
    except (OSError, ValueError):
        return Cgroup(None, None)


def memory_available(meminfo: str = "/proc/meminfo") -> tuple[int | None, int | None]:
    """(available, total) bytes of memory: ``meminfo`` (a file in /proc/meminfo format), or on
    Windows, unless another file is named, GlobalMemoryStatusEx; (None, None) without an answer."""
    if sys.platform.startswith("linux") or meminfo != "/proc/meminfo":
        info = read_meminfo(meminfo)
        return info.get("MemAvailable"), info.get("MemTotal")
    if sys.platform != "win32":
        return None, _physical_memory()  # macOS: no /proc; what is free is not told without vm_stat
    try:
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = _Status()
        status.dwLength = ctypes.sizeof(_Status)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None, None
        return int(status.ullAvailPhys), int(status.ullTotalPhys)
    except Exception:  # noqa: BLE001 - no answer: the caller's default applies
        return None, None


def _physical_memory() -> int | None:
    """The machine's memory from sysconf (macOS and other POSIX systems), None without an answer."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return total if total > 0 else None


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
