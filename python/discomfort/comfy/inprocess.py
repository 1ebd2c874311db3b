"""ComfyUI's own ``PromptExecutor``, run inside this process.

ComfyUI keeps its node registry, caches and settings in module globals, so a process holds at
most one :class:`InProcessComfy`: constructing it again with the same ComfyUI path returns the
same object; another path raises.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ComfyConnectionError, RunCancelled
from ..run_control import CancelToken
from . import _tvshim
from . import _startup
from ._common import make_custom_nodes_dir, raise_for_messages, validation_error

__all__ = ["InProcessComfy"]

log = logging.getLogger(__name__)

_instance: "InProcessComfy | None" = None
_instance_lock = threading.Lock()


class _ServerStandIn:
    """What ComfyUI's executor needs of ``server.PromptServer.instance`` when there is no server."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.routes = None  # no HTTP routes in-process: node packs must tolerate this

    on_event: Callable[[Any, Any], None] | None = None  # while a run wants to hear its progress

    def send_sync(self, event, data, sid=None) -> None:
        # Nothing listens on a socket; a running execute() may watch the events.
        hook = self.on_event
        if hook is not None:
            hook(event, data)

    def queue_updated(self) -> None:
        pass


def _install_progress_hook(server: _ServerStandIn) -> None:
    """What ComfyUI's main.py does for its server: node progress (``comfy.utils.ProgressBar``,
    e.g. sampler steps) becomes "progress" messages, and is where an interrupt is noticed."""
    import comfy.model_management
    import comfy.utils

    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # older ComfyUI
        def get_executing_context():  # type: ignore[misc]
            return None

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if ctx is not None:
            prompt_id = prompt_id or ctx.prompt_id
            node_id = node_id or ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        server.send_sync("progress", {"value": value, "max": total,
                                      "prompt_id": prompt_id or server.last_prompt_id,
                                      "node": node_id or server.last_node_id}, server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def _apply_tree_paths(path: Path, folder_paths, extra_config) -> None:
    """What main.py's apply_custom_paths does without arguments: the tree's
    extra_model_paths.yaml, and the output-folder model paths."""
    config = path / "extra_model_paths.yaml"
    if config.is_file():
        extra_config.load_extra_path_config(str(config))
    out = folder_paths.get_output_directory()
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(out, kind))


def _run_prestartup_scripts(folder_paths) -> None:
    """main.py's execute_prestartup_script: each pack's ``prestartup_script.py``, before nodes load."""
    import importlib.util

    for base in folder_paths.get_folder_paths("custom_nodes"):
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            script = os.path.join(base, name, "prestartup_script.py")
            if name.endswith(".disabled") or name == "__pycache__" or not os.path.isfile(script):
                continue
            try:
                spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], script)
                assert spec is not None and spec.loader is not None
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except Exception as exc:  # noqa: BLE001 - as main.py: one pack's failure is logged
                log.error("Failed to execute startup-script: %s / %s", script, exc)


async def _init_nodes(nodes, api_nodes: bool) -> list:
    """main.py's node loading: custom nodes may not replace ComfyUI's guarded functions."""
    try:
        import hook_breaker_ac10a0 as breaker
    except ImportError:  # older ComfyUI
        breaker = None
    if breaker is not None:
        breaker.save_functions()
    try:
        return await nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=api_nodes)
    finally:
        if breaker is not None:
            breaker.restore_functions()


def _setup_database() -> None:
    """main.py's setup_database: ComfyUI's own database (``user/comfyui.db`` by default)."""
    try:
        from app.database.db import dependencies_available, get_db_path, init_db

        if dependencies_available():
            db = get_db_path()
            if db != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
            init_db()
    except Exception as exc:  # noqa: BLE001 - as main.py: ComfyUI runs on without it
        log.error("Failed to initialize ComfyUI's database: %s", exc)


class InProcessComfy:
    """Execute API-format prompts with ComfyUI's real executor in this process.

    ``comfy_path``: the ComfyUI tree. By default it runs as ``python main.py`` would run it: on
    the GPU where this Python's torch sees one (``--cpu`` only where it sees none; ``cpu=True``
    or ``False`` forces either), with the tree's own ``custom_nodes/``, ``models/`` and
    ``extra_model_paths.yaml``, its ``input/``, ``output/`` and ``user/`` folders, its database
    and ComfyUI's API nodes. This project's node pack is added where the tree lacks it;
    ``custom_nodes``: more node-pack folders to load besides the tree's. Only the temp folder is
    this process's own (ComfyUI empties its temp folder when a server starts).

    ``isolated=True`` (what tests use): only the given packs (default: this project's), and the
    output/temp/input/user folders in ``work_dir`` (default: a fresh temporary folder), no API
    nodes. ``work_dir`` otherwise holds the temp folder and the links to the added packs.

    Constructing it again with the same path returns the same object (arguments left out, or
    None, take what is loaded); another path, or other packs, isolation or device, raise.
    """

    def __new__(cls, comfy_path, custom_nodes: Sequence[os.PathLike | str] | None = None,
                work_dir: os.PathLike | str | None = None, *, isolated: bool | None = None,
                cpu: bool | None = None):
        global _instance
        path = Path(comfy_path).expanduser().resolve()
        with _instance_lock:
            if _instance is not None:
                _instance._check_same(path, custom_nodes, isolated, cpu)
                return _instance
            self = super().__new__(cls)
            self._boot(path, custom_nodes, work_dir, bool(isolated), cpu)
            _instance = self
            return self

    def __init__(self, *args, **kwargs) -> None:  # all the work is in __new__/_boot
        pass

    def _check_same(self, path: Path, custom_nodes, isolated: bool | None, cpu: bool | None) -> None:
        if self.comfy_path != path:
            raise RuntimeError(f"ComfyUI from {self.comfy_path} is already loaded in this process; "
                               f"cannot load another one from {path}")
        if isolated is not None and isolated != self.isolated:
            raise RuntimeError(f"ComfyUI is already loaded in this process with isolated={self.isolated}; "
                               f"cannot reload it with isolated={isolated}")
        if cpu is not None and cpu != self.cpu:
            raise RuntimeError(f"ComfyUI is already loaded in this process with cpu={self.cpu}; "
                               f"cannot reload it with cpu={cpu}")
        if custom_nodes is not None and \
                _startup.packs_to_add(path, custom_nodes, self.isolated) != self.node_packs:
            raise RuntimeError(
                "ComfyUI is already loaded in this process with node packs "
                f"{[str(p) for p in self.node_packs]}; cannot reload with others"
            )

    # -- start-up ---------------------------------------------------------------------------

    def _boot(self, path: Path, custom_nodes, work_dir, isolated: bool, cpu: bool | None) -> None:
        t0 = time.monotonic()
        if not (path / "execution.py").is_file() or not (path / "nodes.py").is_file():
            raise FileNotFoundError(f"{path} is not a ComfyUI tree (no execution.py / nodes.py)")
        self.comfy_path = path
        self.isolated = isolated
        self.node_packs = _startup.packs_to_add(path, custom_nodes, isolated)
        if work_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="discomfort-comfy-")
            self.work_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            self.work_dir = Path(work_dir).resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.last_messages: list = []  # ComfyUI's status messages of the last execute()
        self.client_id = "discomfort-inprocess"

        _tvshim.install()
        for name in ("comfy", "nodes", "execution", "server", "folder_paths"):
            mod = sys.modules.get(name)
            where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
            if mod is not None and (where is None or not Path(where).resolve().is_relative_to(path)):
                raise RuntimeError(
                    f"a module named {name!r} from {where} is already imported; ComfyUI's own "
                    f"{name!r} from {path} cannot be loaded in this process"
                )
        self.accelerator = None if cpu is True else _startup.probe_accelerator()
        self.cpu = _startup.use_cpu(cpu, self.accelerator)
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))

        import comfy.options  # noqa: F401  (no argument parsing: defaults)
        import comfy.cli_args

        args = comfy.cli_args.args
        args.cpu = self.cpu
        args.disable_api_nodes = isolated
        if "comfy.model_management" in sys.modules and self.cpu and \
                not sys.modules["comfy.model_management"].cpu_state.name == "CPU":
            log.warning("comfy.model_management was imported before --cpu could be set")

        import folder_paths

        nodes_dir = make_custom_nodes_dir(self.node_packs, self.work_dir)
        (self.work_dir / "temp").mkdir(exist_ok=True)
        folder_paths.set_temp_directory(str(self.work_dir / "temp"))
        if isolated:
            for sub in ("output", "input", "user"):
                (self.work_dir / sub).mkdir(exist_ok=True)
            folder_paths.set_output_directory(str(self.work_dir / "output"))
            folder_paths.set_input_directory(str(self.work_dir / "input"))
            folder_paths.set_user_directory(str(self.work_dir / "user"))
            # Only the given packs: not the ComfyUI tree's own custom_nodes folder.
            folder_paths.folder_names_and_paths["custom_nodes"] = ([str(nodes_dir)], set())
            args.database_url = "sqlite:///:memory:"
        import utils.extra_config  # noqa: F401  (before nodes, which puts comfy/ first on sys.path)

        if not isolated:
            _apply_tree_paths(path, folder_paths, utils.extra_config)
            if self.node_packs:
                folder_paths.add_model_folder_path("custom_nodes", str(nodes_dir))
            _run_prestartup_scripts(folder_paths)
        import nodes
        import execution
        import server

        self._nodes = nodes
        self._execution = execution
        self.server = _ServerStandIn()
        server.PromptServer.instance = self.server

        _install_progress_hook(self.server)
        failed = asyncio.run(_init_nodes(nodes, api_nodes=not isolated))
        if failed:  # ComfyUI's own log has said why (optional extras, e.g. without torchaudio)
            log.info("ComfyUI extras that did not import: %s", failed)
        missing = [p for p in self.node_packs if not self._pack_loaded(p)]
        if missing:
            raise ComfyConnectionError(f"ComfyUI could not import the node pack(s) {[str(p) for p in missing]}"
                                       " (see the log above: IMPORT FAILED)")
        if not isolated:
            _setup_database()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )
        self.startup_seconds = time.monotonic() - t0
        log.info("ComfyUI in-process ready in %.1fs (%s)", self.startup_seconds,
                 "CPU" if self.cpu else self.accelerator or "GPU")

    def _pack_loaded(self, pack: Path) -> bool:
        dirs = {os.path.realpath(d) for d in self._nodes.LOADED_MODULE_DIRS.values()}
        return os.path.realpath(pack) in dirs or os.path.realpath(pack.parent) in dirs and pack.is_file()

    # -- API --------------------------------------------------------------------------------

    @property
    def node_class_mappings(self) -> dict:
        return self._nodes.NODE_CLASS_MAPPINGS

    @property
    def output_dir(self) -> Path:
        """ComfyUI's output folder (where ``SaveImage`` writes): ``folder_paths``' own answer."""
        import folder_paths

        return Path(folder_paths.get_output_directory())

    def object_info(self, node_class: str | None = None) -> dict:
        """What the server's ``/object_info`` (or ``/object_info/{node_class}``) answers."""
        import json

        from comfy_api.internal import _ComfyNodeInternal

        nodes = self._nodes
        names = [node_class] if node_class else list(nodes.NODE_CLASS_MAPPINGS)
        out = {}
        for name in names:
            cls = nodes.NODE_CLASS_MAPPINGS.get(name)
            if cls is None:
                continue
            if issubclass(cls, _ComfyNodeInternal):
                info = cls.GET_NODE_INFO_V1()
            else:
                inputs = cls.INPUT_TYPES()
                info = {
                    "input": inputs,
                    "input_order": {k: list(v.keys()) for k, v in inputs.items()},
                    "output": cls.RETURN_TYPES,
                    "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                    "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                    "name": name,
                    "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                    "description": getattr(cls, "DESCRIPTION", ""),
                    "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
                    "category": getattr(cls, "CATEGORY", "sd"),
                    "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
                }
            try:
                out[name] = json.loads(json.dumps(info, default=str))
            except (TypeError, ValueError):
                continue
        return out

    def execute(self, prompt: dict, timeout: float | None = None, *, extra_data: dict | None = None,
                cancel: CancelToken | None = None, on_event: Callable[[str, dict], Any] | None = None) -> dict:
        """Validate and run an API-format prompt; returns ComfyUI's outputs of it,
        ``{node_id: ui}`` (the executor's history result, as a server's ``/history`` gives it;
        files of ``"type": "output"`` are under :attr:`output_dir`).

        Raises :class:`~discomfort.errors.PromptValidationError` when ComfyUI rejects the prompt,
        :class:`~discomfort.errors.NodeExecutionError` when a node fails, ``TimeoutError``
        when ``timeout`` seconds pass, and :class:`~discomfort.errors.RunCancelled` when the
        :class:`~discomfort.run_control.CancelToken` ``cancel`` fires (in both cases the run
        stops before its next node or progress report). ``on_event(kind, data)`` hears
        ComfyUI's messages for this prompt ("executing", "progress", ...).
        """
        execution = self._execution
        with self._lock:
            prompt_id = str(uuid.uuid4())
            prompt = copy.deepcopy(prompt)
            valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
            if not valid[0] or valid[3]:
                raise validation_error(valid[1], valid[3])
            outputs_to_execute = valid[2]
            done = threading.Event()
            stopped: list[str] = []  # "timeout", "cancel" or "ctrl-c", in the order they fired

            def _stop(reason: str) -> None:
                if not done.is_set() and reason not in stopped:
                    stopped.append(reason)
                    self._nodes.interrupt_processing(True)

            def _on_sigint(signum, frame) -> None:
                # Like ComfyUI's server: the first Ctrl-C interrupts the prompt at its next node or
                # progress check (a node's own code cannot be cut safely); a second one raises at once.
                if "ctrl-c" in stopped:
                    raise KeyboardInterrupt
                _stop("ctrl-c")

            def _on_event(event, data) -> None:
                # ComfyUI clears the interrupt flag when a run starts ("execution_start") and
                # checks it before each node ("executing"): raise it again at those points.
                if stopped and event in ("execution_start", "executing"):
                    self._nodes.interrupt_processing(True)
                if on_event is not None and isinstance(data, dict) and data.get("prompt_id") == prompt_id:
                    on_event(event, data)

            watchdog = None
            if timeout is not None:
                def _watch() -> None:
                    if not done.wait(max(0.0, timeout)):
                        _stop("timeout")

                watchdog = threading.Thread(target=_watch, name="discomfort-comfy-timeout", daemon=True)
                watchdog.start()
            unsubscribe = cancel.subscribe(lambda: _stop("cancel")) if cancel is not None else None
            self.server.on_event = _on_event
            # Only where Ctrl-C would be the default KeyboardInterrupt (the main thread, no handler of
            # the caller's): otherwise asyncio.run would turn it into a cancel ComfyUI never sees.
            sigint = threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler
            if sigint:
                signal.signal(signal.SIGINT, _on_sigint)
            try:
                # With a client id (as a server has), ComfyUI also reports the UI outputs of
                # nodes served from its cache; the stand-in server just drops the messages.
                extra = {"client_id": self.client_id, **(extra_data or {})}
                self.executor.execute(copy.deepcopy(prompt), prompt_id, extra, outputs_to_execute)
            finally:
                done.set()
                if sigint:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                if unsubscribe is not None:
                    unsubscribe()
                if watchdog is not None:
                    watchdog.join()
                self.server.on_event = None
                self._nodes.interrupt_processing(False)
            messages = list(self.executor.status_messages)
            self.last_messages = messages
            if "ctrl-c" in stopped:
                raise KeyboardInterrupt(f"prompt {prompt_id} was interrupted by Ctrl-C")
            if stopped and (not self.executor.success or any(m[0] == "execution_interrupted" for m in messages)):
                if stopped[0] == "cancel":
                    raise RunCancelled(f"prompt {prompt_id} was cancelled")
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
            raise_for_messages(messages, prompt_id)
            if not self.executor.success:
                raise ComfyConnectionError(f"prompt {prompt_id} failed without an error message: {messages}")
            return copy.deepcopy(self.executor.history_result.get("outputs", {}))

    def set_cache(self, lru: int = 0) -> None:
        """ComfyUI's output cache: 0 (the default) keeps only the last prompt's node outputs, so a
        loader re-runs when its workflow comes back after another one; ``lru=N`` keeps the N most
        recent outputs across prompts (a server's ``--cache-lru N``), so models load once per loop.
        Clears the cache."""
        if not isinstance(lru, int) or lru < 0:
            raise ValueError(f"lru must be an int >= 0, not {lru!r}")
        execution = self._execution
        with self._lock:
            self.executor.cache_type = execution.CacheType.LRU if lru else execution.CacheType.CLASSIC
            self.executor.cache_args = {"lru": lru, "ram": 0}
            self.executor.reset()

    def free(self) -> None:
        """Drop ComfyUI's caches (what POST /free with free_memory does)."""
        with self._lock:
            self.executor.reset()
