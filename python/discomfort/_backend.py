"""Chooses the store implementation: the C++ core, the pure-Python twin, or the process-local store.

DISCOMFORT_BACKEND=auto|native|python picks the shared store's (auto: native when it loads).
DISCOMFORT_REQUIRE_NATIVE=1 turns a missing core into an import error instead of a fallback.
The core is for Linux with /dev/shm only: elsewhere (the store's portable mode on macOS; see
_platform.MODE) it is never loaded, and auto means python. Where no shared store can run
(Windows, MODE "local"), auto means "local": discomfort._localstore, whose runs stay in the
process that creates them.

Each backend module says which it is (BACKEND: "native", "python" or "local"), and so do its
Store objects (`store.backend`). `module()` is the backend this process chose, `module(name)` a
named one.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from . import _settings
from ._platform import MODE, PLATFORM, SHARED
from .errors import BackendUnavailableError

VALID = _settings.BACKENDS  # DISCOMFORT_BACKEND

_chosen: ModuleType | None = None
_chosen_lock = threading.Lock()


def _require_native() -> bool:
    return bool(_settings.get("DISCOMFORT_REQUIRE_NATIVE"))


def requested() -> str:
    return str(_settings.get("DISCOMFORT_BACKEND"))  # ValueError naming it and the valid ones


def _import_core() -> ModuleType:
    if MODE != "shm":
        # Its locks and placement are Linux's: mixed with the Python store's portable mode, they
        # would not exclude each other.
        raise BackendUnavailableError(
            f"the native core discomfort._core runs on Linux with /dev/shm only; on this system ({PLATFORM}) "
            f"the store is pure Python ({MODE} mode)"
        )
    try:
        return importlib.import_module("discomfort._core")
    except ImportError as exc:
        # Fall back only when the core module itself is what is missing or broken; an import
        # error raised from inside it for another module propagates.
        if exc.name not in (None, "discomfort._core"):
            raise
        raise BackendUnavailableError(f"the native core discomfort._core could not be loaded: {exc}") from exc


def load(name: str) -> ModuleType:
    """Return the store module of backend `name` ("native", "python" or "local")."""
    if name == "native":
        return _import_core()
    if name == "python":
        return importlib.import_module("discomfort._pystore")
    if name == "local":
        return importlib.import_module("discomfort._localstore")
    raise ValueError(f"unknown backend {name!r}; use one of: native, python, local")


def select() -> tuple[str, ModuleType]:
    """The backend this process uses, by the environment: (its name, its module)."""
    want = requested()
    if want == "python":
        if _require_native():
            raise BackendUnavailableError(
                "DISCOMFORT_REQUIRE_NATIVE=1 conflicts with DISCOMFORT_BACKEND=python"
            )
        return "python", load("python")
    try:
        return "native", load("native")
    except BackendUnavailableError:
        if want == "native" or _require_native():
            raise
    if not SHARED:
        return "local", load("local")
    return "python", load("python")


def module(name: str | None = None) -> ModuleType:
    """The store module of backend `name`; None: the one this process chose (selected once, on
    first use: `import discomfort` does it)."""
    global _chosen
    if name is not None:
        return load(name)
    if _chosen is None:
        with _chosen_lock:
            if _chosen is None:
                _chosen = select()[1]
    return _chosen


def name() -> str:
    """Which backend this process chose: "native", "python" or "local"."""
    return module().BACKEND


def available() -> list[str]:
    """The backends a run can use here: the shared store's that load, else (Windows) "local"."""
    if not SHARED:
        return ["local"]
    names = []
    for backend in ("native", "python"):
        try:
            load(backend)
        except BackendUnavailableError:
            continue
        names.append(backend)
    return names
