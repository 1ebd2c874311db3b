"""Independent runs at once: :func:`run_parallel` spreads a batch of inputs over several ComfyUIs.

One run per input mapping, each with its own run context, on one executor at a time (a server
per GPU, several machines through a :class:`~discomfort.distributed.RayComfyPool`). Each
executor has a worker thread that takes the next run when it is free; a run is the engine's loop
(:class:`~discomfort.engine.RunEngine`), placed on that worker's executor for all its workflows.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .engine import LocalPlacement, RunEngine, executor_where
from .errors import ComfyConnectionError, RunCancelled, WorkflowError
from .run_control import CancelToken, ProgressEvent, Until, check_bounds, progress_bar
from .workflows.tools import choose_transport, read_workflows, resolve_executor, workflow_names

__all__ = ["run_parallel", "RunEvent"]

log = logging.getLogger("discomfort")


@dataclass(frozen=True)
class RunEvent:
    """What ``on_run`` gets when a run of a batch starts, ends, fails, or is retried elsewhere.

    ``kind``: "run_start", "run_done", "run_failed" (``error`` says why) or "run_retry" (its
    server died: the run starts again from its inputs on another). ``index``: the run's position
    in ``inputs``; ``attempt``: 1, or more after retries. ``done`` of ``total`` runs have ended
    (failed ones included); ``by_server``: how many ended on each server.
    """

    kind: str
    index: int
    server: Any
    attempt: int
    done: int
    total: int
    by_server: Mapping[Any, int]
    run_id: str | None = None
    error: BaseException | None = None


class _ServerGone(Exception):
    """A worker's server died: its run goes back to the queue, the worker stops."""


# ---- where runs go: one slot per executor, one worker thread per slot ------------------------------


class _SharedPlacement(LocalPlacement):
    """A LocalPlacement whose ``/object_info`` is asked once for all runs on the executor."""

    def __init__(self, executor: Any) -> None:
        super().__init__(executor)
        self._info: Mapping | None = None
        self._lock = threading.Lock()

    def object_info(self, slot: Any) -> Mapping | None:
        with self._lock:
            if self._info is None:
                self._info = super().object_info(slot)
            return self._info


class _LocalRun(RunEngine):
    """A run on one executor whose transport was chosen once for the batch."""

    def __init__(self, placement: _SharedPlacement, transport: str, ram_budget: Any, disk_dir: Any,
                 object_info: Mapping | None) -> None:
        self._start_engine(object_info)
        self.placement = placement
        self._removes_store_on_cancel = True
        if transport == "http":
            from .remote import RemoteContext

            self.context: Any = RemoteContext(placement.executor.url, ram_budget=ram_budget)
        else:
            from .context import WorkflowContext

            self.context = WorkflowContext(ram_budget=ram_budget, disk_dir=disk_dir)


class _LocalSlot:
    """An executor (ComfyUI in this process, a server, a URL): the transport is chosen once."""

    open_ahead = False  # a run context is made in about a millisecond

    def __init__(self, executor: Any, transport: str | None, ram_budget: Any, disk_dir: Any,
                 object_info: Mapping | None) -> None:
        self.executor = resolve_executor(executor)
        self.label: Any = executor_where(self.executor)
        self.requested, self.ram_budget, self.disk_dir, self.object_info = transport, ram_budget, disk_dir, object_info
        self.transport: str | None = None
        self.placement = _SharedPlacement(self.executor)

    def open(self) -> RunEngine:
        if self.transport is None:
            self.transport, why = choose_transport(self.executor, self.requested)
            log.info("discomfort: runs on %s: values %s (%s)", self.label,
                     "travel over HTTP" if self.transport == "http" else "in shared memory", why)
            if self.transport == "http":
                from .remote import TransportWarning

                warnings.warn(f"discomfort runs on {self.label}: values travel over HTTP ({why}); every value is "
                              "copied over the socket", TransportWarning, stacklevel=2)
        return _LocalRun(self.placement, self.transport, self.ram_budget, self.disk_dir, self.object_info)

    def dead(self) -> bool:
        """Whether the server is gone (ComfyUI in this process never is)."""
        process = getattr(self.executor, "process", None)
        if process is not None:  # a server launched here: its sockets close just before it exits
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                return False
            return True
        ask = getattr(self.executor, "queue", None)
        if not callable(ask):
            return False
        try:
            ask()
        except ComfyConnectionError:
            return True
        return False


class _RaySlot:
    """Server ``index`` of a RayComfyPool: a run is a RayRun whose workflows all go there (a server
    that dies is replaced and the workflow runs again, as in run_sequential_ray)."""

    open_ahead = True  # a RayRun starts its directory actor (~0.4 s): the next one is opened during this one

    def __init__(self, pool: Any, index: int, retries: int, object_info: Mapping | None) -> None:
        self.pool, self.index, self.retries, self.object_info = pool, index, retries, object_info
        self.label: Any = index

    def open(self) -> RunEngine:
        from .distributed._runner import RayRun

        run = RayRun(self.pool, assign=lambda _it, _k: self.index, retries=self.retries,
                     object_info=self.object_info)
        run._removes_store_on_cancel = True
        return run

    def dead(self) -> bool:
        return not self.pool.alive(self.index)


def _ray_pool(executors: Any) -> Any:
    """``executors`` if it is a RayComfyPool (then Ray is imported already), else None."""
    module = sys.modules.get("discomfort.distributed._pool")
    pool_class = getattr(module, "RayComfyPool", None)
    return executors if pool_class is not None and isinstance(executors, pool_class) else None


def _slots(executors: Any, transport: str | None, retries: int, ram_budget: Any, disk_dir: Any,
           object_info: Mapping | None) -> list[Any]:
    pool = _ray_pool(executors)
    if pool is not None:
        if transport is not None or ram_budget is not None or disk_dir is not None:
            raise ValueError("transport=, ram_budget= and disk_dir= are for servers; a Ray pool's runs keep their "
                             "values in Ray's object store")
        if not len(pool):
            pool.start()
        return [_RaySlot(pool, i, retries, object_info) for i in range(len(pool))]
    if isinstance(executors, (str, os.PathLike)) or not isinstance(executors, Sequence) or not executors:
        raise TypeError(f"executors is a non-empty list of executors or server URLs, or a RayComfyPool, "
                        f"not {executors!r}")
    slots = [_LocalSlot(e, transport, ram_budget, disk_dir, object_info) for e in executors]
    here = [s for s in slots if s.label == "this process"]
    if len(here) > 1:
        raise ValueError("ComfyUI in this process runs one prompt at a time: give it once in executors")
    return slots


# ---- the batch --------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """The runs of one call: a queue of indices, a worker per slot, results as they come."""

    items: list
    names: list[str]
    inputs: list[Mapping[str, Any]]
    slots: list[Any]
    options: dict
    retries: int
    on_run: Callable[[RunEvent], Any] | None
    on_progress: Callable[[ProgressEvent], Any] | None
    bar: Any
    stop: CancelToken = field(default_factory=CancelToken)
    done: queue.Queue = field(default_factory=queue.Queue)  # (index, result) as runs end
    by_server: dict = field(default_factory=dict)
    ended: int = 0

    def __post_init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.in_flight = 0  # runs taken by a worker and not ended: one may come back to the queue
        self.attempts = [0] * len(self.inputs)
        self.lock = threading.Lock()  # the counters, and one user callback at a time
        self.turn = threading.Condition()  # the queue: workers wait on it while runs are in flight
        self.workers_left = len(self.slots)
        self.threads: list[threading.Thread] = []
        self.opener = ThreadPoolExecutor(len(self.slots), "discomfort-open") if any(
            s.open_ahead for s in self.slots) else None

    def start(self) -> None:
        # The first runs go to the executors in their order; the rest to whichever is free first.
        self.pending.extend(range(len(self.slots), len(self.inputs)))
        self.stop.subscribe(self._wake)
        for k, slot in enumerate(self.slots):
            first = k if k < len(self.inputs) else None
            self.in_flight += first is not None
            t = threading.Thread(target=self._work, args=(slot, first), name=f"discomfort-parallel-{k}", daemon=True)
            self.threads.append(t)
            t.start()

    def _wake(self) -> None:
        with self.turn:
            self.turn.notify_all()

    def _next(self) -> int | None:
        """The next run to take: None when the batch is stopped or nothing is left to do."""
        with self.turn:
            while not self.stop.cancelled:
                if self.pending:
                    self.in_flight += 1
                    return self.pending.popleft()
                if not self.in_flight:
                    return None
                self.turn.wait()
            return None

    def _ended(self, index: int, again: bool) -> None:
        with self.turn:
            self.in_flight -= 1
            if again:
                self.pending.append(index)
            self.turn.notify_all()

    def _work(self, slot: Any, index: int | None) -> None:
        ahead: list[Future] = []  # the run being opened for this worker's next run
        try:
            if index is not None and self.stop.cancelled:
                self._ended(index, False)
                index = None
            else:
                index = index if index is not None else self._next()
            while index is not None:
                again = False
                try:
                    self._one(slot, index, ahead)
                except _ServerGone as gone:
                    again = gone.args[0]
                    return
                finally:
                    self._ended(index, again)
                index = self._next()
        finally:
            for future in ahead:  # opened for a run that did not come
                with contextlib.suppress(Exception):
                    _close(future.result())
            with self.turn:
                self.workers_left -= 1
                orphans = self.workers_left == 0
            if orphans:  # no worker left: what is still queued cannot run
                self._fail_pending("no server is left to run it (every server in executors died)")
            self.done.put((None, None))  # this worker has stopped

    def _one(self, slot: Any, index: int, ahead: list[Future]) -> None:
        self.attempts[index] += 1
        attempt = self.attempts[index]
        self._event("run_start", index, slot.label, attempt)
        run: RunEngine | None = None
        try:
            run = ahead.pop().result() if ahead else slot.open()
            if self.opener is not None and self.pending and not self.stop.cancelled:
                ahead.append(self.opener.submit(slot.open))
            result: Any = run.run_loop(self.items, self.inputs[index], **self.options, cancel=self.stop,
                                       on_progress=self._progress, names=self.names)
        except RunCancelled as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - a failing run's error is its result
            if not _lost_connection(exc) or not slot.dead():
                result = exc
            elif attempt <= self.retries and not self.stop.cancelled:
                log.warning("discomfort: run %d of the batch: its server %s died (%s); it starts again from its "
                            "inputs on another", index, slot.label, exc)
                self._event("run_retry", index, slot.label, attempt, run, error=exc)
                raise _ServerGone(True) from exc
            else:
                result = WorkflowError(f"run {index}: its server {slot.label} died {attempt} time(s) (retries="
                                       f"{self.retries}): {exc}")
                result.__cause__ = exc
                self._finish(index, slot.label, attempt, run, result)
                raise _ServerGone(False) from exc
        finally:
            if run is not None:
                _close(run)
        self._finish(index, slot.label, attempt, run, result)

    def _finish(self, index: int, server: Any, attempt: int, run: RunEngine | None, result: Any) -> None:
        failed = isinstance(result, BaseException)
        with self.lock:
            self.ended += 1
            self.by_server[server] = self.by_server.get(server, 0) + 1
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(f"{s}: {n}" for s, n in self.by_server.items()), refresh=False)
                self.bar.update(1)
        self._event("run_failed" if failed else "run_done", index, server, attempt, run,
                    error=result if failed else None)
        self.done.put((index, result))

    def _fail_pending(self, why: str) -> None:
        with self.turn:
            left, self.pending = list(self.pending), collections.deque()
        if not self.stop.cancelled:
            for index in left:
                self._finish(index, None, self.attempts[index], None, WorkflowError(f"run {index}: {why}"))

    def _event(self, kind: str, index: int, server: Any, attempt: int, run: RunEngine | None = None,
               error: BaseException | None = None) -> None:
        if self.on_run is None:
            return
        with self.lock:
            self.on_run(RunEvent(kind, index, server, attempt, self.ended, len(self.inputs), dict(self.by_server),
                                 None if run is None else run.run_id, error))

    def _progress(self, event: ProgressEvent) -> None:
        if self.on_progress is not None:
            with self.lock:
                self.on_progress(event)

    def results(self, raise_first: bool, cancel: CancelToken | None) -> Iterator[tuple[int, Any]]:
        """(index, result) as runs end; on the way out every worker has stopped."""
        unsubscribe = cancel.subscribe(lambda: self.stop.cancel(cancel.reason)) if cancel is not None else None
        self.start()
        received, running, given = 0, len(self.threads), 0
        try:
            while received < len(self.inputs) and running:
                index, result = self.done.get()
                if index is None:
                    running -= 1
                    continue
                received += 1
                if isinstance(result, RunCancelled) and self.stop.cancelled:
                    continue  # cut by the batch's cancel: said once, below
                if raise_first and isinstance(result, Exception):
                    self.stop.cancel(f"run {index} failed")
                    raise result
                given += 1
                yield index, result
            if cancel is not None and cancel.cancelled:
                why = f" ({cancel.reason})" if cancel.reason else ""
                raise RunCancelled(f"the batch was cancelled{why}: {given} of {len(self.inputs)} runs had "
                                   "ended; the others were stopped or never started, and their stores removed")
        finally:
            if received < len(self.inputs):
                self.stop.cancel("the batch ended early")
            for t in self.threads:
                t.join()
            if self.opener is not None:
                self.opener.shutdown()
            if unsubscribe is not None:
                unsubscribe()
            if self.bar is not None:
                self.bar.close()


def _lost_connection(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a server that could not be reached."""
    while exc is not None:
        if isinstance(exc, ComfyConnectionError):
            return True
        exc = exc.__cause__
    return False


def _close(run: RunEngine) -> None:
    """End a run; a server that died took its HTTP run with it, which is not an error here."""
    try:
        run.close()
    except Exception as exc:  # noqa: BLE001
        log.info("discomfort: run %s could not be ended cleanly: %s", run.run_id, exc)


def run_parallel(
    workflows: Any,
    inputs: Iterable[Mapping[str, Any]],
    executors: Any,
    *,
    iterations: int | None = 1,
    until: Until | None = None,
    timeout: float | None = None,
    outputs: Iterable[str] | None = None,
    release_unused: bool = False,
    cancel: CancelToken | None = None,
    progress: bool | None = None,
    on_progress: Callable[[ProgressEvent], Any] | None = None,
    on_run: Callable[[RunEvent], Any] | None = None,
    as_completed: bool = False,
    raise_first: bool = False,
    retries: int = 1,
    transport: str | None = None,
    object_info: Mapping | None = None,
    ram_budget: int | str | None = None,
    disk_dir: str | os.PathLike | None = None,
    controls: Any = None,
    keep: Iterable[str] | None = None,
) -> Any:
    """Run ``workflows`` once per mapping in ``inputs``, the runs at once on several ComfyUIs.

    ``inputs``: a list of input mappings, one run each (a run is :func:`~discomfort.run_sequential`
    of ``workflows`` with those inputs, in a run context of its own). ``executors``: a list of
    executors or server URLs (one ComfyUI per GPU, several machines), or a
    :class:`~discomfort.distributed.RayComfyPool` (its servers). The first runs go to the
    executors in their order, the others to whichever is free first; all workflows of a run go to
    the executor that took it, and its values stay there (shared memory on this machine, the
    server's store over HTTP, Ray's object store on the server's node).

    Returns the results in input order, a list whose items are a :class:`~discomfort.sequential.Result`,
    or the exception that run raised: one failing run does not stop the others (unless
    ``raise_first=True``: the first error stops the batch and is raised). ``as_completed=True``
    returns an iterator of ``(index, result)`` as runs end instead (the runs start on the first
    ``next``; leaving the loop early stops them).

    A server that dies during a run (its process gone, its URL unreachable) takes no more runs;
    the run starts again from its inputs on another, at most ``retries`` times (default once). On
    a Ray pool the server is replaced and the workflow runs again, as in
    :func:`~discomfort.distributed.run_sequential_ray`.

    ``cancel``: one token stops every run (running ones inside their workflow, queued ones never
    start) and raises :class:`~discomfort.errors.RunCancelled`. ``progress``: a bar of runs done of
    the total with the count per server. ``on_run(RunEvent)``: each run's start, end, failure or
    retry. ``on_progress``: each run's :class:`~discomfort.run_control.ProgressEvent` (its
    ``run_id`` and ``server`` say which); callbacks are called one at a time, from the workers'
    threads. ``iterations``, ``until``, ``timeout``, ``outputs``, ``release_unused``, ``transport``
    (chosen once per server), ``object_info``, ``ram_budget``, ``disk_dir``, ``controls``, ``keep``:
    as in run_sequential, for each run (each run starts from the workflows' saved widget values, and
    its result carries its own ``history``, ``files`` and ``controls``).
    """
    iterations = check_bounds(iterations, until)
    if isinstance(inputs, Mapping) or isinstance(inputs, (str, bytes)):
        raise TypeError("inputs is a list of input mappings, one per run (for one run: [inputs])")
    runs = list(inputs)
    bad = [i for i, x in enumerate(runs) if not isinstance(x, Mapping)]
    if bad:
        raise TypeError(f"inputs[{bad[0]}] is a {type(runs[bad[0]]).__name__}: each run's inputs are a mapping "
                        "{unique_id: value}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress= is True, False or None, not {progress!r}: a function is on_run= or on_progress=")
    slots = _slots(executors, transport, retries, ram_budget, disk_dir, object_info)
    names = workflow_names(workflows)
    items = read_workflows(workflows)
    bar = progress_bar(progress, len(runs), "discomfort runs")
    if bar is not None:
        bar.unit = "run"
    options = {"iterations": iterations, "until": until, "timeout": timeout, "outputs": outputs,
               "release_unused": release_unused, "progress": False, "controls": controls, "keep": keep}
    batch = _Batch(items, names, runs, slots, options, retries, on_run, on_progress, bar)
    stream = batch.results(raise_first, cancel)
    if as_completed:
        return stream
    out: list[Any] = [None] * len(runs)
    try:
        for index, result in stream:
            out[index] = result
    except RunCancelled as exc:
        setattr(exc, "results", out)  # the runs that ended before the cancel; None for the others
        raise
    return out

