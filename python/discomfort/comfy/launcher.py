"""Launch a local ComfyUI server: the user's tree as its ``main.py`` runs it, or isolated."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from .. import _settings
from ..errors import ComfyConnectionError
from . import _startup
from ._common import default_node_pack, make_custom_nodes_dir
from .client import ComfyServer

__all__ = ["launch_server", "free_port"]

log = logging.getLogger(__name__)

_BIND_FAILURE_MARKERS = ("address already in use", "errno 98", "error while attempting to bind")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (ComfyUI does not accept port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _pythonpath_with_package(env: dict) -> str:
    """PYTHONPATH that makes this very ``discomfort`` importable in the child.

    Only for a source tree: an installed package (site-packages) is the child's own business.
    """
    pkg_parent = Path(__file__).resolve().parents[2]
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pkg_parent.name not in ("site-packages", "dist-packages") and str(pkg_parent) not in parts:
        parts.insert(0, str(pkg_parent))
    return os.pathsep.join(parts)


def _tree_output_dir(comfy_path: Path, extra_args: Sequence[str]) -> Path:
    """Where a server of the tree writes its outputs: ``--output-directory`` if given, else the
    tree's ``output/`` (folder_paths' default)."""
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--output-directory" and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if arg.startswith("--output-directory="):
            return Path(arg.split("=", 1)[1]).resolve()
    return comfy_path / "output"


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def _start(cmd: list[str], cwd: Path, env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, deadline: float) -> str | None:
    """Wait until the server answers; returns None when ready, else why it is not."""
    import requests

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            r = requests.get(url + "/system_stats", timeout=2)
            if r.status_code == 200:
                return None
        except requests.RequestException:
            pass
        # Wait for the process to change state (bounded): exits are noticed at once.
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    return "did not answer in time"


def server_args(comfy_path: Path, work: Path, packs: Sequence[Path], *, isolated: bool, cpu: bool,
                api_nodes: bool) -> list[str]:
    """``main.py``'s arguments besides the address: with ``isolated``, only ``packs`` and the
    folders in ``work``; otherwise the tree's own folders and database, ``packs`` added to its
    custom nodes, and only the temp folder in ``work`` (ComfyUI empties it at start and exit:
    another server on the same tree keeps its own)."""
    args = ["--cpu"] if cpu else []
    if packs or isolated:
        nodes_dir = make_custom_nodes_dir(packs, work)
        config = work / "extra_model_paths.yaml"
        # JSON is YAML: no quoting issues with odd paths. The tree's own extra_model_paths.yaml
        # is read by main.py as well.
        config.write_text(json.dumps({"discomfort": {"custom_nodes": str(nodes_dir)}}))
        args += ["--extra-model-paths-config", str(config)]
    (work / "temp").mkdir(parents=True, exist_ok=True)
    args += ["--temp-directory", str(work / "temp")]
    if isolated:
        for sub in ("output", "input", "user"):
            (work / sub).mkdir(exist_ok=True)
        args += ["--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
                 "--user-directory", str(work / "user"), "--database-url", "sqlite:///:memory:"]
        # Not the tree's own custom nodes: only the linked packs, by their folder names.
        linked = sorted(entry.name for entry in (work / "custom_nodes").iterdir())
        clash = [name for name in linked if (comfy_path / "custom_nodes" / name).exists()]
        if clash:
            log.warning("the ComfyUI tree's custom_nodes has %s too: an isolated server loads those as well "
                        "(ComfyUI whitelists packs by folder name)", clash)
        args += ["--disable-all-custom-nodes", *(["--whitelist-custom-nodes", *linked] if linked else [])]
    return [*args, *([] if api_nodes else ["--disable-api-nodes"]), "--disable-auto-launch"]


@contextlib.contextmanager
def launch_server(
    comfy_path: os.PathLike | str,
    port: int | None = None,
    python: str | None = None,
    custom_nodes: Sequence[os.PathLike | str] | None = None,
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = 120.0,
    stop_timeout: float = 10.0,
    work_dir: os.PathLike | str | None = None,
    log_path: os.PathLike | str | None = None,
    env: dict | None = None,
    cpu: bool | None = None,
    api_nodes: bool = True,
    isolated: bool = False,
) -> Iterator[ComfyServer]:
    """Start the ComfyUI tree at ``comfy_path`` as ``python main.py`` would, listening on
    127.0.0.1:``port`` (default: a free one), and yield a :class:`ComfyServer`.

    By default: on the GPU where the torch of ``python`` sees one, with ``--cpu`` only where it
    sees none (``cpu=True`` / ``False`` forces either); the tree's own ``custom_nodes/``,
    ``models/``, ``extra_model_paths.yaml``, ``input/``, ``output/``, ``user/`` folders and
    database; this project's node pack added where the tree lacks it, and ``custom_nodes`` added
    to the tree's packs. ``isolated=True`` (what tests use): only ``custom_nodes`` (default: this
    project's pack), with output/temp/input/user folders in ``work_dir`` and an in-memory
    database. ``work_dir`` (default: a temporary folder) always holds the log, the temp folder and
    the links to the added packs.

    The server runs in ``python`` (default: this interpreter) through
    ``python -m discomfort.comfy.serve`` (the torchvision shim, then ComfyUI's own ``main.py``).
    It must load ``DiscomfortPort`` (checked on ``/object_info/DiscomfortPort``). On exit it gets
    SIGTERM, then SIGKILL after ``stop_timeout`` seconds. The log goes to ``log_path`` (default:
    in the work directory); errors quote its tail. ``api_nodes`` as in ComfyUI (default True: its
    API nodes are loaded, with no network until one runs); ``api_nodes=False`` passes
    ``--disable-api-nodes``, a faster start for servers that never run them.
    """
    comfy_path = Path(comfy_path).expanduser().resolve()
    if not (comfy_path / "main.py").is_file():
        raise FileNotFoundError(f"{comfy_path} is not a ComfyUI tree (no main.py)")
    packs = _startup.packs_to_add(comfy_path, custom_nodes, isolated)
    check_port_node = isolated is False or any(p == default_node_pack() or p.name == "comfy_nodes" for p in packs)
    python = python or sys.executable

    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="discomfort-server-")))
        else:
            work = Path(work_dir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        log_file = Path(log_path) if log_path else work / "comfyui.log"

        child_env = _settings.child_env(env)
        pythonpath = _pythonpath_with_package(child_env)
        if pythonpath:
            child_env["PYTHONPATH"] = pythonpath
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        child_env.setdefault("DO_NOT_TRACK", "1")
        accelerator = None if cpu is True else _startup.probe_accelerator(python, child_env)
        main_args = server_args(comfy_path, work, packs, isolated=isolated,
                                cpu=_startup.use_cpu(cpu, accelerator), api_nodes=api_nodes)

        attempts = 1 if port else 2
        last_error = None
        for _attempt in range(attempts):
            p = port or free_port()
            url = f"http://127.0.0.1:{p}"
            cmd = [python, "-m", "discomfort.comfy.serve", str(comfy_path), "--listen", "127.0.0.1",
                   "--port", str(p), *main_args, *extra_args]
            log_start = log_file.stat().st_size if log_file.exists() else 0
            t0 = time.monotonic()
            proc = _start(cmd, comfy_path, child_env, log_file)
            try:
                why = _wait_ready(proc, url, log_file, time.monotonic() + startup_timeout)
            except BaseException:
                _stop(proc, stop_timeout)
                raise
            if why is None:
                break
            _stop(proc, stop_timeout)
            tail = log_tail(log_file)
            new_log = ""
            try:
                with open(log_file, "rb") as f:
                    f.seek(log_start)
                    new_log = f.read().decode("utf-8", "replace").lower()
            except OSError:
                pass
            last_error = ComfyConnectionError(
                f"ComfyUI server on port {p} {why} (command: {' '.join(cmd)})\n--- log tail ({log_file}) ---\n{tail}"
            )
            if port is None and any(m in new_log for m in _BIND_FAILURE_MARKERS):
                continue  # someone took the port in between: one more try on another
            raise last_error
        else:
            raise last_error  # type: ignore[misc]

        server = ComfyServer(url, log_tail=lambda: log_tail(log_file))
        server.process = proc
        server.log_path = log_file
        server.work_dir = work
        server.output_dir = work / "output" if isolated else _tree_output_dir(comfy_path, extra_args)
        server.accelerator = accelerator
        server.startup_seconds = time.monotonic() - t0
        try:
            if check_port_node:
                info = server.object_info("DiscomfortPort")
                if "DiscomfortPort" not in info:
                    raise ComfyConnectionError(
                        "the ComfyUI server started but did not load the Discomfort node pack "
                        f"(no /object_info/DiscomfortPort)\n--- log tail ({log_file}) ---\n{log_tail(log_file)}"
                    )
            yield server
        finally:
            server.close()
            _stop(proc, stop_timeout)
