"""Tests of the compiled store core, discomfort._core, and of its interplay with discomfort._pystore.

Run: PYTHONPATH=python .venv/bin/python -m pytest tests/test_core_native.py
"""

from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from discomfort import errors

core = pytest.importorskip("discomfort._core")
try:
    from discomfort import _pystore as pystore
except ImportError:  # the Python twin is optional for these tests
    pystore = None

np = pytest.importorskip("numpy")

SHM = "/dev/shm"
MiB = 1 << 20
GiB = 1 << 30
CONTROL_SIZE = 1454080
OBJ_OFF = 12288
ENTRY = 320

needs_pystore = pytest.mark.skipif(pystore is None, reason="discomfort._pystore is not available")
BACKENDS = [pytest.param(core, id="native")] + ([pytest.param(pystore, id="python")] if pystore else [])


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def run_files(run_id: str) -> list[str]:
    prefix = f"dcf-{run_id}"
    return [n for n in os.listdir(SHM) if n == prefix or n.startswith(prefix + ".")]


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


@pytest.fixture
def run_id():
    rid = "test-" + uuid.uuid4().hex[:16]
    yield rid
    leftovers = run_files(rid)
    for name in leftovers:  # do not let a failed test leak shared memory
        os.unlink(os.path.join(SHM, name))


@pytest.fixture
def disk_root(tmp_path):
    return str(tmp_path / "disk")


@pytest.fixture
def store(run_id, disk_root):
    s = core.Store.create(run_id, ram_budget=256 * MiB, disk_root=disk_root)
    yield s
    s.destroy()
    assert run_files(run_id) == []


def pattern(n: int, seed: int = 0) -> bytes:
    return (np.arange(n, dtype=np.uint64) * 2654435761 + seed).astype(np.uint8).tobytes()


# ---- module ------------------------------------------------------------------------------------


def test_module_constants():
    assert core.FORMAT_VERSION == 2
    assert core.SMALL_OBJECT_BYTES == 65536
    assert core.COPY_LOAD_BYTES == pystore.COPY_LOAD_BYTES == 128 << 10  # both backends copy the same loads
    assert isinstance(core.__version__, str) and core.__version__


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
def test_round_trip_sizes(store, size):
    data = pattern(size, size)
    version = store.put("k", b"meta:" + str(size).encode(), [data])
    meta, views, info = store.get("k")
    assert meta == b"meta:" + str(size).encode()
    assert len(views) == 1 and views[0] == data
    assert info == {"version": version, "tier": "ram", "zero_copy": store.info("k")["size"] >= core.COPY_LOAD_BYTES}
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


def test_round_trip_200_mib(run_id):
    s = core.Store.create(run_id, ram_budget=512 * MiB)
    try:
        src = np.arange(200 * MiB, dtype=np.uint8)
        s.put("big", b"", [src])
        _, views, info = s.get("big")
        assert info["tier"] == "ram" and info["zero_copy"]
        assert np.array_equal(np.frombuffer(views[0], dtype=np.uint8), src)
        assert s.stats()["ram_capacity"] <= 512 * MiB
    finally:
        s.destroy()
    assert run_files(run_id) == []


@pytest.mark.parametrize("size, misalign", [(4 * MiB, 0), (8 * MiB + 13, 3), (33 * MiB + 7, 5), (64 * MiB + 1, 1)])
def test_large_copies_stream_and_split(run_id, size, misalign):
    """From 4 MiB put streams (non-temporal stores), from 32 MiB it shares blocks with a helper
    thread: odd sizes and a source that is not aligned must arrive intact, also from threads."""
    s = core.Store.create(run_id, ram_budget=512 * MiB)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocation_follows_other_handles(run_id, backend):
    """Each handle caches what it derives from the tables; another handle's update (another
    epoch) makes it rescan, so allocations never overlap and freed space is found again."""
    s = backend.Store.create(run_id, ram_budget=256 * MiB)
    others = [core.Store.attach(run_id)] + ([pystore.Store.attach(run_id)] if pystore else [])
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


def test_dropped_reservation_is_aborted(store):
    store.reserve("dropped", b"", [100_000])
    gc.collect()
    assert store.stats()["reserved"] == 0
    assert not store.contains("dropped")


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


def test_views_survive_close_and_destroy(run_id, disk_root):
    s = core.Store.create(run_id, ram_budget=4 * MiB, disk_root=disk_root)
    s.put("ram", b"", [pattern(MiB, 1)])
    s.put("disk", b"", [pattern(8 * MiB, 2)])  # larger than the budget
    s.put("small", b"", [b"tiny"])
    assert s.info("disk")["tier"] == "disk"
    views = {k: s.get(k)[1][0] for k in ("ram", "disk", "small")}
    s.destroy()
    assert s.closed and s.finished
    assert run_files(run_id) == [] and not os.path.exists(os.path.join(disk_root, f"dcf-{run_id}"))
    assert views["ram"] == pattern(MiB, 1)
    assert views["disk"] == pattern(8 * MiB, 2)
    assert bytes(views["small"]) == b"tiny"
    views["ram"][:2] = b"ok"
    with pytest.raises(errors.StoreClosedError):
        s.get("ram")
    del views
    gc.collect()


def test_close_keeps_slot_until_last_view(store, run_id):
    store.put("k", b"", [pattern(MiB)])
    other = core.Store.attach(run_id)
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


# ---- tiers -------------------------------------------------------------------------------------


def test_spill_to_disk_when_budget_is_exhausted(run_id, disk_root):
    s = core.Store.create(run_id, ram_budget=MiB, disk_root=disk_root)
    try:
        s.put("a", b"", [pattern(600_000, 1)])
        s.put("b", b"", [pattern(600_000, 2)])
        assert s.info("a")["tier"] == "ram" and s.info("a")["chunk"] == 0
        info = s.info("b")
        assert info["tier"] == "disk" and info["chunk"] is None and info["offset"] == 0
        meta, views, ginfo = s.get("b")
        assert views[0] == pattern(600_000, 2) and ginfo["tier"] == "disk" and ginfo["zero_copy"]
        files = os.listdir(s.disk_dir)
        assert len(files) == 1 and files[0].endswith(".obj") and len(files[0]) == 20
        s.put("b", b"", [pattern(700_000, 3)])  # overwrite: a view maps the old file, so a new one
        now = os.listdir(s.disk_dir)
        assert len(now) == 2 and files[0] in now  # the old one is kept (retired) for a later save
        assert views[0] == pattern(600_000, 2)  # the old private mapping stays intact
        s.put("tiny", b"", [b"t" * 10])  # fits in RAM still
        assert s.info("tiny")["tier"] == "ram"
        s.delete("b")
        assert len(os.listdir(s.disk_dir)) == 2  # both retired; no object of the run is on disk
        st = s.stats()
        assert st["objects_disk"] == 0 and st["objects_ram"] == 2 and st["ram_capacity"] == MiB
    finally:
        s.destroy()
    assert run_files(run_id) == [] and not os.path.exists(os.path.join(disk_root, f"dcf-{run_id}"))


def test_small_disk_object_is_copied(run_id, disk_root):
    s = core.Store.create(run_id, ram_budget=0, disk_root=disk_root)
    try:
        s.put("d", b"meta", [b"abc"])
        meta, views, info = s.get("d")
        assert (meta, bytes(views[0]), info["tier"], info["zero_copy"]) == (b"meta", b"abc", "disk", False)
    finally:
        s.destroy()


def test_no_disk_tier_means_store_full(run_id):
    s = core.Store.create(run_id, ram_budget=MiB)
    try:
        s.put("fits", b"", [pattern(500_000)])
        with pytest.raises(errors.StoreFullError):
            s.put("too-big", b"", [pattern(2 * MiB)])
        assert s.stats()["reserved"] == 0 and s.disk_dir is None
    finally:
        s.destroy()


def test_memory_probe_refuses_growth(run_id, disk_root, tmp_path):
    probe = tmp_path / "meminfo"
    probe.write_text("MemTotal:       16000000 kB\nMemFree:  10 kB\nMemAvailable:      1000 kB\n")
    s = core.Store.create(run_id, ram_budget=GiB, disk_root=disk_root, mem_probe=str(probe))
    try:
        s.put("k", b"", [pattern(1000)])
        assert s.info("k")["tier"] == "disk" and s.stats()["chunks"] == 0
    finally:
        s.destroy()



def run_child(code: str, env: dict | None = None, pass_fds=()) -> subprocess.Popen:
    full_env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(errors.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join([package_root, full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full_env, pass_fds=pass_fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_failed_fallocate_falls_back_to_disk(run_id, disk_root):
    # RLIMIT_FSIZE makes posix_fallocate fail (EFBIG) the way a full /dev/shm does (ENOSPC).
    child = run_child(f"""
        import resource, signal
        from discomfort import _core
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))
        s = _core.Store.create({run_id!r}, ram_budget=1 << 30, disk_root={disk_root!r})
        s.put("a", b"", [bytes(20 << 20)])
        print(s.info("a")["tier"], s.stats()["chunks"])
        try:
            s.put("b", b"", [bytes(40 << 20)])
        except OSError as exc:
            print(type(exc).__name__, s.stats()["reserved"], len(__import__("os").listdir(s.disk_dir)))
        s.destroy()
    """)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.split() == ["disk", "0", "OSError", "0", "1"]
    assert run_files(run_id) == []


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "a\0b", "x" * 256, "é" * 128, 5, None, b"bytes"])
def test_invalid_keys(store, key):
    with pytest.raises(errors.InvalidKeyError):
        store.put(key, b"", [])
    with pytest.raises(errors.InvalidKeyError):
        store.get(key)
    with pytest.raises(errors.InvalidKeyError):
        store.contains(key)


def test_longest_keys(store):
    for key in ("x" * 255, "é" * 127 + "x", "日本語"):
        store.put(key, b"", [b"1"])
        assert store.keys().count(key) == 1 and bytes(store.get(key)[1][0]) == b"1"


@pytest.mark.parametrize("bad", ["", "a" * 65, "a/b", "a.b", "ü", "a b", 7, None])
def test_invalid_run_ids(bad):
    with pytest.raises(errors.InvalidRunIdError):
        core.Store.create(bad, ram_budget=MiB)
    with pytest.raises(errors.InvalidRunIdError):
        core.Store.attach(bad)


def test_unknown_run_and_key(store, run_id):
    missing = "nope-" + uuid.uuid4().hex[:8]
    with pytest.raises(errors.UnknownRunError, match=missing):
        core.Store.attach(missing)
    with pytest.raises(errors.UnknownKeyError) as exc:
        store.get("absent")
    assert "absent" in str(exc.value) and run_id in str(exc.value)
    assert isinstance(exc.value, KeyError)
    with pytest.raises(errors.UnknownKeyError):
        store.info("absent")


def test_create_twice_and_bad_budget(store, run_id):
    with pytest.raises(FileExistsError):
        core.Store.create(run_id, ram_budget=MiB)
    with pytest.raises(ValueError):
        core.Store.create("other-" + uuid.uuid4().hex[:8], ram_budget=-1)


def test_closed_handle(store, run_id):
    other = core.Store.attach(run_id)
    other.close()
    other.close()  # twice is fine
    for call in (lambda: other.get("k"), lambda: other.put("k", b"", []), other.keys, other.stats,
                 lambda: other.reserve("k", b"", [1]), other.reclaim, other.mark_finished):
        with pytest.raises(errors.StoreClosedError):
            call()


def test_only_the_owner_destroys(store, run_id):
    other = core.Store.attach(run_id)
    assert not other.owner
    with pytest.raises(errors.StoreAccessError):
        other.destroy()
    other.close()
    assert other.finished  # a released handle can no longer tell


def test_finished_run(store, run_id):
    store.mark_finished()
    assert store.finished
    with pytest.raises(errors.RunFinishedError):
        core.Store.attach(run_id)


def test_context_manager_destroys_for_owner(run_id):
    with core.Store.create(run_id, ram_budget=MiB) as s:
        s.put("k", b"", [b"v"])
        with core.Store.attach(run_id) as a:
            assert a.keys() == ["k"]
        assert a.closed and not s.closed
    assert s.closed and run_files(run_id) == []


def test_table_full(run_id):
    s = core.Store.create(run_id, ram_budget=64 * MiB)
    try:
        for i in range(3072):
            s.put(f"k{i}", b"", [])
        with pytest.raises(errors.StoreFullError):
            s.put("one-too-many", b"", [])
        # A deleted key leaves a TOMBSTONE on its own probe path: the key fits there again.
        assert s.delete("k0")
        s.put("k0", b"", [b"back"])
        assert len(s.keys()) == 3072 and bytes(s.get("k0")[1][0]) == b"back"
    finally:
        s.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the segment to another uid")
def test_foreign_segment_is_refused(store, run_id):
    os.chown(control_path(run_id), 12345, -1)
    try:
        with pytest.raises(errors.StoreAccessError):
            core.Store.attach(run_id)
    finally:
        os.chown(control_path(run_id), os.geteuid(), -1)


# ---- corruption --------------------------------------------------------------------------------


def write_fake_control(run_id: str, data: bytes) -> None:
    fd = os.open(control_path(run_id), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def valid_header_bytes(run_id: str) -> bytearray:
    s = core.Store.create(run_id, ram_budget=MiB)
    with open(control_path(run_id), "rb") as fh:
        data = bytearray(fh.read())
    s.destroy()
    return data


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d.__setitem__(slice(0, 8), b"NOTASTOR"), "not a discomfort store"),
        (lambda d: d.__setitem__(slice(8, 12), struct.pack("<I", 3)), "version 3"),
        (lambda d: d.__setitem__(slice(72, 76), struct.pack("<I", 8192)), "table_capacity"),
        (lambda d: d.__setitem__(slice(104, 112), struct.pack("<Q", 5)), "pin_table_off"),
        (lambda d: d.__setitem__(slice(176, 180), struct.pack("<I", 5000)), "disk directory"),
        (lambda d: d.__setitem__(slice(112, 116), b"zzzz"), "names run"),
        (lambda d: d.__delitem__(slice(CONTROL_SIZE - 4096, None)), "bytes"),
        (lambda d: d.__delitem__(slice(100, None)), "truncated"),
    ],
)
def test_corrupted_header(run_id, damage, match):
    data = valid_header_bytes(run_id)
    damage(data)
    write_fake_control(run_id, bytes(data))
    with pytest.raises(errors.CorruptedStoreError, match=match):
        core.Store.attach(run_id)
    os.unlink(control_path(run_id))


def test_corrupted_entry(store, run_id):
    store.put("k", b"", [pattern(MiB)])
    store.put("fine", b"", [b"ok"])
    i = entry_index(run_id, "k")
    base = OBJ_OFF + i * ENTRY
    patch_control(run_id, base + 56, struct.pack("<Q", 1 << 50))  # length far past the chunk
    with pytest.raises(errors.CorruptedStoreError, match=f"entry {i}"):
        store.get("k")
    with pytest.raises(errors.CorruptedStoreError):
        store.put("new", b"", [b"x"])  # allocation will not trust it either
    patch_control(run_id, base + 56, struct.pack("<Q", 4096 * 257))
    patch_control(run_id, base + 16, struct.pack("<Q", 12345))  # key hash mismatch: entry looks foreign
    with pytest.raises(errors.UnknownKeyError):
        store.get("k")
    patch_control(run_id, base + 16, struct.pack("<Q", fnv1a64(b"k")))
    patch_control(run_id, base + 4, struct.pack("<I", 7))  # bad tier
    with pytest.raises(errors.CorruptedStoreError, match="tier"):
        store.info("k")
    # A dirty flag makes the next locker repair: the bad entry is dropped, the rest stays.
    patch_control(run_id, 28, struct.pack("<I", 1))
    assert store.keys() == ["fine"]
    assert read_header_u32(run_id, 28) == 0
    store.put("k", b"", [b"back"])
    assert bytes(store.get("k")[1][0]) == b"back"


def test_corrupted_extent_directory(store, run_id):
    store.put("k", b"meta", [pattern(100_000)])
    info = store.info("k")
    chunk_fd = os.open(store.chunk_path(info["chunk"]), os.O_RDWR)
    try:
        off = info["offset"]
        os.pwrite(chunk_fd, struct.pack("<QQ", 4096, 1 << 40), off + 32)  # buffer 0 past the end
        with pytest.raises(errors.CorruptedStoreError, match="buffer 0"):
            store.get("k")
        os.pwrite(chunk_fd, struct.pack("<I", 70000), off + 4)  # nbuf too large
        with pytest.raises(errors.CorruptedStoreError, match="buffer count"):
            store.get("k")
        with pytest.raises(errors.CorruptedStoreError):
            store.info("k")
        os.pwrite(chunk_fd, b"\0\0\0\0", off)  # magic gone
        with pytest.raises(errors.CorruptedStoreError, match="magic"):
            store.get("k")
    finally:
        os.close(chunk_fd)
    assert store.stats()["pins"] == 0  # failed gets keep no pin


def test_truncated_chunk(store, run_id):
    store.put("k", b"", [pattern(MiB)])
    other = core.Store.attach(run_id)  # has not opened the chunk yet
    os.truncate(store.chunk_path(0), 4096)
    with pytest.raises(errors.CorruptedStoreError, match="chunk 0"):
        other.get("k")
    other.close()


# ---- other processes ---------------------------------------------------------------------------


def _spawned_child(run_id: str) -> None:
    from discomfort import _core

    s = _core.Store.attach(run_id)
    meta, views, info = s.get("from-parent")
    assert meta == b"parent" and views[0] == pattern(MiB, 5) and info["tier"] == "ram"
    s.put("from-child", b"child", [pattern(3 * MiB, 6), b"tail"])
    del views
    s.close()


def test_spawned_process_reads_and_writes(store, run_id):
    store.put("from-parent", b"parent", [pattern(MiB, 5)])
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_spawned_child, args=(run_id,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    meta, views, _ = store.get("from-child")
    assert meta == b"child" and views[0] == pattern(3 * MiB, 6) and bytes(views[1]) == b"tail"
    st = store.stats()
    assert st["slots_used"] == 1 and st["pins"] == 1 and st["reserved"] == 0


def park_child(backend: str, run_id: str, body: str, killpoint: str | None = None):
    """Start a child that attaches and runs `body`; return it once it reports parked ('K')."""
    r, w = os.pipe()
    env = {"DISCOMFORT_TEST_KILLPOINT_FD": str(w)}
    if killpoint:
        env["DISCOMFORT_TEST_KILLPOINT"] = killpoint
    child = run_child(f"""
        import os, signal
        from discomfort import {backend} as m
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


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    child.stderr.close()


def child_backends():
    names = ["_core"] + (["_pystore"] if pystore else [])
    return [pytest.param(n, id=n.strip("_")) for n in names]


@pytest.mark.parametrize("backend", child_backends())
def test_kill_holding_the_lock_is_repaired(store, run_id, backend):
    store.put("keep", b"", [pattern(MiB)])
    epoch = store.stats()["epoch"]
    child = park_child(backend, run_id, 's.put("lost", b"", [b"x" * 100_000])', killpoint="after_lock")
    assert read_header_u32(run_id, 28) == 1  # dirty, lock held
    kill(child)
    st = store.stats()  # waits for the lock, finds dirty, repairs, reclaims the dead slot
    assert read_header_u32(run_id, 28) == 0
    assert st["epoch"] > epoch and st["slots_used"] == 1 and st["reserved"] == 0
    assert store.keys() == ["keep"] and store.get("keep")[1][0] == pattern(MiB)
    store.put("after", b"", [b"ok"])


@pytest.mark.parametrize("backend", child_backends())
def test_kill_between_reserve_and_seal_is_reclaimed(store, run_id, disk_root, backend):
    body = 's.put("ram-lost", b"", [b"x" * 200_000])'
    child = park_child(backend, run_id, body, killpoint="after_reserve")
    assert store.stats()["reserved"] == 1
    kill(child)
    assert store.reclaim() >= 1
    st = store.stats()
    assert st["reserved"] == 0 and st["slots_used"] == 1 and store.keys() == []
    # The space of the dead reservation is free again: the next object lands at offset 0.
    store.put("new", b"", [b"y" * 200_000])
    assert store.info("new")["offset"] == 0


def test_kill_between_reserve_and_seal_on_disk(run_id, disk_root):
    s = core.Store.create(run_id, ram_budget=0, disk_root=disk_root)
    try:
        child = park_child("_core", run_id, 's.put("disk-lost", b"", [b"x" * 100])', killpoint="after_reserve")
        assert len(os.listdir(s.disk_dir)) == 1
        kill(child)
        assert s.reclaim() == 1
        assert os.listdir(s.disk_dir) == [] and s.stats()["reserved"] == 0
    finally:
        s.destroy()


@pytest.mark.parametrize("backend", child_backends())
def test_kill_holding_views_frees_pins(store, run_id, backend):
    store.put("k", b"", [pattern(MiB)])
    child = park_child(backend, run_id, 'views = s.get("k")[1]')
    st = store.stats()
    assert st["pins"] == 1 and st["slots_used"] == 2
    store.put("k", b"", [pattern(MiB, 1)])  # the pinned extent is skipped
    assert store.info("k")["offset"] > 0
    kill(child)
    assert store.reclaim() == 1
    st = store.stats()
    assert st["pins"] == 0 and st["slots_used"] == 1
    # The dead slot is taken again by the next attacher.
    again = core.Store.attach(run_id)
    assert again.slot == 1
    again.close()


@pytest.mark.parametrize("backend", child_backends())
def test_forked_child_lets_go_of_the_parents_locks(store, run_id, backend):
    sync_r, sync_w = os.pipe()
    hold_r, hold_w = os.pipe()  # the forked grandchild lives until we close hold_w
    child = run_child(f"""
        import os, signal
        from discomfort import {backend} as m, errors
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
            assert chunk, child.stderr.read()
            got += chunk
        assert sorted(got) == sorted(b"CK")
        assert store.stats()["slots_used"] == 2
        kill(child)
        # The grandchild still runs but holds nothing of its parent's: the slot reads as dead.
        assert store.stats()["slots_used"] == 1
    finally:
        os.close(hold_w)
        os.close(sync_r)


# ---- both backends -----------------------------------------------------------------------------


@needs_pystore
@pytest.mark.parametrize("killpoint", ["after_lock", "after_reserve"])
def test_python_parent_recovers_from_native_child(run_id, killpoint):
    s = pystore.Store.create(run_id, ram_budget=64 * MiB)
    try:
        s.put("keep", b"", [pattern(MiB)])
        child = park_child("_core", run_id, 's.put("lost", b"", [b"x" * 300_000])', killpoint=killpoint)
        kill(child)
        s.reclaim()
        st = s.stats()
        assert st["reserved"] == 0 and st["slots_used"] == 1 and read_header_u32(run_id, 28) == 0
        assert s.keys() == ["keep"] and s.get("keep")[1][0] == pattern(MiB)
        s.put("after", b"", [b"x" * 300_000])  # lands where the dead reservation was
        assert s.info("after")["offset"] == s.info("keep")["size"]
    finally:
        s.destroy()
    assert run_files(run_id) == []


@needs_pystore
@pytest.mark.parametrize("creator, attacher", [(core, pystore), (pystore, core)], ids=["native-python", "python-native"])
def test_backends_interoperate(run_id, disk_root, creator, attacher):
    s = creator.Store.create(run_id, ram_budget=2 * MiB, disk_root=disk_root)
    try:
        s.put("small", b"m1", [b"abc", b""])
        s.put("big", b"m2", [pattern(300_000, 1), pattern(70_000, 2)])
        s.put("disk", b"m3", [pattern(3 * MiB, 3)])
        a = attacher.Store.attach(run_id)
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
    assert run_files(run_id) == []


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


@needs_pystore
def test_backends_write_identical_segments(run_id, tmp_path):
    native = _snapshot(core, run_id, str(tmp_path / "d"))
    python = _snapshot(pystore, run_id, str(tmp_path / "d"))
    assert native[1] == python[1]
    if native[0] != python[0]:
        diff = [i for i in range(CONTROL_SIZE) if native[0][i] != python[0][i]]
        pytest.fail(f"control segments differ at bytes {diff[:16]}")


def test_error_classes_are_looked_up_when_the_core_loads():
    """A class of discomfort.errors the core raises, renamed or gone: the import fails, naming it."""
    code = """
        import discomfort.errors  # the Python backend is chosen: the core is not loaded yet
        del discomfort.errors.DiskFullError
        import discomfort._core
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**env, "DISCOMFORT_BACKEND": "python"}, timeout=120)
    assert out.returncode != 0 and "DiskFullError" in out.stderr, out.stderr
    assert core.BACKEND == "native" and core.Store.backend == "native"
