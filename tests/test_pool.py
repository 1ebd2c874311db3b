"""The per-process chunk pool: finished runs give their prefaulted chunks to the next run of the
process (docs/FORMAT.md, "Chunk pool"), on both backends, each with a pool of its own."""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from _helpers import leftovers, load_backend
from discomfort import errors
from discomfort._sweep import sweep
from discomfort.context import WorkflowContext

MiB = 1 << 20
SHM = "/dev/shm"
IMAGE = (1, 1280, 1024, 4)  # 20 MiB of float32: one object in a 64 MiB chunk
PAGES = 20 * MiB // 4096


@pytest.fixture
def mod(backend):
    """The backend's store module, with an empty pool before and after the test."""
    m = load_backend(backend)
    m.release_pool()
    yield m
    m.set_pool_limit(None)
    m.release_pool()


@pytest.fixture
def make_ctx(backend, tmp_path):
    made = []

    def make(**kw):
        kw.setdefault("ram_budget", 256 * MiB)
        ctx = WorkflowContext(backend=backend, disk_dir=str(tmp_path), **kw)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.shutdown()
        assert leftovers(ctx.run_id, disk_root=str(tmp_path)) == []


def shared_mappings(inode: int) -> list[tuple[str, str]]:
    """(address range, path) of this process's shared mappings of a /dev/shm file."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[4] == str(inode) and parts[1].endswith("s"):
                out.append((parts[0], parts[5]))
    return out


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(errors.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_second_context_leases_the_pooled_chunk(mod, make_ctx):
    image = torch.rand(IMAGE)
    first = make_ctx()
    first.save("image", image)
    inode = os.stat(first.store.chunk_path(0)).st_ino
    first.shutdown()

    info = mod.pool_info()
    assert [f["inode"] for f in info["files"]] == [inode] and info["bytes"] == 64 * MiB
    pooled = info["files"][0]["path"]
    assert os.path.basename(pooled).startswith(info["prefix"] + ".") and info["prefix"].startswith("dcf-pool-")
    assert stat.S_IMODE(os.stat(pooled).st_mode) == 0o600
    (mapping,) = shared_mappings(inode)  # the pool keeps the mapping the first run wrote through

    second = make_ctx()
    before = minor_faults()
    second.save("image", image)
    faults = minor_faults() - before
    chunk = second.store.chunk_path(0)
    assert os.stat(chunk).st_ino == inode and not os.path.exists(pooled)
    assert mod.pool_info()["files"] == []
    # Same pages, same mapping: the copy faulted nothing in (a fresh chunk takes one fault a page).
    assert shared_mappings(inode) == [(mapping[0], os.path.realpath(chunk))]
    assert faults < PAGES // 4, f"{faults} minor faults for {PAGES} pages"
    assert torch.equal(second.load("image"), image)


def test_chunks_under_live_views_stay_out_of_the_pool(mod, make_ctx):
    ctx = make_ctx()
    ctx.save("a", torch.rand(IMAGE))  # chunk 0 (64 MiB)
    ctx.save("b", torch.rand(18, 1024, 1024))  # 72 MiB: a chunk of its own
    assert ctx.info("b")["chunk"] == 1
    inodes = [os.stat(ctx.store.chunk_path(k)).st_ino for k in (0, 1)]
    b = ctx.load("b")
    expected = b.clone()
    ctx.shutdown()
    assert [f["inode"] for f in mod.pool_info()["files"]] == [inodes[0]]

    other = make_ctx()
    other.save("c", torch.zeros(IMAGE))  # leases chunk 0, never the one under the view
    assert os.stat(other.store.chunk_path(0)).st_ino == inodes[0]
    assert torch.equal(b, expected)


def test_run_with_a_live_attacher_gives_nothing_back(mod, make_ctx):
    ctx = make_ctx()
    ctx.save("image", torch.rand(IMAGE))
    attacher = mod.Store.attach(ctx.run_id)  # a handle of its own: it may map any chunk
    try:
        ctx.shutdown()
        assert mod.pool_info()["files"] == [] and leftovers(ctx.run_id) == []
        assert attacher.finished
    finally:
        attacher.close()


def test_lease_stays_within_the_budget(mod, make_ctx):
    first = make_ctx(ram_budget=256 * MiB)
    first.save("image", torch.rand(IMAGE))
    first.shutdown()
    assert len(mod.pool_info()["files"]) == 1
    small = make_ctx(ram_budget=32 * MiB)  # a 64 MiB chunk would break its budget
    small.save("image", torch.rand(IMAGE))
    assert small.store.stats()["ram_capacity"] == 32 * MiB
    assert len(mod.pool_info()["files"]) == 1


def test_pool_limit(mod, make_ctx):
    mod.set_pool_limit(0)  # keep nothing
    ctx = make_ctx()
    ctx.save("image", torch.rand(IMAGE))
    ctx.shutdown()
    assert mod.pool_info()["files"] == [] and mod.pool_info()["limit"] == 0
    with pytest.raises(ValueError):
        mod.set_pool_limit(-1)
    mod.set_pool_limit(None)
    assert mod.pool_info()["limit"] >= 256 * MiB  # the largest budget of a pooling store so far


def meminfo(tmp_path, available_kb: int) -> str:
    probe = tmp_path / f"meminfo-{available_kb}"
    probe.write_text(f"MemTotal: 16000000 kB\nMemAvailable: {available_kb} kB\n")
    return str(probe)


def pool_a_chunk(mod, tmp_path) -> str:
    s = mod.Store.create("t" + secrets.token_hex(8), ram_budget=256 * MiB, disk_root=str(tmp_path), pool=True,
                         mem_probe=meminfo(tmp_path, 15_000_000))
    s.put("x", b"", [bytes(MiB)])
    s.destroy()
    (f,) = mod.pool_info()["files"]
    return f["path"]


def test_memory_pressure_drops_the_pool(mod, tmp_path):
    short = meminfo(tmp_path, 200_000)  # 200 MB left: below the reserve
    pooled = pool_a_chunk(mod, tmp_path)
    # Growth the probe refuses gives the pool back first (the request does not fit the pooled chunk).
    s = mod.Store.create("t" + secrets.token_hex(8), ram_budget=1024 * MiB, disk_root=str(tmp_path), pool=True,
                         mem_probe=short)
    try:
        s.put("big", b"", [bytes(100 * MiB)])
        assert s.info("big")["tier"] == "disk"
        assert mod.pool_info()["files"] == [] and not os.path.exists(pooled)
    finally:
        s.destroy()

    # A run that ends while memory is short gives nothing to the pool, and drops what it holds.
    pooled = pool_a_chunk(mod, tmp_path)
    s = mod.Store.create("t" + secrets.token_hex(8), ram_budget=256 * MiB, disk_root=str(tmp_path), pool=True,
                         mem_probe=short)
    s.put("small", b"", [bytes(MiB)])  # leases the pooled chunk: that needs no memory
    assert s.info("small")["tier"] == "ram" and mod.pool_info()["files"] == []
    chunk = s.chunk_path(0)
    s.destroy()
    assert mod.pool_info()["files"] == [] and not os.path.exists(chunk) and not os.path.exists(pooled)


CHILD = """
    import json, os, signal, torch
    from discomfort.context import WorkflowContext
    from discomfort import _backend
    mod = _backend.load({backend!r})
    with WorkflowContext(backend={backend!r}, ram_budget=256 << 20) as ctx:
        ctx.save("image", torch.rand(1, 1280, 1024, 4))
    info = mod.pool_info()
    # Still open at exit; its budget keeps it off the pooled 64 MiB chunk.
    late = WorkflowContext(backend={backend!r}, ram_budget=32 << 20)
    late.save("image", torch.rand(1, 1280, 1024, 4))
    print(json.dumps({{"prefix": info["prefix"], "files": [f["path"] for f in info["files"]],
                      "late": late.run_id}}), flush=True)
    {ending}
"""


def pool_files(prefix: str) -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith(prefix + ".")]


def test_pool_is_gone_after_the_process_exits(backend):
    load_backend(backend)
    child = run_child(CHILD.format(backend=backend, ending="pass"))
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert len(out["files"]) == 1 and out["prefix"].startswith("dcf-pool-")
    assert pool_files(out["prefix"]) == []
    assert leftovers(out["late"]) == []  # the context left open was destroyed at exit too


def test_sweep_removes_the_pool_of_a_dead_process(mod, make_ctx, backend):
    child = run_child(CHILD.format(backend=backend, ending="os.kill(os.getpid(), signal.SIGKILL)"))
    assert child.returncode == -signal.SIGKILL, child.stderr
    out = json.loads(child.stdout)
    assert [os.path.join(SHM, n) for n in pool_files(out["prefix"])] == out["files"]
    # A live pool (ours) is left alone.
    ctx = make_ctx()
    ctx.save("image", torch.rand(IMAGE))
    ctx.shutdown()
    (ours,) = mod.pool_info()["files"]
    sweep(SHM)
    assert pool_files(out["prefix"]) == [] and leftovers(out["late"]) == []
    assert os.path.exists(ours["path"])


def test_forked_child_leaves_the_parents_pool_alone(mod, make_ctx):
    ctx = make_ctx()
    ctx.save("image", torch.rand(IMAGE))
    ctx.shutdown()
    (pooled,) = mod.pool_info()["files"]
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        ok = mod.pool_info()["files"] == [] and mod.release_pool() == 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(pooled["path"]) and mod.pool_info()["files"] == [pooled]


def test_release_pool_gives_back_what_finished_runs_left(mod, make_ctx):
    import discomfort

    ctx = make_ctx()
    ctx.save("image", torch.ones(IMAGE))
    ctx.shutdown()
    held = mod.pool_info()["bytes"]
    assert held >= 20 * MiB  # the finished run's chunk waits for the next run, prefaulted
    files = [f["path"] for f in mod.pool_info()["files"]]
    assert discomfort.release_pool() >= held
    assert mod.pool_info()["bytes"] == 0 and not any(os.path.exists(f) for f in files)
