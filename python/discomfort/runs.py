"""What every kind of run shares: the :class:`RunContext` protocol and its three implementations'
common parts (lifecycle, objects kept by reference, prompt digests, run-id resolvers).

The implementations: :class:`~discomfort.WorkflowContext` (shared memory on this host),
:class:`~discomfort.distributed.RayContext` (a Ray cluster's object store) and
:class:`~discomfort.remote.RemoteContext` (a store inside a ComfyUI server, over HTTP).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import secrets
import struct
import threading
from typing import Any, Callable, Iterator, Literal, Protocol, runtime_checkable

from .errors import ReferenceUnavailableError, RunFinishedError, UnknownKeyError

__all__ = ["RunContext", "SharedRunContext", "RunBase", "References", "REFERENCES", "PassBy", "prompt_digest", "run_digests",
           "key_versions", "register_resolver", "resolver_for"]

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
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...


@runtime_checkable
class SharedRunContext(RunContext, Protocol):
    """A run that another process finds by its id (:func:`~discomfort.get_context`): a
    :class:`~discomfort.WorkflowContext` or a :class:`~discomfort.distributed.RayContext`. Its
    nodes check first that the prompt may use it."""

    def check_prompt(self, prompt: Any) -> None: ...


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

    def _prompt_digests_to_allow(self, prompt: Any) -> list[str]:
        """What ``allow_prompt`` registers (:func:`run_digests`); the first is the one it returns,
        and ``revoke_prompt`` of it takes back the others too (:meth:`_prompt_digests_to_revoke`)."""
        digests = run_digests(prompt, self.run_id, lambda keys: key_versions(self, keys))
        with self._lock:
            self.__dict__.setdefault("_companions", {})[digests[0]] = digests[1:]
        return digests

    def _prompt_digests_to_revoke(self, digest: str) -> list[str]:
        with self._lock:
            return [digest, *self.__dict__.get("_companions", {}).pop(digest, [])]

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

    def holds(self, run_id: str, key: str, obj: Any, marker: Any) -> bool:
        """Whether ``marker`` (a key's stored marker) names this process and ``obj`` is the very
        object kept for the key."""
        if not isinstance(marker, dict) or marker.get("process") != self.token:
            return False
        with self._lock:
            return self._objects.get((run_id, key), _NOTHING) is obj

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


_NOTHING = object()
REFERENCES = References()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=REFERENCES.after_fork)


#: The class whose ``is_changed`` the digest covers: ComfyUI's cache key for a loader's output.
_LOADER = "DiscomfortDataLoader"
_FIELDS = ("class_type", "inputs")
_LOADER_FIELDS = ("class_type", "inputs", "is_changed")


def prompt_digest(prompt: Any) -> str:
    """SHA-256 of what an API prompt does: each node's ``class_type`` and ``inputs``, exactly, and
    a ``DiscomfortDataLoader``'s ``is_changed``.

    Type-preserving: a link ``["1", 0]``, the literal ``["1", "0"]``, ``1``, ``1.0``, ``"1"`` and
    ``true`` all differ, as a list and a tuple do, so two prompts that ComfyUI runs differently
    never share a digest. Nodes digest what ComfyUI hands them (its validation has cast widget
    values and unwrapped ``{"__value__": ...}``); an orchestrator registers that same form
    (:func:`discomfort.prompt_forms.prompt_as_run`). ComfyUI keys a node's cached outputs by its
    ``is_changed``, taken as sent when a prompt has one: a loader's is covered (a sent one, an
    older version, would serve outputs computed from an older value; :func:`run_digests` gives
    the one ComfyUI computes). Other nodes' ``is_changed`` and other fields are left out: ComfyUI
    writes ``is_changed`` into every node with ``IS_CHANGED`` (a port's is new each time) while it
    runs a prompt. Raises TypeError on a value JSON cannot hold (a prompt from ``/prompt`` never
    has one).
    """
    if not isinstance(prompt, dict):
        raise TypeError(f"a prompt is an API-format dict, not {type(prompt).__name__}")
    what = {k: {f: n[f] for f in (_LOADER_FIELDS if n.get("class_type") == _LOADER else _FIELDS) if f in n}
            if isinstance(n, dict) else n for k, n in prompt.items()}
    out: list[bytes] = []
    try:
        _encode(what, out)
    except RecursionError:
        raise ValueError("a prompt nested too deeply, or containing itself, has no digest") from None
    return hashlib.sha256(b"".join(out)).hexdigest()


def run_digests(prompt: Any, run_id: str, versions: Callable[[list[str]], dict[str, int | None]]) -> list[str]:
    """The digests that let ``prompt`` use the run ``run_id``: the one its nodes will compute, then
    the one a server without a cache gives them.

    Before any node runs, ComfyUI (with a cache: classic, LRU or RAM) sets each loader's
    ``is_changed`` to what its ``IS_CHANGED`` answers, ``[version]`` of its key (``NaN`` when the
    key is missing), unless the prompt came with one. So each loader of this run without one is
    digested with the version ``versions`` gives now: a copy with an older version is refused,
    and so is a copy queued after the key changed. A server started with ``--cache-none`` sets no
    ``is_changed`` and serves nothing from a cache: the prompt as given is its form (and can never
    be what a caching server's nodes see). Loaders of other runs are left as given: their
    versions are not known here, so such a prompt is refused on a caching server.
    """
    plain = prompt_digest(prompt)
    loaders = {nid: n["inputs"].get("unique_id") for nid, n in prompt.items()
               if isinstance(n, dict) and n.get("class_type") == _LOADER and "is_changed" not in n
               and isinstance(n.get("inputs"), dict) and n["inputs"].get("run_id") == run_id}
    if not loaders:
        return [plain]
    have = versions(sorted({uid for uid in loaders.values() if type(uid) is str}))
    pinned = dict(prompt)
    for nid, uid in loaders.items():
        version = have.get(uid) if type(uid) is str else None
        pinned[nid] = {**prompt[nid], "is_changed": float("nan") if version is None else [version]}
    return [prompt_digest(pinned), plain]


def key_versions(ctx: Any, keys: list[str]) -> dict[str, int | None]:
    """The stored version of each key, None when absent (one round trip where the context can)."""
    many = getattr(ctx, "versions", None)
    if many is not None:
        return dict(many(keys))
    out: dict[str, int | None] = {}
    for uid in keys:
        try:
            out[uid] = ctx.info(uid)["version"]
        except UnknownKeyError:
            out[uid] = None
    return out


def _encode(v: Any, out: list[bytes]) -> None:
    """A prefix-free, type-tagged encoding of ``v``: equal bytes only for equal values of equal types."""
    t = type(v)
    if t is str:
        out.append(_str(v))
    elif t is int:
        out.append(b"i%x;" % v)  # hex: no limit on digits
    elif t is list or t is tuple:
        out.append((b"L%d[" if t is list else b"U%d[") % len(v))
        for x in v:
            _encode(x, out)
    elif t is dict:
        items = sorted([(_str(k) if type(k) is str else _encoded(k), x) for k, x in v.items()], key=_first)
        out.append(b"D%d{" % len(items))
        for k, x in items:
            out.append(k)
            _encode(x, out)
    elif t is float:
        out.append(b"f" + struct.pack(">d", v))
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif v is None:
        out.append(b"N")
    else:
        raise TypeError(f"a prompt holds JSON values only (dict, list, str, int, float, bool, None), "
                        f"not {t.__module__}.{t.__qualname__}")


def _str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"s%d:" % len(b) + b


def _first(pair: tuple[bytes, Any]) -> bytes:
    return pair[0]


def _encoded(key: Any) -> bytes:
    out: list[bytes] = []
    _encode(key, out)
    return b"".join(out)


# Run-id prefix -> "module:function" (imported on first use) or a callable, giving the context.
_RESOLVERS: dict[str, str | Callable[[str], SharedRunContext]] = {}


def register_resolver(prefix: str, target: str | Callable[[str], SharedRunContext]) -> None:
    """Let ``get_context`` hand run ids starting with ``prefix`` to ``target``.

    ``target`` is a callable or ``"package.module:function"``, imported only when such an id is
    met, so registering costs nothing (the Ray package is not imported until a ``ray-`` id).
    """
    _RESOLVERS[prefix] = target


def resolver_for(run_id: str) -> Callable[[str], SharedRunContext] | None:
    for prefix, target in _RESOLVERS.items():
        if run_id.startswith(prefix):
            if isinstance(target, str):
                module, _, name = target.partition(":")
                target = getattr(importlib.import_module(module), name)
                _RESOLVERS[prefix] = target
            return target
    return None
