"""Internal: `discomfort doctor`: what a run would get on this machine, plain advice, and a check.

The check does what a run does: it reads the settings (``DISCOMFORT_RAM_BUDGET``,
``DISCOMFORT_DISK_DIR``, ``DISCOMFORT_TRANSPORT``), checks the disk root's type, owner and mode,
and creates and removes a tiny run whose RAM budget is too small for one of its two values, so
that both tiers are written and read back. What fails is in ``report["problems"]``, one line
each with the fix.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from . import _backend, _settings, sysinfo
from ._platform import MODE, PLATFORM, SHARED, memory_available
from ._version import __version__
from ._runfiles import disk_root_problem
from ._sweep import local_root_problem

MiB = 1 << 20
GiB = 1 << 30


def collect(disk_root: str | None = None, shm_dir: str = sysinfo.SHM_DIR, meminfo: str = "/proc/meminfo",
            cgroup_root: str = "/sys/fs/cgroup", check: bool = True) -> dict[str, Any]:
    """What a run would get here; ``check``: also create and remove a tiny run (both tiers)."""
    backend = _backend.name()
    core_version = _backend.module().__version__ if backend == "native" else None
    mem_available, mem_total = memory_available(meminfo)
    shm_size: int | None = None
    shm_free: int | None = None
    if SHARED:
        try:
            shm_size, shm_free = sysinfo.shm_space(shm_dir)
        except OSError:
            pass
    problems: list[str] = []
    notes: list[str] = []
    budget_env = _settings.raw("DISCOMFORT_RAM_BUDGET")
    if budget_env:
        try:
            _settings.get("DISCOMFORT_RAM_BUDGET")
        except ValueError:
            problems.append(f"DISCOMFORT_RAM_BUDGET={budget_env!r} is not a size, so every run fails; "
                            "set it to bytes or a K/M/G/T size (e.g. DISCOMFORT_RAM_BUDGET=8G) or unset it")
    try:
        _settings.get("DISCOMFORT_TRANSPORT")
    except ValueError:
        *some, last = _settings.TRANSPORTS
        problems.append(f"DISCOMFORT_TRANSPORT={_settings.raw('DISCOMFORT_TRANSPORT')!r} is not a transport, so runs "
                        f"on a server fail; set it to {', '.join(some)} or {last}, or unset it")
    # every other setting (those two are said above, with what they break)
    problems += _settings.problems(skip=("DISCOMFORT_RAM_BUDGET", "DISCOMFORT_TRANSPORT"))
    where = "--disk-dir" if disk_root is not None else (
        "DISCOMFORT_DISK_DIR" if _settings.is_set("DISCOMFORT_DISK_DIR") else "the default disk root")
    try:
        root = sysinfo.disk_root(disk_root)
    except OSError as exc:
        root = None
        problems.append(f"cannot make the default disk root: {exc}")
    disk_free = None
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
        existing = _existing_ancestor(root)
        if existing != root:
            if os.path.isdir(existing):
                notes.append(f"The disk root {root} does not exist yet; a run creates it (mode 0700).")
            else:
                problems.append(f"{where} {root} cannot be a folder: {existing} is not a directory; "
                                "give a directory of your own (mode 0700)")
        elif not os.path.isdir(root) and not os.path.islink(root):
            problems.append(f"{where} {root} is not a directory; give a directory of your own (mode 0700)")
        elif problem := (disk_root_problem(root) if SHARED else local_root_problem(root)):
            problems.append(problem)
        try:
            disk_free = shutil.disk_usage(existing if os.path.isdir(existing) else os.path.dirname(existing)).free
        except (OSError, AttributeError):  # AttributeError: a system without statvfs, as simulated
            disk_free = None
    cg = sysinfo.cgroup_memory(cgroup_root)
    if check and not problems and root is not None:
        problem = try_a_run(root)
        if problem:
            problems.append(problem)
    return {
        "version": __version__,
        "backend": backend,
        "core_version": core_version,
        "mode": MODE,
        "store": "shared" if SHARED else "local",
        "platform": PLATFORM,
        "shm_dir": shm_dir if SHARED else None,
        "shm_size": shm_size,
        "shm_free": shm_free,
        "mem_total": mem_total,
        "mem_available": mem_available,
        "cgroup_limit": cg.limit,
        "cgroup_usage": cg.usage,
        "disk_root": root,
        "disk_free": disk_free,
        "ram_budget": sysinfo.default_ram_budget(shm_dir if SHARED else None, meminfo, cgroup_root)
        if shm_size or not SHARED else 0,
        "ram_budget_env": budget_env,
        "problems": problems,
        "checked": check and not problems and root is not None,
        "advice": problems + notes + advice(shm_size, shm_free, mem_available, cg.limit, disk_free,
                                            mode=MODE, problems=bool(problems)),
    }


def _existing_ancestor(path: str) -> str:
    """``path`` itself when it exists (a link counts), else its nearest existing ancestor."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def try_a_run(root: str) -> str | None:
    """Create a run as ``WorkflowContext`` does, with a RAM budget too small for one of its two
    values, write both tiers, read them back and remove it; folders it had to make for the disk
    root are removed again. Returns what failed, with the fix, or None."""
    from .context import WorkflowContext, release_pool

    made = []
    path = root
    while not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    small, big = b"s" * 100, b"b" * (2 * MiB)
    step = "create a run"
    try:
        with WorkflowContext(ram_budget=MiB, disk_dir=root) as ctx:
            step = "save a value in memory"
            ctx.save("small", small)
            step = "save a value on the disk tier"
            ctx.save("big", big)
            step = "read the values back"
            tiers = (ctx.info("small")["tier"], ctx.info("big")["tier"])
            if ctx.load("small") != small or ctx.load("big") != big:
                return f"a test run in {root} read back other bytes than it saved; please report this"
            run_dir = os.path.join(root, f"dcf-{ctx.run_id}")
        if tiers[1] != "disk":
            return f"a test run with a 1 MiB RAM budget kept a 2 MiB value in {tiers[1]}, not on disk; please report this"
        if os.path.lexists(run_dir):
            return f"a test run left its disk folder {run_dir} behind; remove it and report this"
        return None
    except Exception as exc:  # noqa: BLE001 - what a run would hit, in one line
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fix = "" if "DISK_DIR" in text or "disk_dir" in text else \
            "; set DISCOMFORT_DISK_DIR (or --disk-dir) to a directory of your own (mode 0700)" \
            if isinstance(exc, OSError) else ""
        return f"a test run failed to {step} (disk root {root}): {text}{fix}"
    finally:
        release_pool()
        for folder in made:  # innermost first; only if still empty
            try:
                os.rmdir(folder)
            except OSError:
                break


def advice(shm_size: int | None, shm_free: int | None, avail: int | None, cg_limit: int | None,
           disk_free: int | None, mode: str = "shm", problems: bool = False) -> list[str]:
    out = []
    if mode == "local":
        out.append("Process-local store (no shared memory on this system): a run stays in the process that creates "
                   "it. ComfyUI in that process (InProcessComfy) and ComfyUI servers reached over HTTP (their node "
                   "pack keeps the run in the server) work; another process cannot attach a run. Loads from the RAM "
                   "tier are copies; loads from the disk tier are zero-copy mappings.")
    elif mode == "portable":
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
    if disk_free is not None and disk_free < 4 * GiB:
        out.append(f"The disk root has {_fmt(disk_free)} free: set DISCOMFORT_DISK_DIR to a larger filesystem.")
    if mode == "local" and not problems and len(out) == 1:
        out.append("All good: values stay in this process's memory up to the RAM budget.")
    if not out and not problems:
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
    "local": "process-local: runs stay in the process that creates them (no shared memory here)",
}


def format_report(r: dict[str, Any]) -> str:
    head = [
        f"discomfort {r['version']}   backend: {r['backend']}"
        + (f" (core {r['core_version']})" if r["core_version"] else " (pure Python)"),
        f"store mode     {_MODES[r['mode']]} [{r['platform']}]",
    ]
    segments = (f"{r['shm_dir']}: {_fmt(r['shm_size'])} total, {_fmt(r['shm_free'])} free" if r["shm_dir"]
                else "none: values in RAM are held in the run's own process")
    lines = head + [
        f"segments       {segments}",
        f"memory         {_fmt(r['mem_available'])} available of {_fmt(r['mem_total'])}",
        f"cgroup limit   {_fmt(r['cgroup_limit']) if r['cgroup_limit'] else 'none'}",
        f"disk root      {r['disk_root']}: {_fmt(r['disk_free'])} free",
        "test run       " + ("created and removed: both tiers written and read back" if r.get("checked")
                             else "not tried (fix the problems below first)" if r.get("problems") else "skipped"),
        f"RAM budget     {_fmt(r['ram_budget'])} by default"
        + (f" (DISCOMFORT_RAM_BUDGET={r['ram_budget_env']} overrides it)" if r["ram_budget_env"] else ""),
        "",
    ]
    lines += [f"- {a}" for a in r["advice"]]
    return "\n".join(lines)
