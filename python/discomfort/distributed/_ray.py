"""Connecting to Ray: the one place that decides how this process joins a cluster."""

from __future__ import annotations

import logging
import threading
from typing import Any

from .. import _settings

NAMESPACE = "discomfort"
"""Ray namespace of the run directories (every process looks them up there explicitly)."""

ACTOR_PREFIX = "discomfort-run-"
"""Name of a run's directory actor: ``discomfort-run-<run_id>``."""

ENV_NODE_IP = "DISCOMFORT_RAY_NODE_IP"
"""Set by the server pool for its ComfyUI processes: the IP of the Ray node to join (several
nodes may share one host, as in tests; Ray would otherwise pick the head node)."""

_lock = threading.Lock()


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "discomfort.distributed needs Ray: pip install 'ray[default]' (the shared-memory "
            "WorkflowContext needs nothing more)"
        ) from exc
    return ray


def ensure_connected(address: str | None = None, *, start_local: bool = True, quiet: bool = False) -> Any:
    """``ray`` after making sure this process is connected to a cluster.

    Already connected: nothing changes (``address`` is then ignored). Else ``address``, or
    ``$RAY_ADDRESS``; with neither, ``start_local`` starts a single-node Ray here (what a plain
    ``ray.init()`` does), otherwise ConnectionError. ``quiet`` (ComfyUI servers): no worker logs
    forwarded, warnings only.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    with _lock:
        if ray.is_initialized():
            return ray
        target = address or _settings.get("RAY_ADDRESS")
        if target is None and not start_local:
            raise ConnectionError("this process is not connected to a Ray cluster and RAY_ADDRESS is not set")
        kwargs: dict[str, Any] = {}
        node_ip = _settings.get(ENV_NODE_IP)
        if target is not None and node_ip:
            kwargs["_node_ip_address"] = node_ip
        if quiet:
            kwargs.update(log_to_driver=False, logging_level=logging.WARNING)
        ray.init(address=target, **kwargs)
    return ray


def node_id() -> str:
    return import_ray().get_runtime_context().get_node_id()


def gcs_address() -> str:
    return import_ray().get_runtime_context().gcs_address
