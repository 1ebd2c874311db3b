"""Errors of the store on every backend: bad keys and run ids, closed and foreign handles, a full
object table, and damaged control segments, entries, extents and chunks (an error naming the
damage, never a crash)."""

from __future__ import annotations

import os
import struct
import uuid

import pytest

from _helpers import CONTROL_SIZE, ENTRY, OBJ_OFF, control_path, entry_index, fnv1a64, patch_control, read_header_u32
from _helpers import stripes as pattern
from discomfort import errors

pytest.importorskip("numpy")

MiB = 1 << 20


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
def test_invalid_run_ids(store_mod, bad):
    with pytest.raises(errors.InvalidRunIdError):
        store_mod.Store.create(bad, ram_budget=MiB)
    with pytest.raises(errors.InvalidRunIdError):
        store_mod.Store.attach(bad)


def test_unknown_run_and_key(store, store_mod, run_id):
    missing = "nope-" + uuid.uuid4().hex[:8]
    with pytest.raises(errors.UnknownRunError, match=missing):
        store_mod.Store.attach(missing)
    with pytest.raises(errors.UnknownKeyError) as exc:
        store.get("absent")
    assert "absent" in str(exc.value) and run_id in str(exc.value)
    assert isinstance(exc.value, KeyError)
    with pytest.raises(errors.UnknownKeyError):
        store.info("absent")


def test_create_twice_and_bad_budget(store, store_mod, run_id):
    with pytest.raises(FileExistsError):
        store_mod.Store.create(run_id, ram_budget=MiB)
    with pytest.raises(ValueError):
        store_mod.Store.create("other-" + uuid.uuid4().hex[:8], ram_budget=-1)


def test_closed_handle(store, store_mod, run_id):
    other = store_mod.Store.attach(run_id)
    other.close()
    other.close()  # twice is fine
    for call in (lambda: other.get("k"), lambda: other.put("k", b"", []), other.keys, other.stats,
                 lambda: other.reserve("k", b"", [1]), other.reclaim, other.mark_finished):
        with pytest.raises(errors.StoreClosedError):
            call()


def test_only_the_owner_destroys(store, store_mod, run_id):
    other = store_mod.Store.attach(run_id)
    assert not other.owner
    with pytest.raises(errors.StoreAccessError):
        other.destroy()
    other.close()
    assert other.finished  # a released handle can no longer tell


def test_finished_run(store, store_mod, run_id):
    store.mark_finished()
    assert store.finished
    with pytest.raises(errors.RunFinishedError):
        store_mod.Store.attach(run_id)


def test_table_full(store_mod, run_id):
    s = store_mod.Store.create(run_id, ram_budget=64 * MiB)
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
def test_foreign_segment_is_refused(store, store_mod, run_id):
    os.chown(control_path(run_id), 12345, -1)
    try:
        with pytest.raises(errors.StoreAccessError):
            store_mod.Store.attach(run_id)
    finally:
        os.chown(control_path(run_id), os.geteuid(), -1)


# ---- corruption --------------------------------------------------------------------------------


def write_fake_control(run_id: str, data: bytes) -> None:
    fd = os.open(control_path(run_id), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def valid_header_bytes(store_mod, run_id: str) -> bytearray:
    s = store_mod.Store.create(run_id, ram_budget=MiB)
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
def test_corrupted_header(store_mod, run_id, damage, match):
    data = valid_header_bytes(store_mod, run_id)
    damage(data)
    write_fake_control(run_id, bytes(data))
    with pytest.raises(errors.CorruptedStoreError, match=match):
        store_mod.Store.attach(run_id)
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


def test_truncated_chunk(store, store_mod, run_id):
    store.put("k", b"", [pattern(MiB)])
    other = store_mod.Store.attach(run_id)  # has not opened the chunk yet
    os.truncate(store.chunk_path(0), 4096)
    with pytest.raises(errors.CorruptedStoreError, match="chunk 0"):
        other.get("k")
    other.close()
