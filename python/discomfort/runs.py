"""What every kind of run shares: the :class:`RunContext` protocol and its three implementations'
common parts (lifecycle, objects kept by reference, prompt digests, run-id resolvers).

The implementations: :class:`~discomfort.WorkflowContext` (shared memory on this host),
:class:`~discomfort.distributed.RayContext` (a Ray cluster's object store) and
:class:`~discomfort.remote.RemoteContext` (a store inside a ComfyUI server, over HTTP).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import secrets
import threading
from typing import Any, Callable, Iterator, Literal, Protocol, runtime_checkable

from .errors import ReferenceUnavailableError, RunFinishedError

__all__ = ["RunContext", "RunBase", "References", "REFERENCES", "PassBy", "prompt_digest",
           "register_resolver", "resolver_for"]

log = logging.getLogger("discomfort")

#: How a value is saved: by value (encoded), by reference (kept in the saving process), or decided by type.
PassBy = Literal["auto", "val", "ref"]


@runtime_checkable
class RunContext(Protocol):
    """One run's values, wherever they live. ``with`` ends the run (owner) or detaches."""

    run_id: str

    @property
    def owner(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def backend(self) -> str: ...
    def save(self, unique_id: str, data: Any, pass_by: PassBy = "auto") -> int: ...
    def load(self, unique_id: str) -> Any: ...
    def delete(self, unique_id: str) -> bool: ...
    def keys(self) -> list[str]: ...
    def __contains__(self, unique_id: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def info(self, unique_id: str) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def allow_prompt(self, prompt: Any) -> str: ...
    def revoke_prompt(self, digest: str) -> None: ...
    def shutdown(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


class RunBase:
    """The lifecycle the three contexts share: ``shutdown`` once (idempotent), ``close``, ``with``.

    Subclasses set ``run_id`` and ``_owner`` and implement ``_release`` (free or detach) and
    ``backend``; ``_forget`` (always run after ``_release``) drops registrations.
    """

    run_id: str
    _owner: bool

    def _start(self, owner: bool) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._owner = owner

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> str:
        raise NotImplementedError

    def _finished(self) -> RunFinishedError:
        return RunFinishedError(f"run {self.run_id!r} has finished: its context was shut down")

    def _release(self) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        if self._owner:
            REFERENCES.drop_run(self.run_id)

    def shutdown(self) -> None:
        """Release the run: the owner frees everything, an attacher detaches. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._release()
        finally:
            self._forget()

    close = shutdown

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
            return
        try:  # do not hide the error that ended the block
            self.shutdown()
        except Exception as err:  # noqa: BLE001
            log.warning("could not end run %s: %s", self.run_id, err)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owner" if self._owner else "attached")
        return f"<{type(self).__name__} run_id={self.run_id!r} {state} backend={self.backend}>"


class References:
    """Objects saved by reference (models, locks, files) stay in the process that saved them.

    The store holds a marker naming the process (a random token, never reused) and the type; only
    that process can turn the marker back into the object.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self._objects: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def keep(self, run_id: str, key: str, obj: Any, **where: Any) -> dict[str, Any]:
        with self._lock:
            self._objects[(run_id, key)] = obj
        return {"process": self.token, "pid": os.getpid(),
                "type": f"{type(obj).__module__}.{type(obj).__qualname__}", **where}

    def get(self, run_id: str, key: str, marker: dict, where: str = "") -> Any:
        if marker.get("process") != self.token:
            raise ReferenceUnavailableError(
                f"{key!r} in run {run_id!r} is a {marker.get('type')} saved by reference in process "
                f"{marker.get('pid')}{where}; references cannot leave the process that saved them "
                "(save it with pass_by='val' to share it)"
            )
        with self._lock:
            try:
                return self._objects[(run_id, key)]
            except KeyError:
                raise ReferenceUnavailableError(f"{key!r} in run {run_id!r}: the referenced object is gone") from None

    def drop(self, run_id: str, key: str) -> None:
        with self._lock:
            self._objects.pop((run_id, key), None)

    def drop_run(self, run_id: str) -> None:
        with self._lock:
            for k in [k for k in self._objects if k[0] == run_id]:
                del self._objects[k]

    def after_fork(self) -> None:
        """A forked child owns none of its parent's objects."""
        self._lock = threading.Lock()
        self._objects.clear()
        self.token = secrets.token_hex(16)


REFERENCES = References()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=REFERENCES.after_fork)


def prompt_digest(prompt: Any) -> str:
    """SHA-256 of what an API prompt does (each node's class and inputs, canonical JSON).

    Other fields are left out: ComfyUI adds its own (``is_changed``) while it runs a prompt. Values
    are compared as ComfyUI's validation leaves them: it casts each widget value in place to its
    input's type (``1`` -> ``1.0`` for a FLOAT, ``5`` -> ``"5"`` for a STRING) and unwraps
    ``{"__value__": ...}``, so a number, a bool and a string that such casts make equal digest alike.
    """
    if not isinstance(prompt, dict):
        raise TypeError(f"a prompt is an API-format dict, not {type(prompt).__name__}")
    what = {str(k): [n.get("class_type"), _canonical(n.get("inputs"))] if isinstance(n, dict) else n
            for k, n in prompt.items()}
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__value__"}:
            return _canonical(value["__value__"])
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value if value is None else str(value)


# Run-id prefix -> "module:function" (imported on first use) or a callable, giving the context.
_RESOLVERS: dict[str, str | Callable[[str], Any]] = {}


def register_resolver(prefix: str, target: str | Callable[[str], Any]) -> None:
    """Let ``get_context`` hand run ids starting with ``prefix`` to ``target``.

    ``target`` is a callable or ``"package.module:function"``, imported only when such an id is
    met, so registering costs nothing (the Ray package is not imported until a ``ray-`` id).
    """
    _RESOLVERS[prefix] = target


def resolver_for(run_id: str) -> Callable[[str], Any] | None:
    for prefix, target in _RESOLVERS.items():
        if run_id.startswith(prefix):
            if isinstance(target, str):
                module, _, name = target.partition(":")
                target = getattr(importlib.import_module(module), name)
                _RESOLVERS[prefix] = target
            return target
    return None
