"""Test-only: the calls of the platform hook (see _dcf_simhook): who is calling, and the
wrappers that refuse a call of discomfort's own code the way Windows or macOS would."""

from __future__ import annotations

import errno
import os
import posixpath
import stat as _stat
import sys
import sysconfig

PLATFORM = ""  # set by _dcf_simhook.install
REAL = {}  # name -> the real callable this hook wraps
_OWN_DIRS: list[str] = []  # realpaths whose code counts as the package's (the node pack folder)
_HOOK_FILES = {os.path.join(os.path.dirname(os.path.abspath(__file__)), f)
               for f in ("_dcf_simcalls.py", "_dcf_simhook.py")}  # frames counted as the standard library
_STDLIB = tuple({os.path.realpath(sysconfig.get_paths()["stdlib"]) + "/", sysconfig.get_paths()["stdlib"] + "/"})
_file_cache: dict[str, str] = {}  # co_filename -> "own" | "std" | "other"
_MISSING_ROOTS = ("/dev/shm", "/proc", "/sys")
refused: list[str] = []  # what this process refused, newest last

# ---------------------------------------------------------------- what the calls need of a system

WIN_O = {"O_RDONLY": 0, "O_WRONLY": 1, "O_RDWR": 2, "O_APPEND": 0x8, "O_RANDOM": 0x10, "O_SEQUENTIAL": 0x20,
         "O_TEMPORARY": 0x40, "O_NOINHERIT": 0x80, "O_CREAT": 0x100, "O_TRUNC": 0x200, "O_EXCL": 0x400,
         "O_SHORT_LIVED": 0x1000, "O_TEXT": 0x4000, "O_BINARY": 0x8000}
_LINUX_ONLY_FCNTL_CMDS = {36, 37, 38, 1031, 1032, 1033, 1034, 1024, 1025, 1026, 1027, 10, 11}
MAC_LIBC_MISSING = {"renameat2", "fallocate", "fallocate64", "posix_fallocate", "posix_fallocate64", "memfd_create",
                    "posix_fadvise", "prctl", "eventfd", "splice", "copy_file_range", "sched_getaffinity",
                    "gettid", "syncfs", "mremap", "pidfd_open", "statx"}
MAC_PAGE = 16384  # Apple silicon


# --------------------------------------------------------------------------------------- callers

def _kind(filename: str) -> str:
    kind = _file_cache.get(filename)
    if kind is None:
        if filename in _HOOK_FILES or filename.startswith("<frozen") or (
                filename.startswith(_STDLIB) and "-packages/" not in filename):
            kind = "std"  # before realpath: on 3.10 it calls os.lstat, whose wrapper asks here again
        elif any(os.path.realpath(filename).startswith(d) for d in _OWN_DIRS if filename.startswith("/")):
            kind = "own"
        else:
            kind = "other"
        _file_cache[filename] = kind
    return kind


def _is_own(frame) -> bool:
    g = frame.f_globals
    name = g.get("__name__") or ""
    if name.startswith("discomfort"):
        return True
    spec = g.get("__spec__")
    if spec is not None and (getattr(spec, "name", "") or "").startswith("discomfort"):
        return True
    return _kind(frame.f_code.co_filename) == "own"


def direct_caller_is_own(depth: int = 2) -> bool:
    """The frame that called the wrapper (``depth`` up from here) is the package's."""
    return _is_own(sys._getframe(depth))


def caller_frame(depth: int = 2):
    """The first frame, from ``depth`` up, outside the standard library (and this hook)."""
    f = sys._getframe(depth)
    while f is not None and _kind(f.f_code.co_filename) == "std" and not _is_own(f):
        f = f.f_back
    return f


def from_package(depth: int = 3) -> bool:
    f = caller_frame(depth)
    return f is not None and _is_own(f)


def _refuse(exc: BaseException, what: str, depth: int = 3) -> BaseException:
    f = caller_frame(depth)
    where = f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"
    line = f"{PLATFORM}: {what} at {where}"
    refused.append(line)
    _log(line)
    return exc


def _log(line: str) -> None:
    log = os.environ.get("DISCOMFORT_SIM_LOG")
    if log:
        with REAL["open"](log, "a") as fh:
            fh.write(line + "\n")


# ------------------------------------------------------------------------------------ paths

def _gone(path) -> bool:
    """A path under a root this system does not have (/dev/shm, /proc, /sys)."""
    try:
        p = os.fspath(path)
    except TypeError:
        return False  # a file descriptor
    if isinstance(p, bytes):
        p = p.decode("utf-8", "surrogateescape")
    if not p.startswith("/"):
        return False
    p = posixpath.normpath(p)
    return any(p == r or p.startswith(r + "/") for r in _MISSING_ROOTS)


def _not_found(path, what: str) -> OSError:
    return _refuse(FileNotFoundError(errno.ENOENT, f"No such file or directory (not on {PLATFORM})", os.fspath(path)),
                   f"{what}({os.fspath(path)!r})", 4)


def _path_wrapper(name: str, nargs: int = 1):
    real = REAL[f"os.{name}"] = getattr(os, name)

    def wrapper(*args, **kw):
        for p in args[:nargs]:
            if _gone(p) and from_package():
                raise _not_found(p, f"os.{name}")
        if PLATFORM == "win32" and any(kw.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")) \
                and from_package():
            raise _refuse(NotImplementedError("dir_fd unavailable on this platform"), f"os.{name}(dir_fd=...)")
        return real(*args, **kw)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__wrapped__ = real
    return wrapper


def _open_builtin(file, *args, **kw):
    if not isinstance(file, int) and _gone(file) and from_package(2):
        raise _not_found(file, "open")
    if isinstance(file, int) and file in _TEXT_FDS and from_package(2):
        raise _refuse(OSError(errno.EINVAL, f"fd {file} was opened by os.open without O_BINARY: on Windows it is "
                                            "in text mode and its line ends are translated"), "open(text-mode fd)", 2)
    f = REAL["open"](file, *args, **kw)
    if _TEXT_FDS and not isinstance(file, int):
        _TEXT_FDS.discard(f.fileno())
    return f


# ---------------------------------------------------------------------- win32: files held open

_TEXT_FDS: set[int] = set()  # fds the package opened without O_BINARY (win32: text mode)


def _held_open(path) -> bool:
    """Some process of this user has the file open or mapped (Windows refuses to delete it then)."""
    try:
        st = REAL["stat"](path, follow_symlinks=False)
    except OSError:
        return False
    if not _stat.S_ISREG(st.st_mode):
        return False
    me = (st.st_dev, st.st_ino)
    for pid in REAL["listdir"]("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = REAL["listdir"](f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                s = REAL["stat"](f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == me:
                return True
    return False


def _sharing_violation(path, what: str) -> OSError:
    return _refuse(PermissionError(errno.EACCES, "[WinError 32] The process cannot access the file because it is "
                                                 "being used by another process", os.fspath(path)), what, 4)


def _remove_wrapper(name: str):
    inner = _path_wrapper(name)

    def wrapper(path, *args, **kw):
        if PLATFORM == "win32" and kw.get("dir_fd") is None and from_package() and _held_open(path):
            raise _sharing_violation(path, f"os.{name}({os.fspath(path)!r}) of a file held open")
        return inner(path, *args, **kw)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def _rename_wrapper(name: str):
    inner = _path_wrapper(name, 2)

    def wrapper(src, dst, *args, **kw):
        if PLATFORM == "win32" and kw.get("src_dir_fd") is None and kw.get("dst_dir_fd") is None and from_package():
            for p in (src, dst):
                if _held_open(p):
                    raise _sharing_violation(p, f"os.{name}({os.fspath(src)!r}, {os.fspath(dst)!r}) of a file held open")
            if name == "rename" and os.path.lexists(dst):
                raise _refuse(FileExistsError(errno.EEXIST, "[WinError 183] Cannot create a file when that file "
                                                            "already exists", os.fspath(dst)), "os.rename onto a file", 3)
        return inner(src, dst, *args, **kw)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def _win_os_open(path, flags, mode=0o777, *, dir_fd=None):
    """os.open as a package module calls it under win32: Windows' O_* values, no directories."""
    if not direct_caller_is_own():
        return REAL["os_open"](path, flags, mode, dir_fd=dir_fd)
    if _gone(path):
        raise _not_found(path, "os.open")
    if dir_fd is not None:
        raise _refuse(NotImplementedError("dir_fd unavailable on this platform"), "os.open(dir_fd=...)")
    unknown = flags & ~sum(WIN_O.values()) & ~0x70000
    if unknown:
        raise _refuse(OSError(errno.EINVAL, f"os.open flags {flags:#x}: bits {unknown:#x} are no Windows O_* flag "
                                            "(a Linux constant?)", os.fspath(path)), "os.open(Linux flags)")
    lin = flags & 3
    for win, real in (("O_APPEND", os.O_APPEND), ("O_CREAT", os.O_CREAT), ("O_TRUNC", os.O_TRUNC),
                      ("O_EXCL", os.O_EXCL), ("O_NOINHERIT", os.O_CLOEXEC)):
        if flags & WIN_O[win]:
            lin |= real
    if os.path.isdir(path):
        raise _refuse(PermissionError(errno.EACCES, "Permission denied (Windows opens no directory with os.open)",
                                      os.fspath(path)), "os.open(directory)")
    fd = REAL["os_open"](path, lin, mode)
    if flags & WIN_O["O_BINARY"]:
        _TEXT_FDS.discard(fd)
    else:
        _TEXT_FDS.add(fd)
    return fd


def _fd_io(name: str):
    real = REAL[name] = getattr(os, name)

    def wrapper(fd, *args):
        if fd in _TEXT_FDS and direct_caller_is_own():
            raise _refuse(OSError(errno.EINVAL, f"fd {fd} was opened without O_BINARY: on Windows os.{name} would "
                                                "translate its line ends"), f"os.{name}(text-mode fd)")
        return real(fd, *args)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def _close(fd):
    _TEXT_FDS.discard(fd)
    return REAL["close"](fd)


def _stat_for_package(name: str):
    """os.stat / lstat / fstat as on Windows: st_uid and st_gid are 0 (no owners in stat), and the
    permission bits say only read-only or not (0o444 / 0o666; directories 0o777 / 0o555)."""
    real = getattr(os, name)

    def wrapper(*args, **kw):
        st = real(*args, **kw)
        if not direct_caller_is_own():
            return st
        vals = list(st)
        vals[4] = vals[5] = 0
        perm = 0o444 | (0o222 if st.st_mode & 0o200 else 0) | (0o111 if _stat.S_ISDIR(st.st_mode) else 0)
        vals[0] = _stat.S_IFMT(st.st_mode) | perm
        extra = {k: getattr(st, k) for k in ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns",
                                             "st_ctime_ns")}
        return os.stat_result(vals, extra)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


# ------------------------------------------------------------------------ processes and signals

def _absent(module: str, name: str, walk: bool):
    """``walk``: refused for the standard library working for the package too (os.fork under
    multiprocessing); else only for a direct call (the standard library guards its own calls with
    hasattr on the real module, and would not make them on that system)."""
    real = REAL[f"{module}.{name}"] = getattr(sys.modules[module], name)

    def wrapper(*args, **kw):
        if from_package(2) if walk else direct_caller_is_own():
            raise _refuse(AttributeError(f"module {module!r} has no attribute {name!r} (not on {PLATFORM})"),
                          f"{module}.{name}", 2)
        return real(*args, **kw)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def _kill(pid, sig):
    if from_package(2):
        if sig == 0:
            raise _refuse(OSError(errno.EINVAL, "os.kill(pid, 0) is no liveness check on Windows: it terminates "
                                                "the process (TerminateProcess)"), "os.kill(pid, 0)", 2)
        if sig not in (0, 1):  # CTRL_C_EVENT, CTRL_BREAK_EVENT aside, Windows terminates the process
            sig = 9
    return REAL["kill"](pid, sig)


def _send_signal(self, sig):
    if from_package(2):
        import signal as _signal

        if sig in (_signal.SIGTERM, _signal.SIGKILL):  # terminate() and kill() alike: TerminateProcess,
            sig = _signal.SIGKILL                       # no handler runs in the child
        elif sig not in (0, 1):  # CTRL_C_EVENT, CTRL_BREAK_EVENT
            raise _refuse(ValueError(f"Unsupported signal: {sig}"), f"Popen.send_signal({sig})", 2)
    return REAL["send_signal"](self, sig)


def _popen_init(self, *args, **kw):
    if from_package(2):
        if kw.get("preexec_fn") is not None:
            raise _refuse(ValueError("preexec_fn is not supported on Windows platforms"), "Popen(preexec_fn=)", 2)
        if kw.get("pass_fds"):
            raise _refuse(ValueError("pass_fds not supported on Windows."), "Popen(pass_fds=)", 2)
    return REAL["Popen.__init__"](self, *args, **kw)


def _select(rlist, wlist, xlist, *timeout):
    if from_package(2):
        for f in [*rlist, *wlist, *xlist]:
            fd = f if isinstance(f, int) else f.fileno()
            if not _stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise _refuse(OSError(errno.ENOTSOCK, "[WinError 10038] An operation was attempted on something "
                                                      "that is not a socket"), "select.select(non-socket)", 2)
    return REAL["select"](rlist, wlist, xlist, *timeout)


# ------------------------------------------------------------------------------ mmap and ctypes

def _mmap_classes():
    import mmap

    class WinMmap(mmap.mmap):
        """mmap as on Windows: (fileno, length, tagname=None, access=..., offset=0), offsets in 64 KiB."""

        def __new__(cls, fileno, length, tagname=None, access=mmap.ACCESS_DEFAULT, offset=0):
            if tagname is not None and not isinstance(tagname, str):
                raise _refuse(TypeError(f"mmap() argument 'tagname' must be str or None, not {type(tagname).__name__}"
                                        " (flags/prot are POSIX only)"), "mmap(flags)", 2)
            if offset % 65536:
                raise _refuse(OSError(errno.EINVAL, "[WinError 1132] The base address or the file offset specified "
                                                    "does not have the proper alignment"), "mmap(offset % 64 KiB)", 2)
            return super().__new__(cls, fileno, length, access=access, offset=offset)

        def __getattribute__(self, name):
            if name == "madvise":
                raise AttributeError("'mmap.mmap' object has no attribute 'madvise' (not on win32)")
            return super().__getattribute__(name)

    class MacMmap(mmap.mmap):
        """mmap as on macOS (Apple silicon): offsets in 16 KiB pages, no resize (no mremap)."""

        def __new__(cls, fileno, length, *args, **kw):
            offset = kw.get("offset", args[3] if len(args) > 3 else 0)
            if offset % MAC_PAGE:
                raise _refuse(OSError(errno.EINVAL, "Invalid argument (mmap offset not a multiple of 16 KiB)"),
                              "mmap(offset % 16 KiB)", 2)
            return super().__new__(cls, fileno, length, *args, **kw)

        def resize(self, newsize):
            raise _refuse(SystemError("mmap: resizing not available--no mremap()"), "mmap.resize", 2)

    return WinMmap, MacMmap


def _ctypes_cdll():
    import ctypes

    class SimCDLL(ctypes.CDLL):
        def __init__(self, name, *args, **kw):
            if PLATFORM == "win32" and name is None:
                raise _refuse(TypeError("LoadLibrary() argument 1 must be str, not None"), "ctypes.CDLL(None)", 2)
            if name is not None and (".so" in os.fspath(name) if PLATFORM != "linux" else False):
                raise _refuse(OSError(f"dlopen({name}): image not found"), f"ctypes.CDLL({name!r})", 2)
            super().__init__(name, *args, **kw)

        def __getattr__(self, name):
            if PLATFORM == "darwin" and name in MAC_LIBC_MISSING:
                raise _refuse(AttributeError(f"dlsym(RTLD_DEFAULT, {name}): symbol not found"), f"libc.{name}", 2)
            return super().__getattr__(name)

    return SimCDLL


def _fcntl_view_fn(real):
    def fcntl_(fd, cmd, *args):
        if cmd in _LINUX_ONLY_FCNTL_CMDS:
            raise _refuse(OSError(errno.EINVAL, "Invalid argument (a Linux-only fcntl command)"), f"fcntl({cmd})", 2)
        return real(fd, cmd, *args)

    return fcntl_


def _shm_open_wrapper(real):
    def shm_open(path, flags, mode=0o777):
        if from_package(2):
            if PLATFORM == "win32":
                raise _refuse(AttributeError("_posixshmem is not on win32"), "_posixshmem.shm_open", 2)
            if len(path) > 31:
                raise _refuse(OSError(errno.ENAMETOOLONG, "File name too long (macOS: 31 bytes)", path),
                              "shm_open(long name)", 2)
        return real(path, flags, mode)

    return shm_open


def _shm_unlink_wrapper(real):
    def shm_unlink(path):
        if PLATFORM == "win32" and from_package(2):
            raise _refuse(AttributeError("_posixshmem is not on win32"), "_posixshmem.shm_unlink", 2)
        return real(path)

    return shm_unlink
