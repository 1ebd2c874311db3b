"""WorkflowContext: one run's ephemeral object store, its registry, and its lifecycle.

The store is shared memory other processes of the user attach to by run id, or (Windows, or
``store="local"``) kept in the creating process (:mod:`discomfort._localstore`).
`run_sequential` owns one context per call; ComfyUI nodes find it by `run_id` through the
registry (in this process) or attach to it (in a ComfyUI server process).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import sys
import threading
from typing import Any

from . import _backend, codecs, datacodec, sysinfo
from ._names import control_name
from ._platform import SHARED, require_local_store
from ._sweep import LOCAL_LOCK, sweep
from .errors import (
    InvalidRunIdError,
    PromptNotAllowedError,
    RunFinishedError,
    StoreClosedError,
    UnknownKeyError,
    UnknownRunError,
)
from .runs import REFERENCES, PassBy, RunBase, SharedRunContext, prompt_digest, resolver_for

__all__ = ["WorkflowContext", "get_context", "release_finished", "active_runs", "release_pool",
           "install_signal_handler", "RAY_RUN_PREFIX", "STORES", "store_kind"]

# The seed's registry: run_id -> the context this process holds for it.
_contexts: dict[str, WorkflowContext] = {}
_contexts_lock = threading.Lock()

_TAG_VALUE = b"V"  # a pickle this user's own process wrote
_TAG_REF = b"R"  # a JSON marker of an object kept in the saving process
_TAG_DATA = b"D"  # a datacodec description that crossed a trust boundary: never unpickled
_TAG_PROMPTS = b"P"  # the run's registered prompt digests (JSON)
_KINDS = {_TAG_REF: "ref", _TAG_DATA: "data"}  # load_encoded's kind by tag; any other: "val"

#: The digests of the prompts the run's orchestrator queued and that are running now.
_PROMPTS_KEY = "\x1fdiscomfort.prompts"

#: Run ids with this prefix live in a Ray cluster (discomfort.distributed.RayContext).
RAY_RUN_PREFIX = "ray-"

#: WorkflowContext(store=...): "shared" (other processes attach by run id), "local" (kept in
#: this process), "auto" (shared where the system has a cross-process store, else local).
STORES = ("auto", "shared", "local")


def store_kind(store: str = "auto", backend: str | None = None) -> str:
    """"shared" or "local": what ``WorkflowContext(store=store, backend=backend)`` creates."""
    if store not in STORES:
        raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
    if backend == "local":
        if store == "shared":
            raise ValueError("store='shared' with backend='local': the local store is not shared; "
                             "leave one of them out")
        return "local"
    if store == "local" and backend is not None:
        raise ValueError(f"store='local' with backend={backend!r}: backend names a shared store's "
                         "implementation (native or python); leave it out")
    if store == "auto":
        return "shared" if SHARED or backend is not None else "local"
    return store


class WorkflowContext(RunBase):
    """A per-run object store: `save` values under unique ids, `load` them back zero-copy.

    Use it as a context manager; on exit its shared memory and files are removed and it leaves
    the registry, whatever happened inside.
    """

    #: ComfyUI nodes read and write this run with pread/pwrite (``load_guarded``) even in its
    #: owner's process: set by runs a server owns (HTTP and panel runs), so that a chunk another
    #: process cut fails a prompt instead of killing the server with SIGBUS.
    guard_nodes: bool = False

    def __init__(self, run_id: str | None = None, ram_budget: int | str | None = None,
                 disk_dir: str | os.PathLike | None = None, *, store: str = "auto", backend: str | None = None,
                 shm_dir: str = sysinfo.SHM_DIR, _store: Any = None):
        """``store``: "shared" (shared memory other processes attach to by run id: ComfyUI
        servers on this host), "local" (kept in this process: ComfyUI in this process, or a
        server reached over HTTP), or "auto" (shared where the system can, i.e. not on Windows).
        ``backend``: the shared store's implementation ("native" or "python"; "local" means
        ``store="local"``); None: the one this process chose."""
        if _store is not None:  # attach()
            self._start(owner=False)
            self._store = _store
            self.run_id = _store.run_id
            return
        if run_id is not None and str(run_id).startswith(RAY_RUN_PREFIX):
            raise InvalidRunIdError(f"run id {run_id!r}: the prefix {RAY_RUN_PREFIX!r} is reserved for Ray runs")
        kind = store_kind(store, backend)
        self._start(owner=True)
        self.run_id = run_id if run_id is not None else secrets.token_hex(16)
        if kind == "local":
            self._store = _backend.module("local").Store.create(  # loaded on first use
                self.run_id, ram_budget=sysinfo.ram_budget(ram_budget, None), disk_root=sysinfo.disk_root(disk_dir))
        else:
            require_local_store()  # Windows: a clear error before anything touches the system
            sweep(shm_dir)
            module = _backend.module(backend)
            self._store = module.Store.create(
                self.run_id,
                ram_budget=sysinfo.ram_budget(ram_budget, shm_dir),
                disk_root=sysinfo.disk_root(disk_dir),
                shm_dir=shm_dir,
                pool=True,  # chunks of finished runs serve the next run of this process, prefaulted
            )
        self._pid = os.getpid()
        install_signal_handler()
        with _contexts_lock:
            _contexts[self.run_id] = self

    # ---- attaching ---------------------------------------------------------------------------
    @classmethod
    def attach(cls, run_id: str, *, backend: str | None = None,
               shm_dir: str = sysinfo.SHM_DIR) -> WorkflowContext:
        """Open a run another process owns: same data, no ownership; `close()` detaches.

        A run in a process-local store (every run on Windows) cannot be attached:
        UnsupportedPlatformError says why and what works instead."""
        if backend == "local" or (backend is None and not SHARED):
            raise _backend.module("local").attach_error(run_id)
        try:
            store = _backend.module(backend).Store.attach(run_id, shm_dir=shm_dir)
        except UnknownRunError as exc:
            if not isinstance(exc, RunFinishedError) and _is_local_run(run_id):
                raise _backend.module("local").attach_error(run_id) from None
            raise
        return cls(_store=store)

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._store.backend

    @property
    def store(self) -> Any:
        return self._store

    def _release(self) -> None:
        if self._owner and os.getpid() == self._pid:
            self._store.destroy()
        else:
            self._store.close()

    def _forget(self) -> None:
        with _contexts_lock:
            if _contexts.get(self.run_id) is self:
                del _contexts[self.run_id]
        super()._forget()

    def _check(self) -> Any:
        if self._closed:
            raise self._finished()
        return self._store

    # ---- data -------------------------------------------------------------------------------------
    def save(self, unique_id: str, data: Any, pass_by: PassBy = "auto") -> int:
        """Store `data` under `unique_id`; returns its version (store-wide, never repeated)."""
        return self._save(unique_id, data, pass_by, False)

    def save_guarded(self, unique_id: str, data: Any, pass_by: PassBy = "auto") -> int:
        """`save` for long-lived processes (the ComfyUI server's ports): written with pwrite, never
        through a mapping of a chunk, so a chunk another process truncated is a
        TruncatedStoreError, never a SIGBUS."""
        return self._save(unique_id, data, pass_by, True)

    def _save(self, unique_id: str, data: Any, pass_by: PassBy, guarded: bool) -> int:
        store = self._check()
        put = store.put_guarded if guarded else store.put
        # A bare tensor or an atom is a value whatever `pass_by` says but "ref": the fast encoder
        # spares them classification and cloudpickle.
        encoded = codecs.encode_fast(data) if pass_by == "auto" or pass_by == "val" else None
        if encoded is None:
            encoded = codecs.encode_or_ref(data, pass_by, f"{unique_id!r} in run {self.run_id!r}")
        if encoded is not None:
            version = put(unique_id, _TAG_VALUE + encoded[0], encoded[1])
            REFERENCES.drop(self.run_id, unique_id)
            return version
        kept = self._kept_version(store, unique_id, data, guarded)
        if kept is not None:
            return kept
        marker = REFERENCES.keep(self.run_id, unique_id, data)
        return put(unique_id, _TAG_REF + json.dumps(marker).encode(), [])

    def _kept_version(self, store: Any, unique_id: str, data: Any, guarded: bool) -> int | None:
        """The version ``unique_id`` keeps when it already holds ``data`` itself by reference in this
        process: saving the very object again changes nothing, and a new version would make
        ComfyUI run every node downstream of its loaders again (their fingerprint is the version).
        A value is always stored anew: a tensor changed in place must never come from a cache."""
        try:
            meta, _views, info = store.get_guarded(unique_id) if guarded else store.get(unique_id)
        except UnknownKeyError:
            return None
        if bytes(meta[:1]) != _TAG_REF:
            return None
        try:
            marker = json.loads(bytes(meta[1:]))
        except ValueError:
            return None
        return int(info["version"]) if REFERENCES.holds(self.run_id, unique_id, data, marker) else None

    def reserve_data(self, unique_id: str, meta: bytes, sizes: list[int]) -> Any:
        """Room for a value in the data-only encoding (:mod:`discomfort.datacodec`).

        For transports that receive values from outside: fill `.buffers`, then `.seal()` (or
        `.abort()`). Every later reader decodes it with the data-only decoder, never pickle.
        The value replaces whatever `unique_id` held, references included.
        """
        store = self._check()
        REFERENCES.drop(self.run_id, unique_id)
        return store.reserve(unique_id, _TAG_DATA + meta, sizes)

    def load_encoded(self, unique_id: str, *, guarded: bool = False) -> tuple[str, bytes, list[memoryview],
                                                                              dict[str, Any]]:
        """("val", "data" or "ref", meta, buffers, info) of a stored value, without decoding it.

        "val": a pickle this user's processes wrote; "data": a datacodec description; "ref": a
        JSON marker naming the type and the process that owns the object. ``guarded``: the
        buffers are a copy read as in :meth:`load_guarded`.
        """
        store = self._check()
        meta, views, info = store.get_guarded(unique_id) if guarded else store.get(unique_id)
        return _KINDS.get(bytes(meta[:1]), "val"), meta[1:], views, info

    def load(self, unique_id: str) -> Any:
        """The value saved under `unique_id`: CPU tensors and arrays are zero-copy views."""
        meta, views, _info = self._check().get(unique_id)
        return self._decode(unique_id, meta, views)

    def load_guarded(self, unique_id: str) -> Any:
        """`load` for long-lived processes that other processes' files must not crash (the
        ComfyUI server's nodes): the value's bytes are copied out of the store with pread into
        memory the value owns, so a chunk or disk file that another process of the user
        truncated is a TruncatedStoreError naming the key, never a SIGBUS. Costs one copy.
        """
        meta, views, _info = self._check().get_guarded(unique_id)
        return self._decode(unique_id, meta, views)

    def _decode(self, unique_id: str, meta: bytes, views: list[memoryview]) -> Any:
        tag = meta[:1]
        if tag == _TAG_VALUE:  # the common case first
            return codecs.decode(meta[1:], views)
        kind, meta = _KINDS.get(bytes(tag), "val"), meta[1:]
        if kind == "ref":
            return REFERENCES.get(self.run_id, unique_id, json.loads(meta))
        if kind == "data":
            return datacodec.decode(meta, views)
        return codecs.decode(meta, views)

    # ---- which prompts may use the run ------------------------------------------------------
    def allow_prompt(self, prompt: Any) -> str:
        """Let the ComfyUI nodes of ``prompt`` (an API prompt) use this run; returns its digest.

        Ports and loaders act on a run only for prompts its orchestrator registered here, so a
        prompt someone else queued with this run's id (readable in ComfyUI's /queue and /history)
        is refused. ``revoke_prompt(digest)`` once the prompt has finished. The digest binds the
        versions its loaders read now (:func:`~discomfort.runs.run_digests`): register it after
        saving its inputs, and again after changing them.
        """
        digests = self._prompt_digests_to_allow(prompt)
        self._set_prompts(self.prompt_digests() | set(digests))
        return digests[0]

    def allow_digest(self, digest: str) -> None:
        self._set_prompts(self.prompt_digests() | {digest})

    def revoke_prompt(self, digest: str) -> None:
        self._set_prompts(self.prompt_digests() - set(self._prompt_digests_to_revoke(digest)))

    def check_prompt(self, prompt: Any) -> None:
        """Raise PromptNotAllowedError unless ``prompt`` was registered with ``allow_prompt``."""
        if not isinstance(prompt, dict) or prompt_digest(prompt) not in self.prompt_digests():
            raise PromptNotAllowedError(
                f"run {self.run_id!r} does not accept this prompt: only prompts its orchestrator queued "
                "(run_sequential, or WorkflowContext.allow_prompt) may read or write its values"
            )

    def prompt_digests(self) -> frozenset[str]:
        """The digests of the prompts allowed to use the run now."""
        try:  # guarded: the ComfyUI server's nodes check this before every load and save
            meta, _views, _info = self._check().get_guarded(_PROMPTS_KEY)
        except UnknownKeyError:
            return frozenset()
        return frozenset(json.loads(bytes(meta[1:])))

    def _set_prompts(self, digests: frozenset[str]) -> None:
        store = self._check()
        if digests:
            store.put(_PROMPTS_KEY, _TAG_PROMPTS + json.dumps(sorted(digests)).encode(), [])
        else:
            store.delete(_PROMPTS_KEY)

    def delete(self, unique_id: str) -> bool:
        removed = self._check().delete(unique_id)
        REFERENCES.drop(self.run_id, unique_id)
        return removed

    def keys(self) -> list[str]:
        return [k for k in self._check().keys() if k != _PROMPTS_KEY]

    def __contains__(self, unique_id: object) -> bool:
        return unique_id != _PROMPTS_KEY and self._check().contains(unique_id)

    def info(self, unique_id: str) -> dict[str, Any]:
        """Tier, size and version (store-wide, never repeated) of the stored object, and its
        ``kind``: "ref" (an object kept by reference in the process that saved it) or "value"."""
        store = self._check()
        out: dict[str, Any] = dict(store.info(unique_id))
        kind = "value"
        if out["nbuf"] == 0:  # a reference has no buffers: its tag is read from its small meta
            try:
                kind = _KINDS.get(bytes(store.get_guarded(unique_id)[0][:1]), "value")
            except UnknownKeyError:  # deleted in between
                pass
        out["kind"] = "ref" if kind == "ref" else "value"
        return out

    def stats(self) -> dict[str, Any]:
        out = self._check().stats()
        out["backend"] = self.backend
        out["owner"] = self._owner
        return out


def _is_local_run(run_id: str) -> bool:
    """Whether a process-local run of this id lives in the default disk root (its directory and
    owner's lock file are there), for attach()'s error."""
    try:
        path = os.path.join(sysinfo.disk_root(), control_name(run_id), LOCAL_LOCK)
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def get_context(run_id: str) -> SharedRunContext:
    """The context of `run_id` registered in this process, else an attachment to it.

    Attachments of runs that have finished are dropped here, so a long-lived server that serves
    many runs does not keep their memory mapped.
    """
    if not isinstance(run_id, str) or not run_id:
        raise UnknownRunError(f"no run id given (got {run_id!r})")
    resolve = resolver_for(run_id)  # e.g. a Ray run: found through the cluster, not /dev/shm
    if resolve is not None:
        return resolve(run_id)
    with _contexts_lock:
        _drop_finished_locked()
        ctx = _contexts.get(run_id)
        if ctx is not None:
            return ctx
        try:
            ctx = WorkflowContext.attach(run_id)
        except StoreClosedError as exc:
            raise RunFinishedError(f"run {run_id!r} has finished") from exc
        _contexts[run_id] = ctx
        return ctx


def release_finished() -> int:
    """Detach from every attached run that has finished; returns how many."""
    with _contexts_lock:
        return _drop_finished_locked()


def _drop_finished_locked() -> int:
    dropped = 0
    for rid, ctx in list(_contexts.items()):
        if ctx._owner:
            continue
        try:
            finished = ctx._closed or ctx._store.finished
        except Exception:
            finished = True
        if finished:
            del _contexts[rid]
            ctx._closed = True
            ctx._store.close()
            REFERENCES.drop_run(rid)  # what this process's nodes kept by reference for that run
            dropped += 1
    return dropped


def active_runs() -> list[str]:
    with _contexts_lock:
        return sorted(_contexts)


def release_pool() -> int:
    """Give back the prefaulted chunks that finished runs keep for this process's next run.

    Each backend keeps such a pool (at most the largest RAM budget of a run) so the next run's
    first saves cost no page faults; a long-lived process calls this between bursts of work to
    return that memory. Returns the bytes given back.
    """
    return sum(mod.release_pool() for name in ("discomfort._core", "discomfort._pystore")
               if (mod := sys.modules.get(name)) is not None and hasattr(mod, "release_pool"))


# ---- process lifecycle: exit, SIGTERM, fork -------------------------------------------------------
def _shutdown_all() -> None:
    with _contexts_lock:
        contexts = list(_contexts.values())
    for ctx in contexts:
        try:
            ctx.shutdown()
        except Exception:
            pass


atexit.register(_shutdown_all)

_signal_installed = False
_previous_sigterm: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    """Only raises: cleanup runs in __exit__/shutdown, never inside the handler."""
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    raise SystemExit(128 + signum)


def install_signal_handler() -> None:
    """SIGTERM unwinds the process (handlers only raise), so owners clean up on the way out."""
    global _signal_installed, _previous_sigterm
    if _signal_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return  # the program chose to ignore SIGTERM; leave that alone
    _previous_sigterm = previous if callable(previous) else None
    signal.signal(signal.SIGTERM, _on_sigterm)
    _signal_installed = True


def _after_fork_in_child() -> None:
    """A forked child inherits no ownership: it must never unlink its parent's runs."""
    global _contexts_lock
    _contexts_lock = threading.Lock()
    for ctx in _contexts.values():
        ctx._owner = False
        ctx._closed = True
    _contexts.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
