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
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .errors import ReferenceUnavailableError, RunCancelled, RunInterrupted, UnknownKeyError, WorkflowError
from .prompt_forms import prompt_as_run
from .recipes import Recipe, RecipeError, check_recipe, extract, stitch_recipe
from .run_control import (
    CancelToken,
    ProgressEvent,
    Until,
    accepts_keyword,
    check_bounds,
    cut_error,
    plan_releases,
    progress_bar,
    until_holds,
)
from .workflow_format import is_ui_format
from .workflow_tools import (
    choose_transport,
    missing_inputs_error,
    plan_workflows,
    port_io,
    prepare_prompt,
    read_workflows,
    resolve_executor,
    workflow_names,
)

__all__ = ["Run", "Result", "run_sequential"]

log = logging.getLogger("discomfort")


class Result(dict):
    """``{unique_id: value}`` of a call, with how many iterations ran and why the loop stopped
    (``stopped``: "iterations" when it ran them all, "until" when the condition held)."""

    iterations: int = 0
    stopped: str = "iterations"


class Run:
    """A run you hold across calls: ``with Run(executor) as run: run.save(...); run.execute([...])``.

    Values, and objects kept by reference in the executor's process (a model a workflow loaded),
    live until the ``with`` block ends, so Python can run between the calls: save a new parameter,
    choose the next workflow, load a result. ``executor``, ``transport``, ``ram_budget`` and
    ``disk_dir`` are those of :func:`run_sequential`.
    """

    def __init__(self, executor: Any = None, *, transport: str | None = None, ram_budget: int | str | None = None,
                 disk_dir: str | os.PathLike | None = None, object_info: Mapping | None = None) -> None:
        self.executor = resolve_executor(executor)
        self.transport, why = choose_transport(self.executor, transport)
        self.object_info = object_info
        self._removes_store_on_cancel = False  # run_sequential: a cut call ends the run too
        self._recipes: dict[str, Recipe] = {}  # keys given as recipes: built where they are read
        self._writers: dict[str, tuple[str, dict, str]] = {}  # key -> (executor, prompt, port node) that wrote it
        self._infos: dict[str, Mapping | None] = {}  # executor -> its /object_info
        self._executors: dict[str, Any] = {_where(self.executor): self.executor}  # where -> an executor there
        if self.transport == "http":
            from .remote import RemoteContext

            self.context: Any = RemoteContext(self.executor.url, ram_budget=ram_budget)
        else:
            from .context import WorkflowContext

            self.context = WorkflowContext(ram_budget=ram_budget, disk_dir=disk_dir)
        _announce(self.context, self.transport, why, self.executor)

    # ---- the run's values ----------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.context.run_id

    def save(self, unique_id: str, value: Any, pass_by: str = "auto") -> int | None:
        """Store a value. A :class:`~discomfort.recipes.Recipe` object goes to :meth:`save_recipe`;
        anything else is data, a mapping shaped like a recipe's JSON included."""
        if isinstance(value, Recipe):
            self.save_recipe(unique_id, value)
            return None
        self._recipes.pop(unique_id, None)
        self._writers.pop(unique_id, None)
        return self.context.save(unique_id, value, pass_by)

    def save_recipe(self, unique_id: str, recipe: Recipe) -> None:
        """Keep ``recipe`` as ``unique_id``'s value: built by whichever executor reads the key, after
        it is checked against that server (:func:`~discomfort.recipes.check_recipe`)."""
        if not isinstance(recipe, Recipe):
            raise TypeError(f"save_recipe({unique_id!r}, ...) takes a Recipe (Recipe.from_json(data) makes one "
                            f"from JSON), not a {type(recipe).__name__}")
        check_recipe(recipe, nodes=False)  # the bounds now; the nodes against the server that builds it
        self._recipes[unique_id] = recipe
        self._writers.pop(unique_id, None)
        if unique_id in self.context:
            self.context.delete(unique_id)

    def load(self, unique_id: str) -> Any:
        return self.context.load(unique_id)

    def recipe(self, unique_id: str) -> Recipe:
        """How to build ``unique_id``'s value elsewhere: the part of the workflow that wrote it."""
        if unique_id in self._recipes:
            return self._recipes[unique_id]
        if unique_id not in self._writers:
            raise RecipeError(f"{unique_id!r} was not written by a workflow of this run: no recipe for it")
        where, prompt, node = self._writers[unique_id]
        return extract(prompt, node, unique_id, self._object_info(self._executors[where]), self._recipes)

    def _object_info(self, executor: Any) -> Mapping | None:
        key = _where(executor)
        if key not in self._infos:
            ask = getattr(executor, "object_info", None)
            self._infos[key] = self.object_info if self.object_info is not None or not callable(ask) else ask()
        return self._infos[key]

    def delete(self, unique_id: str) -> bool:
        given = self._recipes.pop(unique_id, None) is not None
        self._writers.pop(unique_id, None)
        return self.context.delete(unique_id) or given

    def keys(self) -> list[str]:
        return self.context.keys() + [k for k in self._recipes if k not in self.context]

    def __contains__(self, unique_id: object) -> bool:
        return unique_id in self.context

    # ---- running workflows --------------------------------------------------------------------
    def execute(self, workflows: Any, inputs: Mapping[str, Any] | None = None, iterations: int | None = 1, *,
                until: Until | None = None, timeout: float | None = None, outputs: Iterable[str] | None = None,
                release_unused: bool = False, cancel: CancelToken | None = None, progress: bool | None = None,
                on_progress: Callable[[ProgressEvent], Any] | None = None, executor: Any = None) -> Result:
        """Run ``workflows`` one after the other, ``iterations`` times (or until ``until``); returns
        the values the ports wrote in this call (or ``outputs``). See :func:`run_sequential`.

        ``executor``: run this call somewhere else than the run's executor (shared memory only):
        references another executor's workflows saved reach this one by recipe.
        """
        iterations = check_bounds(iterations, until)
        executor = self.executor if executor is None else resolve_executor(executor)
        self._executors.setdefault(_where(executor), executor)
        if _where(executor) != _where(self.executor) and self.transport == "http":
            raise ValueError("this run lives inside its ComfyUI server (HTTP transport): its workflows run there only")
        plan = _plan(workflows, inputs, iterations, until, self, outputs, release_unused)
        state = _RunState(plan.names, iterations, until, on_progress, progress)
        state.run_id = self.run_id
        options = _executor_options(executor, cancel, state, on_progress is not None)
        ctx = self.context
        try:
            for uid, value in (inputs or {}).items():
                self.save(uid, value)
            if plan.releases is not None:
                _release(ctx, plan.releases[0])
            sent = [prepare_prompt(p, ctx.run_id, nodes) for p, nodes in zip(plan.prompts, plan.port_nodes)]
            result = Result()
            iteration = 0
            while iterations is None or iteration < iterations:
                for k, prompt in enumerate(sent):
                    prompt = self._with_recipes(prompt, plan, k, executor, cancel)
                    _run_workflow(ctx, executor, plan, state, iteration, k, prompt, timeout, options, cancel,
                                  self._recipes)
                    for uid in plan.writes[k]:  # where each written value lives, and its recipe's source
                        self._recipes.pop(uid, None)
                        node = plan.port_keys[k][uid].output_node_ids[-1]
                        self._writers[uid] = (_where(executor), plan.prompts[k], node)
                iteration += 1
                if until is not None and until_holds(ctx, until, iteration - 1):
                    result.stopped = "until"
                    break
            state.at(None, None)
            result.update(self._collect(plan.written, plan.wanted))
            result.iterations = iteration
            return result
        except RunCancelled as exc:
            raise state.cut(RunCancelled, cancel.reason if cancel is not None else None,
                            self._removes_store_on_cancel) from exc
        except KeyboardInterrupt as exc:
            raise state.cut(RunInterrupted, "Ctrl-C", self._removes_store_on_cancel) from exc
        finally:
            state.close()

    def _with_recipes(self, prompt: dict, plan: "_Plan", k: int, executor: Any, cancel: CancelToken | None) -> dict:
        """``prompt`` with a recipe in place of each loader whose key is a reference that does not
        live in ``executor``'s process (or was given as a recipe), each checked for that server."""
        for uid in plan.reads[k]:
            recipe = self._recipes.get(uid)
            if recipe is None and uid in self._writers and self._writers[uid][0] != _where(executor) \
                    and self._is_reference(uid):
                recipe = self.recipe(uid)
            if recipe is None:
                continue
            for node in plan.port_keys[k][uid].input_node_ids:
                prompt = stitch_recipe(prompt, node, recipe, self.run_id, self._object_info(executor), cancel=cancel)
        return prompt

    def _is_reference(self, uid: str) -> bool:
        encoded = getattr(self.context, "load_encoded", None)
        return encoded is not None and uid in self.context and encoded(uid)[0] == "ref"

    def _collect(self, written: list[str], wanted: list[str] | None) -> dict[str, Any]:
        """The values to return: ``wanted`` (a reference that cannot come here comes as its
        recipe), else every written key that can leave its process."""
        out: dict[str, Any] = {}
        for uid in written if wanted is None else wanted:
            if uid in self._recipes:
                out[uid] = self._recipes[uid]
                continue
            try:
                out[uid] = self.context.load(uid)
            except ReferenceUnavailableError:
                if wanted is not None:
                    out[uid] = self.recipe(uid)
                    continue
                log.info("discomfort: run %s: %r is not returned: it is a reference to an object in the "
                         "ComfyUI server's process (ask for it in outputs= to get its recipe)", self.run_id, uid)
        return out

    # ---- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """End the run: its store and everything kept by reference for it are released."""
        self.context.shutdown()

    shutdown = close

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)

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
) -> Result:
    """Run ``workflows`` one after the other, ``iterations`` times; returns ``{unique_id: value}``.

    ``workflows``: one or several workflows (API or UI format; dicts or JSON files).
    ``inputs``: values for INPUT ports, by unique_id. Every OUTPUT (or PASSTHRU) port saves its
    value under its unique_id; an INPUT port reads the latest value of its unique_id, so the
    outputs of workflow k feed workflow k+1, and those of iteration N feed iteration N+1. A value
    saved again under its key replaces the old one, whose space the store reuses.
    ``executor``: an :class:`~discomfort.comfy.InProcessComfy`, a
    :class:`~discomfort.comfy.ComfyServer`, a server URL, or None (ComfyUI in this process, from
    ``$DISCOMFORT_COMFYUI``).

    ``until``: stop after the iteration in which it holds: a key an output port writes (a BOOLEAN
    or INT value; true or non-zero stops), or ``fn(iteration, values)`` returning True to stop
    (``values``: a read-only mapping of the run's current values). ``iterations`` is then the
    upper bound; None means no bound (only with ``until``). The result's ``iterations`` says how
    many ran and ``stopped`` why ("until" or "iterations").

    ``transport``: how values reach the ComfyUI nodes (default "auto", or
    ``$DISCOMFORT_TRANSPORT``; see :func:`~discomfort.workflow_tools.choose_transport`). "shm":
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

    The result stays valid after the run's store is gone. The store lives only inside this call;
    hold a :class:`Run` to keep values and models across calls.
    """
    iterations = check_bounds(iterations, until)
    with Run(executor, transport=transport, ram_budget=ram_budget, disk_dir=disk_dir,
             object_info=object_info) as run:
        run._removes_store_on_cancel = True
        return run.execute(workflows, inputs, iterations, until=until, timeout=timeout, outputs=outputs,
                           release_unused=release_unused, cancel=cancel, progress=progress,
                           on_progress=on_progress)


# ---- the steps ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a call knows before it starts: prompts, ports, keys read and written, releases."""

    names: list[str]
    prompts: list[dict]
    port_nodes: list[dict]
    port_keys: list[dict]
    reads: list[list[str]]
    writes: list[list[str]]
    wanted: list[str] | None
    releases: list[list[str]] | None
    bounded: bool  # releases were planned for the real number of iterations
    written: list[str] = field(default_factory=list)  # keys some port wrote, in order

    def release_index(self, iteration: int, k: int) -> int:
        """Where in ``releases`` the step after workflow ``k`` of ``iteration`` is."""
        n = len(self.prompts)
        if not self.bounded and iteration > 0:
            iteration = 1  # planned for 3 iterations: the middle one stands for every later one
        return iteration * n + k + 1


def _plan(workflows: Any, inputs: Mapping[str, Any] | None, iterations: int | None, until: Until | None,
          run: Run, outputs: Iterable[str] | None, release_unused: bool) -> _Plan:
    """Read and convert the workflows, find their ports, check ``outputs=`` and ``until=``, plan releases."""
    names = workflow_names(workflows)
    items = read_workflows(workflows)
    object_info = run.object_info
    if object_info is None and any(is_ui_format(w) for w in items) \
            and callable(getattr(run.executor, "object_info", None)):
        object_info = run.object_info = run.executor.object_info()
    prompts, port_nodes, port_keys = plan_workflows(items, object_info)
    reads, writes = port_io(port_keys)
    written = {uid for w in writes for uid in w}
    wanted = None if outputs is None else list(dict.fromkeys([outputs] if isinstance(outputs, str) else outputs))
    if wanted is not None:
        unknown = [uid for uid in wanted if uid not in written | set(inputs or {}) | set(run.keys()) | set(run._recipes)]
        if unknown:
            raise ValueError(f"outputs= names {', '.join(map(repr, unknown))}, which no port writes, inputs= "
                             "does not give and the run does not hold")
    if isinstance(until, str) and until not in written:
        raise ValueError(f"until={until!r}: no output port of these workflows writes that key")
    releases = None
    bounded = iterations is not None and until is None
    if release_unused:
        keep = set(wanted if wanted is not None else written) | ({until} if isinstance(until, str) else set())
        releases = plan_releases(reads, writes, iterations if bounded and iterations else 3, keep,
                                 initial=inputs or {})
    return _Plan(names, prompts, port_nodes, port_keys, reads, writes, wanted, releases, bounded)


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


def _run_workflow(ctx: Any, executor: Any, plan: _Plan, state: "_RunState", iteration: int, k: int,
                  prompt: dict, timeout: float | None, options: dict[str, Any],
                  cancel: CancelToken | None, recipes: Mapping[str, Any]) -> None:
    """One workflow of one iteration: check its inputs, let its prompt use the run, run it,
    check that every port wrote, release what no later workflow reads."""
    state.at(iteration, k)
    if cancel is not None and cancel.cancelled:
        raise RunCancelled("cancelled between workflows")
    missing = sorted(uid for uid in plan.reads[k] if uid not in recipes and uid not in ctx)
    if missing:
        raise missing_inputs_error(k, missing, ctx.run_id)
    before = {uid: _version(ctx, uid) for uid in plan.writes[k]}
    state.emit("workflow_start")
    state.inside = True
    digest = ctx.allow_prompt(prompt_as_run(prompt, executor))  # the form its nodes get (issue 23)
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
    if plan.releases is not None:
        _release(ctx, plan.releases[plan.release_index(iteration, k)])
    state.finished()


def _where(executor: Any) -> str:
    """Which process an executor's nodes run in: a server's URL, or this process."""
    url = getattr(executor, "url", None)
    return str(url) if url else "this process"


def _version(ctx: Any, uid: str) -> int | None:
    """The stored version of ``uid`` or None, in one call (one request over HTTP)."""
    try:
        return ctx.info(uid)["version"]
    except UnknownKeyError:
        return None


def _release(ctx: Any, keys: list[str]) -> None:
    for uid in keys:
        ctx.delete(uid)


class _RunState:
    """Where a call is, for progress events, the progress bar and the message of a cut run."""

    def __init__(self, names: list[str], iterations: int | None, until: Until | None,
                 on_progress: Callable | None, progress: bool | None) -> None:
        self.names = names
        self.iterations = iterations
        self.until = None if until is None else (repr(until) if isinstance(until, str) else "a condition")
        self.total = None if iterations is None else iterations * len(names)
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

    def where(self) -> str:
        assert self.iteration is not None and self.workflow is not None
        of = "" if self.iterations is None else f"/{self.iterations}"
        until = "" if self.until is None else f" (until {self.until})"
        return (f"iteration {self.iteration + 1}{of}{until}, workflow {self.workflow + 1}/{len(self.names)} "
                f"({self.names[self.workflow]})")

    def emit(self, kind: str, **extra: Any) -> None:
        assert self.iteration is not None and self.workflow is not None
        if self.bar is not None:
            where = self.where()
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

    def cut(self, cls: type, reason: str | None, store_removed: bool) -> BaseException:
        """The RunCancelled / RunInterrupted saying where the run was cut."""
        return cut_error(cls, reason, self.run_id, self.names, self.iterations, self.iteration, self.workflow,
                         self.inside, self.done, store_removed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
