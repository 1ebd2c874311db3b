"""A run shared between processes and backends: children of every backend that are SIGKILLed
holding the lock, a reservation or views, forked children, and two backends on one run (the
same segments byte for byte). The parent is each backend in turn (the `store` fixtures)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import select
import struct

import pytest

from _helpers import (BACKENDS, CONTROL_SIZE, control_path, kill_child, leftovers, load_backend, park_child,
                      read_header_u32, run_child)
from _helpers import stripes as pattern

pytest.importorskip("numpy")

MiB = 1 << 20


def _spawned_child(backend: str, run_id: str) -> None:
    from discomfort import _backend

    s = _backend.load(backend).Store.attach(run_id)
    meta, views, info = s.get("from-parent")
    assert meta == b"parent" and views[0] == pattern(MiB, 5) and info["tier"] == "ram"
    s.put("from-child", b"child", [pattern(3 * MiB, 6), b"tail"])
    del views
    s.close()


def test_spawned_process_reads_and_writes(store, backend, run_id):
    store.put("from-parent", b"parent", [pattern(MiB, 5)])
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_spawned_child, args=(backend, run_id))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    meta, views, _ = store.get("from-child")
    assert meta == b"child" and views[0] == pattern(3 * MiB, 6) and bytes(views[1]) == b"tail"
    st = store.stats()
    assert st["slots_used"] == 1 and st["pins"] == 1 and st["reserved"] == 0


@pytest.fixture(params=BACKENDS)
def child(request) -> str:
    """The backend of the child process a test starts (each parent backend meets each)."""
    load_backend(request.param)  # skips (or fails, when required) where it is missing
    return request.param


def test_kill_holding_the_lock_is_repaired(store, run_id, child):
    store.put("keep", b"", [pattern(MiB)])
    epoch = store.stats()["epoch"]
    proc = park_child(child, run_id, 's.put("lost", b"", [b"x" * 100_000])', killpoint="after_lock")
    assert read_header_u32(run_id, 28) == 1  # dirty, lock held
    kill_child(proc)
    st = store.stats()  # waits for the lock, finds dirty, repairs, reclaims the dead slot
    assert read_header_u32(run_id, 28) == 0
    assert st["epoch"] > epoch and st["slots_used"] == 1 and st["reserved"] == 0
    assert store.keys() == ["keep"] and store.get("keep")[1][0] == pattern(MiB)
    store.put("after", b"", [b"ok"])


def test_kill_between_reserve_and_seal_is_reclaimed(store, run_id, child):
    body = 's.put("ram-lost", b"", [b"x" * 200_000])'
    proc = park_child(child, run_id, body, killpoint="after_reserve")
    assert store.stats()["reserved"] == 1
    kill_child(proc)
    assert store.reclaim() >= 1
    st = store.stats()
    assert st["reserved"] == 0 and st["slots_used"] == 1 and store.keys() == []
    # The space of the dead reservation is free again: the next object lands at offset 0.
    store.put("new", b"", [b"y" * 200_000])
    assert store.info("new")["offset"] == 0


def test_kill_between_reserve_and_seal_on_disk(store_mod, run_id, disk_root, child):
    s = store_mod.Store.create(run_id, ram_budget=0, disk_root=disk_root)
    try:
        proc = park_child(child, run_id, 's.put("disk-lost", b"", [b"x" * 100])', killpoint="after_reserve")
        assert len(os.listdir(s.disk_dir)) == 1
        kill_child(proc)
        assert s.reclaim() == 1
        assert os.listdir(s.disk_dir) == [] and s.stats()["reserved"] == 0
    finally:
        s.destroy()


def test_kill_holding_views_frees_pins(store, store_mod, run_id, child):
    store.put("k", b"", [pattern(MiB)])
    proc = park_child(child, run_id, 'views = s.get("k")[1]')
    st = store.stats()
    assert st["pins"] == 1 and st["slots_used"] == 2
    store.put("k", b"", [pattern(MiB, 1)])  # the pinned extent is skipped
    assert store.info("k")["offset"] > 0
    kill_child(proc)
    assert store.reclaim() == 1
    st = store.stats()
    assert st["pins"] == 0 and st["slots_used"] == 1
    # The dead slot is taken again by the next attacher.
    again = store_mod.Store.attach(run_id)
    assert again.slot == 1
    again.close()


def test_forked_child_lets_go_of_the_parents_locks(store, run_id, child):
    sync_r, sync_w = os.pipe()
    hold_r, hold_w = os.pipe()  # the forked grandchild lives until we close hold_w
    proc = run_child(f"""
        import os, signal
        from discomfort import _backend, errors
        m = _backend.load({child!r})
        s = m.Store.attach({run_id!r})
        if os.fork() == 0:
            try:
                s.get("k")
            except errors.StoreClosedError:
                os.write({sync_w}, b"C")
            os.read({hold_r}, 1)
            os._exit(0)
        os.write({sync_w}, b"K")
        signal.pause()
    """, pass_fds=(sync_w, hold_r))
    os.close(sync_w)
    os.close(hold_r)
    try:
        got = b""
        while len(got) < 2:
            ready, _, _ = select.select([sync_r], [], [], 60)
            chunk = os.read(sync_r, 2) if ready else b""
            assert chunk, proc.stderr.read()
            got += chunk
        assert sorted(got) == sorted(b"CK")
        assert store.stats()["slots_used"] == 2
        kill_child(proc)
        # The grandchild still runs but holds nothing of its parent's: the slot reads as dead.
        assert store.stats()["slots_used"] == 1
    finally:
        os.close(hold_w)
        os.close(sync_r)


@pytest.mark.parametrize("killpoint", ["after_lock", "after_reserve"])
def test_parent_recovers_from_a_killed_child(store_mod, run_id, child, killpoint):
    s = store_mod.Store.create(run_id, ram_budget=64 * MiB)
    try:
        s.put("keep", b"", [pattern(MiB)])
        proc = park_child(child, run_id, 's.put("lost", b"", [b"x" * 300_000])', killpoint=killpoint)
        kill_child(proc)
        s.reclaim()
        st = s.stats()
        assert st["reserved"] == 0 and st["slots_used"] == 1 and read_header_u32(run_id, 28) == 0
        assert s.keys() == ["keep"] and s.get("keep")[1][0] == pattern(MiB)
        s.put("after", b"", [b"x" * 300_000])  # lands where the dead reservation was
        assert s.info("after")["offset"] == s.info("keep")["size"]
    finally:
        s.destroy()
    assert leftovers(run_id) == []


# ---- two backends on one run -------------------------------------------------------------------


@pytest.mark.parametrize("creator", BACKENDS)
@pytest.mark.parametrize("attacher", BACKENDS)
def test_backends_interoperate(run_id, disk_root, creator, attacher):
    s = load_backend(creator).Store.create(run_id, ram_budget=2 * MiB, disk_root=disk_root)
    try:
        s.put("small", b"m1", [b"abc", b""])
        s.put("big", b"m2", [pattern(300_000, 1), pattern(70_000, 2)])
        s.put("disk", b"m3", [pattern(3 * MiB, 3)])
        a = load_backend(attacher).Store.attach(run_id)
        assert a.keys() == ["big", "disk", "small"]
        assert a.disk_dir == s.disk_dir
        for key in a.keys():
            assert a.info(key) == s.info(key)
            ma, va, ia = a.get(key)
            ms, vs, is_ = s.get(key)
            assert ma == ms and [bytes(x) for x in va] == [bytes(x) for x in vs] and ia == is_
        held = a.get("big")[1]
        a.put("big", b"over", [pattern(500_000, 4)])
        assert s.get("big")[1][0] == pattern(500_000, 4)
        assert held[0] == pattern(300_000, 1)
        with a.reserve("res", b"r", [4, 100_000]) as res:
            res.buffers[0][:] = b"abcd"
        assert bytes(s.get("res")[1][0]) == b"abcd"
        a.delete("disk")
        assert s.keys() == ["big", "res", "small"] and len(os.listdir(s.disk_dir)) == 1  # kept for reuse
        st_a, st_s = a.stats(), s.stats()
        assert st_a == st_s and st_s["pins"] == 1
        del held
        gc.collect()
        assert s.stats()["pins"] == 0
        a.close()
        assert s.stats()["slots_used"] == 1
    finally:
        s.destroy()
    assert leftovers(run_id) == []


def _snapshot(backend, run_id: str, disk_root: str):
    """Run a fixed sequence of operations; return the control segment and every extent."""
    s = backend.Store.create(run_id, ram_budget=2 * MiB, disk_root=disk_root)
    s.put("a", b"meta-a", [pattern(100, 1), pattern(70_000, 2)])
    s.put("b", b"", [pattern(500_000, 3)])
    s.put("a", b"meta-a2", [pattern(10, 4)])
    s.delete("b")
    with s.reserve("c", b"c", [3, 0, 65536]) as res:
        res.buffers[0][:] = b"abc"
        res.buffers[2][:] = pattern(65536, 5)
    s.reserve("aborted", b"", [1000]).abort()
    s.put("spill", b"s", [pattern(3 * MiB, 6)])
    with open(control_path(run_id), "rb") as fh:
        control = bytearray(fh.read())
    control[56:64] = bytes(8)  # creator uid/pid
    control[184:192] = bytes(8)  # created_ns
    extents = {}
    for key in s.keys():
        info = s.info(key)
        if info["tier"] == "ram":
            with open(s.chunk_path(info["chunk"]), "rb") as fh:
                fh.seek(info["offset"])
                raw = fh.read(info["size"])
        else:
            (name,) = os.listdir(s.disk_dir)
            with open(os.path.join(s.disk_dir, name), "rb") as fh:
                raw = fh.read()
        meta, views, _ = s.get(key)
        # The directory, the meta and the buffers; padding between them is unspecified.
        nbuf = struct.unpack_from("<I", raw, 4)[0]
        extents[key] = (raw[: 32 + 16 * nbuf], meta, [bytes(v) for v in views])
    s.destroy()
    return control, extents


@pytest.mark.parametrize("other", BACKENDS[1:])
def test_backends_write_identical_segments(run_id, tmp_path, other):
    """Each backend writes what the first of BACKENDS (the core) writes, byte for byte."""
    native = _snapshot(load_backend(BACKENDS[0]), run_id, str(tmp_path / "d"))
    python = _snapshot(load_backend(other), run_id, str(tmp_path / "d"))
    assert native[1] == python[1]
    if native[0] != python[0]:
        diff = [i for i in range(CONTROL_SIZE) if native[0][i] != python[0][i]]
        pytest.fail(f"control segments differ at bytes {diff[:16]}")
