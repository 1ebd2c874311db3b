"""Runs that span machines: a Ray-backed run context and run_sequential on a pool of ComfyUI servers.

On one machine the shared-memory :class:`~discomfort.WorkflowContext` is the default and the
fastest path. When one machine is not enough (several GPU boxes, each running ComfyUI), the same
API runs on a Ray cluster:

* :class:`RayContext` has the :class:`~discomfort.WorkflowContext` API (``save``, ``load``,
  ``keys``, ``delete``, ``info``, ``stats``, ``with`` lifecycle). Values go into Ray's object
  store, encoded by :mod:`discomfort.codecs` (tensors and arrays out of band, never pickled in
  band); the run's ``unique_id -> object`` directory is a named Ray actor, so any process of the
  cluster finds the run by its id. Ray run ids start with ``ray-``: ``discomfort.get_context``
  hands such ids to :func:`get_ray_context`.
* :func:`run_sequential_ray` runs workflows on a :class:`RayComfyPool`: ComfyUI servers with the
  node pack, one per node or GPU, each started by a Ray actor on its node. It and :class:`RayRun`
  run :mod:`discomfort.engine`'s loop, the one ``Run`` runs; :class:`RayPlacement` only says
  where each workflow runs (with retry and adoption).

Ray is optional (``pip install "ray[default]"``); nothing here imports it until it is used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..context import RAY_RUN_PREFIX
from ..errors import ServerDiedError, UnknownRunError, ValueLostError

if TYPE_CHECKING:  # the module imports Ray
    from ._context import RayContext

__all__ = [
    "RAY_RUN_PREFIX",
    "RayContext",
    "RayComfyPool",
    "run_sequential_ray",
    "RayRun",
    "RayPlacement",
    "WorkflowEvent",
    "ValueLostError",
    "ServerDiedError",
    "get_ray_context",
    "is_ray_run_id",
    "ray_available",
]

_LAZY = {
    "RayContext": "._context",
    "RayComfyPool": "._pool",
    "run_sequential_ray": "._runner",
    "RayRun": "._runner",
    "RayPlacement": "._runner",
    "WorkflowEvent": "._runner",
}


def is_ray_run_id(run_id: object) -> bool:
    """Whether ``run_id`` names a run in a Ray cluster (it starts with ``ray-``)."""
    return isinstance(run_id, str) and run_id.startswith(RAY_RUN_PREFIX)


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def get_ray_context(run_id: str) -> RayContext:
    """The :class:`RayContext` of a Ray run: held by this process, else attached by its id.

    This is what ``discomfort.get_context`` calls for ``ray-`` ids (from inside a ComfyUI node,
    for example). A process that is not yet connected to Ray connects to ``$RAY_ADDRESS`` (the
    pool sets it for its ComfyUI servers); it never starts a cluster of its own. Raises
    :class:`~discomfort.errors.UnknownRunError` when Ray is not installed, no cluster can be
    reached, or the run does not exist (any more).
    """
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise UnknownRunError(
            f"run {run_id!r} is a Ray run (its id starts with {RAY_RUN_PREFIX!r}), but Ray is not installed "
            f"for {sys.executable}: pip install 'ray[default]' (or use a WorkflowContext run)"
        ) from exc
    from ._context import attach_or_get

    return attach_or_get(run_id)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'discomfort.distributed' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module, __name__), name)
    except ImportError as exc:
        if not ray_available():
            raise ImportError(
                f"discomfort.distributed.{name} needs Ray: pip install 'ray[default]'"
            ) from exc
        raise
