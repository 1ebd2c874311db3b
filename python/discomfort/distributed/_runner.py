"""run_sequential_ray: run_sequential on a pool of ComfyUI servers in a Ray cluster."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ReferenceUnavailableError, RunCancelled, RunInterrupted, WorkflowError
from ..prompt_forms import prompt_as_run
from ..recipes import Recipe, extract, stitch_recipe
from ..sequential import Result
from ..run_control import CancelToken, Until, check_bounds, cut_error, progress_bar, until_holds
from ..workflow_format import is_ui_format
from ..workflow_tools import (
    missing_inputs_error,
    plan_workflows,
    port_io,
    prepare_prompt,
    read_workflows,
    workflow_names,
)
from . import _ray
from ._context import RayContext
from ._pool import RayComfyPool, ServerDiedError

__all__ = ["run_sequential_ray", "RayRun", "WorkflowEvent"]

log = logging.getLogger("discomfort")


@dataclass(frozen=True)
class WorkflowEvent:
    """What ``progress`` gets after each workflow ran."""

    run_id: str
    iteration: int  # 0-based
    index: int  # the workflow's index in ``workflows``
    step: int  # 1-based count of workflows run so far in this call
    total: int | None  # iterations x workflows (None: a loop bounded only by until=)
    server: int  # index of the pool's server that ran it
    node_id: str  # the Ray node of that server
    seconds: float  # running it, the retry and the server's replacement included
    attempts: int  # 1, or 2 when its server died and it ran again on a replacement


def _assigner(assign: Any, n: int) -> Callable[[int, int, int], int]:
    if callable(assign):
        return lambda it, k, step: int(assign(it, k)) % n
    if assign == "workflow":
        return lambda it, k, step: k % n
    if assign == "round_robin":
        return lambda it, k, step: step % n
    raise ValueError(f"assign must be 'workflow', 'round_robin' or a callable(iteration, index), not {assign!r}")


def run_sequential_ray(
    workflows: Any,
    inputs: Mapping[str, Any] | None = None,
    iterations: int | None = 1,
    servers: RayComfyPool | int | None = None,
    *,
    until: Until | None = None,
    timeout: float | None = None,
    object_info: Mapping | None = None,
    progress: bool | Callable[[WorkflowEvent], Any] | None = None,
    retries: int = 1,
    assign: str | Callable[[int, int], int] = "workflow",
    adopt: bool = True,
    free_after: bool = False,
    run_id: str | None = None,
    address: str | None = None,
    comfy_path: str | os.PathLike | None = None,
    cancel: CancelToken | None = None,
) -> Result:
    """:func:`~discomfort.sequential.run_sequential` across a Ray cluster.

    ``workflows``, ``inputs``, ``iterations``, ``until``, ``timeout``, ``object_info``: as in
    run_sequential (the outputs of workflow k feed workflow k+1, those of iteration N feed N+1).
    A value saved by reference (a MODEL) on one server reaches a workflow on another by recipe:
    the part of the workflow that built it runs there (once, with ``--cache-lru``).
    The run is a :class:`~discomfort.distributed.RayContext` owned by this call; values pass
    between servers through Ray's object store, never through the prompts.

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

    ``progress``: None (a bar on a terminal), True, False, or a callable that gets a
    :class:`WorkflowEvent` after each workflow; every workflow is also logged at INFO on the
    ``discomfort`` logger (server, node, seconds, attempts). ``free_after``: ask the servers to
    drop ComfyUI's execution cache at the end, which holds zero-copy views into the object store
    (otherwise they are released when the next prompt replaces them).

    ``cancel``: a :class:`~discomfort.run_control.CancelToken`; as in run_sequential, cancelling it
    (or Ctrl-C) stops the run before its next workflow or inside the running one (that server's
    actor takes the prompt off the queue or interrupts it) and raises
    :class:`~discomfort.errors.RunCancelled` (:class:`~discomfort.errors.RunInterrupted`) saying
    where; the run's values are freed from Ray first.

    Returns ``{unique_id: value}``: private, writable copies that stay valid after the run,
    whose values are all freed from Ray before this returns (references, which cannot leave
    their server's process, are left out).
    """
    iterations = check_bounds(iterations, until)
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
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
        with RayRun(pool, run_id=run_id, assign=assign, retries=retries, adopt=adopt) as run:
            run._removes_store_on_cancel = True
            result = run.execute(items, inputs, iterations, until=until, timeout=timeout, object_info=object_info,
                                 progress=progress, cancel=cancel, names=names)
        if free_after and run.used:
            pool.free(sorted(run.used))
        return result
    finally:
        if own_pool is not None:
            own_pool.close()


class RayRun:
    """A Ray run held across calls: ``with RayRun(pool) as run: run.save(...); run.execute([...])``.

    The :class:`~discomfort.sequential.Run` of a :class:`RayComfyPool`: values live in the Ray
    object store for the whole block, Python runs between the calls, and a reference a server
    saved reaches workflows on other servers by recipe. ``assign``, ``retries``, ``adopt``: as in
    :func:`run_sequential_ray`.
    """

    def __init__(self, servers: RayComfyPool, *, run_id: str | None = None,
                 assign: str | Callable[[int, int], int] = "workflow", retries: int = 1, adopt: bool = True) -> None:
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.pool = servers
        self.choose = _assigner(assign, len(servers))
        self.retries, self.adopt = retries, adopt
        self.context = RayContext(run_id)
        self.used: set[int] = set()  # servers that ran a workflow of this run
        self._writers: dict[str, tuple[int, dict, str]] = {}  # key -> (server, prompt, port node) that wrote it
        self._info: Mapping | None = None
        self._removes_store_on_cancel = False
        log.info("discomfort: run %s on %d ComfyUI servers in the Ray cluster at %s", self.run_id, len(servers),
                 _ray.gcs_address())

    @property
    def run_id(self) -> str:
        return self.context.run_id

    def save(self, unique_id: str, value: Any, pass_by: str = "auto") -> int:
        """Store a value (a mapping shaped like a recipe's JSON is data too)."""
        if isinstance(value, Recipe):
            raise TypeError(f"{unique_id!r}: a Recipe is not a value of a Ray run (recipes given as inputs are "
                            "built by run_sequential and Run only)")
        self._writers.pop(unique_id, None)
        return self.context.save(unique_id, value, pass_by)  # type: ignore[arg-type]

    def load(self, unique_id: str, *, copy: bool | None = None) -> Any:
        return self.context.load(unique_id, copy=copy)

    def delete(self, unique_id: str) -> bool:
        return self.context.delete(unique_id)

    def keys(self) -> list[str]:
        return self.context.keys()

    def __contains__(self, unique_id: object) -> bool:
        return unique_id in self.context

    def close(self) -> None:
        self.context.shutdown()

    def __enter__(self) -> "RayRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)

    def _object_info(self) -> Mapping:  # the pool's servers run one ComfyUI: one /object_info
        if self._info is None:
            self._info = self.pool.object_info(0)
        return self._info

    def execute(self, workflows: Any, inputs: Mapping[str, Any] | None = None, iterations: int | None = 1, *,
                until: Until | None = None, timeout: float | None = None, object_info: Mapping | None = None,
                progress: bool | Callable[[WorkflowEvent], Any] | None = None, cancel: CancelToken | None = None,
                assign: str | Callable[[int, int], int] | None = None, names: list[str] | None = None) -> Result:
        """Run ``workflows`` on the pool ``iterations`` times (or until ``until``); returns private
        copies of the values their ports wrote (references, which stay in their server, left out).
        ``assign``: which server runs each workflow in this call (default: the run's)."""
        iterations = check_bounds(iterations, until)
        choose = self.choose if assign is None else _assigner(assign, len(self.pool))
        names = names or workflow_names(workflows)
        items = read_workflows(workflows)
        if object_info is not None:
            self._info = object_info
        info = self._object_info() if any(is_ui_format(w) for w in items) else object_info
        prompts, port_nodes, port_keys = plan_workflows(items, info)
        reads, writes = port_io(port_keys)
        if isinstance(until, str) and until not in {u for w in writes for u in w}:
            raise ValueError(f"until={until!r}: no output port of these workflows writes that key")
        ctx = self.context
        total = None if iterations is None else iterations * len(prompts)
        written: list[str] = []
        bar = progress_bar(None if progress is None else progress is True, total, f"discomfort {ctx.run_id[:12]}")
        where: list[Any] = [None, None, False]  # iteration, workflow, inside: for a cut run's message
        step = 0
        try:
            for uid, value in (inputs or {}).items():
                self.save(uid, value)
            sent = [prepare_prompt(p, ctx.run_id, nodes) for p, nodes in zip(prompts, port_nodes)]
            result = Result()
            iteration = 0
            while iterations is None or iteration < iterations:
                for k, prompt in enumerate(sent):
                    where[:] = [iteration, k, False]
                    if cancel is not None and cancel.cancelled:
                        raise RunCancelled("cancelled between workflows")
                    keys, outs = port_keys[k], writes[k]
                    have = ctx.versions(reads[k] + outs)
                    missing = sorted(uid for uid in reads[k] if have[uid] is None)
                    if missing:
                        raise missing_inputs_error(k, missing, ctx.run_id)
                    server = choose(iteration, k, step)
                    prompt = self._with_recipes(prompt, server, reads[k], port_keys[k], cancel)
                    t0 = time.monotonic()
                    where[2] = True
                    attempts = _run_one(self.pool, ctx, server, k, iteration, prompt, keys, outs, have, timeout,
                                        self.retries, self.adopt, cancel)
                    where[2] = False
                    self.used.add(server)
                    for uid in outs:
                        self._writers[uid] = (server, prompts[k], keys[uid].output_node_ids[-1])
                        if uid not in written:
                            written.append(uid)
                    step += 1
                    self._report(progress, bar, iteration, k, step, total, server, time.monotonic() - t0, attempts)
                iteration += 1
                if until is not None and until_holds(ctx, until, iteration - 1):
                    result.stopped = "until"
                    break
            where[:] = [None, None, False]
            for uid in written:
                try:
                    result[uid] = ctx.load(uid, copy=True)
                except ReferenceUnavailableError:
                    log.info("discomfort: run %s: %r is a reference in a server's process: not returned",
                             ctx.run_id, uid)
            result.iterations = iteration
            return result
        except RunCancelled as exc:
            raise cut_error(RunCancelled, cancel.reason if cancel is not None else None, ctx.run_id, names,
                            iterations, where[0], where[1], where[2], step, self._removes_store_on_cancel) from exc
        except KeyboardInterrupt as exc:
            raise cut_error(RunInterrupted, "Ctrl-C", ctx.run_id, names, iterations, where[0], where[1], where[2],
                            step, self._removes_store_on_cancel) from exc
        finally:
            if bar is not None:
                bar.close()

    def _with_recipes(self, prompt: dict, server: int, reads: list[str], ports: Mapping,
                      cancel: CancelToken | None = None) -> dict:
        """``prompt`` with a recipe in place of each loader whose key is a reference another server
        saved (extracted here from this run's own workflows: trusted, bounded)."""
        for uid in reads:
            wrote = self._writers.get(uid)
            if wrote is None or wrote[0] == server or self.context.info(uid).get("kind") != "ref":
                continue
            info = self._object_info()
            recipe = extract(wrote[1], wrote[2], uid, info)
            for node in ports[uid].input_node_ids:
                prompt = stitch_recipe(prompt, node, recipe, self.run_id, info, cancel=cancel)
        return prompt

    def _report(self, progress: Any, bar: Any, iteration: int, k: int, step: int, total: int | None, server: int,
                seconds: float, attempts: int) -> None:
        event = WorkflowEvent(self.run_id, iteration, k, step, total, server, self.pool.slots[server].node_id,
                              seconds, attempts)
        log.info("discomfort: run %s: iteration %d, workflow %d on server %d (node %s): %.2fs%s",
                 self.run_id, iteration, k, server, event.node_id[:8], seconds,
                 "" if attempts == 1 else f" ({attempts} attempts: its server was replaced)")
        if bar is not None:
            bar.set_postfix_str(f"it {iteration} wf {k} -> server {server} ({event.node_id[:8]}) {seconds:.1f}s",
                                refresh=False)
            bar.update(1)
        if callable(progress) and progress is not True:
            progress(event)


def _run_one(pool: RayComfyPool, ctx: RayContext, server: int, k: int, iteration: int, prompt: dict,
             keys: Mapping, outs: list, before: Mapping, timeout: float | None, retries: int,
             adopt: bool, cancel: CancelToken | None = None) -> int:
    """Run one workflow on ``server``, replacing the server and trying again if it dies."""
    attempts = 0
    while True:
        attempts += 1
        try:
            digest = ctx.allow_prompt(prompt_as_run(prompt, pool))  # the form its nodes get (issue 23)
            try:
                pool.execute(server, prompt, timeout, cancel)
            finally:
                ctx.revoke_prompt(digest)
            after = ctx.versions(outs)
            for uid in outs:
                if after[uid] is None or after[uid] == before.get(uid):
                    raise WorkflowError(
                        f"workflow {k}: the port(s) {', '.join(keys[uid].output_node_ids)} writing "
                        f"{uid!r} did not save a value in run {ctx.run_id!r}"
                    )
            if adopt:
                _adopt(pool, ctx, server, outs)
            return attempts
        except ServerDiedError as exc:
            if attempts > retries:
                raise WorkflowError(
                    f"workflow {k} (iteration {iteration}) failed: its ComfyUI server {server} died "
                    f"{attempts} time(s): {exc}\n--- server log (tail) ---\n{pool.log_tail(server)}"
                ) from exc
            log.warning("discomfort: run %s: ComfyUI server %d died during workflow %d (iteration %d): %s; "
                        "replacing it and running the workflow again", ctx.run_id, server, k, iteration, exc)
            pool.replace(server)


def _adopt(pool: RayComfyPool, ctx: RayContext, server: int, outs: list) -> None:
    """Make the values the server saved owned by this process (one copy each, on the server's node)."""
    foreign = ctx._foreign_values(outs)
    if not foreign:
        return
    uids = list(foreign)
    refs = pool.adopt(server, [foreign[u][0] for u in uids])
    node = pool.slots[server].node_id
    for uid, ref in zip(uids, refs):
        ctx._adopted(uid, foreign[uid][1]["version"], ref, node)
