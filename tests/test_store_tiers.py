"""The RAM and disk tiers on every backend: spilling when the budget is spent, small disk objects
copied, no disk tier, a memory probe that refuses growth, a failed fallocate."""

from __future__ import annotations

import os

import pytest

from _helpers import leftovers, run_child
from _helpers import stripes as pattern
from discomfort import errors

pytest.importorskip("numpy")

MiB = 1 << 20
GiB = 1 << 30


def test_spill_to_disk_when_budget_is_exhausted(store_mod, run_id, disk_root):
    s = store_mod.Store.create(run_id, ram_budget=MiB, disk_root=disk_root)
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
    assert leftovers(run_id) == [] and not os.path.exists(os.path.join(disk_root, f"dcf-{run_id}"))


def test_small_disk_object_is_copied(store_mod, run_id, disk_root):
    s = store_mod.Store.create(run_id, ram_budget=0, disk_root=disk_root)
    try:
        s.put("d", b"meta", [b"abc"])
        meta, views, info = s.get("d")
        assert (meta, bytes(views[0]), info["tier"], info["zero_copy"]) == (b"meta", b"abc", "disk", False)
    finally:
        s.destroy()


def test_no_disk_tier_means_store_full(store_mod, run_id):
    s = store_mod.Store.create(run_id, ram_budget=MiB)
    try:
        s.put("fits", b"", [pattern(500_000)])
        with pytest.raises(errors.StoreFullError):
            s.put("too-big", b"", [pattern(2 * MiB)])
        assert s.stats()["reserved"] == 0 and s.disk_dir is None
    finally:
        s.destroy()


def test_memory_probe_refuses_growth(store_mod, run_id, disk_root, tmp_path):
    probe = tmp_path / "meminfo"
    probe.write_text("MemTotal:       16000000 kB\nMemFree:  10 kB\nMemAvailable:      1000 kB\n")
    s = store_mod.Store.create(run_id, ram_budget=GiB, disk_root=disk_root, mem_probe=str(probe))
    try:
        s.put("k", b"", [pattern(1000)])
        assert s.info("k")["tier"] == "disk" and s.stats()["chunks"] == 0
    finally:
        s.destroy()


def test_failed_fallocate_falls_back_to_disk(store_mod, backend, run_id, disk_root):
    # RLIMIT_FSIZE makes posix_fallocate fail (EFBIG) the way a full /dev/shm does (ENOSPC).
    child = run_child(f"""
        import resource, signal
        from discomfort import _backend
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))
        s = _backend.load({backend!r}).Store.create({run_id!r}, ram_budget=1 << 30, disk_root={disk_root!r})
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
    assert leftovers(run_id) == []
