"""Test-only: take away, from the discomfort package's own code, what Windows or macOS lacks.

Installed by ``sitecustomize.py`` in this folder (put first on a fresh process's PYTHONPATH with
``DISCOMFORT_TEST_PLATFORM=win32|darwin``), before anything imports discomfort. The package still
learns its system from ``DISCOMFORT_TEST_PLATFORM`` (``discomfort._platform``); this hook is what
makes a POSIX/Linux-only call fail there, as it would on that system. No package code reads a flag:

- ``import fcntl`` (and the other missing modules) made by a package module raises
  ModuleNotFoundError; ``import os``/``mmap``/``signal``/``select``/``sys``/``ctypes``/``fcntl``
  gives a package module a view of the real module without the names that system lacks (so
  ``hasattr(os, "fork")`` is False there) and, for win32, Windows' ``O_*`` values, ``mmap``'s
  signature and 64 KiB offset granularity, and ``os.name == "nt"``.
- Calls into the real modules are checked against their caller, the first frame outside the
  standard library (so ``shutil.rmtree`` or ``multiprocessing`` called by the package count as the
  package's own): paths under /dev/shm, /proc and /sys do not exist; ``os.fork``, ``_posixshmem``,
  ``dir_fd=``, deleting or renaming a file some process holds open or mapped (Windows' sharing
  rule), ``os.kill(pid, 0)`` (it terminates the process on Windows)... raise.

Callers outside the package (ComfyUI, torch, aiohttp, the standard library on its own, tests) see
the real modules, untouched. What was refused is appended to ``$DISCOMFORT_SIM_LOG`` when set.
"""

from __future__ import annotations

import builtins
import importlib
import io
import os
import sys
import types

import _dcf_simcalls as calls
from _dcf_simcalls import (
    MAC_PAGE, REAL, WIN_O, _OWN_DIRS, _absent, _close, _ctypes_cdll, _fcntl_view_fn, _fd_io, _is_own, _kill, _log,
    _mmap_classes, _open_builtin, _path_wrapper, _popen_init, _refuse, _remove_wrapper, _rename_wrapper, _select,
    _send_signal, _shm_open_wrapper, _shm_unlink_wrapper, _stat_for_package, _win_os_open, from_package,
)

PLATFORM = ""

# --------------------------------------------------------------------------- what each system has

# Everything Windows' os module has (CPython 3.11, nt); every other public name of Linux's is hidden.
WIN_OS = set("""
abc sys st GenericAlias Mapping MutableMapping PathLike DirEntry error environ getenv putenv unsetenv
fsencode fsdecode fspath get_exec_path name path curdir pardir sep altsep extsep pathsep linesep defpath devnull
SEEK_SET SEEK_CUR SEEK_END F_OK R_OK W_OK X_OK TMP_MAX P_WAIT P_NOWAIT P_NOWAITO P_DETACH P_OVERLAY
abort access chdir chmod close closerange cpu_count device_encoding dup dup2 execl execle execlp execlpe execv
execve execvp execvpe fdopen fstat fsync ftruncate get_handle_inheritable get_inheritable get_terminal_size getcwd
getcwdb getlogin getpid getppid isatty kill link listdir lseek lstat makedirs mkdir open pipe popen read readlink
remove removedirs rename renames replace rmdir scandir set_handle_inheritable set_inheritable spawnl spawnle spawnv
spawnve startfile stat stat_result statvfs_result strerror supports_bytes_environ supports_dir_fd
supports_effective_ids supports_fd supports_follow_symlinks symlink system terminal_size times times_result
truncate umask uname_result unlink urandom utime waitpid waitstatus_to_exitcode walk write add_dll_directory
""".split())
# Windows' O_* values (msvcrt); os.open called by the package translates them to Linux's.
WIN_SIGNALS = {"SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM"}
WIN_MISSING_MODULES = {"fcntl", "_posixshmem", "resource", "pwd", "grp", "termios", "tty", "pty", "posix",
                       "syslog", "crypt", "spwd", "nis", "_posixsubprocess", "multiprocessing.resource_tracker"}

MAC_OS_MISSING = {"posix_fallocate", "posix_fadvise", "memfd_create", "sched_getaffinity", "sched_setaffinity",
                  "pipe2", "getrandom", "eventfd", "eventfd_read", "eventfd_write", "pidfd_open", "splice",
                  "copy_file_range", "fdatasync", "waitid", "getresuid", "getresgid", "setresuid", "setresgid",
                  "getxattr", "setxattr", "listxattr", "removexattr", "O_DIRECT", "O_NOATIME", "O_PATH",
                  "O_TMPFILE", "O_LARGEFILE", "O_RSYNC", "unshare", "setns", "sched_getscheduler"}
MAC_OS_MISSING |= {n for n in dir(os) if n.startswith(("RWF_", "MFD_", "GRND_", "EFD_", "SPLICE_", "POSIX_FADV_",
                                                        "XATTR_", "CLONE_", "P_PIDFD"))}
MAC_FCNTL_MISSING = {n for n in ("F_OFD_GETLK", "F_OFD_SETLK", "F_OFD_SETLKW", "F_SETPIPE_SZ", "F_GETPIPE_SZ",
                                 "F_ADD_SEALS", "F_GET_SEALS", "F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW",
                                 "F_SEAL_WRITE", "F_SEAL_FUTURE_WRITE", "F_NOTIFY", "F_SETLEASE", "F_GETLEASE",
                                 "F_SETSIG", "F_GETSIG", "F_EXLCK", "F_SHLCK", "F_GETLK64", "F_SETLK64",
                                 "F_SETLKW64", "LOCK_MAND", "LOCK_READ", "LOCK_WRITE", "LOCK_RW")}
MAC_FCNTL_MISSING |= {n for n in ("DN_ACCESS", "DN_ATTRIB", "DN_CREATE", "DN_DELETE", "DN_MODIFY", "DN_MULTISHOT",
                                  "DN_RENAME")}
MAC_MMAP_MISSING = {"MAP_POPULATE", "MAP_DENYWRITE", "MAP_EXECUTABLE", "MAP_STACK", "MADV_POPULATE_READ",
                    "MADV_POPULATE_WRITE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "MADV_DONTFORK", "MADV_DOFORK",
                    "MADV_REMOVE", "MADV_HWPOISON", "MADV_MERGEABLE", "MADV_UNMERGEABLE", "MADV_DONTDUMP",
                    "MADV_DODUMP", "MADV_WIPEONFORK", "MADV_KEEPONFORK", "MADV_SOFT_OFFLINE", "MADV_COLD",
                    "MADV_PAGEOUT"}
# glibc symbols a ctypes lookup finds on Linux but not in macOS's libSystem.


# ---------------------------------------------------------------------------------- module views

class ModuleView(types.ModuleType):
    """A real module without the names this system lacks, with some replaced."""

    def __init__(self, real: types.ModuleType, hidden: set[str], extra: dict) -> None:
        super().__init__(real.__name__, real.__doc__)
        for k in ("__spec__", "__loader__", "__package__", "__file__", "__path__"):
            if hasattr(real, k):
                self.__dict__[k] = getattr(real, k)
        self.__dict__["_real"], self.__dict__["_hidden"], self.__dict__["_extra"] = real, hidden, extra

    def __getattr__(self, name: str):
        if name in self._extra:
            return self._extra[name]
        if name in self._hidden:
            raise AttributeError(f"module {self._real.__name__!r} has no attribute {name!r} (not on {PLATFORM})")
        return getattr(self._real, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._real, name, value)

    def __dir__(self):
        return sorted((set(dir(self._real)) - self._hidden) | set(self._extra))


VIEWS: dict[str, types.ModuleType] = {}


def _view(name: str, real: types.ModuleType) -> types.ModuleType:
    v = VIEWS.get(name)
    return v if v is not None else real


def _missing(name: str) -> bool:
    return PLATFORM == "win32" and name in WIN_MISSING_MODULES


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (name in VIEWS or name in WIN_MISSING_MODULES or name.split(".")[0] in VIEWS) \
            and _is_own(sys._getframe(1)):
        if _missing(name):
            raise _refuse(ModuleNotFoundError(f"No module named {name!r}", name=name), f"import {name}", 2)
        mod = REAL["__import__"](name, globals, locals, fromlist, level)
        if not fromlist:
            return _view(name.split(".")[0], mod)
        return _view(name, mod)
    return REAL["__import__"](name, globals, locals, fromlist, level)


def _import_module(name, package=None):
    if from_package(2) and _missing(name):
        raise _refuse(ModuleNotFoundError(f"No module named {name!r}", name=name), f"import {name}", 2)
    mod = REAL["import_module"](name, package)
    return _view(name, mod) if from_package(2) else mod


# ------------------------------------------------------------------------------------- install

def _own_dirs() -> list[str]:
    import importlib.util

    dirs = [os.path.realpath(p) for p in os.environ.get("DISCOMFORT_SIM_OWN", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("discomfort")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(os.path.realpath(loc))
    return [d.rstrip("/") + "/" for d in dirs]


def _put(module: types.ModuleType, name: str, wrapper) -> None:
    """Replace ``module.name`` by ``wrapper``, as a staticmethod: callable like the builtin it
    replaces and, like a builtin, not bound when a class keeps it (Python 3.10's pathlib keeps
    ``stat = os.stat`` on a class). os.supports_* list the wrapper wherever they list the real one."""
    real, wrapped = getattr(module, name), staticmethod(wrapper)
    setattr(module, name, wrapped)
    if module is os:
        for group in (os.supports_fd, os.supports_dir_fd, os.supports_follow_symlinks, os.supports_effective_ids):
            if real in group:
                group.add(wrapped)


def install(platform: str) -> None:
    """Take away what ``platform`` (win32 or darwin) lacks from the package's own code."""
    global PLATFORM
    import ctypes
    import fcntl
    import mmap
    import select
    import signal
    import subprocess

    if "discomfort" in sys.modules:
        raise RuntimeError("the platform hook must be installed before discomfort is imported")
    if platform not in ("win32", "darwin"):
        raise ValueError(f"DISCOMFORT_TEST_PLATFORM={platform!r}: the hook knows win32 and darwin")
    if PLATFORM:
        return
    PLATFORM = calls.PLATFORM = platform
    _OWN_DIRS[:] = _own_dirs()
    REAL["__import__"], REAL["import_module"], REAL["open"] = builtins.__import__, importlib.import_module, builtins.open
    REAL["stat"], REAL["listdir"], REAL["os_open"], REAL["close"] = os.stat, os.listdir, os.open, os.close
    REAL["kill"], REAL["select"] = os.kill, select.select
    win = platform == "win32"

    # calls into the real modules, checked against the caller
    for name in ("stat", "lstat", "listdir", "scandir", "statvfs", "access", "mkdir", "rmdir", "truncate", "chmod",
                 "utime", "readlink", "chown", "makedirs"):
        if hasattr(os, name):
            _put(os, name, _path_wrapper(name))
    for name in ("unlink", "remove"):
        _put(os, name, _remove_wrapper(name))
    for name in ("rename", "replace", "link", "symlink"):
        _put(os, name, _rename_wrapper(name))
    _put(os, "open", _path_wrapper("open"))
    REAL["os_open"] = os.open
    _put(builtins, "open", _open_builtin)
    io.open = builtins.open
    walked = ["fork", "forkpty", "memfd_create", "posix_fallocate"] if win else ["memfd_create", "posix_fallocate"]
    direct = ["register_at_fork", "geteuid", "getuid", "pread", "pwrite", "killpg", "setsid"] if win else []
    for name in walked + direct:
        if hasattr(os, name):
            _put(os, name, _absent("os", name, name in walked))
    try:
        import _posixshmem

        _put(_posixshmem, "shm_open", _shm_open_wrapper(_posixshmem.shm_open))
        _put(_posixshmem, "shm_unlink", _shm_unlink_wrapper(_posixshmem.shm_unlink))
    except ImportError:
        pass
    if win:
        _put(os, "kill", _kill)
        REAL["send_signal"], REAL["Popen.__init__"] = subprocess.Popen.send_signal, subprocess.Popen.__init__
        subprocess.Popen.send_signal = _send_signal
        subprocess.Popen.__init__ = _popen_init
        _put(select, "select", _select)
        _put(os, "read", _fd_io("read"))
        _put(os, "write", _fd_io("write"))
        _put(os, "close", _close)
        for name in ("stat", "lstat", "fstat"):
            _put(os, name, _stat_for_package(name))
        # Windows' shutil walks trees by path: it has no dir_fd functions (shutil decided that at its
        # import, with Linux's os, before this hook)
        import shutil

        shutil._use_fd_functions = False  # type: ignore[attr-defined]

    # the package's own view of some modules (what `import X` in a package module gives)
    win_mmap, mac_mmap = _mmap_classes()
    if win:
        os_hidden = {n for n in dir(os) if not n.startswith("_") and n not in WIN_OS and n not in WIN_O}
        VIEWS["os"] = ModuleView(os, os_hidden, {**WIN_O, "name": "nt", "open": _win_os_open,
                                                  "supports_dir_fd": set(), "supports_fd": {os.stat, os.truncate},
                                                  "supports_follow_symlinks": {os.stat}})
        mmap_hidden = {n for n in dir(mmap) if n.startswith(("MAP_", "PROT_", "MADV_"))}
        VIEWS["mmap"] = ModuleView(mmap, mmap_hidden, {"mmap": win_mmap, "ALLOCATIONGRANULARITY": 65536})
        VIEWS["signal"] = ModuleView(signal, {n for n in dir(signal) if n.startswith("SIG") and "_" not in n
                                              and n not in WIN_SIGNALS} | {
            "alarm", "pause", "setitimer", "getitimer", "siginterrupt", "pthread_kill", "pthread_sigmask",
            "sigpending", "sigwait", "sigwaitinfo", "sigtimedwait", "ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF",
            "SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK", "pidfd_send_signal"},
            {"SIGBREAK": 21, "CTRL_C_EVENT": 0, "CTRL_BREAK_EVENT": 1})
        VIEWS["select"] = ModuleView(select, {"poll", "epoll", "devpoll", "kqueue", "POLLIN", "POLLOUT", "EPOLLIN",
                                              "EPOLLOUT", "PIPE_BUF"}, {})
        VIEWS["sys"] = ModuleView(sys, set(), {"platform": "win32"})
    else:
        VIEWS["os"] = ModuleView(os, {n for n in MAC_OS_MISSING if hasattr(os, n)}, {})
        VIEWS["fcntl"] = ModuleView(fcntl, MAC_FCNTL_MISSING, {"fcntl": _fcntl_view_fn(fcntl.fcntl)})
        VIEWS["mmap"] = ModuleView(mmap, MAC_MMAP_MISSING, {"mmap": mac_mmap, "PAGESIZE": MAC_PAGE,
                                                             "ALLOCATIONGRANULARITY": MAC_PAGE})
        VIEWS["select"] = ModuleView(select, {n for n in dir(select) if n.startswith("EPOLL")} | {"epoll"}, {})
        VIEWS["sys"] = ModuleView(sys, set(), {"platform": "darwin"})
    VIEWS["ctypes"] = ModuleView(ctypes, set(), {"CDLL": _ctypes_cdll()})
    builtins.__import__ = _import
    importlib.import_module = _import_module
    argv = " ".join(" ".join(sys.orig_argv[1:4]).split())  # on one line
    _log(f"{PLATFORM}: hook installed in {argv[:120]}")


def install_from_environment() -> None:
    platform = os.environ.get("DISCOMFORT_TEST_PLATFORM", "").strip()
    if platform:
        install(platform)
