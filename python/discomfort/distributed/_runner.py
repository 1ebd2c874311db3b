"""run_sequential_ray: run_sequential on a pool of ComfyUI servers in a Ray cluster.

The loop is :class:`~discomfort.engine.RunEngine`'s, the one ``Run`` uses; this module only
says where each workflow runs (:class:`RayPlacement`: a server of the pool, replaced and the
workflow run again when it dies, its outputs adopted so they outlive it).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Iterable, Mapping

from ..engine import Result, RunEngine
from ..errors import WorkflowError
from ..run_control import CancelToken, ProgressEvent, Until, check_bounds
from ..workflows.tools import read_workflows, workflow_names
from . import _ray
from ._context import RayContext
from ._pool import RayComfyPool, ServerDiedError

__all__ = ["run_sequential_ray", "RayRun", "RayPlacement", "WorkflowEvent"]

log = logging.getLogger("discomfort")

#: What Ray runs called their progress event: one event type now, :class:`ProgressEvent`.
WorkflowEvent = ProgressEvent


def _assigner(assign: Any, n: int) -> Callable[[int, int, int], int]:
    if callable(assign):
        return lambda it, k, step: int(assign(it, k)) % n
    if assign == "workflow":
        return lambda it, k, step: k % n
    if assign == "round_robin":
        return lambda it, k, step: step % n
    raise ValueError(f"assign must be 'workflow', 'round_robin' or a callable(iteration, index), not {assign!r}")


def _check_retries(retries: Any) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")


def _check_store_options(ram_budget: Any, disk_dir: Any) -> None:
    """run_sequential's store options: a Ray run's store is the cluster's object store."""
    if ram_budget is not None or disk_dir is not None:
        raise ValueError("ram_budget= and disk_dir= size a shared-memory run; a Ray run keeps its values in Ray's "
                         "object store, sized and spilled by the cluster (ray start --object-store-memory, "
                         "object spilling)")


def _progress_options(progress: Any, on_progress: Any) -> tuple[bool | None, Any]:
    """``progress=callable`` (Ray runs' older form) as ``on_progress`` of the "workflow_done" events."""
    if not callable(progress) or isinstance(progress, bool):
        return progress, on_progress
    warnings.warn("progress=callable is on_progress= now (one ProgressEvent type for Run and RayRun); "
                  "it gets the \"workflow_done\" events", DeprecationWarning, stacklevel=3)
    if on_progress is not None:
        raise TypeError("give on_progress= only (progress= is True, False or None)")
    return False, lambda ev: progress(ev) if ev.kind == "workflow_done" else None  # no bar, as before


def run_sequential_ray(
    workflows: Any,
    inputs: Mapping[str, Any] | None = None,
    iterations: int | None = 1,
    servers: RayComfyPool | int | None = None,
    *,
    until: Until | None = None,
    timeout: float | None = None,
    object_info: Mapping | None = None,
    outputs: Iterable[str] | None = None,
    release_unused: bool = False,
    cancel: CancelToken | None = None,
    progress: bool | Callable[[ProgressEvent], Any] | None = None,
    on_progress: Callable[[ProgressEvent], Any] | None = None,
    retries: int = 1,
    assign: str | Callable[[int, int], int] = "workflow",
    adopt: bool = True,
    free_after: bool = False,
    run_id: str | None = None,
    address: str | None = None,
    comfy_path: str | os.PathLike | None = None,
    ram_budget: int | str | None = None,
    disk_dir: str | os.PathLike | None = None,
    controls: Any = None,
    on_iteration: Callable[[int, Mapping[str, Any]], Any] | None = None,
    keep: Iterable[str] | None = None,
) -> Result:
    """:func:`~discomfort.sequential.run_sequential` across a Ray cluster.

    ``workflows``, ``inputs``, ``iterations``, ``until``, ``timeout``, ``object_info``,
    ``outputs``, ``release_unused``, ``cancel``, ``progress``, ``on_progress``, ``controls``,
    ``on_iteration``, ``keep``: as in
    run_sequential, the same loop (the outputs of workflow k feed workflow k+1, those of
    iteration N feed N+1). A value saved by reference (a MODEL) on one server reaches a workflow
    on another by recipe: the part of the workflow that built it runs there (once, with
    ``--cache-lru``); a :class:`~discomfort.recipes.Recipe` given in ``inputs`` is built where it
    is read. The run is a :class:`~discomfort.distributed.RayContext` owned by this call; values
    pass between servers through Ray's object store, never through the prompts.

    ``servers``: a :class:`RayComfyPool` (started here if it is not; a pool started here is
    closed at the end), a number of servers, or None (one per node, or per GPU, from
    ``comfy_path`` / ``$DISCOMFORT_COMFYUI``). ``assign``: which server runs each workflow:
    ``"workflow"`` (default: workflow k always on server k mod n, so each server keeps its own
    models loaded), ``"round_robin"``, or ``callable(iteration, index) -> server``.

    ``retries``: a server that dies while it runs a workflow (its ComfyUI process or its actor) is
    replaced on the same node, and the workflow runs again on the new one, this many times
    (default once); a workflow that fails in a node raises at once. ``adopt`` (default True):
    after each workflow, the values its server saved are copied once on that node into objects
    this process owns, so they outlive the server (Ray frees what a dead process owned); without
    it a dead server takes its outputs with it.

    ``on_progress`` gets a :class:`~discomfort.run_control.ProgressEvent` when each workflow
    starts and ends (``server``: the pool's index, ``node_id``, ``attempts``; ComfyUI's node and
    step messages stay in the server's actor); every workflow is also logged at INFO on the
    ``discomfort`` logger. ``progress=callable`` (a ``WorkflowEvent`` per workflow) still works:
    it gets the "workflow_done" events. ``free_after``: ask the servers to drop ComfyUI's
    execution cache at the end, which holds zero-copy views into the object store (otherwise they
    are released when the next prompt replaces them). ``ram_budget`` and ``disk_dir`` are
    refused: the run's values are in Ray's object store, which the cluster sizes and spills.

    ``cancel`` (or Ctrl-C) stops the run as in run_sequential: the running server's actor takes
    the prompt off the queue or interrupts it, and :class:`~discomfort.errors.RunCancelled`
    (:class:`~discomfort.errors.RunInterrupted`) says where; the run's values are freed from Ray.

    Returns ``{unique_id: value}``: private, writable copies that stay valid after the run,
    whose values are all freed from Ray before this returns (references, which cannot leave
    their server's process, are left out unless ``outputs`` names them: then their recipe).
    """
    iterations = check_bounds(iterations, until)
    _check_retries(retries)
    _check_store_options(ram_budget, disk_dir)
    progress, on_progress = _progress_options(progress, on_progress)
    names = workflow_names(workflows)
    items = read_workflows(workflows)
    _ray.ensure_connected(address)

    own_pool = None
    if isinstance(servers, RayComfyPool):
        pool = servers
        if not len(pool):
            own_pool = pool.start()
    else:
        if servers is not None and (not isinstance(servers, int) or servers < 1):
            raise TypeError(f"servers must be a RayComfyPool, a positive int or None, not {servers!r}")
        pool = own_pool = RayComfyPool(comfy_path, size=servers).start()
    try:
        with RayRun(pool, run_id=run_id, assign=assign, retries=retries, adopt=adopt,
                    object_info=object_info) as run:
            run._removes_store_on_cancel = True
            result = run.run_loop(items, inputs, iterations, until=until, timeout=timeout, outputs=outputs,
                              release_unused=release_unused, cancel=cancel, progress=progress,
                              on_progress=on_progress, placement=run.placement, names=names, controls=controls,
                              on_iteration=on_iteration, keep=keep)
        if free_after and run.used:
            pool.free(sorted(run.used))
        return result
    finally:
        if own_pool is not None:
            own_pool.close()


class RayPlacement:
    """Workflows on the servers of a :class:`RayComfyPool`: ``assign`` chooses the server; a
    server that dies is replaced and the workflow runs again (``retries`` times); the values a
    server saved are adopted by this process (``adopt``) so they outlive it."""

    def __init__(self, pool: RayComfyPool, assign: str | Callable[[int, int], int] = "workflow",
                 retries: int = 1, adopt: bool = True, used: set[int] | None = None) -> None:
        _check_retries(retries)
        self.pool, self.retries, self.adopt = pool, retries, adopt
        self.choose_server = _assigner(assign, len(pool))
        self.used: set[int] = set() if used is None else used  # servers that ran a workflow
        self._info: Mapping | None = None

    def choose(self, iteration: int, k: int, step: int) -> int:
        return self.choose_server(iteration, k, step)

    def where(self, slot: int) -> str:
        return f"ray server {slot}"

    def prompt_target(self, slot: int) -> Any:
        return self.pool

    def object_info(self, slot: int) -> Mapping:  # the pool's servers run one ComfyUI: one /object_info
        if self._info is None:
            self._info = self.pool.object_info(0)
        return self._info

    def execute(self, slot: int, prompt: dict, timeout: float | None, cancel: CancelToken | None,
                on_event: Callable[[str, dict], Any] | None) -> Any:
        self.used.add(slot)
        return self.pool.execute(slot, prompt, timeout, cancel)  # its files' paths: not known here

    def settle(self, ctx: Any, slot: int, written: list[str]) -> None:
        """Make the values the server saved owned by this process (one copy each, on its node)."""
        if not self.adopt:
            return
        foreign = ctx._foreign_values(written)
        if not foreign:
            return
        uids = list(foreign)
        refs = self.pool.adopt(slot, [foreign[u][0] for u in uids])
        node = self.pool.slots[slot].node_id
        for uid, ref in zip(uids, refs):
            ctx._adopted(uid, foreign[uid][1]["version"], ref, node)

    def recover(self, slot: int, exc: Exception, attempts: int, run_id: str, iteration: int, k: int) -> bool:
        """A dead server: replaced, and the workflow runs again (at most ``retries`` times)."""
        if not isinstance(exc, ServerDiedError):
            return False
        if attempts > self.retries:
            raise WorkflowError(
                f"workflow {k} (iteration {iteration}) failed: its ComfyUI server {slot} died "
                f"{attempts} time(s): {exc}\n--- server log (tail) ---\n{self.pool.log_tail(slot)}"
            ) from exc
        log.warning("discomfort: run %s: ComfyUI server %d died during workflow %d (iteration %d): %s; "
                    "replacing it and running the workflow again", run_id, slot, k, iteration, exc)
        self.pool.replace(slot)
        return True

    def describe(self, slot: int) -> dict[str, Any]:
        return {"server": slot, "node_id": self.pool.slots[slot].node_id}


class RayRun(RunEngine):
    """A Ray run held across calls: ``with RayRun(pool) as run: run.save(...); run.execute([...])``.

    The :class:`~discomfort.sequential.Run` of a :class:`RayComfyPool`, the same loop: values live
    in the Ray object store for the whole block, Python runs between the calls, and a reference a
    server saved reaches workflows on other servers by recipe. ``assign``, ``retries``, ``adopt``:
    as in :func:`run_sequential_ray`.
    """

    _bar_name = "discomfort ray run"
    context: RayContext

    def __init__(self, servers: RayComfyPool, *, run_id: str | None = None,
                 assign: str | Callable[[int, int], int] = "workflow", retries: int = 1, adopt: bool = True,
                 object_info: Mapping | None = None, ram_budget: int | str | None = None,
                 disk_dir: str | os.PathLike | None = None) -> None:
        _check_store_options(ram_budget, disk_dir)
        self.pool = servers
        self.used: set[int] = set()  # servers that ran a workflow of this run
        self.placement = RayPlacement(servers, assign, retries, adopt, self.used)
        self._start_engine(object_info)
        self.context = RayContext(run_id)
        log.info("discomfort: run %s on %d ComfyUI servers in the Ray cluster at %s", self.run_id, len(servers),
                 _ray.gcs_address())

    def load(self, unique_id: str, *, copy: bool | None = None) -> Any:
        return self.context.load(unique_id, copy=copy)

    def _load_result(self, unique_id: str) -> Any:
        return self.context.load(unique_id, copy=True)  # results are private copies, valid after the run

    def __enter__(self) -> "RayRun":
        return self

    def execute(self, workflows: Any, inputs: Mapping[str, Any] | None = None, iterations: int | None = 1, *,
                until: Until | None = None, timeout: float | None = None, outputs: Iterable[str] | None = None,
                release_unused: bool = False, cancel: CancelToken | None = None,
                progress: bool | Callable[[ProgressEvent], Any] | None = None,
                on_progress: Callable[[ProgressEvent], Any] | None = None,
                assign: str | Callable[[int, int], int] | None = None, object_info: Mapping | None = None,
                names: list[str] | None = None, controls: Any = None,
                on_iteration: Callable[[int, Mapping[str, Any]], Any] | None = None,
                keep: Iterable[str] | None = None) -> Result:
        """Run ``workflows`` on the pool ``iterations`` times (or until ``until``); returns private
        copies of the values their ports wrote (or ``outputs``). The options are
        :meth:`Run.execute <discomfort.sequential.Run.execute>`'s; ``assign``: which server runs
        each workflow in this call (default: the run's)."""
        progress, on_progress = _progress_options(progress, on_progress)
        if object_info is not None:
            self.object_info = object_info
        placement = self.placement
        if assign is not None:
            placement = RayPlacement(self.pool, assign, placement.retries, placement.adopt, self.used)
            placement._info = self.placement._info
        return self.run_loop(workflows, inputs, iterations, until=until, timeout=timeout, outputs=outputs,
                         release_unused=release_unused, cancel=cancel, progress=progress, on_progress=on_progress,
                         placement=placement, names=names, controls=controls, on_iteration=on_iteration, keep=keep)
