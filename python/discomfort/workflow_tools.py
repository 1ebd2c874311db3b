"""run_sequential: run ComfyUI workflows in sequence and in loops, values passing through a store.

Every call owns one :class:`~discomfort.WorkflowContext` (a per-run, ephemeral object store) in a
``with`` block. Ports save into it from inside ComfyUI, DataLoaders read from it, and the prompts
only ever carry the run id and the keys: never payload data.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Protocol

from .errors import UnknownKeyError, WorkflowError
from .workflow_format import (
    INPUT,
    LOADER_CLASS,
    PORT_CLASS,
    Port,
    discover_port_nodes,
    discover_ports,
    is_ui_format,
    load_workflow,
    stitch,
)

__all__ = [
    "Executor",
    "run_sequential",
    "prepare_prompt",
    "discover_ports",
    "stitch",
    "load_workflow",
    "resolve_executor",
]


class Executor(Protocol):
    """What runs a prompt: :class:`~discomfort.comfy.InProcessComfy` or :class:`~discomfort.comfy.ComfyServer`."""

    def execute(self, prompt: dict, timeout: float | None = ...) -> dict: ...


def resolve_executor(executor: Any = None) -> Any:
    """An executor from ``executor``: an object with ``execute``, a server URL, or None.

    None means ComfyUI in this process, from ``$DISCOMFORT_COMFYUI`` (the path
    ``scripts/setup_comfyui.py`` prints).
    """
    if executor is None:
        path = os.environ.get("DISCOMFORT_COMFYUI")
        if not path:
            raise ValueError(
                "no executor given and DISCOMFORT_COMFYUI is not set: pass executor=InProcessComfy(path), "
                "a ComfyServer, or a server URL"
            )
        from .comfy import InProcessComfy

        return InProcessComfy(path)
    if isinstance(executor, str):
        if executor.startswith(("http://", "https://")):
            from .comfy import ComfyServer

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


def _as_list(workflows: Any) -> list:
    if isinstance(workflows, (str, os.PathLike)) or isinstance(workflows, Mapping):
        return [workflows]
    return list(workflows)


def _read(workflow: Any) -> Any:
    if isinstance(workflow, (str, os.PathLike)):
        with open(workflow, encoding="utf-8") as f:
            return json.load(f)
    return workflow


def run_sequential(
    workflows: Any,
    inputs: Mapping[str, Any] | None = None,
    iterations: int = 1,
    executor: Any = None,
    *,
    timeout: float | None = None,
    object_info: Mapping | None = None,
    ram_budget: int | str | None = None,
    disk_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``workflows`` one after the other, ``iterations`` times; returns ``{unique_id: value}``.

    ``workflows``: one or several workflows (API or UI format; dicts or JSON files).
    ``inputs``: values for INPUT ports, by unique_id. Every OUTPUT (or PASSTHRU) port saves its
    value under its unique_id; an INPUT port reads the latest value of its unique_id, so the
    outputs of workflow k feed workflow k+1, and those of iteration N feed iteration N+1.
    ``executor``: an :class:`~discomfort.comfy.InProcessComfy`, a
    :class:`~discomfort.comfy.ComfyServer`, a server URL, or None (ComfyUI in this process, from
    ``$DISCOMFORT_COMFYUI``).

    The result holds the last value of every key a port wrote; it stays valid after the run's
    store is gone. The store lives only inside this call.
    """
    from .context import WorkflowContext

    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    items = [_read(w) for w in _as_list(workflows)]
    if not items:
        raise ValueError("no workflows given")
    executor = resolve_executor(executor)
    if object_info is None and any(is_ui_format(w) for w in items) \
            and callable(getattr(executor, "object_info", None)):
        object_info = executor.object_info()
    prompts = [load_workflow(w, object_info) for w in items]

    port_nodes = [discover_port_nodes(p, object_info) for p in prompts]
    port_keys = [discover_ports(p, object_info) for p in prompts]
    for k, keys in enumerate(port_keys):
        for uid, port in keys.items():
            if len(port.output_node_ids) > 1:
                raise WorkflowError(
                    f"workflow {k}: unique_id {uid!r} is written by several ports "
                    f"(nodes {', '.join(port.output_node_ids)}); each key needs one writer"
                )

    written: list[str] = []
    with WorkflowContext(ram_budget=ram_budget, disk_dir=disk_dir) as ctx:
        for uid, value in (inputs or {}).items():
            ctx.save(uid, value)
        sent = [prepare_prompt(p, ctx.run_id, nodes) for p, nodes in zip(prompts, port_nodes)]
        for _iteration in range(iterations):
            for k, prompt in enumerate(sent):
                keys = port_keys[k]
                missing = sorted(
                    uid for uid, port in keys.items()
                    if port.reads and port.consumers and uid not in ctx
                )
                if missing:
                    raise UnknownKeyError(
                        f"workflow {k} reads {', '.join(repr(m) for m in missing)} but no value is stored "
                        f"under {'that key' if len(missing) == 1 else 'those keys'} in run {ctx.run_id!r}: "
                        "pass it in inputs= or write it with an OUTPUT port of an earlier workflow"
                    )
                outs = [uid for uid, port in keys.items() if port.writes]
                before = {uid: (ctx.info(uid)["version"] if uid in ctx else None) for uid in outs}
                executor.execute(prompt, timeout=timeout)
                for uid in outs:
                    if uid not in ctx or ctx.info(uid)["version"] == before[uid]:
                        raise WorkflowError(
                            f"workflow {k}: the port(s) {', '.join(keys[uid].output_node_ids)} writing "
                            f"{uid!r} did not save a value in this run"
                        )
                    if uid not in written:
                        written.append(uid)
        return {uid: ctx.load(uid) for uid in written}
