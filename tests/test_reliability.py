"""Faults survived and bad input refused: full disks, full /dev/shm, memory pressure, damaged
segments (a seeded fuzzer), concurrent shutdown, and another user's runs."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from _helpers import leftovers, load_backend
from _workers import as_user
from discomfort import errors

MiB = 1 << 20
HERE = os.path.dirname(__file__)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of a few MiB, so ENOSPC is the kernel's, not a mock's."""
    mounted = []

    def mount(size: str) -> str:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_is_a_clear_error_and_loses_nothing(store_mod, small_tmpfs, run_id):
    disk = small_tmpfs("4m")
    store = store_mod.Store.create(run_id, ram_budget=MiB, disk_root=disk)
    try:
        store.put("kept", b"k", [b"x" * 2 * MiB])  # over the RAM budget: on disk
        assert store.info("kept")["tier"] == "disk"
        with pytest.raises(errors.DiskFullError, match="full") as info:
            store.put("kept", b"new", [b"y" * 3 * MiB])
        assert info.value.errno == 28
        assert store.keys() == ["kept"] and store.get("kept")[0] == b"k"
        assert bytes(store.get("kept")[1][0][:3]) == b"xxx"
        stats = store.stats()
        assert stats["reserved"] == 0 and stats["objects_disk"] == 1
        assert len(os.listdir(store.disk_dir)) == 1
    finally:
        store.destroy()
    assert leftovers(run_id, disk_root=disk) == []


def test_full_dev_shm_falls_back_to_disk(store_mod, small_tmpfs, run_id, tmp_path):
    shm = small_tmpfs("3m")  # room for the control segment, not for a 64 MiB chunk
    store = store_mod.Store.create(run_id, ram_budget=256 * MiB, disk_root=str(tmp_path), shm_dir=shm)
    try:
        payload = os.urandom(5 * MiB)
        store.put("v", b"", [payload])
        assert store.info("v")["tier"] == "disk"
        assert bytes(store.get("v")[1][0]) == payload
        assert store.stats()["chunks"] == 0
        assert sorted(os.listdir(shm)) == [f"dcf-{run_id}"]
    finally:
        store.destroy()
    assert leftovers(run_id, shm, str(tmp_path)) == []


def test_memory_pressure_stops_ram_growth(store_mod, run_id, tmp_path):
    probe = tmp_path / "meminfo"
    probe.write_text("MemTotal: 16000000 kB\nMemAvailable: 200000 kB\n")  # 200 MB left
    store = store_mod.Store.create(run_id, ram_budget=512 * MiB, disk_root=str(tmp_path), mem_probe=str(probe))
    try:
        store.put("a", b"", [b"a" * MiB])
        assert store.info("a")["tier"] == "disk" and store.stats()["chunks"] == 0
        probe.write_text("MemTotal: 16000000 kB\nMemAvailable: 12000000 kB\n")
        store.put("b", b"", [b"b" * MiB])
        assert store.info("b")["tier"] == "ram" and store.stats()["chunks"] == 1
        assert bytes(store.get("a")[1][0]) == b"a" * MiB
    finally:
        store.destroy()


def test_concurrent_shutdown_gives_errors_not_crashes(backend, tmp_path):
    load_backend(backend)
    code = f"""
import threading, torch
from discomfort import errors
from discomfort.context import WorkflowContext
ctx = WorkflowContext(backend={backend!r}, ram_budget=64 << 20, disk_dir={str(tmp_path)!r})
seen, start = [], threading.Barrier(5)
def work(i):
    start.wait()
    for n in range(400):
        try:
            ctx.save(f"k{{i}}", torch.full((256, 256), float(n)))
            ctx.load(f"k{{i}}")
        except errors.DiscomfortError as exc:
            seen.append(type(exc).__name__)
            return
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads: t.start()
start.wait()
ctx.shutdown()
for t in threads: t.join()
print("errors", sorted(set(seen)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "errors" in out.stdout


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_segments_never_crash(store_mod, backend, make_store, seed):
    store = make_store(ram_budget=2 * MiB)
    store.put("small", b"s", [b"1" * 100])
    store.put("large", b"l", [os.urandom(MiB), b"tail"])
    store.put("disk", b"d", [os.urandom(3 * MiB)])
    store.put("many", b"m", [b"a", b"", os.urandom(70000), b"b" * 65536])
    cases = int(os.environ.get("DISCOMFORT_FUZZ_CASES", "150"))
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "_fuzz_worker.py"), backend, store.run_id, str(seed), str(cases)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, f"fuzz worker died (rc {out.returncode}): {out.stderr[-3000:]}"
    words = out.stdout.split()
    assert words[0] == "ok" and int(words[1]) + int(words[3]) == cases
    assert int(words[3]) > 0, "no damaged segment was refused: the fuzzer is not reaching the checks"
    # the source run is untouched by what was done to its copies
    assert store.get("small")[0] == b"s" and store.stats()["objects_disk"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_another_user_cannot_attach(store_mod, make_store):
    store = make_store()
    store.put("secret", b"", [b"s" * 10])

    def attach():
        store_mod.Store.attach(store.run_id)
        return "attached"

    out = as_user(65534, attach)
    assert out.startswith("raised StoreAccessError"), out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_runs_of_another_user_are_refused(store_mod):
    run_id = "n" + secrets.token_hex(10)

    def create():
        s = store_mod.Store.create(run_id, ram_budget=1 << 20)
        s.put("k", b"", [b"payload"])
        s.close()
        return "made"

    try:
        out = as_user(65534, create)
        assert out == "made", out
        assert os.stat(f"/dev/shm/dcf-{run_id}").st_uid == 65534
        with pytest.raises(errors.StoreAccessError, match="uid 65534"):
            store_mod.Store.attach(run_id)
    finally:
        for name in os.listdir("/dev/shm"):
            if name == f"dcf-{run_id}" or name.startswith(f"dcf-{run_id}."):
                os.unlink(f"/dev/shm/{name}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_sweep_leaves_other_users_runs_alone(tmp_path):
    from discomfort._pystore import Store
    from discomfort._sweep import sweep

    run_id = "o" + secrets.token_hex(10)
    store = Store.create(run_id, ram_budget=MiB)
    store.close()  # stale: nobody holds it
    os.chown(f"/dev/shm/dcf-{run_id}", 65534, 65534)
    try:
        assert run_id not in sweep()
        assert os.path.exists(f"/dev/shm/dcf-{run_id}")
    finally:
        os.unlink(f"/dev/shm/dcf-{run_id}")


def test_injected_enospc_on_the_disk_tier(store_mod, run_id, tmp_path, monkeypatch):
    store = store_mod.Store.create(run_id, ram_budget=0, disk_root=str(tmp_path))
    try:
        store.put("kept", b"k", [b"x" * 1000])
        monkeypatch.setenv("DISCOMFORT_TEST_FAIL_NEXT_WRITE", f"ENOSPC#{run_id}")
        with pytest.raises(errors.DiskFullError) as info:
            store.put("kept", b"new", [b"y" * 5000])
        assert info.value.errno == 28 and run_id in str(info.value)
        assert store.get("kept")[0] == b"k" and store.stats()["reserved"] == 0
        assert len(os.listdir(store.disk_dir)) == 1
        store.put("after", b"a", [b"z"])  # one-shot: the next write goes through
        assert store.keys() == ["after", "kept"]
    finally:
        store.destroy()


def test_injected_enomem_is_a_clear_error(store_mod, run_id, tmp_path, monkeypatch):
    store = store_mod.Store.create(run_id, ram_budget=0, disk_root=str(tmp_path))
    try:
        monkeypatch.setenv("DISCOMFORT_TEST_FAIL_NEXT_WRITE", f"ENOMEM#{run_id}")
        with pytest.raises(OSError) as info:
            store.put("v", b"", [b"y" * 5000])
        assert info.value.errno == 12
        assert store.keys() == [] and store.stats()["reserved"] == 0 and os.listdir(store.disk_dir) == []
    finally:
        store.destroy()


def test_injected_failure_of_a_ram_chunk_falls_back_to_disk(store_mod, run_id, tmp_path, monkeypatch):
    store = store_mod.Store.create(run_id, ram_budget=64 * MiB, disk_root=str(tmp_path), pool=False)
    try:
        monkeypatch.setenv("DISCOMFORT_TEST_FAIL_NEXT_WRITE", f"ENOSPC#{run_id}")
        store.put("v", b"", [b"q" * MiB])
        assert store.info("v")["tier"] == "disk" and store.stats()["chunks"] == 0
        assert bytes(store.get("v")[1][0]) == b"q" * MiB
    finally:
        store.destroy()


# ---- the owner ends the run while an attacher holds a handle ------------------------------------

_OWNER = """
import sys
from discomfort import _backend
mod = _backend.load(sys.argv[1])
store = mod.Store.create(sys.argv[2], ram_budget=int(sys.argv[3]), disk_root=sys.argv[4])
store.put("big", b"b", [b"B" * (1 << 20)])
store.put("small", b"s", [b"S" * 100])
print(store.info("big")["tier"], flush=True)
sys.stdin.readline()  # the attacher has attached and read
store.destroy()
print("destroyed", flush=True)
sys.stdin.readline()
"""


def _assert_finished_everywhere(handle) -> None:
    for name, call in [("get big", lambda: handle.get("big")), ("get small", lambda: handle.get("small")),
                       ("put", lambda: handle.put("new", b"", [b"n" * 100_000])), ("keys", handle.keys),
                       ("info", lambda: handle.info("big")), ("contains", lambda: handle.contains("small")),
                       ("delete", lambda: handle.delete("small"))]:
        with pytest.raises(errors.RunFinishedError, match="has finished"):
            call()
            pytest.fail(f"{name} worked on a finished run")


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_attacher_gets_run_finished_after_the_owner_process_ends_the_run(backend, tier, tmp_path, run_id):
    mod = load_backend(backend)
    budget = 256 * MiB if tier == "ram" else 0
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, backend, run_id, str(budget), str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == tier
        handle = mod.Store.attach(run_id)
        meta, views, _ = handle.get("big")  # chunks and files opened, a view held
        assert meta == b"b" and handle.get("small")[0] == b"s"
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "destroyed"
        _assert_finished_everywhere(handle)
        assert bytes(views[0][:4]) == b"BBBB"  # a view taken before stays valid
        handle.close()
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
    assert leftovers(run_id, disk_root=str(tmp_path)) == []


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_attacher_in_the_owners_process_gets_run_finished(store_mod, tier, tmp_path, run_id):
    owner = store_mod.Store.create(run_id, ram_budget=256 * MiB if tier == "ram" else 0, disk_root=str(tmp_path))
    owner.put("big", b"b", [b"B" * MiB])
    owner.put("small", b"s", [b"S" * 100])
    handle = store_mod.Store.attach(run_id)
    assert handle.get("small")[0] == b"s" and handle.info("big")["tier"] == tier
    res = handle.reserve("late", b"", [10])  # a write in flight when the run ends
    owner.destroy()
    _assert_finished_everywhere(handle)
    with pytest.raises(errors.RunFinishedError):
        res.seal()
    handle.close()
    assert leftovers(run_id, disk_root=str(tmp_path)) == []
