"""Code run in spawned child processes by the cross-process tests (importable by name)."""

from __future__ import annotations

import hashlib
import os
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


def as_user(uid: int, fn, *, wait_for: int | None = None) -> str:
    """Run fn in a forked child that has dropped to `uid`; return what it returned (or raised).

    A fork, not a new interpreter: the interpreter may live where that user cannot read it.
    `wait_for`: a pipe's read end the child reads one byte from before it starts.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if wait_for is not None:
                os.read(wait_for, 1)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = str(fn())
        except BaseException as exc:  # reported to the parent
            result = f"raised {type(exc).__name__}: {exc}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


if __name__ == "__main__":
    main()


def context_child(backend: str, run_id: str, conn) -> None:
    """Attached side of the context tests: answers commands sent through a pipe."""
    import torch

    from discomfort import errors
    from discomfort.context import WorkflowContext

    ctx = WorkflowContext.attach(run_id, backend=backend)
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            try:
                if cmd == "load_sum":
                    value = ctx.load(args[0])
                    conn.send(("ok", float(value.double().sum()), str(value.dtype), tuple(value.shape)))
                elif cmd == "save_tensor":
                    ctx.save(args[0], torch.arange(args[1], dtype=torch.float32).reshape(-1, 2))
                    conn.send(("ok",))
                elif cmd == "load":
                    conn.send(("ok", ctx.load(args[0])))
            except errors.DiscomfortError as exc:
                conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        ctx.close()
        conn.close()


def serve_runs(backend: str, conn) -> None:
    """A long-lived attacher (like a ComfyUI server): loads from each run it is sent."""
    from discomfort.context import get_context

    while True:
        msg = conn.recv()
        if msg is None:
            break
        ctx = get_context(msg)
        value = ctx.load("image")
        total = float(value.view(-1)[::1024].sum())  # touch every page
        held = rss_shmem()
        del value
        conn.send((total, held, mapped_runs()))
    conn.close()


def mapped_runs() -> int:
    """How many distinct runs this process still maps (control segments and chunks)."""
    runs = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            if "/dcf-" in line:  # also "(deleted)": the run is gone but still mapped here
                runs.add(line.split("/dcf-", 1)[1].split()[0].split(".")[0])
    return len(runs)


def rss_shmem() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def stress(backend: str, run_id: str, worker: int, threads: int, ops: int, conn) -> None:
    """Save, load and delete shared keys with checksums from several threads; report counts."""
    import threading

    from discomfort import errors

    mod = _backend.load(backend)
    store = mod.Store.attach(run_id)
    counts = {"put": 0, "get": 0, "delete": 0, "missing": 0, "corrupt": 0}
    lock = threading.Lock()

    def work(t: int) -> None:
        import random

        rng = random.Random(worker * 1000 + t)
        local = dict.fromkeys(counts, 0)
        for i in range(ops):
            key = f"k{rng.randrange(6)}"
            op = rng.random()
            if op < 0.45:
                size = rng.choice([10, 5000, 70000, 300000])
                payload = rng.randbytes(size)
                store.put(key, hashlib.sha256(payload).digest(), [payload, payload[:7]])
                local["put"] += 1
            elif op < 0.9:
                try:
                    meta, views, _ = store.get(key)
                    body = bytes(views[0])
                    if hashlib.sha256(body).digest() != meta or bytes(views[1]) != body[:7]:
                        local["corrupt"] += 1
                    local["get"] += 1
                except errors.UnknownKeyError:
                    local["missing"] += 1
            else:
                store.delete(key)
                local["delete"] += 1
        with lock:
            for k, v in local.items():
                counts[k] += v

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    store.close()
    conn.send(counts)
    conn.close()
