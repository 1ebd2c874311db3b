"""Helpers shared by test modules (a plain module: conftest files are not for importing)."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

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


def status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmRSS``, ``RssShmem``, ...); ``pid`` may be "self"."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class Fifo:
    """A FIFO a test gate node (tests/comfy/test_pack) writes "started" to; the test waits on it
    with select (no sleeps). Opened for reading first, so the node's non-blocking write finds it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def wait(self, timeout: float = 120.0) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready) and os.read(self.fd, 64).startswith(b"started")

    def heard(self) -> bool:
        ready, _, _ = select.select([self.fd], [], [], 0)
        return bool(ready) and bool(os.read(self.fd, 64))

    def close(self) -> None:
        os.close(self.fd)


def in_thread(fn, *args, **kwargs):
    """Call ``fn`` on a daemon thread: (the thread, a dict that gets "value" or "error")."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box
