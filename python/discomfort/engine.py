"""The run engine: the loop every run goes through, written once.

Plan the workflows, stitch recipes in, save the inputs, let each prompt use the run, execute it,
check that every port wrote, stop on ``until``, honour ``cancel``, report progress, release what
no later workflow reads. *Where* a workflow runs is a placement: :class:`LocalPlacement` (an
executor: ComfyUI in this process or a server) here, ``RayPlacement`` (a server of a Ray pool,
with retry and adoption) in :mod:`discomfort.distributed`. :class:`~discomfort.sequential.Run`
and :class:`~discomfort.distributed.RayRun` are :class:`RunEngine` with a context and a placement.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from .controls import Controls, WidgetControl, with_values
from .errors import ReferenceUnavailableError, RunCancelled, RunInterrupted, WorkflowError
from .history import OnIteration, Recorder, check_keep, ram_budget_of
from .prompt_forms import prompt_as_run
from .recipes import Recipe, RecipeError, check_recipe, extract, stitch_recipe
from .reuse import Reuse, wrote
from .reuse import is_reference as _is_reference
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
from .runs import PassBy, RunContext, key_versions
from .workflows.format import is_ui_format
from .workflows.tools import (
    missing_inputs_error,
    plan_workflows,
    port_io,
    prepare_prompt,
    read_workflows,
    workflow_names,
)

__all__ = ["Result", "RunEngine", "Placement", "LocalPlacement", "executor_where"]

log = logging.getLogger("discomfort")


class Result(dict):
    """``{unique_id: value}`` of a call, with how many iterations ran and why the loop stopped
    (``stopped``: "iterations" when it ran them all, "until" when the condition held).

    Per iteration: ``history[key]`` (each ``keep=`` key's value after it), ``files`` (per
    iteration, the files ComfyUI's output nodes wrote: {"node", "filename", "subfolder", "type",
    "workflow", "path"}) and ``controls`` (per iteration, per workflow, {"NODE.INPUT": value used})."""

    iterations: int = 0
    stopped: str = "iterations"
    reused: list[tuple[int, int]] = []  # (iteration, workflow) not queued again (discomfort.reuse)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: dict[str, list] = {}
        self.files: list[list[dict]] = []
        self.controls: list[list[dict]] = []


class Placement(Protocol):
    """Where a run's workflows execute. A slot names one place (a server of a pool)."""

    def choose(self, iteration: int, k: int, step: int) -> Any:
        """The slot that runs workflow ``k`` of ``iteration`` (``step``: workflows run so far)."""

    def where(self, slot: Any) -> str:
        """Which process the slot's nodes run in: references saved there live there."""

    def prompt_target(self, slot: Any) -> Any:
        """What :func:`~discomfort.prompt_forms.prompt_as_run` reads the node types from."""

    def object_info(self, slot: Any) -> Mapping | None:
        """The slot's ``/object_info`` (None: not known)."""

    def execute(self, slot: Any, prompt: dict, timeout: float | None, cancel: CancelToken | None,
                on_event: Callable[[str, dict], Any] | None) -> Any:
        """Run ``prompt`` there; ComfyUI's outputs of it, ``{node_id: ui_output}`` (None: not known).
        A placement may also have ``output_dir(slot)``: the folder those outputs' files are in."""

    def settle(self, ctx: RunContext, slot: Any, written: list[str]) -> None:
        """After the workflow wrote ``written``: e.g. make its values outlive its server."""

    def recover(self, slot: Any, exc: Exception, attempts: int, run_id: str, iteration: int, k: int) -> bool:
        """Whether to run the workflow again after ``exc`` (after replacing what failed)."""

    def describe(self, slot: Any) -> dict[str, Any]:
        """``server`` and ``node_id`` for progress events."""


def executor_where(executor: Any) -> str:
    """Which process an executor's nodes run in: a server's URL, or this process."""
    url = getattr(executor, "url", None)
    return str(url) if url else "this process"


class LocalPlacement:
    """Every workflow on one executor (an InProcessComfy or a ComfyServer): one slot, no retry."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self._cancel = accepts_keyword(executor.execute, "cancel")
        self._events = accepts_keyword(executor.execute, "on_event")

    def choose(self, iteration: int, k: int, step: int) -> Any:
        return None

    def where(self, slot: Any) -> str:
        return executor_where(self.executor)

    def prompt_target(self, slot: Any) -> Any:
        return self.executor

    def object_info(self, slot: Any) -> Mapping | None:
        ask = getattr(self.executor, "object_info", None)
        return ask() if callable(ask) else None

    def execute(self, slot: Any, prompt: dict, timeout: float | None, cancel: CancelToken | None,
                on_event: Callable[[str, dict], Any] | None) -> Any:
        options: dict[str, Any] = {}
        if cancel is not None and self._cancel:
            options["cancel"] = cancel
        if on_event is not None and self._events:
            options["on_event"] = on_event
        return self.executor.execute(prompt, timeout=timeout, **options)

    def output_dir(self, slot: Any) -> Any:
        return getattr(self.executor, "output_dir", None)

    def settle(self, ctx: Any, slot: Any, written: list[str]) -> None:
        return None

    def recover(self, slot: Any, exc: Exception, attempts: int, run_id: str, iteration: int, k: int) -> bool:
        return False

    def describe(self, slot: Any) -> dict[str, Any]:
        return {"server": executor_where(self.executor)}


class RunEngine:
    """A run: its values (``context``), the recipes given for keys, which workflow wrote each key,
    and :meth:`execute`, the loop. Subclasses choose the context and the default placement."""

    context: RunContext
    placement: Any
    object_info: Mapping | None = None
    _removes_store_on_cancel = False  # run_sequential: a cut call ends the run too
    _bar_name = "discomfort run"

    def _start_engine(self, object_info: Mapping | None) -> None:
        self.object_info = object_info
        self._recipes: dict[str, Recipe] = {}  # keys given as recipes: built where they are read
        self._writers: dict[str, tuple[str, dict, str]] = {}  # key -> (where, prompt, port node) that wrote it
        self._infos: dict[str, Mapping | None] = {}  # where -> its /object_info
        self._places: dict[str, tuple[Any, Any]] = {}  # where -> (placement, slot) there
        self._controls = Controls()  # controlled widgets' values, across calls
        self._reuse = Reuse()  # the prompts this run ran, for workflows that need not run again

    # ---- the run's values ----------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.context.run_id

    def save(self, unique_id: str, value: Any, pass_by: PassBy = "auto") -> int | None:
        """Store a value. A :class:`~discomfort.recipes.Recipe` object goes to :meth:`save_recipe`;
        anything else is data, a mapping shaped like a recipe's JSON included."""
        if isinstance(value, Recipe):
            self.save_recipe(unique_id, value)
            return None
        self._recipes.pop(unique_id, None)
        self._writers.pop(unique_id, None)
        return self.context.save(unique_id, value, pass_by)

    def save_recipe(self, unique_id: str, recipe: Recipe) -> None:
        """Keep ``recipe`` as ``unique_id``'s value: built by whichever server reads the key, after
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
        return extract(prompt, node, unique_id, self._object_info(*self._places[where]), self._recipes)

    def delete(self, unique_id: str) -> bool:
        given = self._recipes.pop(unique_id, None) is not None
        self._writers.pop(unique_id, None)
        return self.context.delete(unique_id) or given

    def keys(self) -> list[str]:
        return self.context.keys() + [k for k in self._recipes if k not in self.context]

    def __contains__(self, unique_id: object) -> bool:
        return unique_id in self.context

    def _object_info(self, placement: Any, slot: Any) -> Mapping | None:
        key = placement.where(slot)
        if key not in self._infos:
            self._infos[key] = self.object_info if self.object_info is not None else placement.object_info(slot)
        return self._infos[key]

    # ---- the loop --------------------------------------------------------------------------------
    def run_loop(self, workflows: Any, inputs: Mapping[str, Any] | None = None, iterations: int | None = 1, *,
                 until: Until | None = None, timeout: float | None = None, outputs: Iterable[str] | None = None,
                 release_unused: bool = False, cancel: CancelToken | None = None, progress: bool | None = None,
                 on_progress: Callable[[ProgressEvent], Any] | None = None, placement: Any = None,
                 names: list[str] | None = None, controls: Any = None, on_iteration: OnIteration | None = None,
                 keep: Iterable[str] | None = None, rerun: str = "auto") -> Result:
        """The loop: run ``workflows`` one after the other on ``placement`` (default: the run's),
        ``iterations`` times (or until ``until``); returns the values the ports wrote in this call
        (or ``outputs``). The options are :func:`~discomfort.sequential.run_sequential`'s."""
        iterations = check_bounds(iterations, until)
        kept = check_keep(keep)
        self._reuse.begin(rerun)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress= is True, False or None (a bar on stderr), not {progress!r}: a function "
                            "that hears each workflow is on_progress=")
        placement = self.placement if placement is None else placement
        plan = self._plan(workflows, inputs, iterations, until, outputs, release_unused, placement, names,
                          controls, kept)
        state = _RunState(plan.names, iterations, until, on_progress, progress, self._bar_name)
        state.run_id = self.run_id
        on_event = state.comfy_event if on_progress is not None or state.bar is not None else None
        ctx = self.context
        result = Result()
        record = Recorder(result, ctx, kept, on_iteration, self._load_result, lambda: ram_budget_of(ctx))
        try:
            for uid, value in (inputs or {}).items():
                self.save(uid, value)
            if plan.releases is not None:
                _release(ctx, plan.releases[0])
            sent = [prepare_prompt(p, ctx.run_id, nodes) for p, nodes in zip(plan.prompts, plan.port_nodes)]
            iteration = 0
            while iterations is None or iteration < iterations:
                for k, prompt in enumerate(sent):
                    state.at(iteration, k)
                    if cancel is not None and cancel.cancelled:
                        raise RunCancelled("cancelled between workflows")
                    slot = placement.choose(iteration, k, state.done)
                    where = placement.where(slot)
                    self._places.setdefault(where, (placement, slot))
                    used = self._controls.values(plan.controls[k], plan.prompts[k])
                    raw = with_values(plan.prompts[k], plan.controls[k], used)  # the values its controls give
                    prompt = self._with_recipes(with_values(prompt, plan.controls[k], used), plan, k, placement,
                                                slot, cancel)
                    ui = self._run_workflow(plan, state, iteration, k, prompt, timeout, placement, slot, cancel,
                                            on_event)
                    self._controls.advance(plan.controls[k], used)
                    record.workflow_done(k, ui, getattr(placement, "output_dir", lambda s: None)(slot), used)
                    for uid in plan.writes[k]:  # where each written value lives, and its recipe's source
                        self._recipes.pop(uid, None)
                        self._writers[uid] = (where, raw, plan.port_keys[k][uid].output_node_ids[-1])
                record.iteration_done(iteration)
                iteration += 1
                if until is not None and until_holds(ctx, until, iteration - 1):
                    result.stopped = "until"
                    break
            state.at(None, None)
            result.update(self._collect(plan.written, plan.wanted))
            result.iterations = iteration
            result.reused = self._reuse.reused
            return result
        except RunCancelled as exc:
            raise state.cut(RunCancelled, cancel.reason if cancel is not None else None,
                            self._removes_store_on_cancel) from exc
        except KeyboardInterrupt as exc:
            raise state.cut(RunInterrupted, "Ctrl-C", self._removes_store_on_cancel) from exc
        finally:
            state.close()

    def _plan(self, workflows: Any, inputs: Mapping[str, Any] | None, iterations: int | None, until: Until | None,
              outputs: Iterable[str] | None, release_unused: bool, placement: Any,
              names: list[str] | None, controls: Any = None, keep: list[str] | None = None) -> "_Plan":
        """Read and convert the workflows, find their ports and controls, check ``outputs=``,
        ``keep=`` and ``until=``, plan releases."""
        names = names or workflow_names(workflows)
        items = read_workflows(workflows)
        object_info = self.object_info
        if object_info is None and (any(is_ui_format(w) for w in items) or isinstance(controls, Mapping)):
            object_info = self._object_info(placement, placement.choose(0, 0, 0))
        found: list = []
        prompts, port_nodes, port_keys = plan_workflows(items, object_info, found)
        widgets = self._controls.plan(items, prompts, found, controls, object_info)
        reads, writes = port_io(port_keys)
        written = {uid for w in writes for uid in w}
        wanted = None if outputs is None else list(dict.fromkeys([outputs] if isinstance(outputs, str) else outputs))
        if wanted is not None:
            known = written | set(inputs or {}) | set(self.keys()) | set(self._recipes)
            unknown = [uid for uid in wanted if uid not in known]
            if unknown:
                raise ValueError(f"outputs= names {', '.join(map(repr, unknown))}, which no port writes, inputs= "
                                 "does not give and the run does not hold")
        unknown = [uid for uid in keep or [] if uid not in written | set(inputs or {}) | set(self.keys())]
        if unknown:
            raise ValueError(f"keep= names {', '.join(map(repr, unknown))}, which no port writes, inputs= does not "
                             "give and the run does not hold")
        if isinstance(until, str) and until not in written:
            raise ValueError(f"until={until!r}: no output port of these workflows writes that key")
        releases = None
        bounded = iterations is not None and until is None
        if release_unused:
            held = set(wanted if wanted is not None else written) | ({until} if isinstance(until, str) else set())
            releases = plan_releases(reads, writes, iterations if bounded and iterations else 3, held | set(keep or []),
                                     initial=inputs or {})
        return _Plan(names, prompts, port_nodes, port_keys, reads, writes, wanted, releases, bounded, widgets)

    def _run_workflow(self, plan: "_Plan", state: "_RunState", iteration: int, k: int, prompt: dict,
                      timeout: float | None, placement: Any, slot: Any, cancel: CancelToken | None,
                      on_event: Callable[[str, dict], Any] | None) -> Any:
        """One workflow of one iteration: check its inputs, let its prompt use the run, run it
        (again, when the placement recovers from a failure), check that every port wrote, release
        what no later workflow reads. Returns ComfyUI's outputs of the prompt (None: not known)."""
        ctx, outs = self.context, plan.writes[k]
        have = key_versions(ctx, plan.reads[k] + outs)
        missing = sorted(uid for uid in plan.reads[k] if uid not in self._recipes and have[uid] is None)
        if missing:
            raise missing_inputs_error(k, missing, ctx.run_id)
        state.describe(placement.describe(slot))
        state.emit("workflow_start")
        attempts, outputs = 0, None
        reuse = self._reuse.consider(ctx, prompt, placement, slot, outs, iteration, k)  # discomfort.reuse
        form = reuse.form  # the prompt as the nodes get it, once
        while not reuse.skip:
            attempts += 1
            try:
                state.inside = True
                if form is None:
                    form = prompt_as_run(prompt, placement.prompt_target(slot))
                digest = ctx.allow_prompt(form)  # issue 23
                try:
                    outputs = placement.execute(slot, prompt, timeout, cancel, on_event)
                finally:
                    ctx.revoke_prompt(digest)
                state.inside = False
                after = key_versions(ctx, outs)
                for uid in outs:
                    if not wrote(ctx, uid, have[uid], after[uid]):
                        raise WorkflowError(
                            f"workflow {k}: the port(s) {', '.join(plan.port_keys[k][uid].output_node_ids)} "
                            f"writing {uid!r} did not save a value in run {ctx.run_id}"
                        )
                reuse.ran(after)
                placement.settle(ctx, slot, outs)
                break
            except Exception as exc:  # noqa: BLE001 - the placement says whether it can run it again
                if not placement.recover(slot, exc, attempts, ctx.run_id, iteration, k):
                    raise
                form = None  # the slot's server was replaced: its node types, again
                state.describe(placement.describe(slot))
        for uid in outs:
            if uid not in plan.written:
                plan.written.append(uid)
        if plan.releases is not None:
            _release(ctx, plan.releases[plan.release_index(iteration, k)])
        state.finished(attempts)
        return outputs

    def _with_recipes(self, prompt: dict, plan: "_Plan", k: int, placement: Any, slot: Any,
                      cancel: CancelToken | None) -> dict:
        """``prompt`` with a recipe in place of each loader whose key is a reference that does not
        live in the slot's process (or was given as a recipe), each checked for that server."""
        where = placement.where(slot)
        for uid in plan.reads[k]:
            recipe = self._recipes.get(uid)
            if recipe is None and uid in self._writers and self._writers[uid][0] != where \
                    and _is_reference(self.context, uid):
                recipe = self.recipe(uid)
            if recipe is None:
                continue
            info = self._object_info(placement, slot)
            for node in plan.port_keys[k][uid].input_node_ids:
                prompt = stitch_recipe(prompt, node, recipe, self.run_id, info, cancel=cancel)
        return prompt

    def _load_result(self, unique_id: str) -> Any:
        return self.context.load(unique_id)

    def _collect(self, written: list[str], wanted: list[str] | None) -> dict[str, Any]:
        """The values to return: ``wanted`` (a reference that cannot come here comes as its
        recipe), else every written key that can leave its process."""
        out: dict[str, Any] = {}
        for uid in written if wanted is None else wanted:
            if uid in self._recipes:
                out[uid] = self._recipes[uid]
                continue
            try:
                out[uid] = self._load_result(uid)
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

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)


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
    controls: list[list[WidgetControl]]  # per workflow, the widgets a control changes between iterations
    written: list[str] = field(default_factory=list)  # keys some port wrote, in order

    def release_index(self, iteration: int, k: int) -> int:
        """Where in ``releases`` the step after workflow ``k`` of ``iteration`` is."""
        n = len(self.prompts)
        if not self.bounded and iteration > 0:
            iteration = 1  # planned for 3 iterations: the middle one stands for every later one
        return iteration * n + k + 1


def _release(ctx: RunContext, keys: list[str]) -> None:
    for uid in keys:
        ctx.delete(uid)


class _RunState:
    """Where a call is, for progress events, the progress bar and the message of a cut run."""

    def __init__(self, names: list[str], iterations: int | None, until: Until | None,
                 on_progress: Callable | None, progress: bool | None, bar_name: str) -> None:
        self.names = names
        self.iterations = iterations
        self.until = None if until is None else (repr(until) if isinstance(until, str) else "a condition")
        self.total = None if iterations is None else iterations * len(names)
        self.on_progress = on_progress
        self.bar = progress_bar(progress, self.total, bar_name)
        self.run_id = ""
        self.iteration: int | None = None
        self.workflow: int | None = None
        self.inside = False
        self.done = 0
        self.t0 = 0.0
        self.place: dict[str, Any] = {}

    def at(self, iteration: int | None, workflow: int | None) -> None:
        self.iteration, self.workflow, self.inside = iteration, workflow, False
        self.t0 = time.monotonic()

    def describe(self, place: dict[str, Any]) -> None:
        self.place = place

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
                                           **extra, **self.place))

    def comfy_event(self, kind: str, data: dict) -> None:
        """ComfyUI's messages about the running prompt, as "node" and "step" events."""
        if kind == "executing" and data.get("node") is not None:
            self.emit("node", node=str(data["node"]))
        elif kind == "progress":
            self.emit("step", node=None if data.get("node") is None else str(data["node"]),
                      value=data.get("value"), max=data.get("max"))

    def finished(self, attempts: int = 1) -> None:
        self.done += 1
        seconds = time.monotonic() - self.t0
        if attempts > 1 or "node_id" in self.place:  # a pool's servers: which one ran it, and how often
            node = self.place.get("node_id")
            log.info("discomfort: run %s: %s on server %s%s: %.2fs%s", self.run_id, self.where(),
                     self.place.get("server"), f" (node {node[:8]})" if node else "", seconds,
                     "" if attempts == 1 else f" ({attempts} attempts: its server was replaced)")
        self.emit("workflow_done", seconds=seconds, attempts=attempts)

    def cut(self, cls: type, reason: str | None, store_removed: bool) -> BaseException:
        """The RunCancelled / RunInterrupted saying where the run was cut."""
        return cut_error(cls, reason, self.run_id, self.names, self.iterations, self.iteration, self.workflow,
                         self.inside, self.done, store_removed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
