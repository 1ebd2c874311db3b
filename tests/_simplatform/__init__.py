"""Simulated Windows and macOS for tests: the environment of a fresh process whose discomfort code
sees win32 or darwin (``DISCOMFORT_TEST_PLATFORM`` for the package, this folder's
``sitecustomize`` hook for what that system lacks; see ``_dcf_simhook``)."""

from __future__ import annotations

import os
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
