"""The steps a run of workflows is made of: reading and converting workflows, finding their
ports, the prompts as they are sent, choosing how values reach the executor.

:mod:`discomfort.sequential` (``Run``, ``run_sequential``) puts them together.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Mapping, Protocol

from .. import _settings
from ..errors import UnknownKeyError, WorkflowError
from .format import (
    INPUT,
    LOADER_CLASS,
    PORT_CLASS,
    Control,
    Port,
    discover_port_nodes,
    discover_ports,
    is_ui_format,
    load_workflow,
    stitch,  # noqa: F401  (discover_ports, load_workflow, stitch: format's, also importable from here as before)
    ui_to_api,
)

__all__ = [
    "Executor",
    "prepare_prompt",
    "resolve_executor",
    "choose_transport",
    "read_workflows",
    "plan_workflows",
    "port_io",
    "missing_inputs_error",
    "workflow_names",
]

log = logging.getLogger("discomfort")

TRANSPORTS = _settings.TRANSPORTS


class Executor(Protocol):
    """What runs a prompt: :class:`~discomfort.comfy.InProcessComfy` or :class:`~discomfort.comfy.ComfyServer`."""

    def execute(self, prompt: dict, timeout: float | None = ...) -> dict: ...


def resolve_executor(executor: Any = None) -> Any:
    """An executor from ``executor``: an object with ``execute``, a server URL, or None.

    None means ComfyUI in this process, from ``$DISCOMFORT_COMFYUI``, run as its ``main.py`` would
    run it (:class:`~discomfort.comfy.InProcessComfy`: its GPU, custom nodes, models and folders;
    see docs/COMFYUI.md), or the one this process has already loaded.
    """
    if executor is None:
        path = _settings.get("DISCOMFORT_COMFYUI")
        if not path:
            raise ValueError(
                "no executor given and DISCOMFORT_COMFYUI is not set: pass executor=InProcessComfy(path), "
                "a ComfyServer, or a server URL"
            )
        from ..comfy import InProcessComfy

        return InProcessComfy(path)
    if isinstance(executor, str):
        if executor.startswith(("http://", "https://")):
            from ..comfy import ComfyServer

            return ComfyServer(executor)
        raise ValueError(f"executor {executor!r}: expected a server URL (http://...) or an executor object")
    if not callable(getattr(executor, "execute", None)):
        raise TypeError(f"executor {executor!r} has no execute(prompt, timeout=...) method")
    return executor


def prepare_prompt(prompt: Mapping, run_id: str, ports: Mapping[str, Port] | None = None) -> dict:
    """The prompt as run_sequential sends it: a copy in which every INPUT port is a
    DiscomfortDataLoader carrying ``run_id`` and ``unique_id`` (same node id, so its consumers
    keep their links), and every other port carries ``run_id`` and its mode.
    """
    out = copy.deepcopy(dict(prompt))
    nodes = discover_port_nodes(out) if ports is None else ports
    for nid, port in nodes.items():
        entry = out[nid]
        if port.mode == INPUT:
            title = ((entry.get("_meta") or {}).get("title")) or PORT_CLASS
            out[nid] = {
                "class_type": LOADER_CLASS,
                "inputs": {"run_id": run_id, "unique_id": port.unique_id},
                "_meta": {"title": f"{title} (loader)"},
            }
        else:
            entry.setdefault("inputs", {})
            entry["inputs"]["run_id"] = run_id
            entry["inputs"]["port_mode"] = port.mode
    return out


def read_workflows(workflows: Any) -> list:
    """One workflow or several (dicts, or paths of JSON files) as a non-empty list of dicts."""
    if isinstance(workflows, (str, os.PathLike, Mapping)):
        workflows = [workflows]
    items = []
    for workflow in workflows:
        if isinstance(workflow, (str, os.PathLike)):
            with open(workflow, encoding="utf-8") as f:
                workflow = json.load(f)
        items.append(workflow)
    if not items:
        raise ValueError("no workflows given")
    return items


def plan_workflows(items: list, object_info: Mapping | None, controls: list[list[Control]] | None = None
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """API prompts of ``items``, their port nodes and their ports by unique_id. ``controls``: a
    list that receives, per workflow, the "control after generate" of each sent UI widget value.

    Refuses a workflow in which several ports write one key: each key needs one writer.
    """
    prompts = []
    for w in items:
        found: list[Control] = []
        if object_info is not None and isinstance(w, Mapping) and is_ui_format(w):
            prompts.append(ui_to_api(w, object_info, controls=found))
        else:
            prompts.append(load_workflow(w, object_info))
        if controls is not None:
            controls.append(found)
    port_nodes = [discover_port_nodes(p, object_info) for p in prompts]
    port_keys = [discover_ports(p, object_info) for p in prompts]
    for k, keys in enumerate(port_keys):
        for uid, port in keys.items():
            if len(port.output_node_ids) > 1:
                raise WorkflowError(
                    f"workflow {k}: unique_id {uid!r} is written by several ports "
                    f"(nodes {', '.join(port.output_node_ids)}); each key needs one writer"
                )
    return prompts, port_nodes, port_keys


def port_io(port_keys: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """Per workflow, the keys it reads (an INPUT port that feeds some node) and the keys it writes."""
    reads = [[uid for uid, port in keys.items() if port.reads and port.consumers] for keys in port_keys]
    writes = [[uid for uid, port in keys.items() if port.writes] for keys in port_keys]
    return reads, writes


def missing_inputs_error(k: int, missing: list[str], run_id: str) -> UnknownKeyError:
    """The error for workflow ``k`` reading keys nothing has stored yet."""
    return UnknownKeyError(
        f"workflow {k} reads {', '.join(repr(m) for m in missing)} but no value is stored "
        f"under {'that key' if len(missing) == 1 else 'those keys'} in run {run_id!r}: "
        "pass it in inputs= or write it with an OUTPUT port of an earlier workflow"
    )


def choose_transport(executor: Any, transport: str | None = None) -> tuple[str, str]:
    """How values reach ``executor``'s nodes: ``("shm" | "http", why)``.

    ``transport``: "auto" (default; also ``$DISCOMFORT_TRANSPORT``), "shm" or "http". An executor
    without ``host_info()`` (ComfyUI in this process, or a wrapper) always shares memory. For a
    server, "auto" compares its ``GET /discomfort/host_info`` with this process's
    (:func:`~discomfort.comfy.same_host`: keyed digests of boot id, uid and /dev/shm device
    and inode, made for a fresh nonce, so the server reveals nothing else);
    "http" uses the HTTP routes without asking; "shm" raises
    :class:`~discomfort.errors.WorkflowError` when the server says it cannot share memory.
    """
    requested = transport if transport is not None else _settings.get("DISCOMFORT_TRANSPORT")
    requested = str(requested).strip().lower()
    if requested not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {requested!r}")
    ask = getattr(executor, "host_info", None)
    url = getattr(executor, "url", None)
    if not callable(ask):
        if requested == "http":
            raise ValueError(
                f"transport='http' needs a ComfyUI server executor (ComfyServer or a URL); {executor!r} "
                "runs in this process and always shares its memory"
            )
        return "shm", "ComfyUI runs in this process"
    if requested == "http":
        if not url:
            raise ValueError(f"transport='http': the executor {executor!r} has no server url")
        return "http", "transport='http' was requested"
    from ..sysinfo import host_differences, host_info

    try:
        remote = ask()
    except Exception as exc:
        raise WorkflowError(
            f"cannot tell whether the ComfyUI server {url or executor!r} shares memory with this process "
            f"(GET /discomfort/host_info failed: {exc}); is the discomfort node pack installed there? "
            "Pass transport='shm' or 'http' to decide without asking"
        ) from exc
    try:
        why = host_differences(host_info(remote.get("nonce")), remote)
    except (ValueError, AttributeError):
        why = ["the server's answer carries no valid nonce (an older node pack?)"]
    if not why:
        return "shm", "the server shares this host, user and /dev/shm"
    if requested == "shm":
        raise WorkflowError(
            f"transport='shm', but the ComfyUI server {url or executor!r} cannot share memory with this "
            f"process: {'; '.join(why)}. Use transport='http' (or 'auto')"
        )
    if not url:
        raise WorkflowError(f"the executor {executor!r} cannot share memory ({'; '.join(why)}) and has no url "
                            "for the HTTP transport")
    return "http", f"the server cannot share memory with this process: {'; '.join(why)}"


def workflow_names(workflows: Any) -> list[str]:
    """Names to report workflows by: a file's name, else ``workflow <index>``."""
    if isinstance(workflows, (str, os.PathLike, Mapping)):
        workflows = [workflows]
    return [os.path.basename(os.fspath(w)) if isinstance(w, (str, os.PathLike)) else f"workflow {k}"
            for k, w in enumerate(workflows)]
