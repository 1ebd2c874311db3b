"""Code run in spawned child processes by the cross-process tests (importable by name)."""

from __future__ import annotations

import hashlib
import sys

from discomfort import _backend


def attach_read_write(backend: str, run_id: str, read_key: str, write_key: str, payload: bytes, conn) -> None:
    """Attach, report the digest of what is under read_key, then write payload under write_key."""
    mod = _backend.load(backend)
    store = mod.Store.attach(run_id)
    try:
        meta, views, info = store.get(read_key)
        digest = hashlib.sha256(b"".join(bytes(v) for v in views)).hexdigest()
        store.put(write_key, b"from-child", [payload])
        conn.send((meta, digest, info["tier"]))
    finally:
        del views
        store.close()
        conn.close()


def main() -> None:
    """`python _workers.py BACKEND RUN_ID ACTION FD`: attach and park at a point a test kills."""
    import os

    backend, run_id, action, fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    mod = _backend.load(backend)
    store = mod.Store.attach(run_id)
    if action == "views":
        held = store.get("big")
        os.write(fd, b"V")
    elif action == "reserve":  # parks inside reserve (kill point after_reserve)
        store.reserve("half", b"", [1 << 20])
    elif action == "lock":  # parks holding the lock (kill point after_lock)
        store.put("locked", b"", [b"x" * 100])
    sys.stdin.read()  # parked until killed
    del held


if __name__ == "__main__":
    main()
