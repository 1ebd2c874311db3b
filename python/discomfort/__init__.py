"""discomfort: fast hand-off of tensors and other values between ComfyUI workflows."""

from __future__ import annotations

from . import _aliases, _backend, errors
from ._version import __version__
from .errors import *  # noqa: F403

_aliases.install()  # discomfort.cli_run, discomfort.workflow_format, ...: see _aliases.MOVED

backend: str = _backend.name()
"""Which store implementation is active: "native" (the C++ core), "python", or "local" (Windows:
the process-local store)."""

# How runs are kept here: "shm" (Linux: /dev/shm), "portable" (macOS and other POSIX systems:
# file-backed segments in a private temp directory) or "local" (Windows: no shared store, runs are
# kept in the process that creates them).
from ._platform import MODE as store_mode  # noqa: E402

Store = _backend.module().Store

from .context import RAY_RUN_PREFIX, WorkflowContext, get_context, release_pool  # noqa: E402  (needs the backend chosen above)
from .run_control import CancelToken, ProgressEvent  # noqa: E402
from .runs import RunContext, register_resolver  # noqa: E402

# Ray run ids are found through the cluster; the Ray package is imported only when one is met.
register_resolver(RAY_RUN_PREFIX, "discomfort.distributed:get_ray_context")


def __getattr__(name: str):
    # run_sequential, Run and run_parallel pull in the workflow tooling; load it on first use, not at import.
    if name in ("run_sequential", "Run"):
        from . import sequential

        return getattr(sequential, name)
    if name in ("run_parallel", "RunEvent"):
        from . import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module 'discomfort' has no attribute {name!r}")


__all__ = [
    "backend", "store_mode", "Store", "WorkflowContext", "RunContext", "get_context", "release_pool",
    "run_sequential", "Run", "run_parallel", "RunEvent",
    "CancelToken", "ProgressEvent", "register_resolver", "errors", "__version__",
    *errors.__all__,
]
