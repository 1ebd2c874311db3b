"""ComfyUI with discomfort installed as a user installs it, for the browser tests (fixtures, no test).

A copy of the pristine ComfyUI tree (``$DISCOMFORT_COMFYUI``) with its own virtual environment
in ``venv/`` (where ``install-comfyui`` looks for it), made over the test environment's packages
minus discomfort (a ``.pth`` adds a folder of links to them, so the fresh environment has torch,
aiohttp and ComfyUI's requirements without a copy); then, as a user would:

    discomfort install-comfyui COPY --wheel $DISCOMFORT_WHEEL

which pip-installs the built wheel into ``COPY/venv`` and copies the wheel's node pack to
``COPY/custom_nodes/discomfort_nodes``. Servers run the copy's own ``main.py`` with that venv's
Python (``--cpu``, a free port), its own input/output/user folders and database.

Without ``DISCOMFORT_WHEEL`` (a developer's run, nothing built) the venv sees the installed
discomfort of the test environment, and ``install-comfyui`` run by that venv's Python places the
installed package's node pack (no pip step): the same path, with the installed files.

The test environment's torch is a CPU build beside PyPI's CUDA torchvision, which does not import
as is (``launch_server`` goes through the same shim): a second ``.pth`` installs
``discomfort.comfy._tvshim`` from a copy outside the package, so ``import torchvision`` works in
the copy's Python. With a matching torchvision the shim loads its extension and changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

TEST_PACK = Path(__file__).resolve().parent / "test_pack"
#: What the panel tests need of the server they share with the editor tests:
#: One run per address (the 429 test); 8 per-iteration files a run (the cap test: 4 iterations of 2 keys).
PANEL_ENV = {"DISCOMFORT_PANEL_MAX_RUNS_PER_ADDRESS": "1", "DISCOMFORT_PANEL_HISTORY_FILES": "8"}


def _site_packages() -> Path:
    """This interpreter's site-packages (where torch, aiohttp and ComfyUI's requirements are)."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"]).resolve()


@dataclass
class ComfyCopy:
    """A ComfyUI tree with discomfort installed into it by ``install-comfyui``."""

    root: Path
    python: Path
    source: str  # what was installed: "wheel NAME" or "installed package (PATH)"
    install_output: str
    servers: list = field(default_factory=list)

    @contextlib.contextmanager
    def start(self, extra_args: Sequence[str] = (), env: dict | None = None, startup_timeout: float = 180,
              name: str = "server") -> Iterator:
        """Run ``python main.py --cpu --listen 127.0.0.1 --port P ... *extra_args`` in the copy;
        yields a :class:`discomfort.comfy.ComfyServer` on it (``process``, ``log_path``,
        ``work_dir``: the copy, ``output_dir``). ``env`` adds to this process's environment."""
        from discomfort.comfy import ComfyServer, free_port

        log_path = self.root / f"{name}.log"
        child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        child_env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", **(env or {})})
        for _attempt in range(2):  # a port taken between free_port() and the bind: once more
            port = free_port()
            cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--disable-auto-launch", "--disable-api-nodes", *extra_args]
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cmd, cwd=str(self.root), env=child_env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            try:
                why = _wait_ready(proc, url, time.monotonic() + startup_timeout)
            except BaseException:
                _stop(proc)
                raise
            if why is None:
                break
            _stop(proc)
            if "address already in use" not in _tail(log_path).lower():
                break
        if why is not None:
            pytest.fail(f"ComfyUI in {self.root} ({' '.join(cmd)}) {why}\n--- {log_path} ---\n{_tail(log_path)}")
        server = ComfyServer(url, log_tail=lambda: _tail(log_path))
        server.process, server.log_path = proc, log_path
        server.work_dir, server.output_dir = self.root, self.root / "output"
        self.servers.append(server)
        try:
            yield server
        finally:
            server.close()
            _stop(proc)


def _wait_ready(proc: subprocess.Popen, url: str, deadline: float) -> str | None:
    import requests

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            if requests.get(url + "/system_stats", timeout=2).status_code == 200:
                return None
        except requests.RequestException:
            pass
        try:
            proc.wait(timeout=0.1)  # wakes at once when it exits
        except subprocess.TimeoutExpired:
            pass
    return "did not answer in time"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_copy(comfy_path: Path, work: Path, wheel: str | None) -> ComfyCopy:
    """Copy ``comfy_path`` to ``work/ComfyUI``, make its venv and run ``install-comfyui`` there
    (with ``wheel``, or the installed package when it is None); the test pack goes into its
    ``custom_nodes`` as a user's own pack."""
    root = work / "ComfyUI"
    shutil.copytree(comfy_path, root, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    site = _site_packages()
    base = work / "base-packages"  # the test environment's packages, discomfort left out when a wheel is given
    base.mkdir()
    for entry in site.iterdir():
        if wheel and (entry.name == "discomfort" or entry.name.startswith("discomfort-")):
            continue
        (base / entry.name).symlink_to(entry)
    shim = work / "shim"
    shim.mkdir()
    import discomfort.comfy._tvshim as tvshim

    shutil.copyfile(tvshim.__file__, shim / "_dcf_test_tvshim.py")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    venv_python = root / "venv" / "bin" / "python"
    venv_site = Path(subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    (venv_site / "_dcf_test_base.pth").write_text(f"import site; site.addsitedir({str(base)!r})\n")
    (venv_site / "_dcf_test_tvshim.pth").write_text(
        f"import sys; sys.path.append({str(shim)!r}); import _dcf_test_tvshim; _dcf_test_tvshim.install()\n")
    if wheel:
        cmd = [sys.executable, "-m", "discomfort.cli", "install-comfyui", str(root), "--wheel", wheel]
        source = f"wheel {Path(wheel).name}"
    else:
        cmd = [str(venv_python), "-m", "discomfort.cli", "install-comfyui", str(root)]
        source = f"installed package ({site / 'discomfort'})"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(work), timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    shutil.copytree(TEST_PACK, root / "custom_nodes" / "discomfort_test_pack",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return ComfyCopy(root, venv_python, source, done.stdout + done.stderr)


@pytest.fixture(scope="session")
def comfy_copy(comfy_path, tmp_path_factory) -> ComfyCopy:
    """The copy of ComfyUI with discomfort installed by ``install-comfyui`` (from
    ``$DISCOMFORT_WHEEL``, else from the installed package); start servers with ``.start()``."""
    return make_copy(comfy_path, tmp_path_factory.mktemp("installed-comfy"), os.environ.get("DISCOMFORT_WHEEL"))


@pytest.fixture(scope="session")
def copy_server(comfy_copy):
    """One server of the copy for the session (the editor and panel tests share it)."""
    with comfy_copy.start(env=PANEL_ENV) as srv:
        yield srv
