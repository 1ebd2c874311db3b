"""macOS and Windows, simulated on Linux with DISCOMFORT_TEST_PLATFORM (read once at import, so
every check runs in fresh processes; this process keeps the Linux mode).

darwin: the pure-Python store's portable mode (regular files in a private temp directory, flock
on lock files, no posix_fallocate). win32: `import discomfort`, the process-local store and the
HTTP client work without fcntl and the other POSIX-only calls, and attaching a run from another
process is a clear error.

Every simulated process runs under the platform hook (tests/_simplatform): what that system lacks
fails for discomfort's own code, so a stray POSIX call fails the test.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from discomfort import _platform
from discomfort._pystore import lock as pslock, sys as pssys

from _simplatform import last_json, run_simulated, simulated_env

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "_workers.py")
MiB = 1 << 20

# Prepended to every simulated process: where the portable mode keeps a run's files.
COMMON = textwrap.dedent("""
    import json, os, signal, subprocess, sys
    import numpy as np
    from discomfort import _platform, _pystore as ps
    from discomfort._pystore import lock as pslock, sys as pssys

    def names(run_id):
        return sorted(n for n in os.listdir(_platform.SHM_DIR) if n == f"dcf-{run_id}" or n.startswith(f"dcf-{run_id}."))

    def values():
        rng = np.random.default_rng(7)
        out = {"bytes": bytes(range(256)) * 5,
               "array": rng.standard_normal(MiB),                         # 8 MiB: RAM tier
               "big": rng.integers(0, 1 << 62, 3 * MiB, dtype=np.int64)}  # 24 MiB: over the budget, disk
        try:
            import torch
        except ImportError:
            return out
        out["tensor"] = torch.from_numpy(rng.standard_normal((3, 64, 64)).astype(np.float32))
        return out

    def same(a, b):
        if isinstance(a, bytes):
            return a == b
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
        import torch
        return a.dtype == b.dtype and bool(torch.equal(a, b))

    MiB = 1 << 20
""")


def own_tmp(tmp_path):
    """The simulated processes' TMPDIR (where the portable mode keeps its segments)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return tmp


def simulated(platform: str, tmp_path) -> dict[str, str]:
    """The environment of a process that believes it runs on `platform` (the platform hook
    installed), with its own TMPDIR."""
    return simulated_env(platform, tmpdir=own_tmp(tmp_path))


def run(platform: str, tmp_path, code: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return run_simulated(platform, code, *args, tmpdir=own_tmp(tmp_path), prelude=COMMON, **extra)


def segment_dir(tmp_path) -> str:
    return os.path.join(str(tmp_path / "tmp"), f"discomfort-{os.geteuid()}", "segments")


# ---------------------------------------------------------------------------------------- Linux


@pytest.mark.skipif(not sys.platform.startswith("linux") or "DISCOMFORT_TEST_PLATFORM" in os.environ,
                    reason="checks the real Linux mode")
def test_linux_keeps_dev_shm_ofd_locks_and_fallocate():
    assert _platform.MODE == "shm" and _platform.SHM_DIR == "/dev/shm"
    assert pslock.lock_wait is pslock._ofd_lock_wait and pslock.lock_held is pslock._ofd_held
    assert pssys._allocate is os.posix_fallocate and pssys.map_private is pssys._map_extent


# --------------------------------------------------------------------------------------- darwin


def test_darwin_picks_the_portable_python_store(tmp_path):
    out = last_json(run("darwin", tmp_path, """
        import discomfort
        from discomfort import _backend, doctor
        report = doctor.collect()
        print(json.dumps({"backend": discomfort.backend, "mode": discomfort.store_mode, "dir": _platform.SHM_DIR,
                          "available": _backend.available(), "zero_fill": pssys._allocate is pssys._zero_fill,
                          "flock": pslock.lock_wait is pslock._flock_lock_wait, "renameat2": pssys._renameat2 is not None,
                          "coarse_maps": pssys.map_private is pssys._map_extent_coarse,
                          "doctor": doctor.format_report(report)}))
    """))
    assert out["backend"] == "python" and out["mode"] == "portable" and out["available"] == ["python"]
    assert out["dir"] == segment_dir(tmp_path)
    assert out["zero_fill"] and out["flock"] and not out["renameat2"]
    assert out["coarse_maps"]  # 16 KiB pages (Apple silicon): extents are mapped from the boundary before
    assert "portable" in out["doctor"] and segment_dir(tmp_path) in out["doctor"]
    assert "/dev/shm" not in out["doctor"].split("\n- ")[0]
    native = run("darwin", tmp_path, "import discomfort", DISCOMFORT_BACKEND="native")
    assert native.returncode != 0 and "Linux with /dev/shm only" in native.stderr
    required = run("darwin", tmp_path, "import discomfort", DISCOMFORT_REQUIRE_NATIVE="1")
    assert required.returncode != 0 and "BackendUnavailableError" in required.stderr


ATTACHER = """
    import discomfort
    ctx = discomfort.get_context(sys.argv[1])
    checks = {k: same(v, ctx.load(k)) for k, v in values().items()}
    tiers = {k: ctx.info(k)["tier"] for k in checks}
    ctx.save("from_attacher", np.arange(1000, dtype=np.int32))
    slots = ctx.stats()["slots_used"]  # the owner's slot is alive: its lock file is held
    ctx.close()
    print(json.dumps({"checks": checks, "tiers": tiers, "slots": slots, "backend": ctx.backend}))
"""


def test_darwin_round_trip_between_processes(tmp_path):
    out = last_json(run("darwin", tmp_path, """
        from discomfort import WorkflowContext, sysinfo
        ctx = WorkflowContext(ram_budget=16 * MiB)
        rid = ctx.run_id
        vals = values()
        for k, v in vals.items():
            ctx.save(k, v)
        own = {k: same(v, ctx.load(k)) for k, v in vals.items()}
        running = names(rid)
        devshm = [n for n in os.listdir("/dev/shm") if rid in n]
        modes = {n: os.stat(os.path.join(_platform.SHM_DIR, n)).st_mode & 0o777 for n in running}
        dirs = [os.stat(d).st_mode & 0o777 for d in (_platform.SHM_DIR, os.path.dirname(_platform.SHM_DIR))]
        code = sys.argv[1] + sys.argv[2]
        attacher = subprocess.run([sys.executable, "-c", code, rid], capture_output=True, text=True, timeout=120)
        assert attacher.returncode == 0, attacher.stderr
        back = ctx.load("from_attacher")
        slots_after = ctx.stats()["slots_used"]
        disk_dir = ctx.store.disk_dir
        ctx.shutdown()
        print(json.dumps({"rid": rid, "own": own, "running": running, "devshm": devshm, "modes": modes,
                          "dirs": dirs, "attacher": json.loads(attacher.stdout), "slots_after": slots_after,
                          "back": back.tolist() == list(range(1000)), "disk_dir": disk_dir,
                          "left": names(rid) + [d for d in [disk_dir] if os.path.exists(d)]}))
    """, COMMON, textwrap.dedent(ATTACHER)))
    rid = out["rid"]
    expected = {"bytes", "array", "big"} | ({"tensor"} if "tensor" in out["own"] else set())
    assert set(out["own"]) == expected and all(out["own"].values())
    att = out["attacher"]
    assert att["backend"] == "python" and att["checks"] == out["own"] and att["slots"] == 2
    assert att["tiers"]["array"] == "ram" and att["tiers"]["big"] == "disk"
    assert out["back"] and out["slots_after"] == 1
    # The run's files: control segment, a RAM chunk and the lock files, all private; none in /dev/shm.
    assert {f"dcf-{rid}", f"dcf-{rid}.c0", f"dcf-{rid}.lk", f"dcf-{rid}.lk0"} <= set(out["running"])
    assert set(out["modes"].values()) == {0o600} and out["dirs"] == [0o700, 0o700]
    assert out["devshm"] == [] and out["disk_dir"].startswith(str(tmp_path / "tmp"))
    assert out["left"] == []
    # Both processes have exited: the chunk pool's files went with them, nothing at all is left.
    assert os.listdir(segment_dir(tmp_path)) == []
    assert not [n for n in os.listdir("/dev/shm") if rid in n]


def test_darwin_killed_holders_are_seen_and_reclaimed(tmp_path):
    out = last_json(run("darwin", tmp_path, """
        import select
        workers, disk = sys.argv[1], sys.argv[2]
        store = ps.Store.create("tk" + os.urandom(8).hex(), ram_budget=64 * MiB, disk_root=disk)
        rid = store.run_id
        store.put("big", b"", [b"x" * (8 * MiB)])

        def park(action, killpoint):
            r, w = os.pipe()
            env = dict(os.environ)
            if killpoint:
                env.update(DISCOMFORT_TEST_KILLPOINT=killpoint, DISCOMFORT_TEST_KILLPOINT_FD=str(w))
            proc = subprocess.Popen([sys.executable, workers, "python", rid, action, str(w)], env=env,
                                    pass_fds=(w,), stdin=subprocess.PIPE)
            os.close(w)
            assert select.select([r], [], [], 60)[0], f"{action}: the worker never got there"
            assert os.read(r, 1) in (b"K", b"V")
            os.close(r)
            return proc

        def kill(proc):
            proc.kill()
            proc.wait(30)
            proc.stdin.close()

        out = {}
        # killed inside an update, holding the metadata lock (its lock file's flock)
        kill(park("lock", "after_lock"))
        store.put("after", b"", [b"ok"])  # does not hang: the lock came back; the table is repaired
        s = store.stats()
        out["after_lock"] = [store.keys(), s["slots_used"], s["reserved"], bytes(store.get("big")[1][0][:2]).decode()]
        # alive: one holds a view (a pin), one is between reserve and seal
        viewer, writer = park("views", None), park("reserve", "after_reserve")
        s = store.stats()
        out["alive"] = [s["slots_used"], s["pins"], s["reserved"], store.reclaim()]
        out["files"] = [n[len(rid) + 4:] for n in names(rid)]
        kill(viewer)
        kill(writer)
        out["reclaimed"] = store.reclaim()
        s = store.stats()
        out["dead"] = [s["slots_used"], s["pins"], s["reserved"], store.keys()]
        again = ps.Store.attach(rid)
        out["slot_again"] = again.slot
        again.close()
        store.destroy()
        out["left"] = names(rid) + [d for d in [store.disk_dir] if os.path.exists(d)]
        print(json.dumps(out))
    """, WORKERS, str(tmp_path / "disk")))
    assert out["after_lock"] == [["after", "big"], 1, 0, "xx"]
    assert out["alive"] == [3, 1, 1, 0]  # both live holders are seen alive: nothing reclaimed
    assert {"", ".c0", ".lk", ".lk0", ".lk1", ".lk2"} <= set(out["files"])
    assert out["reclaimed"] == 2  # the dead viewer's pin and the dead writer's reservation
    assert out["dead"] == [1, 0, 0, ["after", "big"]]
    assert out["slot_again"] == 1  # a dead holder's slot is taken again
    assert out["left"] == []


def test_darwin_sweeper_removes_a_dead_runs_files(tmp_path):
    out = last_json(run("darwin", tmp_path, """
        from discomfort import WorkflowContext
        from discomfort._sweep import sweep
        child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        rid, disk_dir = child.stdout.readline().split()
        before = names(rid)
        child.kill()
        child.wait(30)
        child.stdin.close()
        orphan = os.path.join(_platform.SHM_DIR, "dcf-orphan01.lk5")  # a lock file whose run is gone
        open(orphan, "w").close()
        live = WorkflowContext(ram_budget=16 * MiB)  # sweeps the directory first
        after = names(rid) + [d for d in [disk_dir] if os.path.exists(d)]
        swept_again = sweep()
        live.save("x", b"still here")
        out = {"before": [n[len(rid) + 4:] for n in before], "after": after, "orphan": os.path.exists(orphan),
               "swept_again": swept_again, "live": live.load("x").decode(), "live_files": len(names(live.run_id))}
        live.shutdown()
        print(json.dumps(out))
    """, COMMON + textwrap.dedent("""
        from discomfort import WorkflowContext
        ctx = WorkflowContext(ram_budget=16 * MiB)
        ctx.save("ram", np.zeros(MiB))
        ctx.save("disk", np.ones(3 * MiB))
        print(ctx.run_id, ctx.store.disk_dir, flush=True)
        sys.stdin.read()
    """)))
    assert {"", ".c0", ".lk", ".lk0"} <= set(out["before"])
    assert out["after"] == [] and not out["orphan"]
    assert out["swept_again"] == [] and out["live"] == "still here" and out["live_files"] >= 3


# ---------------------------------------------------------------------------------------- win32

def run_windows(tmp_path, code: str, **extra: str) -> subprocess.CompletedProcess:
    """A simulated Windows process: fcntl, resource, fork, the POSIX-only calls of os, /dev/shm and
    /proc are gone for discomfort's code (the platform hook); third-party modules are untouched."""
    env = {**simulated("win32", tmp_path), **extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_win32_keeps_runs_local_and_refuses_attaching_clearly(tmp_path):
    """Windows: every run is kept in the process that creates it (the process-local store);
    attaching from another process is a clear error that says what works."""
    out = run_windows(tmp_path, """
        import json
        import numpy as np
        import discomfort
        from discomfort import doctor, errors
        from discomfort.remote import RemoteContext
        assert discomfort._platform.fcntl is None
        with discomfort.WorkflowContext(ram_budget=1 << 20) as ctx:
            ctx.save("a", np.arange(5))
            round_trip = ctx.load("a").tolist()
            run_id, backend = ctx.run_id, ctx.backend
        seen = {}
        for name, call in [("attach", lambda: discomfort.WorkflowContext.attach(run_id)),
                           ("get_context", lambda: discomfort.get_context(run_id))]:
            try:
                call()
                seen[name] = "no error"
            except errors.UnsupportedPlatformError as exc:
                seen[name] = str(exc)
        print(json.dumps({"backend": discomfort.backend, "mode": discomfort.store_mode, "seen": seen,
                          "round_trip": round_trip, "run_backend": backend,
                          "remote": RemoteContext.__name__, "doctor": doctor.format_report(doctor.collect()),
                          "is_discomfort_error": issubclass(errors.UnsupportedPlatformError, errors.DiscomfortError)}))
    """)
    res = last_json(out)
    assert res["backend"] == "local" and res["mode"] == "local" and res["remote"] == "RemoteContext"
    assert res["round_trip"] == [0, 1, 2, 3, 4] and res["run_backend"] == "local"
    assert res["is_discomfort_error"]
    for name, message in res["seen"].items():
        assert "Windows" in message and "WSL2" in message and "HTTP" in message, name
    assert "Process-local store" in res["doctor"] and "another process cannot attach" in res["doctor"]
    left = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "tmp") for n in names]
    assert left == []  # the run's files went with it
    native = run_windows(tmp_path, "import discomfort", DISCOMFORT_BACKEND="native")
    assert native.returncode != 0 and "BackendUnavailableError" in native.stderr


SERVER = """
    import socket
    from aiohttp import web
    from discomfort.remote import add_routes
    routes = web.RouteTableDef()
    add_routes(routes)
    app = web.Application()
    app.add_routes(routes)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, print=None)
"""


def test_win32_http_client_round_trip(tmp_path):
    """The HTTP transport's client needs no local store: a simulated Windows process saves and
    loads through a run that a (real, Linux) server process owns."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("requests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    # Outside ComfyUI the routes cannot know what it listens on: they need the server secret.
    env["DISCOMFORT_SERVER_SECRET"] = "portable-test-secret-0123456789"
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert select.select([server.stdout], [], [], 60)[0], "the server never started"
        port = int(server.stdout.readline())
        out = run_windows(tmp_path, f"""
            import json
            import numpy as np
            from discomfort.remote import RemoteContext
            arr = np.random.default_rng(3).standard_normal((256, 1024))
            with RemoteContext("http://127.0.0.1:{port}", secret="portable-test-secret-0123456789") as rc:
                rc.save("arr", arr)
                rc.save("text", "héllo")
                got = rc.load("arr")
                print(json.dumps({{"arr": got.dtype == arr.dtype and bool(np.array_equal(got, arr)),
                                  "text": rc.load("text"), "keys": rc.keys(), "run_id": rc.run_id}}))
        """)
        res = last_json(out)
        assert res["arr"] and res["text"] == "héllo" and res["keys"] == ["arr", "text"]
        # The run lived in the server (Linux: /dev/shm) and was ended by the client's shutdown.
        assert not [n for n in os.listdir("/dev/shm") if res["run_id"] in n]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
        server.stdout.close()
        server.stderr.close()


# ---------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
def test_cmake_builds_no_core_off_linux(tmp_path, system):
    repo = os.path.dirname(HERE)
    cmake = shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))
    if cmake is None or not os.path.exists(os.path.join(repo, "CMakeLists.txt")):
        pytest.skip("needs cmake and the source tree")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}

    def configure(build: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([cmake, "-S", repo, "-B", str(tmp_path / build), f"-DCMAKE_SYSTEM_NAME={system}",
                               "-DSKBUILD_PROJECT_VERSION=0.0.0"],
                              capture_output=True, text=True, env={**env, **extra}, timeout=120)

    plain = configure("plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert f"builds on Linux only (this is {system})" in plain.stderr.replace("\n  ", " ")
    assert "pure-Python" in plain.stderr
    required = configure("required", DISCOMFORT_REQUIRE_NATIVE="1")
    assert required.returncode != 0 and "DISCOMFORT_REQUIRE_NATIVE=1" in required.stderr


def test_macos_default_budget_is_a_quarter_of_the_memory(monkeypatch, tmp_path):
    """macOS has no /proc/meminfo: its memory's size comes from sysconf and the default budget is
    half of half of it (not the 1 GiB of a system that tells nothing)."""
    from discomfort import sysinfo

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _platform.memory_available() == (None, total)
    budget = sysinfo.default_ram_budget(None, cgroup_root=str(tmp_path / "no-cgroup"))
    assert budget == total // 4 // 4096 * 4096 and budget != sysinfo.UNKNOWN_MEMORY_BUDGET
