"""Running workflows in sequence and in loops: :class:`Run` (a run you hold across calls) and
:func:`run_sequential` (one call, one run).

A run is one ephemeral object store: a :class:`~discomfort.WorkflowContext` in shared memory
when ComfyUI can share memory with this process, else a :class:`~discomfort.remote.RemoteContext`
held by the ComfyUI server and fed over HTTP. Ports save into it from inside ComfyUI,
DataLoaders read from it, and the prompts only ever carry the run id and the keys: never payload
data.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Iterable, Mapping

from .controls import ControlsOption
from .engine import LocalPlacement, Result, RunEngine, executor_where
from .history import OnIteration
from .run_control import CancelToken, ProgressEvent, Until, check_bounds
from .runs import RunContext
from .workflows.tools import choose_transport, resolve_executor

__all__ = ["Run", "run_sequential"]  # Result: engine.Result

log = logging.getLogger("discomfort")


class Run(RunEngine):
    """A run you hold across calls: ``with Run(executor) as run: run.save(...); run.execute([...])``.

    Values, and objects kept by reference in the executor's process (a model a workflow loaded),
    live until the ``with`` block ends, so Python can run between the calls: save a new parameter,
    choose the next workflow, load a result. ``executor``, ``transport``, ``ram_budget`` and
    ``disk_dir`` are those of :func:`run_sequential`. The loop is :class:`~discomfort.engine.RunEngine`'s,
    the same as :class:`~discomfort.distributed.RayRun`'s.
    """

    def __init__(self, executor: Any = None, *, transport: str | None = None, ram_budget: int | str | None = None,
                 disk_dir: str | os.PathLike | None = None, object_info: Mapping | None = None) -> None:
        self.executor = resolve_executor(executor)
        self.transport, why = choose_transport(self.executor, transport)
        self._start_engine(object_info)
        self.placement = LocalPlacement(self.executor)
        if self.transport == "http":
            from .remote import RemoteContext

            self.context: RunContext = RemoteContext(self.executor.url, ram_budget=ram_budget)
        else:
            from .context import WorkflowContext

            self.context = WorkflowContext(ram_budget=ram_budget, disk_dir=disk_dir)
        _announce(self.context, self.transport, why, self.executor)

    def execute(self, workflows: Any, inputs: Mapping[str, Any] | None = None, iterations: int | None = 1, *,
                until: Until | None = None, timeout: float | None = None, outputs: Iterable[str] | None = None,
                release_unused: bool = False, cancel: CancelToken | None = None, progress: bool | None = None,
                on_progress: Callable[[ProgressEvent], Any] | None = None, executor: Any = None,
                controls: ControlsOption = None, on_iteration: OnIteration | None = None,
                keep: Iterable[str] | None = None, rerun: str = "auto") -> Result:
        """Run ``workflows`` one after the other, ``iterations`` times (or until ``until``); returns
        the values the ports wrote in this call (or ``outputs``). See :func:`run_sequential`.

        ``executor``: run this call somewhere else than the run's executor (shared memory only):
        references another executor's workflows saved reach this one by recipe.
        ``controls``: the widgets' seed controls go on across calls: a workflow given again (the
        same JSON) starts where the run's last call left its widgets, as the editor's widgets do
        after each queue.
        """
        placement = self.placement
        if executor is not None:
            executor = resolve_executor(executor)
            if executor_where(executor) != executor_where(self.executor):
                if self.transport == "http":
                    raise ValueError("this run lives inside its ComfyUI server (HTTP transport): its workflows "
                                     "run there only")
                placement = LocalPlacement(executor)
        return self.run_loop(workflows, inputs, iterations, until=until, timeout=timeout, outputs=outputs,
                         release_unused=release_unused, cancel=cancel, progress=progress, on_progress=on_progress,
                         placement=placement, controls=controls, on_iteration=on_iteration, keep=keep, rerun=rerun)

    def __enter__(self) -> "Run":
        return self

    def __repr__(self) -> str:
        return f"<Run {self.run_id} {self.transport} on {self.executor!r}>"


def run_sequential(
    workflows: Any,
    inputs: Mapping[str, Any] | None = None,
    iterations: int | None = 1,
    executor: Any = None,
    *,
    until: Until | None = None,
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
    controls: ControlsOption = None,
    on_iteration: OnIteration | None = None,
    keep: Iterable[str] | None = None,
    rerun: str = "auto",
) -> Result:
    """Run ``workflows`` one after the other, ``iterations`` times; returns ``{unique_id: value}``.

    ``workflows``: one or several workflows (API or UI format; dicts or JSON files).
    ``inputs``: values for INPUT ports, by unique_id. Every OUTPUT (or PASSTHRU) port saves its
    value under its unique_id; an INPUT port reads the latest value of its unique_id, so the
    outputs of workflow k feed workflow k+1, and those of iteration N feed iteration N+1. A value
    saved again under its key replaces the old one, whose space the store reuses.
    ``executor``: an :class:`~discomfort.comfy.InProcessComfy`, a
    :class:`~discomfort.comfy.ComfyServer`, a server URL, or None: ComfyUI in this process from
    ``$DISCOMFORT_COMFYUI``, run as its ``main.py`` runs it: its GPU (``--cpu`` only where torch
    sees none), its custom nodes, models, ``input/``/``output/``/``user/`` folders and database,
    with this project's node pack added where the tree lacks it (docs/COMFYUI.md).

    ``until``: stop after the iteration in which it holds: a key an output port writes (a BOOLEAN
    or INT value; true or non-zero stops), or ``fn(iteration, values)`` returning True to stop
    (``values``: a read-only mapping of the run's current values). ``iterations`` is then the
    upper bound; None means no bound (only with ``until``). The result's ``iterations`` says how
    many ran and ``stopped`` why ("until" or "iterations").

    ``transport``: how values reach the ComfyUI nodes (default "auto", or
    ``$DISCOMFORT_TRANSPORT``; see :func:`~discomfort.workflows.tools.choose_transport`). "shm":
    the run is a :class:`~discomfort.WorkflowContext` in this process's shared memory, which the
    server's nodes attach to. "http": the ComfyUI server creates and owns the run, inputs are sent
    to it and results fetched from it as binary HTTP bodies (:mod:`discomfort.remote`);
    ``disk_dir`` then does not apply (the server uses its own disk tier), ``ram_budget`` is passed
    on. The choice is logged once per call at INFO on the ``discomfort`` logger; the HTTP path is
    also announced with one :class:`~discomfort.remote.TransportWarning` (``warnings.warn``, so
    one line on stderr unless filtered), since it copies every value over a socket.

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

    ``controls``: the "control after generate" of seed (and other) widgets, applied between
    iterations as the editor applies it after each queue: iteration 1 uses the saved value, the
    next ones ``increment``, ``decrement``, ``randomize`` (within the input's min/max),
    ``increment-wrap`` (combos), or stay ``fixed``. None (default): each UI workflow widget's own
    control; "fixed": nothing changes; ``{"NODE.INPUT": mode}`` (NODE: a node id or title, e.g.
    ``{"KSampler.seed": "increment"}``) sets or adds one widget's, in API workflows too.
    ``result.controls[i][k]`` holds the values iteration ``i`` used in workflow ``k``.

    ``on_iteration``: ``fn(iteration, values)`` after each iteration (0-based; ``values`` the
    run's current values, read-only as ``until``'s, with that iteration's ``files`` and
    ``controls``). ``keep``: keys whose value is copied after every iteration into
    ``result.history[key]`` (a list, one per iteration), within the run's RAM budget
    (:class:`~discomfort.errors.StoreFullError` past it). ``result.files[i]``: the files
    ComfyUI's output nodes (SaveImage, SaveVideo, ...) wrote in iteration ``i``, each
    {"node", "filename", "subfolder", "type", "workflow", "path"} (``path``: absolute when the
    executor's output folder is known, else None).

    ``rerun``: "auto" (default): a workflow whose prompt is the same as when it last ran in this
    run (same nodes, widget values and inputs by version), whose ports wrote references still
    held, with no output node and no node that defines ``IS_CHANGED`` (``LoadImage``...), is not
    queued again (:mod:`discomfort.reuse`; ``result.reused`` lists them as (iteration, workflow));
    "always": every workflow is queued.

    The result stays valid after the run's store is gone. The store lives only inside this call;
    hold a :class:`Run` to keep values and models across calls.
    """
    iterations = check_bounds(iterations, until)
    with Run(executor, transport=transport, ram_budget=ram_budget, disk_dir=disk_dir,
             object_info=object_info) as run:
        run._removes_store_on_cancel = True
        return run.execute(workflows, inputs, iterations, until=until, timeout=timeout, outputs=outputs,
                           release_unused=release_unused, cancel=cancel, progress=progress,
                           on_progress=on_progress, controls=controls, on_iteration=on_iteration, keep=keep,
                           rerun=rerun)


# ---- the transport -----------------------------------------------------------------------------------


def _announce(ctx: Any, path: str, why: str, executor: Any) -> None:
    """Log where the values live; the HTTP path also warns once, since it copies every value."""
    if path == "http":
        from .remote import TransportWarning

        log.info("discomfort: run %s: values travel over HTTP to %s (%s)", ctx.run_id, executor.url, why)
        warnings.warn(
            f"discomfort run {ctx.run_id}: values travel over HTTP to {executor.url} ({why}); "
            "every value is copied over the socket",
            TransportWarning, stacklevel=_caller_stacklevel(),
        )
    else:
        log.info("discomfort: run %s: values in shared memory (%s)", ctx.run_id, why)


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside this module (the user's call)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level
