"""A pool of ComfyUI servers placed by Ray: one Ray actor per server, on its node.

Each actor starts a ComfyUI server with the node pack on its node (``discomfort.comfy.launch_server``,
bound to 127.0.0.1) and runs prompts on it over localhost; the orchestrator only talks to the
actors, so it needs no network route to the servers. The server process gets ``RAY_ADDRESS``
(and the node's IP) in its environment: the node pack's ``get_context`` joins the cluster on
first use and finds the run's directory by id. The server dies with its actor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import _settings
from ..errors import ComfyConnectionError, ServerDiedError, WorkflowError
from ..run_control import CancelToken
from . import _ray

__all__ = ["RayComfyPool", "ServerDiedError", "ComfyServerActor"]

log = logging.getLogger("discomfort")

# Set by Ray for its own worker processes; a ComfyUI server is a driver of its own, not a worker.
_WORKER_ONLY_ENV = ("RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_CLIENT_MODE", "RAY_LD_PRELOAD_ON_WORKERS",
                    "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_NODE_ID", "RAY_WORKER_ID")

# Run as the server's "python": makes the kernel kill the server when the actor process dies, then
# execs the real interpreter with the same arguments.
_WRAPPER = """#!/bin/sh
exec "{python}" -c 'import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != {parent}:
    sys.exit("discomfort: the Ray actor that started this ComfyUI server is gone")
os.execv(sys.executable, [sys.executable] + sys.argv[1:])' "$@"
"""


_WORK_PREFIX = "discomfort-ray-server-"
_WORK_DIR = re.compile(re.escape(_WORK_PREFIX) + r"(\d+)-")


def _sweep_work_dirs() -> None:
    """Remove the work folders of server actors that were killed (they could not clean up)."""
    root = Path(tempfile.gettempdir())
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = _WORK_DIR.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            path = root / name
            if path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


class ComfyServerActor:
    """Runs one ComfyUI server on the node it is placed on (used as a Ray actor)."""

    def __init__(self, comfy_path: str, custom_nodes: Sequence[str] | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float = 180.0, env: dict | None = None, gpu: bool = False,
                 isolated: bool = False) -> None:
        from ..comfy import launch_server

        t0 = time.monotonic()
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self._stack = contextlib.ExitStack()
        _sweep_work_dirs()
        work = Path(self._stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"{_WORK_PREFIX}{os.getpid()}-")))
        wrapper = work / "python"
        wrapper.write_text(_WRAPPER.format(python=sys.executable, parent=os.getpid()))
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        child_env = _settings.child_env(drop=_WORKER_ONLY_ENV)
        child_env.update(env or {})
        child_env["RAY_ADDRESS"] = context.gcs_address
        child_env[_ray.ENV_NODE_IP] = self.node_ip
        # The GPU this actor holds (Ray set CUDA_VISIBLE_DEVICES), else --cpu: Ray's accounting decides.
        self.server = self._stack.enter_context(launch_server(
            comfy_path, custom_nodes=custom_nodes, extra_args=tuple(extra_args), python=str(wrapper),
            startup_timeout=startup_timeout, env=child_env, work_dir=work / "server", cpu=not gpu,
            isolated=isolated,
        ))
        self.seconds = time.monotonic() - t0
        self._running: dict[str, CancelToken] = {}  # by the call id of each execute() that can be cut
        self._running_lock = threading.Lock()

    def describe(self) -> dict:
        return {"url": self.server.url, "pid": self.server.process.pid, "node_id": self.node_id,
                "node_ip": self.node_ip, "actor_pid": os.getpid(), "startup_seconds": self.seconds,
                "log_path": str(self.server.log_path), "output_dir": str(self.server.output_dir)}

    def alive(self) -> bool:
        process = self.server.process
        if process.poll() is not None:
            return False
        # poll() says None while another thread waits for the process (kill_server): ask the kernel
        try:
            with open(f"/proc/{process.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return not os.path.isdir("/proc")  # reaped, where /proc exists
        except OSError:
            return True

    def execute(self, prompt: dict, timeout: float | None = None, call_id: str | None = None) -> dict:
        code = self.server.process.poll()
        if code is not None:
            raise ComfyConnectionError(f"the ComfyUI server (pid {self.server.process.pid}) exited with code {code}")
        if call_id is None:
            return self.server.execute(prompt, timeout=timeout)
        token = CancelToken()
        with self._running_lock:
            self._running[call_id] = token
        try:
            return self.server.execute(prompt, timeout=timeout, cancel=token)
        finally:
            with self._running_lock:
                self._running.pop(call_id, None)

    def interrupt(self, call_id: str) -> bool:
        """Cancel the execute() ``call_id`` running in this actor (in another of its threads): it
        takes its prompt off the server's queue or interrupts it, then raises RunCancelled."""
        with self._running_lock:
            token = self._running.get(call_id)
        if token is not None:
            token.cancel()
        return token is not None

    def object_info(self) -> dict:
        return self.server.object_info()

    def adopt(self, boxes: list) -> Any:
        """The values behind ``boxes`` (ObjectRefs in one-element lists, saved on this node), as
        this call's return values: Ray copies each into this node's object store once, owned by
        the caller. The last return is a small "ok" that says every copy is made."""
        values = [ray.get(box[0]) for box in boxes]
        return (*values, "ok")

    def free(self, unload_models: bool = False) -> None:
        """Drop ComfyUI's execution cache (and the object store views it holds) between prompts."""
        self.server.free(unload_models=unload_models, free_memory=True)

    def kill_server(self, sig: int | None = None) -> int:
        """Kill the ComfyUI process (tests: a server that dies; default SIGKILL); returns its pid.
        (The default is looked up here: Windows has no SIGKILL, and this module must import there.)"""
        pid = self.server.process.pid
        os.kill(pid, signal.SIGKILL if sig is None else sig)
        self.server.process.wait(timeout=30)
        return pid

    def log_tail(self, lines: int = 60) -> str:
        from ..comfy.launcher import log_tail

        return log_tail(Path(self.server.log_path), lines)

    def stop(self) -> None:
        self._stack.close()


@dataclass
class _Slot:
    actor: Any
    node_id: str
    info: dict = field(default_factory=dict)
    replaced: int = 0


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapper."""
    if isinstance(exc, RayTaskError):
        return getattr(exc, "cause", None) or exc
    return exc


class RayComfyPool:
    """ComfyUI servers on a Ray cluster, one per node (default without GPUs) or one per GPU.

    ``comfy_path``: the ComfyUI tree, at the same path on every node (default
    ``$DISCOMFORT_COMFYUI``). ``size``: how many servers (default: one per alive node, or one
    per GPU with ``per="gpu"``). ``num_cpus`` / ``num_gpus``: what each server's actor reserves
    (``per="gpu"``: one GPU each, and Ray sets ``CUDA_VISIBLE_DEVICES`` for the server).
    ``custom_nodes`` / ``extra_args`` / ``env`` / ``startup_timeout`` / ``isolated``: passed to
    :func:`~discomfort.comfy.launch_server` on the node: by default each server runs the node's
    tree as its ``main.py`` would (its custom nodes, models and folders), on the GPU its actor
    holds and with ``--cpu`` where it holds none; ``isolated=True`` loads only the given packs with
    temporary folders. Servers start in parallel on
    :meth:`start` (or ``with``); :meth:`close` stops them.
    """

    def __init__(self, comfy_path: str | os.PathLike | None = None, size: int | None = None, *,
                 per: str = "auto", num_cpus: float = 1, num_gpus: float | None = None,
                 custom_nodes: Sequence[str | os.PathLike] | None = None, extra_args: Sequence[str] = (),
                 env: dict | None = None, startup_timeout: float = 180.0, address: str | None = None,
                 isolated: bool = False) -> None:
        path = comfy_path or _settings.get("DISCOMFORT_COMFYUI")
        if not path:
            raise ValueError("no comfy_path given and DISCOMFORT_COMFYUI is not set")
        if per not in ("auto", "node", "gpu"):
            raise ValueError(f"per must be 'auto', 'node' or 'gpu', not {per!r}")
        self.comfy_path = str(path)
        self.size = size
        self.per = per
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.custom_nodes = [str(p) for p in custom_nodes] if custom_nodes is not None else None
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.isolated = bool(isolated)
        self.address = address
        self.slots: list[_Slot] = []
        self.started_seconds: float | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def _actor_class(self) -> Any:
        return ray.remote(ComfyServerActor)

    def _gpus_each(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        if self.per == "gpu" or (self.per == "auto" and ray.cluster_resources().get("GPU", 0) > 0):
            return 1
        return 0

    def _spawn(self, node_id: str | None, soft: bool) -> Any:
        gpus = self._gpus_each()
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": gpus, "max_restarts": 0,
                                   "max_concurrency": 4}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)
        else:
            options["scheduling_strategy"] = "SPREAD"
        return self._actor_class().options(**options).remote(
            self.comfy_path, self.custom_nodes, self.extra_args, self.startup_timeout, self.env, gpus > 0,
            self.isolated)

    def start(self) -> RayComfyPool:
        if self.slots:
            return self
        _ray.ensure_connected(self.address)
        t0 = time.monotonic()
        nodes = [n["NodeID"] for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= self.num_cpus]
        if not nodes and not self._gpus_each():
            raise WorkflowError(f"no alive Ray node has {self.num_cpus} CPU(s) for a ComfyUI server")
        if self._gpus_each() > 0:
            count = self.size or int(ray.cluster_resources().get("GPU", 0) // self._gpus_each()) or 1
            targets: list[str | None] = [None] * count
        else:
            count = self.size or len(nodes)
            targets = [nodes[i % len(nodes)] for i in range(count)]
        actors = [self._spawn(node, soft=False) for node in targets]
        try:
            infos = self._wait_started([a.describe.remote() for a in actors])
        except BaseException:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise
        self.slots = [_Slot(a, info["node_id"], info) for a, info in zip(actors, infos)]
        self.started_seconds = time.monotonic() - t0
        log.info("discomfort: %d ComfyUI servers started in %.1fs on nodes %s", len(self.slots),
                 self.started_seconds, ", ".join(s.node_id[:8] for s in self.slots))
        return self

    def _wait_started(self, calls: list) -> list:
        """The servers' descriptions once they answer; a server that cannot be placed or does
        not start in time raises ComfyConnectionError instead of waiting forever."""
        limit = self.startup_timeout + 120
        ready, pending = ray.wait(calls, num_returns=len(calls), timeout=limit)
        if pending:
            raise ComfyConnectionError(
                f"{len(pending)} of {len(calls)} ComfyUI server(s) did not start within {limit:.0f}s: the cluster "
                f"may lack the resources asked for each ({self.num_cpus} CPU, {self._gpus_each()} GPU), "
                "see `ray status`"
            )
        return ray.get(calls)

    def close(self) -> None:
        slots, self.slots = self.slots, []
        stops = []
        for slot in slots:
            with contextlib.suppress(Exception):
                stops.append(slot.actor.stop.remote())
        with contextlib.suppress(Exception):
            ray.wait(stops, num_returns=len(stops), timeout=30)
        for slot in slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)

    def __enter__(self) -> RayComfyPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def servers(self) -> list[dict]:
        """What each server is: url (on its node), pid, node id and ip, startup seconds, log."""
        return [dict(s.info, replaced=s.replaced) for s in self.slots]

    def _slot(self, index: int) -> _Slot:
        if not self.slots:
            raise WorkflowError("the ComfyUI server pool is not started (use it in a with block, or call start())")
        return self.slots[index]

    # ---- running ----------------------------------------------------------------------------------
    def alive(self, index: int) -> bool:
        try:
            return bool(ray.get(self._slot(index).actor.alive.remote(), timeout=30))
        except Exception:  # noqa: BLE001 - actor gone or unreachable
            return False

    def execute(self, index: int, prompt: dict, timeout: float | None = None, cancel: CancelToken | None = None) -> dict:
        """Run ``prompt`` on server ``index``. A dead server raises :class:`ServerDiedError`.

        ``cancel``: when it fires, or on Ctrl-C, the server's actor withdraws the prompt (off the
        queue, or interrupted) before this raises RunCancelled (or re-raises the KeyboardInterrupt).
        """
        slot = self._slot(index)
        try:
            call_id = None if cancel is None else uuid.uuid4().hex  # names this call to its actor
            ref = slot.actor.execute.remote(prompt, timeout, call_id)
            try:
                while cancel is not None and not ray.wait([ref], timeout=0.2)[0]:
                    if cancel.cancelled:
                        slot.actor.interrupt.remote(call_id)  # the actor's execute() then raises RunCancelled
                        break
                return ray.get(ref)
            except KeyboardInterrupt:
                if call_id is not None:
                    slot.actor.interrupt.remote(call_id)
                    ray.wait([ref], timeout=30)  # until the server let go of the prompt
                raise
        except RayActorError as exc:
            raise ServerDiedError(f"the actor of ComfyUI server {index} (node {slot.node_id[:8]}) died: {exc}") from exc
        except RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, ComfyConnectionError) and not self.alive(index):
                raise ServerDiedError(f"ComfyUI server {index} (node {slot.node_id[:8]}, pid {slot.info.get('pid')}) "
                                      f"died: {cause}") from exc
            raise cause from exc

    def adopt(self, index: int, boxes: list) -> list:
        """ObjectRefs owned by this process for the values in ``boxes`` (copied on server ``index``'s node)."""
        slot = self._slot(index)
        refs = slot.actor.adopt.options(num_returns=len(boxes) + 1).remote(boxes)
        try:
            ray.get(refs[-1])
        except RayActorError as exc:
            raise ServerDiedError(f"the actor of ComfyUI server {index} died while adopting its outputs: "
                                  f"{exc}") from exc
        except RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, ObjectLostError):
                raise ServerDiedError(f"ComfyUI server {index} died before its outputs were adopted: {cause}") from exc
            raise cause from exc
        return list(refs[:-1])

    def object_info(self, index: int = 0) -> dict:
        return ray.get(self._slot(index).actor.object_info.remote())

    def free(self, indices: Sequence[int] | None = None, unload_models: bool = False) -> None:
        """Ask servers to drop ComfyUI's execution cache (views into the object store included)."""
        chosen = range(len(self.slots)) if indices is None else indices
        calls = [self.slots[i].actor.free.remote(unload_models) for i in chosen]
        with contextlib.suppress(Exception):
            ray.get(calls, timeout=60)

    def kill_server(self, index: int) -> int:
        """Kill server ``index``'s ComfyUI process (to test recovery); returns its pid."""
        return ray.get(self._slot(index).actor.kill_server.remote())

    def log_tail(self, index: int) -> str:
        try:
            return ray.get(self._slot(index).actor.log_tail.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001
            return f"(no log: {exc})"

    def replace(self, index: int) -> dict:
        """Start a new server in place of server ``index`` (on the same node if it is still alive)."""
        old = self._slot(index)
        with contextlib.suppress(Exception):
            ray.get(old.actor.stop.remote(), timeout=15)  # the actor may be alive, its server not
        with contextlib.suppress(Exception):
            ray.kill(old.actor, no_restart=True)
        t0 = time.monotonic()
        actor = self._spawn(old.node_id, soft=True)
        try:
            info = self._wait_started([actor.describe.remote()])[0]
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise
        self.slots[index] = _Slot(actor, info["node_id"], info, old.replaced + 1)
        log.info("discomfort: ComfyUI server %d replaced in %.1fs (node %s, pid %s)", index,
                 time.monotonic() - t0, info["node_id"][:8], info["pid"])
        return info
