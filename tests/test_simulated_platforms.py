"""The platform hook (tests/_simplatform) that makes simulated Windows and macOS faithful: what
the system lacks fails for discomfort's own code, and only for it.

Each check runs in a fresh process with ``DISCOMFORT_TEST_PLATFORM`` set and the hook installed
before anything imports discomfort. The same calls are made by a module named like the package
(``discomfort_probe``) and by one that is not (``thirdparty_probe``): the first must fail where that
system would, the second never. Then package code itself (a Linux-only path of the shared store
called directly) fails, and such a stray call fails a test. The suites themselves run under the
hook in test_portable.py and tests/comfy/test_simulated_comfy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from _simplatform import HOOK_DIR, last_json, run_simulated as _run, simulated_env

PROBE = '''
import json, mmap, os, sys


def attempts(scratch):
    """Each call: ["ok", value] or ["error", "Type: message"]."""
    path = os.path.join(scratch, __name__ + ".bin")
    with open(path, "wb") as fh:
        fh.write(bytes(64 << 10))
    fd = os.open(path, os.O_RDWR)

    def flock():
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def shared_memory():
        from multiprocessing import shared_memory
        m = shared_memory.SharedMemory(create=True, size=16)
        m.close()
        m.unlink()

    def unlink_open():
        held = os.path.join(scratch, __name__ + ".held")
        with open(held, "wb") as fh:
            os.unlink(held)

    calls = {
        "listdir /dev/shm": lambda: len(os.listdir("/dev/shm")) >= 0,
        "read /proc/meminfo": lambda: len(open("/proc/meminfo").read(8)),
        "isdir /dev/shm": lambda: os.path.isdir("/dev/shm"),
        "posix_fallocate": lambda: os.posix_fallocate(fd, 0, 16),
        "F_OFD_SETLK": lambda: __import__("fcntl").F_OFD_SETLK > 0,
        "MAP_POPULATE": lambda: mmap.MAP_POPULATE > 0,
        "flock": flock,
        "has fork": lambda: hasattr(os, "fork"),
        "has register_at_fork": lambda: hasattr(os, "register_at_fork"),
        "geteuid": lambda: os.geteuid() >= 0,
        "pwrite": lambda: os.pwrite(fd, b"x", 0),
        "shared_memory": shared_memory,
        "mmap at 4 KiB": lambda: mmap.mmap(fd, 4096, offset=4096).close(),
        "mmap MAP_PRIVATE": lambda: mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE).close(),
        "unlink an open file": unlink_open,
        "kill(pid, 0)": lambda: os.kill(os.getpid(), 0),
        "os.name": lambda: os.name,
        "sys.platform": lambda: sys.platform,
    }
    out = {}
    for name, call in calls.items():
        try:
            out[name] = ["ok", call()]
        except Exception as exc:
            out[name] = ["error", f"{type(exc).__name__}: {exc}"]
    os.close(fd)
    return out
'''

# What fails for the package's code, per system; the rest works (values: what it sees).
FAILS = {
    "win32": {"listdir /dev/shm", "read /proc/meminfo", "posix_fallocate", "F_OFD_SETLK", "MAP_POPULATE",
              "flock", "geteuid", "pwrite", "shared_memory", "mmap at 4 KiB", "mmap MAP_PRIVATE",
              "unlink an open file", "kill(pid, 0)"},
    # macOS has flock, fork, POSIX shared memory; not /dev/shm, /proc, OFD locks, posix_fallocate,
    # MAP_POPULATE, nor mappings at 4 KiB offsets (16 KiB pages on Apple silicon).
    "darwin": {"listdir /dev/shm", "read /proc/meminfo", "posix_fallocate", "F_OFD_SETLK", "MAP_POPULATE",
               "mmap at 4 KiB"},
}
SEES = {"win32": {"isdir /dev/shm": False, "has fork": False, "has register_at_fork": False, "os.name": "nt",
                  "sys.platform": "win32"},
        "darwin": {"isdir /dev/shm": False, "has fork": True, "has register_at_fork": True, "os.name": "posix",
                   "sys.platform": "darwin"}}


def run_simulated(platform: str, tmp_path, code: str, *args: str, path: tuple[str, ...] = ()):
    return _run(platform, code, *args, tmpdir=tmp_path, log=tmp_path / "refused.log", path=path, timeout=120)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_the_hook_refuses_the_package_only(platform, tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    for name in ("discomfort_probe", "thirdparty_probe"):
        (mods / f"{name}.py").write_text(PROBE)
    res = last_json(run_simulated(platform, tmp_path, """
        import json, sys
        import discomfort_probe, thirdparty_probe
        print(json.dumps({"own": discomfort_probe.attempts(sys.argv[1]),
                          "other": thirdparty_probe.attempts(sys.argv[1])}))
    """, str(tmp_path), path=(str(mods),)))
    own, other = res["own"], res["other"]
    assert {k for k, (how, _) in own.items() if how == "error"} == FAILS[platform], own
    assert {k: v for k, (_, v) in own.items() if k in SEES[platform]} == SEES[platform]
    # Nothing changes for a caller outside the package: it sees this Linux machine.
    assert not [k for k, (how, _) in other.items() if how == "error"], other
    assert other["os.name"][1] == "posix" and other["sys.platform"][1] == sys.platform
    assert other["isdir /dev/shm"][1] and other["has fork"][1]
    # Each refusal of a call names the package's line that made it (names missing from a module
    # are not logged: hasattr probes them all the time).
    log = (tmp_path / "refused.log").read_text().splitlines()
    assert log[0].startswith(f"{platform}: hook installed in -c import json")
    refusals = [line for line in log if "hook installed" not in line]
    assert refusals and all("/mods/discomfort_probe.py:" in line for line in refusals), log


LINUX_ONLY = {
    # The shared store's pwrite (no os.pwrite on Windows); its free-space probe of /dev/shm.
    "win32": """
        from discomfort._pystore import sys as pssys
        from discomfort import sysinfo
        calls = {"pwrite_all": lambda: pssys.pwrite_all(fd, b"abc", 0, "probe"),
                 "shm_space": lambda: sysinfo.shm_space("/dev/shm")}
        mine = {"pwrite_all": lambda: os.pwrite(fd, b"abc", 0), "shm_space": lambda: os.statvfs("/dev/shm")}
    """,
    # Linux's extent mapping at 4 KiB boundaries (the portable mode maps from 16 KiB ones).
    "darwin": """
        from discomfort._pystore import sys as pssys
        from discomfort import sysinfo
        calls = {"map_extent": lambda: pssys._map_extent(fd, 4096, 4096)[0].close(),
                 "shm_space": lambda: sysinfo.shm_space("/dev/shm")}
        mine = {"map_extent": lambda: mmap.mmap(fd, 4096, offset=4096).close(),
                "shm_space": lambda: os.statvfs("/dev/shm")}
    """,
}


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_package_code_on_a_linux_only_path_fails(platform, tmp_path):
    """Called directly, a Linux-only function of the package fails under the hook; the same system
    calls made by the caller itself work."""
    res = last_json(run_simulated(platform, tmp_path, textwrap.dedent("""
        import json, mmap, os, sys
        fd = os.open(os.path.join(sys.argv[1], "f.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 64 << 10)
    """) + textwrap.dedent(LINUX_ONLY[platform]) + textwrap.dedent("""
        out = {}
        for who, table in (("package", calls), ("caller", mine)):
            for name, call in table.items():
                try:
                    call()
                    out[f"{who} {name}"] = "ok"
                except Exception as exc:
                    out[f"{who} {name}"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """), str(tmp_path)))
    package = {k: v for k, v in res.items() if k.startswith("package")}
    assert all(v != "ok" for v in package.values()), res
    assert all(v == "ok" for k, v in res.items() if k.startswith("caller")), res
    if platform == "win32":
        assert "has no attribute 'pwrite' (not on win32)" in res["package pwrite_all"]
        assert "has no attribute 'statvfs' (not on win32)" in res["package shm_space"]
    else:
        assert res["package map_extent"].startswith("OSError: [Errno 22]")
        assert res["package shm_space"].startswith("FileNotFoundError")


def test_windows_sharing_rule_in_the_local_store(tmp_path):
    """Under simulated Windows a file that some process holds open or mapped cannot be deleted:
    the local store's disk tier removes a value's file once the last load of it is gone."""
    res = last_json(run_simulated("win32", tmp_path, """
        import gc, json, os
        import numpy as np
        import discomfort
        ctx = discomfort.WorkflowContext(ram_budget=1 << 20)
        big = np.arange(1 << 20, dtype=np.float64)  # 8 MiB: over the budget, the disk tier
        ctx.save("big", big)
        view = ctx.load("big")  # a mapping of the value's file
        run_dir = ctx.store.disk_dir
        ctx.delete("big")
        while_mapped = sorted(n for n in os.listdir(run_dir) if n.endswith(".obj"))
        same = bool(np.array_equal(view, big))
        ctx.shutdown()
        del view
        gc.collect()
        print(json.dumps({"while_mapped": while_mapped, "same": same, "left": os.path.exists(run_dir)}))
    """))
    assert res["while_mapped"] and res["same"] and not res["left"]
    log = (tmp_path / "refused.log").read_text()
    assert "of a file held open at " in log and "/discomfort/_localstore.py:" in log


STRAY = """
import os

from discomfort._pystore import sys as pssys


def test_saves_a_byte(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    pssys.pwrite_all(fd, b"x", 0, "stray")
    assert os.pread(fd, 1, 0) == b"x"
"""


def test_a_stray_posix_call_fails_a_test(tmp_path):
    """A test whose package code makes a POSIX-only call passes on Linux and fails under the
    simulated Windows."""
    (tmp_path / "test_stray.py").write_text(STRAY)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--basetemp", str(tmp_path / "base"),
           str(tmp_path / "test_stray.py")]
    linux_env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    linux = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=linux_env, cwd=tmp_path)
    assert linux.returncode == 0, linux.stdout[-2000:]
    win = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=simulated_env("win32", tmpdir=tmp_path))
    assert win.returncode == 1 and "1 failed" in win.stdout, win.stdout[-3000:]
    assert "AttributeError: module 'os' has no attribute 'pwrite' (not on win32)" in win.stdout


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_doctor_under_the_simulation(platform, tmp_path):
    """doctor on the simulated system: its tiny run succeeds and it names the store."""
    env = simulated_env(platform, tmpdir=tmp_path)
    doctor = subprocess.run([sys.executable, "-m", "discomfort.cli", "doctor"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"[{platform}]" in doctor.stdout
    assert ("process-local" if platform == "win32" else "portable") in doctor.stdout


def test_bench_under_simulated_windows(tmp_path):
    """bench --quick on simulated Windows writes its rows, without those that need a second
    process (the handoff). macOS runs the same store as Linux's pure-Python backend."""
    pytest.importorskip("torch", reason="the benchmark needs torch")
    out = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, "-m", "discomfort.cli", "bench", "--quick", "--rounds", "2",
                            "--no-progress", "--json", str(out)], capture_output=True, text=True,
                           env=simulated_env("win32", tmpdir=tmp_path), timeout=300)
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = json.loads(out.read_text())
    methods = {r["method"] for r in rows}
    assert {"save [ram]", "load [ram]", "save+load [ram]"} <= methods
    assert {r["backend"] for r in rows if r["method"] == "save [ram]"} == {"local"}
    assert not any(m.startswith(("handoff", "load+touch")) for m in methods)


def test_the_hook_is_test_only():
    """The hook lives beside the tests, not in the package, and only acts where a platform is set."""
    import discomfort

    assert not HOOK_DIR.startswith(os.path.dirname(discomfort.__file__))
    plain = subprocess.run([sys.executable, "-c", "import _dcf_simhook, os; print(_dcf_simhook.PLATFORM or '-', "
                            "os.open.__module__)"], capture_output=True, text=True, timeout=60,
                           env={**{k: v for k, v in os.environ.items() if k != "DISCOMFORT_TEST_PLATFORM"},
                                "PYTHONPATH": HOOK_DIR})
    assert plain.returncode == 0 and plain.stdout.split() == ["-", "posix"], plain.stderr
