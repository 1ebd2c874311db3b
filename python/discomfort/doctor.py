"""`discomfort doctor`: what a run would get on this machine, and plain advice."""

from __future__ import annotations

import os
import shutil
from typing import Any

from . import _backend, sysinfo
from ._platform import MODE, PLATFORM, read_meminfo
from ._version import __version__
from ._pystore.sys import disk_root_problem

MiB = 1 << 20
GiB = 1 << 30


def collect(disk_root: str | None = None, shm_dir: str = sysinfo.SHM_DIR, meminfo: str = "/proc/meminfo",
            cgroup_root: str = "/sys/fs/cgroup") -> dict[str, Any]:
    backend = _backend.name()
    core_version = _backend.module().__version__ if backend == "native" else None
    if MODE == "unsupported":  # nothing local to look at
        return {"version": __version__, "backend": backend, "core_version": None,
                "mode": MODE, "platform": PLATFORM, "shm_dir": None,
                "advice": ["No local store on this system: run discomfort under WSL2, or reach a ComfyUI "
                           "server on Linux with the HTTP transport (discomfort.remote.RemoteContext)."]}
    mem = read_meminfo(meminfo)
    shm_size: int | None
    shm_free: int | None
    try:
        shm_size, shm_free = sysinfo.shm_space(shm_dir)
    except OSError:
        shm_size = shm_free = None
    root = sysinfo.disk_root(disk_root)
    disk = shutil.disk_usage(root)
    cg = sysinfo.cgroup_memory(cgroup_root)
    return {
        "version": __version__,
        "backend": backend,
        "core_version": core_version,
        "mode": MODE,
        "platform": PLATFORM,
        "shm_dir": shm_dir,
        "shm_size": shm_size,
        "shm_free": shm_free,
        "mem_total": mem.get("MemTotal"),
        "mem_available": mem.get("MemAvailable"),
        "cgroup_limit": cg.limit,
        "cgroup_usage": cg.usage,
        "disk_root": root,
        "disk_free": disk.free,
        "ram_budget": sysinfo.default_ram_budget(shm_dir, meminfo, cgroup_root) if shm_size else 0,
        "ram_budget_env": os.environ.get("DISCOMFORT_RAM_BUDGET"),
        "advice": ([problem] if (problem := disk_root_problem(os.path.abspath(root))) else [])
        + advice(shm_size, shm_free, mem.get("MemAvailable"), cg.limit, disk.free, mode=MODE),
    }


def advice(shm_size: int | None, shm_free: int | None, avail: int | None, cg_limit: int | None,
           disk_free: int, mode: str = "shm") -> list[str]:
    out = []
    if mode == "portable":
        out.append("Portable mode (no Linux /dev/shm with OFD locks here): the RAM tier is made of files in the "
                   "segment directory, mapped shared, so the OS may write them back to its disk. Loads stay "
                   "zero-copy. This mode is exercised on Linux by simulation only.")
    elif shm_size is None:
        out.append("No /dev/shm here: every value goes to the disk tier (slower, still zero-copy on load).")
    elif shm_size <= 256 * MiB:
        out.append(f"/dev/shm is only {_fmt(shm_size)} (a container default?): most data will spill to disk. "
                   "Raise it, e.g. `docker run --shm-size=8g`.")
    elif shm_free is not None and shm_free < shm_size // 10:
        out.append(f"/dev/shm is {100 - 100 * shm_free // shm_size}% full: look for leftovers in it.")
    if avail is not None and avail < 2 * GiB:
        out.append(f"Only {_fmt(avail)} of memory available: large values will go to the disk tier.")
    if cg_limit is not None:
        out.append(f"This process runs under a cgroup memory limit of {_fmt(cg_limit)}; the RAM budget respects it.")
    if disk_free < 4 * GiB:
        out.append(f"The disk root has {_fmt(disk_free)} free: set DISCOMFORT_DISK_DIR to a larger filesystem.")
    if not out:
        out.append("All good: values stay in shared memory up to the RAM budget.")
    return out


def _fmt(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


_MODES = {
    "shm": "POSIX shared memory (/dev/shm), OFD locks",
    "portable": "portable: file-backed segments in a private directory, flock lock files",
    "unsupported": "none: no local store on this system",
}


def format_report(r: dict[str, Any]) -> str:
    head = [
        f"discomfort {r['version']}   backend: {r['backend']}"
        + (f" (core {r['core_version']})" if r["core_version"] else " (pure Python)"),
        f"store mode     {_MODES[r['mode']]} [{r['platform']}]",
    ]
    if r["mode"] == "unsupported":
        return "\n".join(head + [""] + [f"- {a}" for a in r["advice"]])
    lines = head + [
        f"segments       {r['shm_dir']}: {_fmt(r['shm_size'])} total, {_fmt(r['shm_free'])} free",
        f"memory         {_fmt(r['mem_available'])} available of {_fmt(r['mem_total'])}",
        f"cgroup limit   {_fmt(r['cgroup_limit']) if r['cgroup_limit'] else 'none'}",
        f"disk root      {r['disk_root']}: {_fmt(r['disk_free'])} free",
        f"RAM budget     {_fmt(r['ram_budget'])} by default"
        + (f" (DISCOMFORT_RAM_BUDGET={r['ram_budget_env']} overrides it)" if r["ram_budget_env"] else ""),
        "",
    ]
    lines += [f"- {a}" for a in r["advice"]]
    return "\n".join(lines)
