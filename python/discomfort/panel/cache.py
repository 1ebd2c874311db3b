"""Release what ComfyUI's executor cache still holds of an ended run's prompts.

ComfyUI keeps the outputs of the last prompt it ran (its ``caches.outputs``) until the next
prompt: after a panel run, the tensors its last workflow produced (gigabytes for large images)
stay in the server's memory. Each cache key is the node's input signature, which holds the
inputs of the node and of its ancestors, so every output computed from one of the run's ports
carries the run's id (the ports' ``run_id`` input). Those entries, and only those, are emptied:
other prompts' entries, and nodes that do not depend on the run (a model loader), are kept.

The entry's value is set to None rather than deleted: ComfyUI's worker thread may be iterating
the same dict, and a None entry is what ComfyUI reads as "not cached".
"""

from __future__ import annotations

import gc
import logging
import sys
import weakref
from typing import Any

__all__ = ["release_run_outputs"]

log = logging.getLogger("discomfort")

_executors: list[Any] = []  # weak references to ComfyUI's PromptExecutor(s), found once


def _find_executors() -> list[Any]:
    live = [e for e in (ref() for ref in _executors) if e is not None]
    if live:
        return live
    try:
        from execution import PromptExecutor  # type: ignore[import-not-found]  # ComfyUI's
    except ImportError:
        return []
    found: list[Any] = []
    for frame in sys._current_frames().values():  # noqa: SLF001 - a local of ComfyUI's worker thread
        f: Any = frame
        while f is not None and not found:
            candidate = f.f_locals.get("e") if f.f_code.co_name == "prompt_worker" else None
            if isinstance(candidate, PromptExecutor):
                found.append(candidate)
            f = f.f_back
    if not found:
        found = [o for o in gc.get_objects() if isinstance(o, PromptExecutor)]
    _executors[:] = [weakref.ref(e) for e in found]
    return found


def _mentions(key: Any, run_id: str) -> bool:
    stack = [key]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item == run_id:
                return True
        elif isinstance(item, (tuple, frozenset, list, set)):
            stack.extend(item)
    return False


def _empty(cache: Any, run_id: str) -> int:
    """Empty ``cache``'s entries (and its subcaches') whose key mentions ``run_id``."""
    count = 0
    pending = [cache]
    while pending:
        c = pending.pop()
        entries = getattr(c, "cache", None)
        if isinstance(entries, dict):
            for key, value in list(entries.items()):
                if value is not None and _mentions(key, run_id):
                    entries[key] = None
                    count += 1
        subs = getattr(c, "subcaches", None)
        if isinstance(subs, dict):
            pending.extend(list(subs.values()))
    return count


def release_run_outputs(run_id: str) -> int:
    """Empty the cached outputs of ``run_id``'s prompts in this ComfyUI process; how many."""
    count = 0
    for executor in _find_executors():
        outputs = getattr(getattr(executor, "caches", None), "outputs", None)
        if outputs is not None:
            count += _empty(outputs, run_id)
    if count:
        log.info("discomfort: panel run %s: %d cached output(s) released", run_id, count)
    return count
