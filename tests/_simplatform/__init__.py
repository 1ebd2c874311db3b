"""Simulated Windows and macOS for tests: the environment of a fresh process whose discomfort code
sees win32 or darwin (``DISCOMFORT_TEST_PLATFORM`` for the package, this folder's
``sitecustomize`` hook for what that system lacks; see ``_dcf_simhook``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HOOK_DIR = str(Path(__file__).resolve().parent)
NODE_PACK = str(Path(__file__).resolve().parents[2] / "comfy_nodes")
PLATFORMS = ("win32", "darwin")


def simulated_env(platform: str, base: dict | None = None, *, keep: tuple[str, ...] = (), tmpdir=None,
                  log=None, **extra: str) -> dict[str, str]:
    """``base`` (default: this environment) without DISCOMFORT_* settings but ``keep``, plus the
    platform switch and the hook first on PYTHONPATH; ``tmpdir``: TMPDIR of its own; ``log``: a
    file the hook appends each refused call to. The repository's node pack counts as the package's."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, not {platform!r}")
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("DISCOMFORT_") or k in keep}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != HOOK_DIR]
    env.update(DISCOMFORT_TEST_PLATFORM=platform, PYTHONPATH=os.pathsep.join([HOOK_DIR, *path]),
               DISCOMFORT_SIM_OWN=NODE_PACK)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    if log is not None:
        env["DISCOMFORT_SIM_LOG"] = str(log)
    env.update(extra)
    return env


def run_simulated(platform: str, code: str, *args: str, tmpdir=None, log=None, prelude: str = "",
                  path: tuple[str, ...] = (), timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """``prelude`` + ``code`` (dedented) run by this Python in a fresh process on the simulated
    ``platform`` (:func:`simulated_env`; ``path``: more PYTHONPATH entries after the hook's)."""
    env = simulated_env(platform, tmpdir=tmpdir, log=log, **extra)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *path])
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def last_json(out: subprocess.CompletedProcess):
    """The JSON value of the last line a simulated process printed (it must have exited 0)."""
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
