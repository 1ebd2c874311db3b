"""A same-user process truncates a run's chunk or disk file while a long-lived process holds an
attachment: the guarded load (``Store.get_guarded``, ``WorkflowContext.load_guarded``, what the
ComfyUI server's nodes use) raises TruncatedStoreError and the holder lives on; a plain
zero-copy view of the same bytes dies of SIGBUS, which is why the server does not use one.

Every party is a real process: the holder ("server"), the truncator, and this test as the
run's owner. They step through pipes, never sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from discomfort import WorkflowContext

from _helpers import load_backend

HERE = os.path.dirname(os.path.abspath(__file__))

# (tier, bytes): the four read paths of get_guarded (RAM below/above COPY_LOAD_BYTES, disk
# below/above SMALL_OBJECT_BYTES).
CASES = [("ram", 4 << 10), ("ram", 3 << 20), ("disk", 16 << 10), ("disk", 3 << 20)]
PROMPT = {"1": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "value"}}}


def _holder(backend: str, run_id: str, key: str, mode: str) -> None:
    """The "server": attach, keep a zero-copy view of another object mapped, say "ready", wait
    for "go", then load ``key`` (``mode``: guarded | info | context | plain) and report."""
    from discomfort import _backend

    store = _backend.load(backend).Store.attach(run_id)
    held = store.get("held")  # a live attachment with a mapping of the run's chunk
    early = store.get(key) if mode == "plain" else None  # a zero-copy view taken before the cut
    if mode.endswith("save"):
        store.put("earlier", b"e", [b"x" * 100])  # a save before the cut: the chunk is mapped
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        if mode == "guarded":
            meta, views, info = store.get_guarded(key)
            print("loaded", info["zero_copy"], int(np.frombuffer(views[0], np.uint8).sum()), flush=True)
        elif mode == "save":  # a port's save lands in the cut chunk
            print("saved", store.put_guarded("new", b"n", [np.ones(1 << 20, np.uint8)]), flush=True)
        elif mode == "plain save":
            print("saved", store.put("new", b"n", [np.ones(1 << 20, np.uint8)]), flush=True)
        elif mode == "info":
            print("info", store.info(key)["size"], flush=True)
        elif mode == "context":  # a node's path: the prompt check, then the load
            ctx = WorkflowContext.attach(run_id, backend=backend)
            for step in (lambda: ctx.check_prompt(PROMPT), lambda: ctx.load_guarded(key)):
                try:
                    step()
                    print("passed", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print("error", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
        else:  # plain: what a zero-copy view of a truncated chunk does when it is read
            print("loaded", int(np.frombuffer(early[1][0], np.uint8).sum()), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which checks the class
        print("error", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
    print("alive", flush=True)
    del held, early


def _start_holder(backend: str, run_id: str, key: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, backend, run_id, key, mode], cwd=HERE, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _finish_holder(proc: subprocess.Popen) -> tuple[list[str], int]:
    out, _ = proc.communicate("go\n", timeout=120)
    return out.splitlines(), proc.returncode


def _truncate(path: str, size: int = 0) -> None:
    """ftruncate from a second, real process (as another program of the user would)."""
    subprocess.run([sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                    "os.ftruncate(fd, int(sys.argv[2]))", path, str(size)], check=True, timeout=60)


def _object_file(store, key: str) -> str:
    """The file holding ``key``: its RAM chunk, or its disk-tier object file."""
    info = store.info(key)
    if info["tier"] == "ram":
        return store.chunk_path(info["chunk"])
    names = sorted(n for n in os.listdir(store.disk_dir) if n.endswith(".obj"))
    assert len(names) == 1, names  # only the object under test is on disk
    return os.path.join(store.disk_dir, names[0])


def _run_with(make_store, tier: str, nbytes: int):
    # RAM: a budget that holds everything; disk: one too small for the object, so it goes there.
    store = make_store(ram_budget=(64 << 20) if tier == "ram" else (8 << 10))
    store.put("held", b"h", [np.ones(200 << 10, np.uint8)] if tier == "ram" else [b"x" * 100])
    store.put("value", b"v", [np.full(nbytes, 7, np.uint8)])
    assert store.info("value")["tier"] == tier
    return store


@pytest.mark.parametrize(("tier", "nbytes"), CASES)
def test_guarded_load_of_a_truncated_file_is_an_error_not_sigbus(make_store, backend, tier, nbytes):
    store = _run_with(make_store, tier, nbytes)
    proc = _start_holder(backend, store.run_id, "value", "guarded")
    _truncate(_object_file(store, "value"))
    lines, rc = _finish_holder(proc)
    assert rc == 0, f"the holder died: {rc} (-{int(signal.SIGBUS)} is SIGBUS)"
    assert lines[0].startswith("error TruncatedStoreError "), lines
    assert "'value'" in lines[0] or "chunk" in lines[0], lines
    assert lines[-1] == "alive"


@pytest.mark.parametrize(("tier", "nbytes"), CASES)
def test_guarded_load_is_a_private_copy(make_store, backend, tier, nbytes):
    store = _run_with(make_store, tier, nbytes)
    proc = _start_holder(backend, store.run_id, "value", "guarded")
    lines, rc = _finish_holder(proc)
    assert rc == 0
    assert lines[0] == f"loaded False {7 * nbytes}", lines


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_info_of_a_truncated_file_is_an_error_not_sigbus(make_store, backend, tier):
    store = _run_with(make_store, tier, 3 << 20)
    path = _object_file(store, "value")
    proc = _start_holder(backend, store.run_id, "value", "info")
    _truncate(path)
    lines, rc = _finish_holder(proc)
    assert rc == 0, rc
    assert lines[0].startswith("error TruncatedStoreError "), lines


def test_context_load_guarded_and_prompt_check_survive_a_truncated_chunk(make_store, backend):
    """The path of a ComfyUI node: WorkflowContext over an attachment; the chunk holding the
    value is cut to half its size (not to zero), so the object's own end is past the file's."""
    store = _run_with(make_store, "ram", 3 << 20)
    WorkflowContext.attach(store.run_id, backend=backend).allow_prompt(PROMPT)  # stored after the value
    path = _object_file(store, "value")
    proc = _start_holder(backend, store.run_id, "value", "context")
    _truncate(path, os.path.getsize(path) // 64)
    lines, rc = _finish_holder(proc)
    assert rc == 0, rc
    assert lines[0].startswith("error TruncatedStoreError "), lines  # the prompt check
    assert lines[1].startswith("error TruncatedStoreError "), lines  # the load
    assert lines[2] == "alive"


@pytest.mark.parametrize("mode", ["save", "plain save"])
def test_guarded_save_into_a_truncated_chunk_is_an_error_not_sigbus(make_store, backend, mode):
    """A port's save in the server: the new object's space is in the chunk that was cut."""
    store = _run_with(make_store, "ram", 3 << 20)
    proc = _start_holder(backend, store.run_id, "value", mode)
    _truncate(_object_file(store, "value"))
    lines, rc = _finish_holder(proc)
    if mode == "plain save":  # why the guard exists: a write through the chunk's mapping
        assert rc == -signal.SIGBUS, (rc, lines)
        return
    assert rc == 0, rc
    assert lines[0].startswith("error TruncatedStoreError ") and "chunk 0 truncated" in lines[0], lines
    assert "new" not in store.keys()  # the reservation was dropped


@pytest.mark.parametrize("nbytes", [0, 100, 200 << 10, 3 << 20])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_guarded_save_reads_back_like_a_save(make_store, backend, store_mod, tier, nbytes):
    store = make_store(ram_budget=(64 << 20) if tier == "ram" else (8 << 10))
    store.put("held", b"h", [b"x" * 100])
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, np.uint8)
    v1 = store.put_guarded("value", b"meta", [data, b"tail"])
    meta, views, info = store.get("value")
    assert (bytes(meta), bytes(views[0]), bytes(views[1])) == (b"meta", data.tobytes(), b"tail")
    assert info["tier"] == (tier if nbytes > 100 else info["tier"]) and info["version"] == v1
    other = {"native": "python", "python": "native"}[backend]  # the other backend reads it the same
    attached = load_backend(other).Store.attach(store.run_id)
    try:
        assert bytes(attached.get_guarded("value")[1][0]) == data.tobytes()
    finally:
        attached.close()


def test_nodes_guard_attached_runs_and_runs_that_ask(backend):
    """The node side's choice: a server's attachment copies; the run's own process (an
    in-process executor) keeps zero-copy unless its context sets ``guard_nodes``."""
    from discomfort.nodes.support import load_value, save_value

    with WorkflowContext(backend=backend) as owner:
        attached = WorkflowContext.attach(owner.run_id, backend=backend)
        try:
            used = []
            for ctx in (owner, attached):
                ctx.load_guarded = lambda uid, ctx=ctx: used.append(("load", ctx)) or 1  # type: ignore[method-assign]
                ctx.save_guarded = lambda uid, v, ctx=ctx: used.append(("save", ctx)) or 1  # type: ignore[method-assign]
            owner.save("x", np.arange(4))
            assert np.array_equal(load_value(owner, "x"), np.arange(4))
            save_value(owner, "y", 1)
            assert used == []
            load_value(attached, "x")
            save_value(attached, "y", 1)
            assert used == [("load", attached), ("save", attached)]
            owner.guard_nodes = True  # type: ignore[attr-defined]
            load_value(owner, "x")
            assert used[-1] == ("load", owner)
        finally:
            attached.close()


def test_plain_zero_copy_view_of_a_truncated_chunk_dies_of_sigbus(make_store, backend):
    """Why the guard exists: the same read through a zero-copy view kills the holder."""
    store = _run_with(make_store, "ram", 3 << 20)
    proc = _start_holder(backend, store.run_id, "value", "plain")
    _truncate(_object_file(store, "value"))
    lines, rc = _finish_holder(proc)
    assert rc == -signal.SIGBUS, (rc, lines)


if __name__ == "__main__":
    _holder(*sys.argv[1:5])
