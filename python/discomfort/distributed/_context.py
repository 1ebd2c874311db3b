"""RayContext: one run's values in Ray's object store, its directory in a named Ray actor."""

from __future__ import annotations

import atexit
import ctypes
import io
import os
import pickle
import secrets
import threading
import time
import warnings
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, ObjectStoreFullError, RayActorError

from .. import _settings, codecs
from .._names import check_key, check_run_id
from ..context import RAY_RUN_PREFIX, install_signal_handler
from ..runs import REFERENCES, PassBy, RunBase, prompt_digest
from ..errors import (
    InvalidRunIdError,
    PromptNotAllowedError,
    ReferenceUnavailableError,
    RunFinishedError,
    StoreFullError,
    UnknownKeyError,
    UnknownRunError,
    ValueLostError,
)
from . import _ray
from ._directory import FINISHED, RunDirectory

__all__ = ["RayContext", "ValueLostError", "attach_or_get", "active_ray_runs"]

_TAG_VALUE = "V"

# run_id -> the RayContext this process holds for it (owned or attached).
_runs: dict[str, RayContext] = {}
_runs_lock = threading.Lock()
_last_sweep = [0.0]
SWEEP_INTERVAL = 30.0  # seconds between checks that attached runs still exist

_actor_class: Any = None


def _directory_actor() -> Any:
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(RunDirectory)
    return _actor_class


def _load_mode(copy: bool | None) -> bool:
    if copy is not None:
        return bool(copy)
    return bool(_settings.get("DISCOMFORT_RAY_LOAD") == "copy")  # ValueError naming it unless view or copy


class RayContext(RunBase):
    """A run whose values live in a Ray cluster's object store: the WorkflowContext API.

    ``RayContext()`` creates a run (id ``ray-<32 hex>``, or ``run_id=`` which must start with
    ``ray-``) and its directory, a named actor ``discomfort-run-<run_id>`` in the ``discomfort``
    namespace on this node; the creating process owns the run. ``RayContext.attach(run_id)``
    (or ``discomfort.get_context(run_id)``) opens it from any process of the cluster.

    ``save`` encodes with :func:`discomfort.codecs.encode` and ``ray.put``\\ s the metadata and
    the raw buffers (tensors and arrays travel out of band: one copy into the object store of the
    node that saves). ``load`` gets them back zero-copy on the node that loads (Ray first copies
    a value from another node into the local store). Loaded values are **read-only**:

    * numpy arrays come back non-writable (numpy enforces it);
    * torch tensors are zero-copy views of Ray's shared memory, and torch has no read-only
      tensors: writing into one would change the stored value for every reader on that node.
      Do not write into them; ``load(key, copy=True)`` (or ``copy=True`` here, or
      ``DISCOMFORT_RAY_LOAD=copy`` in the environment) returns private, writable copies.

    A value lives as long as its key and the process that saved it (Ray's ownership: when that
    process dies, Ray frees what it owned and a load raises :class:`ValueLostError`).
    :func:`~discomfort.distributed.run_sequential_ray` hands its servers' outputs to the
    orchestrator, so that a server dying loses nothing. ``pass_by="ref"`` values stay in the
    process that saved them; loading one elsewhere raises
    :class:`~discomfort.errors.ReferenceUnavailableError`.

    ``shutdown()`` (owner; also on ``with`` exit, at interpreter exit, and when the owner dies)
    drops every reference and kills the directory: Ray frees all the run's values. Views still
    alive keep their bytes until they are collected.
    """

    def __init__(self, run_id: str | None = None, *, address: str | None = None, copy: bool | None = None,
                 _actor: Any = None) -> None:
        self._start(owner=_actor is None)
        self._copy = _load_mode(copy)
        _ray.ensure_connected(address)
        self._pid = os.getpid()
        self.run_id: str
        if _actor is not None:  # attach()
            if run_id is None:
                raise ValueError("attaching needs the run id")
            self.run_id = run_id
            self._actor = _actor
            return
        if run_id is None:
            run_id = RAY_RUN_PREFIX + secrets.token_hex(16)
        check_run_id(run_id)
        if not run_id.startswith(RAY_RUN_PREFIX):
            raise InvalidRunIdError(
                f"run id {run_id!r}: Ray run ids start with {RAY_RUN_PREFIX!r} (that is how get_context finds them)"
            )
        self.run_id = run_id
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = _ray.node_id()
        owner = {"pid": os.getpid(), "node": here, "process": REFERENCES.token}
        self._actor = _directory_actor().options(
            name=self.actor_name, namespace=_ray.NAMESPACE, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True),
        ).remote(run_id, owner)
        try:
            ray.get(self._actor.ping.remote())
        except (ValueError, RayActorError) as exc:
            raise InvalidRunIdError(f"cannot create Ray run {run_id!r}: {exc}") from exc
        install_signal_handler()
        with _runs_lock:
            _runs[run_id] = self

    # ---- attaching -------------------------------------------------------------------------------
    @classmethod
    def attach(cls, run_id: str, *, address: str | None = None, copy: bool | None = None) -> RayContext:
        """Open a Ray run another process owns: same data, no ownership; ``close()`` detaches."""
        if not isinstance(run_id, str) or not run_id.startswith(RAY_RUN_PREFIX):
            raise UnknownRunError(f"{run_id!r} is not a Ray run id (those start with {RAY_RUN_PREFIX!r})")
        _ray.ensure_connected(address)
        gone = UnknownRunError(
            f"no Ray run {run_id!r} in the cluster at {_ray.gcs_address()}: it has finished, or never existed"
        )
        try:
            actor = ray.get_actor(_ray.ACTOR_PREFIX + run_id, namespace=_ray.NAMESPACE)
            # A directory its owner has just cleared may still be named while Ray kills it.
            state: Any = ray.get(actor.ping.remote())
        except (ValueError, RayActorError) as exc:
            raise gone from exc
        if state["finished"]:
            raise gone
        return cls(run_id, copy=copy, _actor=actor)

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def actor_name(self) -> str:
        return _ray.ACTOR_PREFIX + self.run_id

    @property
    def backend(self) -> str:
        return "ray"

    def _release(self) -> None:
        """The owner frees everything it put into Ray; an attacher detaches."""
        if self._owner and os.getpid() == self._pid and ray.is_initialized():
            try:
                ray.get(self._actor.clear.remote())
            except RayActorError:
                pass
            ray.kill(self._actor, no_restart=True)
            _wait_unnamed(self.actor_name)

    def _forget(self) -> None:
        with _runs_lock:
            if _runs.get(self.run_id) is self:
                del _runs[self.run_id]
        super()._forget()

    def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise self._finished()
        try:
            out = ray.get(getattr(self._actor, method).remote(*args))
        except RayActorError as exc:
            self._ended()
            raise RunFinishedError(
                f"Ray run {self.run_id!r} has finished: its directory actor {self.actor_name} is gone"
            ) from exc
        if isinstance(out, str) and out == FINISHED:
            self._ended()
            raise RunFinishedError(f"Ray run {self.run_id!r} has finished (its owner shut it down)")
        return out

    def _ended(self) -> None:
        """The run ended elsewhere (its owner, or its directory died): forget it here."""
        with self._lock:
            self._closed = True
        with _runs_lock:
            if _runs.get(self.run_id) is self:
                del _runs[self.run_id]
        REFERENCES.drop_run(self.run_id)

    # ---- which prompts may use the run --------------------------------------------------------
    def allow_prompt(self, prompt: Any) -> str:
        """Let the ComfyUI nodes of ``prompt`` use this run (see WorkflowContext.allow_prompt)."""
        digests = self._prompt_digests_to_allow(prompt)
        for digest in digests:
            self._call("allow_prompt", digest)
        return digests[0]

    def revoke_prompt(self, digest: str) -> None:
        for each in self._prompt_digests_to_revoke(digest):
            self._call("revoke_prompt", each)

    def check_prompt(self, prompt: Any) -> None:
        if not isinstance(prompt, dict) or not self._call("prompt_allowed", prompt_digest(prompt)):
            raise PromptNotAllowedError(
                f"Ray run {self.run_id!r} does not accept this prompt: only prompts its orchestrator queued "
                "may read or write its values"
            )

    # ---- data --------------------------------------------------------------------------------
    def save(self, unique_id: str, data: Any, pass_by: PassBy = "auto") -> int:
        """Store ``data`` under ``unique_id``; returns its version (run-wide, never repeated)."""
        if self._closed:
            raise self._finished()
        check_key(unique_id)
        encoded = codecs.encode_or_ref(data, pass_by, f"{unique_id!r} in run {self.run_id!r}")
        if encoded is not None:
            return self._put_value(unique_id, *encoded)
        marker = REFERENCES.keep(self.run_id, unique_id, data, kind="ref", tier="ref", node=_ray.node_id(),
                                 size=0, nbytes=0, nbuf=0, meta_len=0)
        return self._call("put", unique_id, [], marker)

    def _put_value(self, unique_id: str, meta: bytes, buffers: list) -> int:
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in buffers]  # views: Ray sends them out of band
        nbytes = sum(a.nbytes for a in arrays)
        try:
            ref = ray.put((_TAG_VALUE, meta, arrays))
        except ObjectStoreFullError as exc:
            raise StoreFullError(
                f"cannot save {unique_id!r} ({nbytes} bytes) in Ray run {self.run_id!r}: the object store of "
                f"this node is full: {exc}"
            ) from exc
        info = {"kind": "val", "tier": "ray", "size": nbytes + len(meta), "nbytes": nbytes,
                "nbuf": len(arrays), "meta_len": len(meta), "node": _ray.node_id(), "pid": os.getpid(),
                "process": REFERENCES.token}
        version = self._call("put", unique_id, [ref], info)
        REFERENCES.drop(self.run_id, unique_id)
        return version

    def load(self, unique_id: str, *, copy: bool | None = None) -> Any:
        """The value of ``unique_id``: zero-copy and read-only, or a private copy with ``copy=True``."""
        got = self._call("get", unique_id)
        if got is None:
            raise UnknownKeyError(f"no object {unique_id!r} in Ray run {self.run_id!r}")
        box, info = got
        if info.get("kind") == "ref":
            return self._load_ref(unique_id, info)
        try:
            _tag, meta, arrays = ray.get(box[0])
        except ObjectLostError as exc:
            raise ValueLostError(
                f"the value of {unique_id!r} in Ray run {self.run_id!r} is lost: it was saved by process "
                f"{info.get('pid')} on node {info.get('node')}, and Ray frees what a process owns when that "
                f"process (or its node) dies ({type(exc).__name__})"
            ) from exc
        copy = self._copy if copy is None else copy
        if copy:
            return codecs.decode(meta, [bytearray(a) for a in arrays])
        return _decode_views(meta, arrays)

    def _load_ref(self, unique_id: str, info: dict) -> Any:
        where = "this node" if info.get("node") == _ray.node_id() else f"node {info.get('node')}"
        return REFERENCES.get(self.run_id, unique_id, info, f" on {where}")

    def delete(self, unique_id: str) -> bool:
        removed = self._call("delete", unique_id)
        REFERENCES.drop(self.run_id, unique_id)
        return removed

    def keys(self) -> list[str]:
        return self._call("keys")

    def __contains__(self, unique_id: object) -> bool:
        return self._call("contains", unique_id)

    def info(self, unique_id: str) -> dict[str, Any]:
        """Tier ("ray" or "ref"), size, version, and the node and process that saved it."""
        out = self._call("info", unique_id)
        if out is None:
            raise UnknownKeyError(f"no object {unique_id!r} in Ray run {self.run_id!r}")
        return out

    def versions(self, unique_ids: list[str]) -> dict[str, int | None]:
        """``{uid: version or None}`` in one round trip."""
        return self._call("versions", list(unique_ids))

    def stats(self) -> dict[str, Any]:
        out = self._call("stats")
        out.update(backend="ray", owner=self._owner, actor=self.actor_name, namespace=_ray.NAMESPACE,
                   address=_ray.gcs_address())
        return out

    # ---- adoption (run_sequential_ray) -----------------------------------------------------------
    def _foreign_values(self, unique_ids: list[str]) -> dict[str, tuple[list, dict]]:
        """Values among ``unique_ids`` that a process other than this one owns."""
        got = self._call("entries", list(unique_ids))
        return {u: e for u, e in got.items() if e[1].get("process") != REFERENCES.token}

    def _adopted(self, unique_id: str, version: int, ref: Any, node: str | None) -> bool:
        info = {"process": REFERENCES.token, "pid": os.getpid(), "node": node, "adopted": True}
        return self._call("adopt", unique_id, version, [ref], info)


# ---- zero-copy decoding ---------------------------------------------------------------------------


def _writable_alias(array: Any) -> Any:
    """A writable buffer over a read-only array's memory, keeping the array (and Ray's buffer) alive."""
    n = array.nbytes
    block = (ctypes.c_ubyte * n).from_address(array.ctypes.data)
    block._discomfort_owner = array
    return block


def _rebuild_tensor_view(buf: Any, dtype: Any, shape: tuple, requires_grad: bool, device: str) -> Any:
    view = memoryview(buf)
    if view.readonly and view.nbytes:
        buf = _writable_alias(np.frombuffer(view, dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return codecs._rebuild_tensor(buf, dtype, shape, requires_grad, device)


def _wait_unnamed(name: str, timeout: float = 10.0) -> None:
    """Return once Ray no longer resolves ``name``: ``ray.kill`` only asks for the kill, so
    without this a ``get_context`` just after ``shutdown()`` could still find the directory."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=_ray.NAMESPACE)
        except ValueError:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class _ViewUnpickler(pickle.Unpickler):
    """The codec's decode, with tensors built over Ray's read-only buffers without a copy.

    Arrays and Arrow data keep the read-only buffers (numpy marks the arrays non-writable).
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == codecs.__name__ and name == "_rebuild_tensor":
            return _rebuild_tensor_view
        return super().find_class(module, name)


def _decode_views(meta: bytes, arrays: list) -> Any:
    return _ViewUnpickler(io.BytesIO(meta), buffers=arrays).load()


# ---- registry -------------------------------------------------------------------------------------


def attach_or_get(run_id: str) -> RayContext:
    """What ``discomfort.get_context`` returns for a ``ray-`` id (see get_ray_context)."""
    with _runs_lock:
        ctx = _runs.get(run_id)
    if ctx is not None and not ctx.closed:
        return ctx
    _sweep()
    try:
        _ray.ensure_connected(start_local=False, quiet=True)
    except Exception as exc:  # noqa: BLE001 - no address, cluster unreachable, ...
        raise UnknownRunError(
            f"run {run_id!r} lives in a Ray cluster, but this process cannot reach one: {exc} "
            "(set RAY_ADDRESS to the cluster's address, e.g. 10.0.0.1:6379)"
        ) from exc
    ctx = RayContext.attach(run_id)
    with _runs_lock:
        current = _runs.get(run_id)
        if current is not None and not current.closed:
            return current
        _runs[run_id] = ctx
    return ctx


def _sweep() -> None:
    """Forget attached runs whose directory is gone (a long-lived ComfyUI server serves many runs)."""
    now = time.monotonic()
    if now - _last_sweep[0] < SWEEP_INTERVAL:
        return
    _last_sweep[0] = now
    with _runs_lock:
        attached = [c for c in _runs.values() if not c.owner]
    for ctx in attached:
        try:
            ray.get_actor(ctx.actor_name, namespace=_ray.NAMESPACE)
        except ValueError:
            ctx._ended()
        except Exception:  # noqa: BLE001 - the check is best effort
            pass


def active_ray_runs() -> list[str]:
    with _runs_lock:
        return sorted(_runs)


def _shutdown_all() -> None:
    with _runs_lock:
        owned = [c for c in _runs.values() if c.owner]
    for ctx in owned:
        try:
            ctx.shutdown()
        except Exception:  # noqa: BLE001 - interpreter exit: best effort (Ray frees it with us anyway)
            pass


atexit.register(_shutdown_all)
