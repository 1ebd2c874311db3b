"""Objects, views and pins of one store, on every backend: round trips of every shape, the
reservation's two phases, versions and keys, views that outlive overwrites, deletes, close and
destroy, and threads sharing a handle (the contract of docs/FORMAT.md; test_store.py has more)."""

from __future__ import annotations

import fcntl
import gc
import os
import threading

import pytest

from _helpers import BACKENDS, SHM, control_path, leftovers, load_backend
from _helpers import stripes as pattern
from discomfort import errors

np = pytest.importorskip("numpy")

MiB = 1 << 20


def test_module_constants(store_mod):
    assert store_mod.FORMAT_VERSION == 2
    assert store_mod.SMALL_OBJECT_BYTES == 65536
    assert store_mod.COPY_LOAD_BYTES == 128 << 10  # every backend copies the same loads


def test_properties(store, run_id, disk_root):
    assert store.run_id == run_id
    assert store.owner and not store.closed and not store.finished
    assert store.slot == 0
    assert store.shm_dir == SHM
    assert store.disk_dir == os.path.join(os.path.abspath(disk_root), f"dcf-{run_id}")
    assert os.path.isdir(store.disk_dir)
    assert store.chunk_path(3) == os.path.join(SHM, f"dcf-{run_id}.c3")
    assert oct(os.stat(control_path(run_id)).st_mode & 0o777) == "0o600"
    assert oct(os.stat(store.disk_dir).st_mode & 0o777) == "0o700"


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 4095, 4096, 4097, 65535, 65536, 100_001, MiB])
def test_round_trip_sizes(store, store_mod, size):
    data = pattern(size, size)
    version = store.put("k", b"meta:" + str(size).encode(), [data])
    meta, views, info = store.get("k")
    assert meta == b"meta:" + str(size).encode()
    assert len(views) == 1 and views[0] == data
    assert info == {"version": version, "tier": "ram", "zero_copy": store.info("k")["size"] >= store_mod.COPY_LOAD_BYTES}
    assert views[0].format == "B" and not views[0].readonly


def test_round_trip_several_buffers(store):
    bufs = [b"", pattern(1), pattern(70_000, 1), b"", pattern(333, 2), pattern(65536, 3), bytearray(b"xy")]
    store.put("multi", b"m" * 1000, bufs)
    meta, views, _ = store.get("multi")
    assert meta == b"m" * 1000
    assert [bytes(v) for v in views] == [bytes(b) for b in bufs]
    info = store.info("multi")
    assert info["nbuf"] == len(bufs) and info["nbytes"] == sum(len(b) for b in bufs)
    assert info["meta_len"] == 1000 and info["tier"] == "ram" and info["chunk"] == 0
    assert info["size"] % 4096 == 0


def test_round_trip_no_buffers_and_numpy(store):
    store.put("empty", b"", [])
    assert store.get("empty")[:2] == (b"", [])
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.put("arr", b"", [arr, memoryview(b"abc")])
    _, views, _ = store.get("arr")
    assert np.array_equal(np.frombuffer(views[0], dtype=np.float32).reshape(3, 4), arr)
    assert bytes(views[1]) == b"abc"
    with pytest.raises(ValueError):
        store.put("strided", b"", [arr[:, ::2]])


@pytest.mark.parametrize("size, misalign", [(4 * MiB, 0), (8 * MiB + 13, 3), (33 * MiB + 7, 5), (64 * MiB + 1, 1)])
def test_large_copies_stream_and_split(store_mod, run_id, size, misalign):
    """From 4 MiB put streams (the core: non-temporal stores), from 32 MiB it shares blocks with a
    helper thread: odd sizes and a source that is not aligned must arrive intact, also from threads."""
    s = store_mod.Store.create(run_id, ram_budget=512 * MiB)
    try:
        raw = np.frombuffer(pattern(size + misalign, size), dtype=np.uint8)
        src = raw[misalign:]
        errors_seen = []

        def put(key):
            try:
                s.put(key, b"", [src])
            except Exception as exc:  # reported below
                errors_seen.append(exc)

        threads = [threading.Thread(target=put, args=(f"k{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors_seen == []
        for i in range(3):
            _, views, _ = s.get(f"k{i}")
            assert np.array_equal(np.frombuffer(views[0], dtype=np.uint8), src)
    finally:
        s.destroy()


def test_allocation_follows_other_handles(store_mod, run_id):
    """Each handle caches what it derives from the tables; another handle's update (another
    epoch) makes it rescan, so allocations never overlap and freed space is found again."""
    s = store_mod.Store.create(run_id, ram_budget=256 * MiB)
    others = [load_backend(name).Store.attach(run_id) for name in BACKENDS]
    try:
        s.put("a", b"", [pattern(MiB, 1)])
        for n, other in enumerate(others):
            other.put(f"o{n}", b"", [pattern(MiB, 2 + n)])
        s.put("b", b"", [pattern(MiB, 9)])
        extents = sorted((s.info(k)["offset"], s.info(k)["size"]) for k in s.keys())
        assert all(a[0] + a[1] <= b[0] for a, b in zip(extents, extents[1:]))
        freed = s.info("o0")["offset"]
        others[0].delete("o0")
        s.put("c", b"", [pattern(MiB, 10)])
        assert s.info("c")["offset"] == freed  # first fit saw the other handle's delete
        for key, seed in [("a", 1), ("b", 9), ("c", 10)] + [(f"o{n}", 2 + n) for n in range(1, len(others))]:
            assert s.get(key)[1][0] == pattern(MiB, seed)
        # A pin another handle holds keeps its extent out of our allocations too.
        held = others[0].get("c")[1]
        s.delete("c")
        s.put("d", b"", [pattern(MiB, 11)])
        assert s.info("d")["offset"] != freed and held[0] == pattern(MiB, 10)
        del held
    finally:
        for other in others:
            other.close()
        s.destroy()


def test_reserve_seal_abort(store):
    with store.reserve("r", b"meta", [5, 0, 70_000]) as res:
        assert res.key == "r" and res.tier == "ram"
        assert [len(b) for b in res.buffers] == [5, 0, 70_000]
        res.buffers[0][:] = b"hello"
        res.buffers[2][:] = b"z" * 70_000
        assert not store.contains("r")  # invisible until sealed
    assert res.buffers == []
    meta, views, _ = store.get("r")
    assert meta == b"meta" and bytes(views[0]) == b"hello" and bytes(views[2]) == b"z" * 70_000
    with pytest.raises(errors.StoreClosedError):
        res.seal()
    res.abort()  # a no-op once sealed

    with pytest.raises(RuntimeError):
        with store.reserve("gone", b"", [10]):
            raise RuntimeError("boom")
    assert not store.contains("gone")
    res = store.reserve("aborted", b"", [10])
    res.abort()
    assert not store.contains("aborted") and store.stats()["reserved"] == 0


def test_versions_and_keys(store):
    v1 = store.put("b", b"", [b"1"])
    v2 = store.put("a", b"", [b"2"])
    v3 = store.put("b", b"", [b"3"])
    assert v1 < v2 < v3
    assert store.keys() == ["a", "b"]
    assert store.get("b")[2]["version"] == v3 and bytes(store.get("b")[1][0]) == b"3"
    assert store.delete("a") is True and store.delete("a") is False
    assert store.keys() == ["b"] and "b" in store and not store.contains("a")


# ---- views -------------------------------------------------------------------------------------


def test_overwrite_and_delete_while_view_alive(store):
    old = pattern(MiB, 1)
    store.put("k", b"old", [old])
    _, views, _ = store.get("k")
    assert store.stats()["pins"] == 1
    for i in range(3):  # the pinned extent must not be reused by these
        store.put("k", b"new", [pattern(MiB, 10 + i)])
    store.put("other", b"", [pattern(MiB, 99)])
    assert views[0] == old
    assert store.get("k")[1][0] == pattern(MiB, 12)
    store.delete("k")
    store.put("again", b"", [pattern(2 * MiB, 7)])
    assert views[0] == old
    assert store.info("again")["offset"] != 0 or store.info("again")["chunk"] != 0
    del views
    gc.collect()
    assert store.stats()["pins"] == 0


def test_same_extent_shares_one_pin(store):
    store.put("k", b"", [pattern(MiB)])
    a = store.get("k")[1]
    b = store.get("k")[1]
    assert store.stats()["pins"] == 1
    del a
    gc.collect()
    assert store.stats()["pins"] == 1
    del b
    gc.collect()
    assert store.stats()["pins"] == 0


def test_writing_into_a_view_does_not_change_the_store(store):
    store.put("big", b"", [pattern(MiB)])
    store.put("small", b"", [b"abc"])
    _, big, _ = store.get("big")
    _, small, info = store.get("small")
    assert not info["zero_copy"]
    big[0][:4] = b"XXXX"
    small[0][:] = b"XYZ"
    assert bytes(big[0][:4]) == b"XXXX"
    assert store.get("big")[1][0] == pattern(MiB)
    assert bytes(store.get("small")[1][0]) == b"abc"


def test_views_of_each_tier_survive_close_and_destroy(store_mod, run_id, disk_root):
    s = store_mod.Store.create(run_id, ram_budget=4 * MiB, disk_root=disk_root)
    s.put("ram", b"", [pattern(MiB, 1)])
    s.put("disk", b"", [pattern(8 * MiB, 2)])  # larger than the budget
    s.put("small", b"", [b"tiny"])
    assert s.info("disk")["tier"] == "disk"
    views = {k: s.get(k)[1][0] for k in ("ram", "disk", "small")}
    s.destroy()
    assert s.closed and s.finished
    assert leftovers(run_id) == [] and not os.path.exists(os.path.join(disk_root, f"dcf-{run_id}"))
    assert views["ram"] == pattern(MiB, 1)
    assert views["disk"] == pattern(8 * MiB, 2)
    assert bytes(views["small"]) == b"tiny"
    views["ram"][:2] = b"ok"
    with pytest.raises(errors.StoreClosedError):
        s.get("ram")
    del views
    gc.collect()


def test_close_keeps_slot_until_last_view(store, store_mod, run_id):
    store.put("k", b"", [pattern(MiB)])
    other = store_mod.Store.attach(run_id)
    assert other.slot == 1
    _, views, _ = other.get("k")
    other.close()
    assert other.closed
    with pytest.raises(errors.StoreClosedError):
        other.get("k")
    st = store.stats()
    assert st["slots_used"] == 2 and st["pins"] == 1
    del views
    gc.collect()
    st = store.stats()
    assert st["slots_used"] == 1 and st["pins"] == 0


def test_flock_marks_the_run_in_use(store, run_id):
    fd = os.open(control_path(run_id), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        store.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a sweeper may now remove it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_threads_share_a_handle(store):
    stop = threading.Event()
    failures = []

    def writer(n):
        try:
            for i in range(150):
                store.put(f"t{n}-{i % 5}", b"", [pattern(70_000 + i, n)])
                _, v, _ = store.get(f"t{n}-{i % 5}")
                assert v[0] == pattern(70_000 + i, n)
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def dropper():  # views die on this thread while the writers hold the lock
        while not stop.is_set():
            try:
                store.get("t0-0")
            except errors.UnknownKeyError:
                pass

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    d = threading.Thread(target=dropper)
    for t in threads + [d]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    d.join()
    assert failures == []
    gc.collect()
    assert store.stats()["pins"] == 0


def test_context_manager_destroys_for_owner(store_mod, run_id):
    with store_mod.Store.create(run_id, ram_budget=MiB) as s:
        s.put("k", b"", [b"v"])
        with store_mod.Store.attach(run_id) as a:
            assert a.keys() == ["k"]
        assert a.closed and not s.closed
    assert s.closed and leftovers(run_id) == []
