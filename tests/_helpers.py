"""Helpers shared by test modules (a plain module: conftest files are not for importing)."""

from __future__ import annotations

import os

import pytest

from discomfort import _backend

BACKENDS = ("native", "python")


def load_backend(name: str):
    """The store module of a backend; a missing native core fails when it is required."""
    try:
        return _backend.load(name)
    except _backend.BackendUnavailableError as exc:
        if os.environ.get("DISCOMFORT_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the native core is required but did not load: {exc}")
        pytest.skip(f"native core not available: {exc}")


def leftovers(run_id: str, shm_dir: str = "/dev/shm", disk_root: str | None = None) -> list[str]:
    """Files of this run still present (looked up by the run's own names only)."""
    found = [n for n in os.listdir(shm_dir) if n == f"dcf-{run_id}" or n.startswith(f"dcf-{run_id}.")]
    if disk_root and os.path.exists(os.path.join(disk_root, f"dcf-{run_id}")):
        found.append(os.path.join(disk_root, f"dcf-{run_id}"))
    return found
