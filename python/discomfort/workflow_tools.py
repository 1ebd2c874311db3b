"""run_sequential: run ComfyUI workflows in sequence and in loops, values passing through a store.

Every call owns one run (a per-run, ephemeral object store) in a ``with`` block: a
:class:`~discomfort.WorkflowContext` in shared memory when ComfyUI can share memory with this
process, else a :class:`~discomfort.remote.RemoteContext` held by the ComfyUI server and fed over
HTTP. Ports save into it from inside ComfyUI, DataLoaders read from it, and the prompts only ever
carry the run id and the keys: never payload data.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from .errors import ReferenceUnavailableError, RunCancelled, RunInterrupted, UnknownKeyError, WorkflowError
from .run_control import CancelToken, ProgressEvent, accepts_keyword, cut_error, plan_releases, progress_bar
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
    "choose_transport",
    "CancelToken",
    "ProgressEvent",
]

log = logging.getLogger("discomfort")

TRANSPORTS = ("auto", "shm", "http")


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


def plan_workflows(items: list, object_info: Mapping | None) -> tuple[list[dict], list[dict], list[dict]]:
    """API prompts of ``items``, their port nodes and their ports by unique_id.

    Refuses a workflow in which several ports write one key: each key needs one writer.
    """
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
    requested = transport if transport is not None else (os.environ.get("DISCOMFORT_TRANSPORT") or "auto")
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
    from .sysinfo import host_differences, host_info

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


def _version(ctx: Any, uid: str) -> int | None:
    """The stored version of ``uid`` or None, in one call (one request over HTTP)."""
    try:
        return ctx.info(uid)["version"]
    except UnknownKeyError:
        return None


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
    transport: str | None = None,
    outputs: Iterable[str] | None = None,
    release_unused: bool = False,
    cancel: CancelToken | None = None,
    progress: bool | None = None,
    on_progress: Callable[[ProgressEvent], Any] | None = None,
) -> dict[str, Any]:
    """Run ``workflows`` one after the other, ``iterations`` times; returns ``{unique_id: value}``.

    ``workflows``: one or several workflows (API or UI format; dicts or JSON files).
    ``inputs``: values for INPUT ports, by unique_id. Every OUTPUT (or PASSTHRU) port saves its
    value under its unique_id; an INPUT port reads the latest value of its unique_id, so the
    outputs of workflow k feed workflow k+1, and those of iteration N feed iteration N+1. A value
    saved again under its key replaces the old one, whose space the store reuses.
    ``executor``: an :class:`~discomfort.comfy.InProcessComfy`, a
    :class:`~discomfort.comfy.ComfyServer`, a server URL, or None (ComfyUI in this process, from
    ``$DISCOMFORT_COMFYUI``).

    ``transport``: how values reach the ComfyUI nodes (default "auto", or
    ``$DISCOMFORT_TRANSPORT``; see :func:`choose_transport`). "shm": the run is a
    :class:`~discomfort.WorkflowContext` in this process's shared memory, which the server's nodes
    attach to. "http": the ComfyUI server creates and owns the run, inputs are sent to it and
    results fetched from it as binary HTTP bodies (:mod:`discomfort.remote`); ``disk_dir`` then
    does not apply (the server uses its own disk tier), ``ram_budget`` is passed on. The choice
    is logged once per call at INFO on the ``discomfort`` logger; the HTTP path is also announced
    with one :class:`~discomfort.remote.TransportWarning` (``warnings.warn``, so one line on
    stderr unless filtered), since it copies every value over a socket.

    ``outputs``: the keys to return (default: every key a port wrote, except references to
    objects living in another process, such as a MODEL saved by a ComfyUI server's nodes).
    ``release_unused``: after each workflow, delete the stored values that no later workflow
    reads before it writes them again and that are not returned, so a long loop holds only the
    values still needed (the default keeps every key's latest value until the run ends).

    ``cancel``: a :class:`~discomfort.run_control.CancelToken`; ``cancel.cancel()`` from any
    thread stops the run before its next workflow or inside the running one (a ComfyUI server is
    told to interrupt it and its queue item is removed) and raises
    :class:`~discomfort.errors.RunCancelled`. Ctrl-C does the same and raises
    :class:`~discomfort.errors.RunInterrupted` (a KeyboardInterrupt). Either way the run's store
    is gone when the exception reaches the caller, and it says which iteration and workflow were cut.

    ``progress``: a progress bar on stderr: None (default) shows it only when stderr is a
    terminal, True always, False never. ``on_progress``: called with a
    :class:`~discomfort.run_control.ProgressEvent` when a workflow starts and ends, and for the
    node and step messages ComfyUI sends while it runs.

    The result stays valid after the run's store is gone. The store lives only inside this call.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    executor = resolve_executor(executor)
    plan = _plan(workflows, inputs, iterations, executor, object_info, outputs, release_unused)
    path, why = choose_transport(executor, transport)
    run = _open_run(path, executor, ram_budget, disk_dir)
    state = _RunState(plan.names, iterations, on_progress, progress)
    options = _executor_options(executor, cancel, state, on_progress is not None)
    try:
        with run as ctx:
            state.run_id = ctx.run_id
            _announce(ctx, path, why, executor)
            try:
                _save_inputs(ctx, inputs, plan)
                sent = [prepare_prompt(p, ctx.run_id, nodes) for p, nodes in zip(plan.prompts, plan.port_nodes)]
                for iteration in range(iterations):
                    for k, prompt in enumerate(sent):
                        _run_workflow(ctx, executor, plan, state, iteration, k, prompt, timeout, options, cancel)
                state.at(None, None)
                return _collect(ctx, plan.written, plan.wanted)
            except RunCancelled as exc:
                raise state.cut(RunCancelled, cancel.reason if cancel is not None else None) from exc
            except KeyboardInterrupt as exc:
                raise state.cut(RunInterrupted, "Ctrl-C") from exc
    finally:
        state.close()


@dataclass
class _Plan:
    """What run_sequential knows before the run starts: prompts, ports, keys read and written."""

    names: list[str]
    prompts: list[dict]
    port_nodes: list[dict]
    port_keys: list[dict]
    reads: list[list[str]]
    writes: list[list[str]]
    wanted: list[str] | None
    releases: list[list[str]] | None
    written: list[str] = field(default_factory=list)  # keys some port wrote, in order


def _plan(workflows: Any, inputs: Mapping[str, Any] | None, iterations: int, executor: Any,
          object_info: Mapping | None, outputs: Iterable[str] | None, release_unused: bool) -> _Plan:
    """Read and convert the workflows, find their ports, check ``outputs=``, plan releases."""
    names = workflow_names(workflows)
    items = read_workflows(workflows)
    if object_info is None and any(is_ui_format(w) for w in items) \
            and callable(getattr(executor, "object_info", None)):
        object_info = executor.object_info()
    prompts, port_nodes, port_keys = plan_workflows(items, object_info)
    reads, writes = port_io(port_keys)
    wanted = None if outputs is None else list(dict.fromkeys([outputs] if isinstance(outputs, str) else outputs))
    if wanted is not None:
        known = {uid for w in writes for uid in w} | set(inputs or {})
        unknown = [uid for uid in wanted if uid not in known]
        if unknown:
            raise ValueError(f"outputs= names {', '.join(map(repr, unknown))}, which no port writes and "
                             "inputs= does not give")
    releases = None
    if release_unused:
        keep = wanted if wanted is not None else {uid for w in writes for uid in w}
        releases = plan_releases(reads, writes, iterations, keep, initial=inputs or {})
    return _Plan(names, prompts, port_nodes, port_keys, reads, writes, wanted, releases)


def _open_run(path: str, executor: Any, ram_budget: int | str | None, disk_dir: Any) -> Any:
    """The run's context: in this process's shared memory, or inside the server over HTTP."""
    if path == "http":
        from .remote import RemoteContext

        return RemoteContext(executor.url, ram_budget=ram_budget)
    from .context import WorkflowContext

    return WorkflowContext(ram_budget=ram_budget, disk_dir=disk_dir)


def _executor_options(executor: Any, cancel: CancelToken | None, state: "_RunState",
                      wants_events: bool) -> dict[str, Any]:
    """The keywords this executor's ``execute`` takes: cancel, and ComfyUI's events for progress."""
    options: dict[str, Any] = {}
    if cancel is not None and accepts_keyword(executor.execute, "cancel"):
        options["cancel"] = cancel
    if (wants_events or state.bar is not None) and accepts_keyword(executor.execute, "on_event"):
        options["on_event"] = state.comfy_event
    return options


def _announce(ctx: Any, path: str, why: str, executor: Any) -> None:
    """Log where the values live; the HTTP path also warns once, since it copies every value."""
    if path == "http":
        from .remote import TransportWarning

        log.info("discomfort: run %s: values travel over HTTP to %s (%s)", ctx.run_id, executor.url, why)
        warnings.warn(
            f"discomfort run {ctx.run_id}: values travel over HTTP to {executor.url} ({why}); "
            "every value is copied over the socket",
            TransportWarning, stacklevel=3,
        )
    else:
        log.info("discomfort: run %s: values in shared memory (%s)", ctx.run_id, why)


def _save_inputs(ctx: Any, inputs: Mapping[str, Any] | None, plan: _Plan) -> None:
    for uid, value in (inputs or {}).items():
        ctx.save(uid, value)
    _release(ctx, plan.releases, 0)


def _run_workflow(ctx: Any, executor: Any, plan: _Plan, state: "_RunState", iteration: int, k: int,
                  prompt: dict, timeout: float | None, options: dict[str, Any],
                  cancel: CancelToken | None) -> None:
    """One workflow of one iteration: check its inputs, let its prompt use the run, run it,
    check that every port wrote, release what no later workflow reads."""
    state.at(iteration, k)
    if cancel is not None and cancel.cancelled:
        raise RunCancelled("cancelled between workflows")
    missing = sorted(uid for uid in plan.reads[k] if uid not in ctx)
    if missing:
        raise missing_inputs_error(k, missing, ctx.run_id)
    before = {uid: _version(ctx, uid) for uid in plan.writes[k]}
    state.emit("workflow_start")
    state.inside = True
    digest = ctx.allow_prompt(prompt)
    try:
        executor.execute(prompt, timeout=timeout, **options)
    finally:
        ctx.revoke_prompt(digest)
    state.inside = False
    for uid in plan.writes[k]:
        after = _version(ctx, uid)
        if after is None or after == before[uid]:
            raise WorkflowError(
                f"workflow {k}: the port(s) {', '.join(plan.port_keys[k][uid].output_node_ids)} writing "
                f"{uid!r} did not save a value in this run"
            )
        if uid not in plan.written:
            plan.written.append(uid)
    _release(ctx, plan.releases, iteration * len(plan.prompts) + k + 1)
    state.finished()


def _release(ctx: Any, releases: list[list[str]] | None, index: int) -> None:
    if releases is not None:
        for uid in releases[index]:
            ctx.delete(uid)


def _collect(ctx: Any, written: list[str], wanted: list[str] | None) -> dict[str, Any]:
    """The values to return: ``wanted``, else every written key that can leave its process."""
    out = {}
    for uid in written if wanted is None else wanted:
        try:
            out[uid] = ctx.load(uid)
        except ReferenceUnavailableError:
            if wanted is not None:
                raise
            log.info("discomfort: run %s: %r is not returned: it is a reference to an object in the "
                     "ComfyUI server's process", ctx.run_id, uid)
    return out


class _RunState:
    """Where a run is, for progress events, the progress bar and the message of a cut run."""

    def __init__(self, names: list[str], iterations: int, on_progress: Callable | None,
                 progress: bool | None) -> None:
        self.names = names
        self.iterations = iterations
        self.total = iterations * len(names)
        self.on_progress = on_progress
        self.bar = progress_bar(progress, self.total, "discomfort run")
        self.run_id = ""
        self.iteration: int | None = None
        self.workflow: int | None = None
        self.inside = False
        self.done = 0
        self.t0 = 0.0

    def at(self, iteration: int | None, workflow: int | None) -> None:
        self.iteration, self.workflow, self.inside = iteration, workflow, False
        self.t0 = time.monotonic()

    def emit(self, kind: str, **extra: Any) -> None:
        assert self.iteration is not None and self.workflow is not None
        if self.bar is not None:
            where = (f"iteration {self.iteration + 1}/{self.iterations}, workflow {self.workflow + 1}/"
                     f"{len(self.names)} ({self.names[self.workflow]})")
            if kind == "step":
                where += f", node {extra['node']} {extra['value']}/{extra['max']}"
            elif kind == "node":
                where += f", node {extra['node']}"
            self.bar.set_postfix_str(where, refresh=kind != "workflow_done")
            if kind == "workflow_done":
                self.bar.update(1)
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(kind, self.run_id, self.iteration, self.iterations, self.workflow,
                                           len(self.names), self.names[self.workflow], self.done, self.total,
                                           **extra))

    def comfy_event(self, kind: str, data: dict) -> None:
        """ComfyUI's messages about the running prompt, as "node" and "step" events."""
        if kind == "executing" and data.get("node") is not None:
            self.emit("node", node=str(data["node"]))
        elif kind == "progress":
            self.emit("step", node=None if data.get("node") is None else str(data["node"]),
                      value=data.get("value"), max=data.get("max"))

    def finished(self) -> None:
        self.done += 1
        self.emit("workflow_done", seconds=time.monotonic() - self.t0)

    def cut(self, cls: type, reason: str | None) -> BaseException:
        """The RunCancelled / RunInterrupted saying where the run was cut."""
        return cut_error(cls, reason, self.run_id, self.names, self.iterations, self.iteration, self.workflow,
                         self.inside, self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
