"""The store contract, on every backend and across them (docs/FORMAT.md)."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import multiprocessing
import os
import select
import signal
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from _helpers import BACKENDS, leftovers, load_backend
from discomfort import errors
from discomfort._pystore.layout import fnv1a64

MiB = 1 << 20
WORKERS = os.path.join(os.path.dirname(__file__), "_workers.py")


def address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


def pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    "sizes",
    [[0], [1], [4095], [4097, 3], [65535], [65536], [MiB + 3], [0, 7, 65536, 0, 100_001], [MiB, MiB, 1]],
)
def test_round_trip(make_store, sizes):
    store = make_store()
    payloads = [pattern(n, i) for i, n in enumerate(sizes)]
    version = store.put("k", b"meta:" + bytes(len(sizes)), payloads)
    meta, views, info = store.get("k")
    assert meta == b"meta:" + bytes(len(sizes))
    assert [bytes(v) for v in views] == payloads
    assert info["version"] == version
    for v, n in zip(views, sizes):
        if n:
            assert address(v) % (4096 if n >= 65536 else 64) == 0


def test_round_trip_200mib(make_store):
    store = make_store(ram_budget=512 * MiB)
    data = np.random.default_rng(3).integers(0, 2**63, 200 * MiB // 8, dtype=np.uint64)
    store.put("big", b"", [data, b"tail"])
    _, views, info = store.get("big")
    assert info["tier"] == "ram" and info["zero_copy"]
    assert np.array_equal(np.frombuffer(views[0], dtype=np.uint64), data)
    assert bytes(views[1]) == b"tail"
    assert store.stats()["ram_capacity"] <= 512 * MiB


def test_view_is_a_mapping_of_the_chunk(make_store):
    store = make_store()
    store.put("pad", b"", [bytes(3 * MiB)])
    store.put("k", b"", [pattern(2 * MiB)])
    _, views, _ = store.get("k")
    info = store.info("k")
    addr = address(views[0])
    chunk = os.path.realpath(store.chunk_path(info["chunk"]))
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                assert parts[-1] == chunk, line
                assert "p" in parts[1], "the view must be a private (copy-on-write) mapping"
                file_off = int(parts[2], 16) + (addr - lo)
                assert info["offset"] <= file_off < info["offset"] + info["size"]
                break
        else:
            pytest.fail("the view's address is in no mapping")


def test_overwrite_and_delete_keep_live_views(make_store):
    store = make_store()
    first = pattern(MiB, 1)
    store.put("k", b"1", [first])
    _, views, _ = store.get("k")
    for i in range(5):
        store.put("k", b"2", [pattern(MiB, 10 + i)])
    assert bytes(views[0]) == first
    store.delete("k")
    store.put("other", b"", [pattern(4 * MiB, 99)])
    assert bytes(views[0]) == first
    assert store.stats()["pins"] == 1
    del views
    assert store.stats()["pins"] == 0


def test_views_survive_close_and_destroy(make_store):
    store = make_store()
    data = pattern(3 * MiB)
    store.put("k", b"", [data, b"small"])
    _, views, _ = store.get("k")
    store.destroy()
    assert store.closed
    assert bytes(views[0]) == data and bytes(views[1]) == b"small"
    assert leftovers(store.run_id) == []
    with pytest.raises(errors.StoreClosedError):
        store.get("k")


def test_loop_with_one_old_view_per_key_stays_within_twice_live_data(make_store):
    sizes = {"a": 20 * MiB, "b": 8 * MiB}  # twice the live data (56 MiB) fits the 64 MiB budget
    store = make_store(ram_budget=64 * MiB)
    held = {}
    for i in range(12):
        for key, size in sizes.items():
            store.put(key, b"", [np.full(size, i, dtype=np.uint8)])
            held[key] = store.get(key)[1]  # the previous view of this key is released here
            assert store.info(key)["tier"] == "ram", f"iteration {i}: {key} spilled to disk"
            assert held[key][0][0] == i
    stats = store.stats()
    assert stats["ram_capacity"] == 64 * MiB and stats["objects_disk"] == 0
    assert stats["pinned_bytes"] <= sum(sizes.values()) + 2 * 4096


def test_spills_to_disk_when_the_budget_is_exhausted(make_store):
    store = make_store(ram_budget=2 * MiB)
    small, large = pattern(MiB), pattern(5 * MiB + 1, 2)
    store.put("small", b"s", [small])
    store.put("large", b"l", [large, b"x"])
    assert store.info("small")["tier"] == "ram"
    assert store.info("large")["tier"] == "disk"
    meta, views, info = store.get("large")
    assert (meta, bytes(views[0]), bytes(views[1])) == (b"l", large, b"x")
    assert info["zero_copy"]
    files = os.listdir(store.disk_dir)
    assert len(files) == 1 and files[0].endswith(".obj")
    store.put("large", b"l2", [b"short"])  # into RAM; the old file is kept for the next disk save
    assert os.listdir(store.disk_dir) == files and bytes(views[0]) == large
    stats = store.stats()
    assert stats["objects_ram"] == 2 and stats["objects_disk"] == 0


def test_disk_files_by_put_and_by_reservation_are_the_same_bytes(make_store):
    """put writes a disk-tier object with pwrite, a reservation through a mapping: same file,
    padding included (zeros, never stale bytes), readable by the other backend's reader too."""
    store = make_store(ram_budget=MiB)
    sizes = [3 * MiB + 5, 17, 70_000]
    payloads = [pattern(n, 10 + i) for i, n in enumerate(sizes)]
    store.put("a", b"meta", payloads)
    res = store.reserve("b", b"meta", sizes)
    for dst, src in zip(res.buffers, payloads):
        dst[:] = src
    res.seal()
    assert store.info("a")["tier"] == store.info("b")["tier"] == "disk"
    files = sorted(os.listdir(store.disk_dir))
    assert len(files) == 2
    first, second = (open(os.path.join(store.disk_dir, f), "rb").read() for f in files)
    assert first == second and len(first) % 4096 == 0
    for key in ("a", "b"):
        meta, views, _ = store.get(key)
        assert meta == b"meta" and [bytes(v) for v in views] == payloads


def _only_file(store) -> int:
    """A read descriptor on the run's one disk file: its inode cannot be recycled while it is open."""
    (name,) = os.listdir(store.disk_dir)
    return os.open(os.path.join(store.disk_dir, name), os.O_RDONLY)


def _file_of(store, fd: int) -> str | None:
    """The name the descriptor's file has in the run directory now (None: unlinked)."""
    ino = os.fstat(fd).st_ino
    return next((n for n in os.listdir(store.disk_dir) if os.stat(os.path.join(store.disk_dir, n)).st_ino == ino), None)


def test_a_disk_save_reuses_the_file_of_an_overwritten_value(make_store):
    """The steady state of a loop on the disk tier: the value before last's file takes the next
    value (its pages are in the page cache already); the padding of a reused file is zeroed."""
    store = make_store(ram_budget=MiB)
    store.put("k", b"v0", [pattern(3 * MiB + 7, 0)])
    fd = _only_file(store)
    try:
        store.put("k", b"v1", [pattern(3 * MiB, 1)])  # a new file; v0's is kept
        assert os.fstat(fd).st_nlink == 1 and len(os.listdir(store.disk_dir)) == 2
        two = [pattern(MiB + 1, 2), pattern(2 * MiB + 5, 3)]  # a gap after the first buffer
        store.put("k", b"v2", two)  # takes v0's file
        name = _file_of(store, fd)
        assert name is not None and len(os.listdir(store.disk_dir)) == 2
        meta, views, info = store.get("k")
        assert meta == b"v2" and [bytes(v) for v in views] == two and info["tier"] == "disk"
        before = set(os.listdir(store.disk_dir))
        res = store.reserve("fresh", b"v2", [len(b) for b in two])  # a new file, through a mapping
        for dst, src in zip(res.buffers, two):
            dst[:] = src
        res.seal()
        (fresh,) = set(os.listdir(store.disk_dir)) - before
        with open(os.path.join(store.disk_dir, name), "rb") as a, open(os.path.join(store.disk_dir, fresh), "rb") as b:
            assert a.read() == b.read()  # no byte of v0 left in the padding
    finally:
        os.close(fd)


def test_a_file_a_view_maps_is_never_rewritten(make_store):
    """A loaded disk value is a private mapping of its file: while it lives, that file is pinned
    and no save takes it; once the view is gone, the next save may."""
    store = make_store(ram_budget=MiB)
    store.put("k", b"", [pattern(2 * MiB, 0)])
    fd = _only_file(store)
    try:
        held = store.get("k")[1]
        for i in range(1, 6):  # files take turns around the pinned one
            store.put("k", b"", [pattern(2 * MiB, i)])
            assert bytes(held[0]) == pattern(2 * MiB, 0)
            assert _file_of(store, fd) is not None and os.pread(fd, 64, 4096) == pattern(2 * MiB, 0)[:64]
        del held
        gc.collect()
        for i in range(6, 9):
            store.put("k", b"", [pattern(2 * MiB, i)])
        assert os.pread(fd, 64, 4096) != pattern(2 * MiB, 0)[:64]  # reused once nothing mapped it
        assert bytes(store.get("k")[1][0]) == pattern(2 * MiB, 8)
    finally:
        os.close(fd)


@pytest.mark.parametrize("child", BACKENDS)
def test_a_file_another_process_maps_is_never_rewritten(store_mod, make_store, child):
    """The pin of a view in another process (of either backend) protects its file; a SIGKILLed
    holder's pin is reclaimed and the file becomes reusable."""
    load_backend(child)
    store = make_store(ram_budget=MiB)
    store.put("big", b"", [pattern(2 * MiB, 0)])
    fd = _only_file(store)
    try:
        proc = _park(child, store.run_id, "views", None)  # holds a view of "big"
        for i in range(1, 6):
            store.put("big", b"", [pattern(2 * MiB, i)])
            assert _file_of(store, fd) is not None and os.pread(fd, 64, 4096) == pattern(2 * MiB, 0)[:64]
        _kill(proc)
        for i in range(6, 9):
            store.put("big", b"", [pattern(2 * MiB, i)])
        assert os.pread(fd, 64, 4096) != pattern(2 * MiB, 0)[:64]
        assert store.stats()["pins"] == 0
    finally:
        os.close(fd)


def test_too_large_for_both_tiers(make_store):
    store = make_store(ram_budget=MiB, disk=False)
    with pytest.raises(errors.StoreFullError, match="big"):
        store.put("big", b"", [bytes(2 * MiB)])
    assert store.keys() == [] and store.stats()["reserved"] == 0


def test_versions_never_repeat(make_store):
    store = make_store()
    seen = []
    for _ in range(3):
        seen.append(store.put("k", b"", [b"v"]))
        seen.append(store.info("k")["version"])
        store.delete("k")
    assert seen[::2] == seen[1::2]
    assert len(set(seen[::2])) == 3 and seen[::2] == sorted(seen[::2])


def test_keys_contains_delete_info_stats(make_store):
    store = make_store()
    store.put("b", b"", [b"1" * 10])
    store.put("a", b"", [bytes(MiB)])
    assert store.keys() == ["a", "b"]
    assert store.contains("a") and not store.contains("zz")
    info = store.info("a")
    assert info["tier"] == "ram" and info["nbytes"] == MiB and info["nbuf"] == 1 and info["size"] >= MiB
    assert store.delete("a") is True and store.delete("a") is False
    stats = store.stats()
    assert stats["objects_ram"] == 1 and stats["run_id"] == store.run_id and stats["ram_budget"] == 256 * MiB


def test_reservation_two_phase(make_store):
    store = make_store()
    res = store.reserve("k", b"m", [10, MiB])
    assert not store.contains("k")
    res.buffers[0][:] = b"0123456789"
    res.buffers[1][:3] = b"abc"
    version = res.seal()
    meta, views, info = store.get("k")
    assert bytes(views[0]) == b"0123456789" and bytes(views[1][:3]) == b"abc"
    assert info["version"] == version
    with pytest.raises(errors.StoreClosedError):
        res.seal()

    with pytest.raises(RuntimeError):
        with store.reserve("k", b"new", [5]) as res2:
            res2.buffers[0][:] = b"nope!"
            raise RuntimeError("fill failed")
    assert store.get("k")[0] == b"m"
    assert store.stats()["reserved"] == 0
    store.reserve("gone", b"", [4]).abort()
    assert not store.contains("gone")


def test_attach_errors(store_mod, make_store, tmp_path):
    with pytest.raises(errors.UnknownRunError, match="nope"):
        store_mod.Store.attach("nope")
    for bad in ("", "../etc", "a" * 65, "a b", 7):
        with pytest.raises(errors.InvalidRunIdError):
            store_mod.Store.attach(bad)
    store = make_store()
    store.mark_finished()
    with pytest.raises(errors.RunFinishedError):
        store_mod.Store.attach(store.run_id)


def _corrupt(store, offset: int, data: bytes) -> None:
    with open(os.path.join(store.shm_dir, f"dcf-{store.run_id}"), "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


@pytest.mark.parametrize(
    "offset,data,message",
    [(0, b"NOTASTOR", "not a discomfort store"), (8, struct.pack("<I", 3), "version"),
     (72, struct.pack("<I", 17), "table_capacity"), (96, struct.pack("<Q", 1 << 50), "obj_table_off")],
)
def test_attach_refuses_a_damaged_header(store_mod, make_store, offset, data, message):
    store = make_store()
    _corrupt(store, offset, data)
    with pytest.raises(errors.CorruptedStoreError, match=message):
        store_mod.Store.attach(store.run_id)


def test_attach_refuses_a_truncated_segment(store_mod, make_store):
    store = make_store()
    fake = "t" + os.urandom(12).hex()
    path = os.path.join(store.shm_dir, f"dcf-{fake}")
    with open(os.path.join(store.shm_dir, f"dcf-{store.run_id}"), "rb") as src:
        head = bytearray(src.read(8192))
    head[112:176] = fake.encode().ljust(64, b"\0")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # a copy cut short: the live
    try:  # segment is never truncated under its owner's mapping
        os.write(fd, head)
        os.close(fd)
        with pytest.raises(errors.CorruptedStoreError, match="8192 bytes"):
            store_mod.Store.attach(fake)
    finally:
        os.unlink(path)


def _refused_by_another_handle(store_mod, store, match: str) -> None:
    """A fresh handle's get("k") is CorruptedStoreError naming `match`."""
    other = store_mod.Store.attach(store.run_id)
    try:
        with pytest.raises(errors.CorruptedStoreError, match=match):
            other.get("k")
    finally:
        other.close()


def test_corrupted_entry_is_an_error_not_a_crash(store_mod, make_store):
    store = make_store()
    store.put("k", b"", [bytes(MiB)])
    index = fnv1a64(b"k") % 4096  # the key's home slot: nothing else is in the table
    entry = 12288 + index * 320
    _corrupt(store, entry + 48, struct.pack("<Q", 1 << 40))  # offset far outside the chunk
    _refused_by_another_handle(store_mod, store, "entry")


def test_closed_store_raises(make_store):
    store = make_store()
    store.close()
    store.close()
    with pytest.raises(errors.StoreClosedError):
        store.put("k", b"", [])


def test_no_leftovers_after_destroy(make_store, tmp_path):
    store = make_store(ram_budget=MiB)
    store.put("ram", b"", [bytes(1000)])
    store.put("disk", b"", [bytes(2 * MiB)])
    assert len(leftovers(store.run_id, disk_root=str(tmp_path))) == 3
    store.destroy()
    assert leftovers(store.run_id, disk_root=str(tmp_path)) == []


def test_segment_modes(make_store):
    store = make_store(ram_budget=MiB)
    store.put("ram", b"", [bytes(1000)])
    store.put("disk", b"", [bytes(2 * MiB)])
    assert os.stat(os.path.join("/dev/shm", f"dcf-{store.run_id}")).st_mode & 0o777 == 0o600
    assert os.stat(store.chunk_path(0)).st_mode & 0o777 == 0o600
    assert os.stat(store.disk_dir).st_mode & 0o777 == 0o700
    for name in os.listdir(store.disk_dir):
        assert os.stat(os.path.join(store.disk_dir, name)).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("creator", BACKENDS)
@pytest.mark.parametrize("reader", BACKENDS)
def test_cross_backend_same_process(creator, reader, tmp_path, run_id):
    a = load_backend(creator).Store.create(run_id, ram_budget=8 * MiB, disk_root=str(tmp_path))
    try:
        b = load_backend(reader).Store.attach(run_id)
        data = pattern(3 * MiB)
        a.put("x", b"meta", [data, b"", b"z"])
        meta, views, _ = b.get("x")
        assert (meta, [bytes(v) for v in views]) == (b"meta", [data, b"", b"z"])
        b.put("y", b"back", [pattern(9 * MiB, 5)])  # over the budget: disk tier
        assert a.info("y")["tier"] == "disk"
        assert bytes(a.get("y")[1][0]) == pattern(9 * MiB, 5)
        b.put("x", b"v2", [b"short"])
        assert bytes(views[0]) == data
        assert a.get("x")[0] == b"v2"
        assert a.keys() == b.keys() == ["x", "y"]
        del views
        b.close()
        assert a.stats()["pins"] == 0 and a.stats()["slots_used"] == 1
    finally:
        a.destroy()
    assert leftovers(run_id, disk_root=str(tmp_path)) == []


@pytest.mark.parametrize("creator", BACKENDS)
@pytest.mark.parametrize("child", BACKENDS)
def test_spawned_process_attaches_reads_and_writes(creator, child, tmp_path, run_id):
    if "native" in (creator, child):
        load_backend("native")
    store = load_backend(creator).Store.create(run_id, ram_budget=64 * MiB, disk_root=str(tmp_path))
    try:
        data = pattern(5 * MiB)
        store.put("in", b"hello", [data])
        ctx = multiprocessing.get_context("spawn")
        parent, conn = ctx.Pipe()
        proc = ctx.Process(target=_attach_read_write, args=(child, run_id, "in", "out", pattern(MiB, 7), conn))
        proc.start()
        conn.close()
        meta, digest, tier = parent.recv()
        proc.join(60)
        assert proc.exitcode == 0
        assert (meta, digest, tier) == (b"hello", hashlib.sha256(data).hexdigest(), "ram")
        meta, views, _ = store.get("out")
        assert meta == b"from-child" and bytes(views[0]) == pattern(MiB, 7)
        assert store.stats()["slots_used"] == 1
    finally:
        store.destroy()


def _attach_read_write(*args):
    import _workers

    _workers.attach_read_write(*args)


def _park(child: str, run_id: str, action: str, killpoint: str | None):
    """Start a child that attaches and parks at a point; return it once it got there."""
    r, w = os.pipe()
    env = dict(os.environ)
    env.pop("DISCOMFORT_TEST_KILLPOINT", None)
    if killpoint:
        env["DISCOMFORT_TEST_KILLPOINT"] = killpoint
        env["DISCOMFORT_TEST_KILLPOINT_FD"] = str(w)
    proc = subprocess.Popen(
        [sys.executable, WORKERS, child, run_id, action, str(w)],
        env=env, pass_fds=(w,), stdin=subprocess.PIPE,
    )
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    assert ready, "the child never reached its parking point"
    assert os.read(r, 1) in (b"K", b"V")
    os.close(r)
    return proc


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdin.close()


@pytest.mark.parametrize("child", BACKENDS)
def test_sigkill_between_reserve_and_seal(store_mod, make_store, child):
    load_backend(child)
    store = make_store(ram_budget=64 * MiB)
    store.put("sealed", b"", [pattern(MiB)])
    proc = _park(child, store.run_id, "reserve", "after_reserve")
    assert store.stats()["reserved"] == 1 and not store.contains("half")
    _kill(proc)
    assert store.reclaim() >= 1
    stats = store.stats()
    assert stats["reserved"] == 0 and stats["slots_used"] == 1
    assert store.keys() == ["sealed"] and bytes(store.get("sealed")[1][0]) == pattern(MiB)


@pytest.mark.parametrize("child", BACKENDS)
def test_sigkill_while_holding_views(store_mod, make_store, child):
    load_backend(child)
    store = make_store(ram_budget=64 * MiB)
    store.put("big", b"", [pattern(8 * MiB)])
    proc = _park(child, store.run_id, "views", None)
    store.delete("big")
    assert store.stats()["pinned_bytes"] >= 8 * MiB
    _kill(proc)
    stats = store.stats()
    assert stats["pins"] == 0 and stats["pinned_bytes"] == 0 and stats["slots_used"] == 1


def test_threads_save_load_delete(make_store):
    store = make_store(ram_budget=64 * MiB)
    failures = []

    def work(t: int) -> None:
        try:
            for i in range(60):
                key = f"k{(t + i) % 5}"
                payload = struct.pack("<II", t, i) * (1 + (i % 3) * 20000)
                store.put(key, hashlib.sha256(payload).digest(), [payload])
                try:
                    meta, views, _ = store.get(key)
                    assert hashlib.sha256(bytes(views[0])).digest() == meta
                except errors.UnknownKeyError:
                    pass
                if i % 7 == 0:
                    store.delete(key)
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
    assert store.stats()["reserved"] == 0


def test_handle_is_not_usable_in_a_forked_child(make_store):
    store = make_store()
    store.put("k", b"", [b"1"])
    pid = os.fork()
    if pid == 0:
        try:
            store.get("k")
            code = 1
        except errors.StoreClosedError:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("k")[1][0] == b"1"


def test_put_accepts_multidimensional_buffers(make_store):
    store = make_store()
    arr = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    store.put("arr", b"", [arr])
    assert np.array_equal(np.frombuffer(store.get("arr")[1][0], dtype=np.float64).reshape(2, 3, 4), arr)
    with pytest.raises(ValueError):
        store.put("bad", b"", [arr[:, ::2]])


def test_address_helper():
    buf = bytearray(16)
    assert address(memoryview(buf)) == ctypes.addressof((ctypes.c_char * 16).from_buffer(buf))


def test_dropped_reservation_is_retired(make_store):
    store = make_store()
    store.reserve("ram", b"", [MiB])
    store.reserve("disk", b"", [1 << 30])  # past the budget: a disk file
    import gc

    gc.collect()
    stats = store.stats()
    assert stats["reserved"] == 0 and not store.contains("ram")
    assert os.listdir(store.disk_dir) == []


def test_close_retires_own_reservations(store_mod, make_store):
    store = make_store()
    other = store_mod.Store.attach(store.run_id)
    res = other.reserve("pending", b"", [MiB])
    other.close()
    res.abort()  # a no-op once the store is closed
    assert store.stats()["reserved"] == 0


# ---- a full object table, a full pin table, keys in messages ------------------------------------


def test_full_table_still_overwrites_existing_keys(make_store):
    store = make_store(ram_budget=64 * MiB, disk=False)
    n = 0
    with pytest.raises(errors.StoreFullError) as info:
        while True:
            store.put(f"k{n}", b"", [n.to_bytes(4, "little")])
            n += 1
    assert n == 3072  # 3/4 of the 4096 entries
    assert f"'k{n}'" in str(info.value) and store.run_id in str(info.value) and "object table full" in str(info.value)
    for round_ in range(3):  # every key, in place, several times (tombstones must not pile up)
        for i in range(0, n, 1 if round_ == 0 else 7):
            store.put(f"k{i}", b"", [(i + 1000 * (round_ + 1)).to_bytes(4, "little")])
    assert int.from_bytes(bytes(store.get("k5")[1][0]), "little") == 5 + 1000 and \
        int.from_bytes(bytes(store.get("k7")[1][0]), "little") == 7 + 3000
    with pytest.raises(errors.StoreFullError, match="'new'"):
        store.put("new", b"", [b"x"])  # new keys still keep the bound
    for i in range(100):
        assert store.delete(f"k{i}")
    for i in range(100):
        store.put(f"fresh{i}", b"", [b"f"])  # room again once keys go
    assert len(store.keys()) == n and store.stats()["reserved"] == 0


def test_a_full_pin_table_names_the_key(store_mod, make_store):
    from discomfort._pystore.format import PIN_CAP, PIN_OFF

    store = make_store(ram_budget=64 * MiB)
    store.put("big\nkey", b"", [b"b" * MiB])
    path = os.path.join(store.shm_dir, f"dcf-{store.run_id}")
    fd = os.open(path, os.O_RDWR)
    try:  # every pin in use by our own slot, on extents of no chunk (so nothing else changes)
        os.pwrite(fd, struct.pack("<IIQQQ", 1, store.slot, 100, 0, 4096) * PIN_CAP, PIN_OFF)
        with pytest.raises(errors.StoreFullError, match="pin table full") as info:
            store.get("big\nkey")
        assert repr("big\nkey") in str(info.value) and "\n" not in str(info.value)
    finally:
        os.pwrite(fd, bytes(32 * PIN_CAP), PIN_OFF)
        os.close(fd)
    assert bytes(store.get("big\nkey")[1][0][:1]) == b"b"


@pytest.mark.parametrize("key", ["a\nb", "tab\there", "q'uote", "both'\"", "bell\x07", "c1\x85", "nbsp\xa0x",
                                 "\u2028sep", "back\\slash", "é日本"])
def test_keys_are_shown_escaped_in_messages(make_store, key):
    store = make_store()
    with pytest.raises(errors.UnknownKeyError) as info:
        store.get(key)
    assert f"no object {key!r} in run" in str(info.value)
    with pytest.raises(errors.InvalidKeyError) as info:
        store.put(key + "\0tail", b"", [])
    assert repr(key + "\0tail") in str(info.value)  # shown in full, never cut at the NUL
