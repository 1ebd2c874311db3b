"""The process-local store (discomfort._localstore): the store where no cross-process store can
run (Windows) and ``WorkflowContext(store="local")`` anywhere.

In this process: its store-level semantics (a save copies, loads are private and survive later
saves, deletes and the run's end, the RAM budget, the disk tier, versions, info and stats as the
shared store gives them, threads, crash leftovers). In fresh simulated-Windows processes (the
platform hook of tests/_simplatform): WorkflowContext round trips, attaching from another process,
``discomfort doctor`` and ``discomfort bench``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _helpers import BACKENDS, load_backend
from _simplatform import run_simulated, simulated_env
from discomfort import _localstore, _platform, errors
from discomfort._sweep import LOCAL_LOCK
from discomfort.context import WorkflowContext, get_context, store_kind

MiB = 1 << 20
#: The platform hook simulates Windows on a Linux host (the macOS CI job runs the rest here natively).
simulation = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Windows simulation runs on Linux")


def left(run_id: str, root) -> bool:
    """Whether anything of local run ``run_id`` is left in disk root ``root`` (a local run has
    nothing anywhere else)."""
    return os.path.lexists(os.path.join(str(root), f"dcf-{run_id}"))


def pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def make_local(tmp_path):
    """Create local stores in ``tmp_path``; destroy them after and check nothing is left."""
    made = []

    def make(ram_budget: int = 64 * MiB, disk: bool = True):
        store = _localstore.Store.create("t" + os.urandom(8).hex(), ram_budget=ram_budget,
                                         disk_root=str(tmp_path) if disk else None)
        made.append(store)
        return store

    yield make
    for store in made:
        store.destroy()
        gc.collect()
        assert not left(store.run_id, tmp_path)


# ---- store-level semantics --------------------------------------------------------------------


@pytest.mark.parametrize("tier, budget", [("ram", 64 * MiB), ("disk", 0)])
def test_a_save_copies_and_a_load_is_private(make_local, tier, budget):
    store = make_local(ram_budget=budget)
    src = bytearray(pattern(2 * MiB))
    version = store.put("k", b"meta", [src, b"tail"])
    src[:4] = b"\0\0\0\0"  # the caller changes its buffer after the save
    meta, views, info = store.get("k")
    assert meta == b"meta" and bytes(views[0]) == pattern(2 * MiB) and bytes(views[1]) == b"tail"
    assert info == {"version": version, "tier": tier, "zero_copy": tier == "disk"}  # disk: a private mapping
    views[0][:4] = b"\xff\xff\xff\xff"  # writing into a load
    assert bytes(store.get("k")[1][0][:4]) == pattern(2 * MiB)[:4]
    assert np.frombuffer(views[0], np.uint8).ctypes.data % 4096 == 0  # page-aligned, as the shared store's


@pytest.mark.parametrize("budget", [64 * MiB, 0])
def test_loads_survive_overwrite_delete_and_destroy(make_local, tmp_path, budget):
    store = make_local(ram_budget=budget)
    first = pattern(MiB, 1)
    store.put("k", b"1", [first])
    held = store.get("k")[1]
    for i in range(4):
        store.put("k", b"2", [pattern(MiB, 10 + i)])
    assert bytes(held[0]) == first and bytes(store.get("k")[1][0]) == pattern(MiB, 13)
    if budget:  # the loop's steady state: the value and one spare region, which took turns
        assert store.stats()["ram_capacity"] == 2 * store.info("k")["size"]
    store.delete("k")
    store.put("other", b"", [pattern(3 * MiB, 99)])
    assert bytes(held[0]) == first
    store.destroy()
    assert store.closed and bytes(held[0]) == first
    if _platform.PLATFORM == "win32":  # Windows keeps a mapped file: it goes with the last load
        assert budget or left(store.run_id, tmp_path)
        del held
        gc.collect()
    assert not left(store.run_id, tmp_path)  # POSIX removes a mapped file at once
    with pytest.raises(errors.StoreClosedError):
        store.get("other")


def test_the_ram_budget_without_a_disk_tier_is_store_full(make_local):
    store = make_local(ram_budget=MiB, disk=False)
    store.put("small", b"", [bytes(1000)])
    with pytest.raises(errors.StoreFullError) as info:
        store.put("big", b"", [bytes(2 * MiB)])
    text = str(info.value)
    assert "'big'" in text and store.run_id in text and "does not fit the RAM budget and the run has no disk tier" in text
    assert store.keys() == ["small"] and store.stats()["reserved"] == 0


def test_the_disk_tier_files_are_private_and_go_with_the_run(make_local, tmp_path):
    store = make_local(ram_budget=MiB)
    store.put("ram", b"", [bytes(1000)])
    store.put("disk", b"", [pattern(2 * MiB)])
    store.put("small disk", b"", [bytes(MiB - 100), bytes(200)])  # over what is left of the budget
    assert [store.info(k)["tier"] for k in ("ram", "disk", "small disk")] == ["ram", "disk", "disk"]
    assert store.get("small disk")[2]["zero_copy"]  # 1 MiB extent: mapped
    assert os.stat(store.disk_dir).st_mode & 0o777 == 0o700
    names = sorted(os.listdir(store.disk_dir))
    assert len(names) == 3 and names[-1] == LOCAL_LOCK
    for name in names:
        assert os.stat(os.path.join(store.disk_dir, name)).st_mode & 0o777 == 0o600
    assert store.delete("disk") and len(os.listdir(store.disk_dir)) == 2
    store.destroy()
    assert not left(store.run_id, tmp_path)


@pytest.mark.parametrize("shared_backend", BACKENDS)
def test_versions_info_and_stats_are_the_shared_stores(make_local, tmp_path, shared_backend):
    """The same operations on a local and a shared store give the same versions, and info()
    and stats() the same fields and figures (those that do not describe chunks or pins)."""
    if not _platform.SHARED:
        pytest.skip("no shared store on this system (Windows) to compare with")
    mod = load_backend(shared_backend)
    shared = mod.Store.create("s" + os.urandom(8).hex(), ram_budget=4 * MiB, disk_root=str(tmp_path / "shared"))
    local = make_local(ram_budget=4 * MiB)
    try:
        seen = []
        for store in (shared, local):
            ops = [store.put("a", b"m", [bytes(100)]), store.put("b", b"mm", [bytes(MiB), b"x"])]
            res = store.reserve("c", b"r", [10, 70_000])
            res.buffers[0][:] = b"0123456789"
            ops += [res.seal(), store.put("d", b"", [bytes(8 * MiB)]), store.put("a", b"m2", [bytes(200)])]
            ops.append(store.delete("b"))
            store.reserve("gone", b"", [5]).abort()
            info = {k: store.info(k) for k in store.keys()}
            seen.append((ops, info, store.stats(), bytes(store.get("c")[1][0])))
        (ops_s, info_s, stats_s, c_s), (ops_l, info_l, stats_l, c_l) = seen
        assert ops_s == ops_l and c_s == c_l == b"0123456789"
        assert info_s.keys() == info_l.keys() == {"a", "c", "d"}
        for key in info_s:
            assert info_s[key].keys() == info_l[key].keys()
            same = ("key", "tier", "version", "size", "nbuf", "nbytes", "meta_len")
            assert {f: info_s[key][f] for f in same} == {f: info_l[key][f] for f in same}, key
        assert stats_s.keys() == stats_l.keys()
        for field in ("objects_ram", "objects_disk", "bytes_ram", "bytes_disk", "reserved", "ram_budget",
                      "next_version"):
            assert stats_s[field] == stats_l[field], field
    finally:
        shared.destroy()


def test_reservations_seal_abort_and_dropped(make_local):
    store = make_local(ram_budget=MiB)
    for key, sizes in (("ram", [10, 1000]), ("disk", [3 * MiB])):
        res = store.reserve(key, b"m", sizes)
        assert res.tier == key and not store.contains(key)
        res.buffers[0][:3] = b"abc"
        version = res.seal()
        assert store.info(key)["version"] == version and bytes(store.get(key)[1][0][:3]) == b"abc"
        with pytest.raises(errors.StoreClosedError):
            res.seal()
    with pytest.raises(RuntimeError), store.reserve("ram", b"new", [5]) as res2:
        res2.buffers[0][:] = b"nope!"
        raise RuntimeError("fill failed")
    assert store.get("ram")[0] == b"m"
    store.reserve("dropped ram", b"", [100])
    store.reserve("dropped disk", b"", [1 << 30])  # past the budget: a (sparse) disk file
    gc.collect()
    stats = store.stats()
    assert stats["reserved"] == 0 and stats["ram_capacity"] == store.info("ram")["size"]
    assert sorted(os.listdir(store.disk_dir)) == [f"{store.info('disk')['version'] - 1:016x}.obj",
                                                  LOCAL_LOCK]


def test_threads_save_load_delete(make_local):
    store = make_local(ram_budget=4 * MiB)

    def work(t: int) -> None:
        for i in range(60):
            key = f"k{(t + i) % 5}"
            store.put(key, bytes([t, i]), [pattern(1 + (i % 3) * 700_000, t * 100 + i)])  # RAM and disk
            try:
                meta, views, _ = store.get(key)
                assert bytes(views[0]) == pattern(len(views[0]), meta[0] * 100 + meta[1])
            except errors.UnknownKeyError:
                pass
            if i % 7 == 0:
                store.delete(key)

    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(work, t) for t in range(4)]:
            done.result()  # raises what a thread raised
    gc.collect()
    stats = store.stats()
    assert stats["reserved"] == 0 and stats["pins"] == 0
    assert stats["bytes_ram"] <= stats["ram_capacity"] <= 4 * MiB  # spare regions of replaced values count too


OWNER = """
    import sys
    from discomfort import _localstore
    store = _localstore.Store.create(sys.argv[1], ram_budget=0, disk_root=sys.argv[2])
    store.put("k", b"", [bytes(1 << 20)])
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_crashed_owners_run_is_swept_by_the_next_one(tmp_path):
    """A run whose process was SIGKILLed is removed by the next local run made in that disk root;
    a live one (its owner holds owner.lk) is left alone."""
    procs = {}
    for name in ("killed", "alive"):
        procs[name] = subprocess.Popen([sys.executable, "-c", textwrap.dedent(OWNER), name, str(tmp_path)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert procs[name].stdout.readline() == "ready\n"
    try:
        procs["killed"].kill()  # SIGKILL; TerminateProcess on Windows
        procs["killed"].wait(60)
        assert len(os.listdir(tmp_path / "dcf-killed")) == 2  # its object file and owner.lk stayed
        store = _localstore.Store.create("next", ram_budget=0, disk_root=str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["dcf-alive", "dcf-next"]
        store.destroy()
    finally:
        procs["alive"].communicate("", timeout=60)
    assert procs["alive"].returncode == 0 and os.listdir(tmp_path) == []  # it removed its own at exit


# ---- WorkflowContext ------------------------------------------------------------------------


def test_the_store_argument(tmp_path):
    assert store_kind() == ("shared" if _platform.SHARED else "local") and store_kind("local") == "local" and store_kind(backend="local") == "local"
    for bad, words in [({"store": "tmpfs"}, "store must be one of auto, shared, local"),
                       ({"store": "local", "backend": "native"}, "leave it out"),
                       ({"store": "shared", "backend": "local"}, "leave one of them out")]:
        with pytest.raises(ValueError, match=words):
            WorkflowContext(disk_dir=str(tmp_path), **bad)
    with WorkflowContext(store="local", ram_budget=MiB, disk_dir=str(tmp_path)) as ctx:
        arr = np.arange(300_000, dtype=np.float32)  # 1.2 MiB: the disk tier
        ctx.save("arr", arr)
        ctx.save("text", "héllo")
        assert get_context(ctx.run_id) is ctx and ctx.backend == "local" and ctx.stats()["backend"] == "local"
        assert np.array_equal(ctx.load("arr"), arr) and ctx.info("arr")["tier"] == "disk"
        assert ctx.load("text") == "héllo" and ctx.keys() == ["arr", "text"]
    assert not left(ctx.run_id, tmp_path)


ATTACH = """
    import sys
    from discomfort import errors
    from discomfort.context import WorkflowContext, get_context
    for call in (WorkflowContext.attach, get_context):
        try:
            call(sys.argv[1])
            print("attached")
        except errors.UnsupportedPlatformError as exc:
            print(str(exc).replace("\\n", " "))
"""


def test_another_process_cannot_attach_a_local_run(tmp_path):
    """Here (Linux) as on Windows: the error says why and what works instead."""
    env = {**os.environ, "DISCOMFORT_DISK_DIR": str(tmp_path)}
    with WorkflowContext(store="local", ram_budget=MiB, disk_dir=str(tmp_path)) as ctx:  # that process's default
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(ATTACH), ctx.run_id], capture_output=True,
                             text=True, env=env, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    for line in lines:
        assert ctx.run_id in line and "process-local" in line and "InProcessComfy" in line and "HTTP" in line


# ---- simulated Windows, in fresh processes ---------------------------------------------------

ROUND_TRIPS = """
    import gc, json, os, sys
    import numpy as np
    import discomfort
    from discomfort import WorkflowContext, get_context
    rng = np.random.default_rng(5)
    values = {"small": rng.standard_normal(1000), "ram": rng.standard_normal(MIB // 8),
              "disk": rng.integers(0, 1 << 60, 3 * MIB // 8, dtype=np.int64), "bytes": bytes(range(256)) * 9}
    try:
        import torch
        values["tensor"] = torch.from_numpy(rng.standard_normal((4, 64, 64)).astype(np.float32))
    except ImportError:
        pass

    def same(a, b):
        if isinstance(a, bytes):
            return a == b
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and bool(np.array_equal(a, b))
        import torch
        return a.dtype == b.dtype and bool(torch.equal(a, b))

    out = {"backend": discomfort.backend, "mode": discomfort.store_mode}
    with WorkflowContext(ram_budget=2 * MIB) as ctx:
        for k, v in values.items():
            ctx.save(k, v)
        out["same"] = {k: same(v, ctx.load(k)) for k, v in values.items()}
        out["tiers"] = {k: ctx.info(k)["tier"] for k in values}
        out["registry"] = get_context(ctx.run_id) is ctx
        held = ctx.load("disk")  # a private mapping of its file: Windows cannot delete that file
        ctx.delete("disk")
        ctx.save("disk", np.zeros(3))
        out["held_intact"] = same(values["disk"], held)
        run_dir = ctx.store.disk_dir
    out["dir_while_held"] = os.path.isdir(run_dir)
    out["held_after_end"] = same(values["disk"], held)
    del held
    gc.collect()
    out["dir_after"] = os.path.exists(run_dir)
    print(json.dumps(out))
"""


def simulated_run(tmp_path, code: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return run_simulated("win32", code, *args, tmpdir=tmp_path, log=tmp_path / "refused.log", prelude=f"MIB = {MiB}\n",
                         **extra)


def refused(tmp_path) -> list[str]:
    """What the platform hook refused, but deleting a file a view maps (Windows' rule: the store
    defers that until the view is gone, as checked) and the package's own fcntl probe."""
    log = tmp_path / "refused.log"
    lines = log.read_text().splitlines() if log.exists() else []
    calls = [line for line in lines if re.search(r" at \S+\.py:\d+$", line)]  # "<system>: <call> at <file>:<line>"
    return [line for line in calls if "of a file held open" not in line and "import fcntl" not in line]


@simulation
def test_win32_workflow_context_round_trips(tmp_path):
    out = simulated_run(tmp_path, ROUND_TRIPS)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["backend"] == "local" and res["mode"] == "local" and res["registry"]
    assert all(res["same"].values()) and {"small", "ram", "disk", "bytes"} <= set(res["same"])
    assert res["tiers"]["small"] == res["tiers"]["ram"] == "ram" and res["tiers"]["disk"] == "disk"
    assert res["held_intact"] and res["held_after_end"]
    assert res["dir_while_held"] and not res["dir_after"]  # removed once the view was collected
    assert refused(tmp_path) == []


WAIT = """
    import json, sys
    from discomfort import WorkflowContext, sysinfo
    with WorkflowContext(ram_budget=1 << 20) as ctx:
        ctx.save("k", b"v")
        print(ctx.run_id, flush=True)
        print(json.dumps(sysinfo.host_info("ab" * 16)), flush=True)  # what its node pack's route answers
        sys.stdin.read()
"""

SAME_HOST = """
    import json, sys
    from discomfort import sysinfo
    other, mine = json.loads(sys.argv[1]), sysinfo.host_info("ab" * 16)
    print(json.dumps([sysinfo.host_differences(mine, other), sysinfo.host_differences(mine, mine)]))
"""


HOLDER = """
    import sys
    from discomfort import WorkflowContext
    ctx = WorkflowContext(ram_budget=0)
    ctx.save("k", bytes(1 << 20))
    view = ctx.load("k")  # maps its file
    print(ctx.run_id, flush=True)
    sys.stdin.read()
"""

SWEEPER = """
    import os
    from discomfort import WorkflowContext
    with WorkflowContext(ram_budget=0) as ctx:  # its creation sweeps the disk root
        print(sorted(n for n in os.listdir(os.path.dirname(ctx.store.disk_dir)) if n != f"dcf-{ctx.run_id}"))
"""


@simulation
def test_win32_a_run_left_by_a_killed_process_is_swept(tmp_path):
    """Windows' rule, as the hook applies it: owner.lk cannot be removed while its process holds it
    open, so a live run is left alone and a killed one's directory is removed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=simulated_env("win32", tmpdir=tmp_path))
    try:
        run_id = holder.stdout.readline().strip()
        alive = simulated_run(tmp_path, SWEEPER)
        assert alive.returncode == 0 and f"dcf-{run_id}" in alive.stdout, alive.stderr[-2000:]
        log = (tmp_path / "refused.log").read_text()
        assert f"dcf-{run_id}/owner.lk" in log and "held open" in log  # the sweeper tried, Windows said no
    finally:
        holder.kill()
        holder.wait(60)
        holder.stdin.close()
        holder.stdout.close()
    gone = simulated_run(tmp_path, SWEEPER)
    assert gone.returncode == 0 and gone.stdout.strip() == "[]", gone.stderr[-2000:]


@simulation
def test_win32_another_process_cannot_attach(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WAIT)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=simulated_env("win32", tmpdir=tmp_path))
    try:
        run_id, owner_host = owner.stdout.readline().strip(), owner.stdout.readline().strip()
        out = simulated_run(tmp_path, ATTACH, run_id)
        hosts = simulated_run(tmp_path, SAME_HOST, owner_host)
    finally:
        owner.communicate("", timeout=60)
    # The transports' same-host check: another process never shares a local run's memory (HTTP
    # is chosen); the same process always does (the panel's run in its own server).
    other, same = json.loads(hosts.stdout.splitlines()[-1])
    assert len(other) == 1 and "process-local" in other[0] and same == []
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    for line in lines:
        assert run_id in line and "Windows" in line and "InProcessComfy" in line and "HTTP" in line
    assert owner.returncode == 0 and not [n for n in os.listdir(tmp_path) if n.startswith("discomfort-")
                                          for m in os.listdir(tmp_path / n) if run_id in m]


@simulation
def test_win32_doctor_and_bench_exit_0(tmp_path):
    pytest.importorskip("torch")
    doctor = simulated_run(tmp_path, "from discomfort.cli import main; raise SystemExit(main(['doctor']))")
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert "process-local" in doctor.stdout and "both tiers written and read back" in doctor.stdout
    bench = simulated_run(tmp_path, "from discomfort.cli import main; "
                                    "raise SystemExit(main(['bench', '--sizes', '64 KiB', '--no-progress', '--rounds', '1']))")
    assert bench.returncode == 0, bench.stderr[-2000:]
    rows = {" ".join(p[:2]) for p in map(str.split, bench.stdout.splitlines()) if p[2:3] == ["local"]}
    assert rows == {"save [ram]", "load [ram]", "save+load [ram]", "save [disk]", "load [disk]", "save+load [disk]"}
    assert "handoff [ram]" not in bench.stdout and "left out for the local backend" in bench.stdout
    if all(importlib.util.find_spec(m) for m in ("aiohttp", "requests")):  # to a simulated server process
        assert "http save" in bench.stdout and "http load" in bench.stdout
    assert refused(tmp_path) == []
