"""Controlling a long run: cancelling it, hearing its progress, and knowing which values it still needs.

``CancelToken`` stops a run from another thread; ``ProgressEvent`` is what ``on_progress`` gets;
``plan_releases`` says, after each workflow of a loop, which stored values no later workflow reads
(run_sequential's ``release_unused=True`` deletes them so a long loop holds only live values).
"""

from __future__ import annotations

import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .errors import UnknownKeyError, WorkflowError
from .runs import RunContext

__all__ = ["CancelToken", "ProgressEvent", "plan_releases", "progress_bar", "accepts_keyword", "cut_error",
           "Until", "check_bounds", "until_holds", "RunValues"]


class CancelToken:
    """Cancels a run from another thread: ``run_sequential(..., cancel=token)``, then ``token.cancel()``.

    The run stops before its next workflow, or inside the running one (the ComfyUI server is told
    to interrupt it and its queue item is removed), shuts its store down, and raises
    :class:`~discomfort.errors.RunCancelled`. A token cancels once and stays cancelled.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], Any]] = []
        self.reason: str | None = None

    def cancel(self, reason: str | None = None) -> None:
        """Ask every run holding this token to stop; safe from any thread, idempotent."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or ``timeout`` seconds passed (False)."""
        return self._event.wait(timeout)

    def subscribe(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """Call ``fn()`` once when cancelled (now, if already); returns the unsubscribe function."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)

                def unsubscribe() -> None:
                    with self._lock:
                        if fn in self._callbacks:
                            self._callbacks.remove(fn)

                return unsubscribe
        fn()
        return lambda: None

    def __repr__(self) -> str:
        return f"<CancelToken {'cancelled' if self.cancelled else 'active'}>"


@dataclass(frozen=True)
class ProgressEvent:
    """What ``on_progress`` gets.

    ``kind``: "workflow_start", "node" (ComfyUI started a node), "step" (a node reported progress,
    e.g. sampler steps: ``value`` of ``max``) or "workflow_done" (``seconds`` it took, and
    ``attempts``: 2 or more when its server died and it ran again on a replacement).
    ``iteration`` and ``workflow`` are 0-based; ``done`` counts workflows finished in this call,
    out of ``total`` = iterations x workflows. ``server``: where it runs (a ``Run``: the server's
    URL or "this process"; a ``RayRun``: the index of the pool's server, on Ray node ``node_id``).
    Ray runs were given a ``WorkflowEvent`` per workflow: that name is this class, and its fields
    ``index`` and ``step`` are ``workflow`` and ``done``.
    """

    kind: str
    run_id: str
    iteration: int
    iterations: int | None  # None: no bound (a loop that runs until a condition)
    workflow: int
    workflows: int
    name: str
    done: int
    total: int | None
    node: str | None = None
    value: int | None = None
    max: int | None = None
    seconds: float | None = None
    attempts: int | None = None
    server: Any = None
    node_id: str | None = None

    @property
    def index(self) -> int:
        """The workflow's index (``WorkflowEvent``'s name for ``workflow``)."""
        return self.workflow

    @property
    def step(self) -> int:
        """Workflows finished so far in this call (``WorkflowEvent``'s name for ``done``)."""
        return self.done


def progress_bar(show: bool | None, total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr, or None: ``show`` None means only when stderr is a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="workflow", file=sys.stderr)


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``name`` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def plan_releases(reads: Sequence[Iterable[str]], writes: Sequence[Iterable[str]], iterations: int,
                  keep: Iterable[str], initial: Iterable[str] = ()) -> list[list[str]]:
    """Which keys can be deleted after each step of the loop (and before the first).

    ``reads[k]`` / ``writes[k]``: the keys workflow ``k`` reads and writes. Steps run workflow
    0..n-1, ``iterations`` times. After a step, a stored key is dead when the next step touching
    it writes it without reading it, or when no later step touches it and it is not in ``keep``
    (the keys the caller gets back). Returns ``n * iterations + 1`` lists: index 0 is for the
    ``initial`` keys before anything runs, index ``s + 1`` for after step ``s``.
    """
    n = len(reads)
    r = [frozenset(x) for x in reads]
    w = [frozenset(x) for x in writes]
    keep = frozenset(keep)
    steps = n * iterations

    def dead(key: str, after: int) -> bool:
        # The pattern repeats: a key no step touches in one lap is never touched again.
        for t in range(after + 1, min(after + 1 + n, steps)):
            if key in r[t % n]:
                return False
            if key in w[t % n]:
                return True
        return key not in keep

    stored = set(initial)
    out = [sorted(k for k in stored if dead(k, -1))]
    stored -= set(out[0])
    for s in range(steps):
        stored |= w[s % n]
        drop = sorted(k for k in stored if dead(k, s))
        stored -= set(drop)
        out.append(drop)
    return out



def cut_error(cls: type, reason: str | None, run_id: str, names: Sequence[str], iterations: int | None,
              iteration: int | None, workflow: int | None, inside: bool, done: int,
              store_removed: bool = True) -> BaseException:
    """The RunCancelled / RunInterrupted of a run cut at (iteration, workflow), saying where."""
    of = "" if iterations is None else f"/{iterations}"
    if iteration is None or workflow is None:
        where = "before its first workflow" if done == 0 else "after its last workflow"
    else:
        where = (f"{'inside' if inside else 'before'} workflow {workflow + 1}/{len(names)} "
                 f"({names[workflow]}) of iteration {iteration + 1}{of}")
        if inside:
            where += " (ComfyUI was told to stop it)"
    why = f" ({reason})" if reason else ""
    total = "" if iterations is None else f" of {iterations * len(names)}"
    store = "its store was removed" if store_removed else "its store is kept until the run ends"
    return cls(
        f"run {run_id} was cancelled{why} {where}, after {done}{total} workflows; {store}",
        run_id=run_id, iteration=iteration, iterations=iterations, workflow=workflow,
        workflow_name=None if workflow is None else names[workflow], inside=inside,
    )


# ---- loops that stop on a condition ---------------------------------------------------------

#: What ``until`` may be: a key an output port writes (BOOLEAN or INT), or
#: ``fn(iteration, values) -> bool`` (``values``: a read-only mapping of the run's current values).
Until = str | Callable[[int, Mapping[str, Any]], Any]


def check_bounds(iterations: int | None, until: Until | None) -> int | None:
    """``iterations`` checked against ``until``: a positive int, or None (no bound) with ``until``."""
    if iterations is None:
        if until is None:
            raise ValueError("iterations=None (no bound) needs until= (a key or a function that says when to stop)")
        return None
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int (or None with until=), got {iterations!r}")
    if until is not None and not isinstance(until, str) and not callable(until):
        raise TypeError(f"until must be a key (str) or a function (iteration, values) -> bool, not {until!r}")
    return iterations


class RunValues(Mapping):
    """The run's current values, read-only, loaded when asked for (what an ``until`` function sees)."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def __getitem__(self, key: str) -> Any:
        try:
            return self._ctx.load(key)
        except UnknownKeyError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._ctx.keys())

    def __len__(self) -> int:
        return len(self._ctx.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._ctx


def until_holds(ctx: RunContext, until: Until, iteration: int) -> bool:
    """Whether ``until`` holds after ``iteration``."""
    if callable(until):
        return bool(until(iteration, RunValues(ctx)))
    value = ctx.load(until)
    if hasattr(value, "numel") and hasattr(value, "item") or hasattr(value, "size") and hasattr(value, "item"):
        count = value.numel() if hasattr(value, "numel") else value.size
        if count != 1:
            raise WorkflowError(f"until={until!r}: the value is an array of {count} items, not one BOOLEAN or INT")
        value = value.item()
    if isinstance(value, (list, tuple)) and len(value) == 1:  # ComfyUI's list outputs
        value = value[0]
    if not isinstance(value, (bool, int, float)):
        raise WorkflowError(f"until={until!r}: the value is a {type(value).__name__}, not a BOOLEAN or INT")
    return bool(value)
