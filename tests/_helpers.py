"""Helpers shared by test modules (a plain module: conftest files are not for importing)."""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from discomfort import _backend

#: Every store backend the store tests run on: the conftest fixtures (`backend`, `store_mod`,
#: `make_store`, `store`) take one each, cross-backend tests parametrise over this tuple.
BACKENDS = ("native", "python")

SHM = "/dev/shm"
CONTROL_SIZE = 1454080  # the control segment's bytes (docs/FORMAT.md)
OBJ_OFF = 12288  # where the object table starts in it
ENTRY = 320  # the bytes of one object-table entry


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


# ---- the store's files, read and damaged the way docs/FORMAT.md lays them out ------------------


def stripes(n: int, seed: int = 0) -> bytes:
    """n bytes of a cheap, seed-dependent pattern (numpy, so large ones are fast)."""
    import numpy as np

    return (np.arange(n, dtype=np.uint64) * 2654435761 + seed).astype(np.uint8).tobytes()


def fnv1a64(data: bytes) -> int:
    """The object table's key hash, written out here (not the backends') to check them against."""
    h = 0xCBF29CE484222325
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def control_path(run_id: str) -> str:
    return os.path.join(SHM, f"dcf-{run_id}")


def read_header_u32(run_id: str, offset: int) -> int:
    with open(control_path(run_id), "rb") as fh:
        fh.seek(offset)
        return struct.unpack("<I", fh.read(4))[0]


def entry_index(run_id: str, key: str) -> int:
    """Index of the SEALED entry of `key` in the object table (read from the file)."""
    raw = key.encode()
    with open(control_path(run_id), "rb") as fh:
        table = fh.read()[OBJ_OFF : OBJ_OFF + 4096 * ENTRY]
    i = fnv1a64(raw) % 4096
    while True:
        state, _, _, key_len = struct.unpack_from("<IIII", table, i * ENTRY)
        if state == 0:
            raise KeyError(key)
        if state == 2 and table[i * ENTRY + 64 : i * ENTRY + 64 + key_len] == raw:
            return i
        i = (i + 1) % 4096


def patch_control(run_id: str, offset: int, data: bytes) -> None:
    fd = os.open(control_path(run_id), os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# ---- child processes that attach to a run -------------------------------------------------------


def run_child(code: str, env: dict | None = None, pass_fds=()) -> subprocess.Popen:
    """A Python child running `code` (dedented) with the installed package first on its path."""
    from discomfort import errors

    full_env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(errors.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join([package_root, full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full_env, pass_fds=pass_fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def park_child(backend: str, run_id: str, body: str, killpoint: str | None = None) -> subprocess.Popen:
    """A child on `backend` (a name of BACKENDS) that attaches and runs `body`; returned once it
    reports parked ('K' on a pipe): at the kill point, or after `body` when there is none."""
    r, w = os.pipe()
    env = {"DISCOMFORT_TEST_KILLPOINT_FD": str(w)}
    if killpoint:
        env["DISCOMFORT_TEST_KILLPOINT"] = killpoint
    child = run_child(f"""
        import os, signal
        from discomfort import _backend
        m = _backend.load({backend!r})
        s = m.Store.attach({run_id!r})
        {body}
        os.write({w}, b"K")  # bodies without a kill point park here
        signal.pause()
    """, env=env, pass_fds=(w,))
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        assert ready and os.read(r, 1) == b"K", child.stderr.read() if not ready else "child exited early"
    finally:
        os.close(r)
    return child


def kill_child(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    child.stderr.close()
