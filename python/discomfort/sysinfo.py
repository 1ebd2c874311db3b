"""Internal: what the machine offers a run: memory, /dev/shm (or the portable mode's segment directory),
cgroup limits, and the RAM budget from them; and whether another process shares this host.

Used to size a context's RAM tier and by `discomfort doctor`. Every reader takes its path as an
argument so tests never depend on the machine's live memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from typing import Any

from . import _settings
from ._platform import (  # noqa: F401  (Cgroup and cgroup_memory are part of this module's API)
    MODE, SHARED, SHM_DIR, Cgroup, cgroup_memory, memory_available, prepare_shm_dir, private_dir, read_meminfo,
    user_temp_dir,
)

BUDGET_FRACTION = 0.5  # of what is available: the rest stays for the workflows themselves
UNKNOWN_MEMORY_BUDGET = 1 << 30  # the budget where the system tells nothing of its memory
parse_size = _settings.parse_size  # '512M', '2GiB', '1048576' -> bytes (the settings' size parser)


def shm_space(shm_dir: str = SHM_DIR) -> tuple[int, int]:
    """(size, free bytes) of the filesystem holding the shared-memory segments."""
    prepare_shm_dir(shm_dir)
    st = os.statvfs(shm_dir)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def default_ram_budget(shm_dir: str | None = SHM_DIR, meminfo: str = "/proc/meminfo",
                       cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Half of the available memory, bounded by /dev/shm's free space (``shm_dir`` None, or no
    shared store on this system: a process-local store, not bounded by it) and the cgroup's
    headroom; a quarter of the memory where the system tells its size only (macOS); 1 GiB where
    it tells nothing."""
    avail, total = memory_available(meminfo)
    if avail is None and total is not None:
        avail = int(total * BUDGET_FRACTION)  # taken as what is free: half, then half of that
    candidates = [int(avail * BUDGET_FRACTION)] if avail is not None else []
    if shm_dir is not None and SHARED:
        candidates.append(shm_space(shm_dir)[1])
    cg = cgroup_memory(cgroup_root)
    if cg.limit is not None and cg.usage is not None:
        candidates.append(max(0, int((cg.limit - cg.usage) * BUDGET_FRACTION)))
    if not candidates:
        candidates.append(UNKNOWN_MEMORY_BUDGET)
    return max(0, min(candidates)) // 4096 * 4096


def ram_budget(explicit: int | str | None = None, shm_dir: str | None = SHM_DIR) -> int:
    """The constructor argument wins, then DISCOMFORT_RAM_BUDGET, then the machine's default
    (``shm_dir`` None: for a process-local store)."""
    if explicit is not None:
        return parse_size(explicit) if isinstance(explicit, str) else int(explicit)
    env = _settings.get("DISCOMFORT_RAM_BUDGET")
    if env is not None:
        return int(env)
    return default_ram_budget(shm_dir)


def disk_root(explicit: str | os.PathLike | None = None) -> str:
    """Where runs put their disk tier: argument, DISCOMFORT_DISK_DIR, or a private temp folder."""
    if explicit is not None:
        return os.fspath(explicit)
    env = _settings.get("DISCOMFORT_DISK_DIR")
    if env:
        return str(env)
    try:
        return private_dir(user_temp_dir())
    except PermissionError as exc:
        raise PermissionError(f"{exc}; set DISCOMFORT_DISK_DIR") from None


# ---- is another process on this host, user and /dev/shm? -------------------------------------

#: This process, for host_info where runs are process-local (a new one after a fork).
_PROCESS = [secrets.token_hex(16)]
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, secrets.token_hex(16)))


def host_facts() -> dict[str, Any]:
    """What decides whether two processes can share this run's memory; never sent anywhere.

    "boot" is Linux's boot id; where the system has none (macOS, Windows) it is this process's
    token, so only the same process is known to share memory (a server in a process of its own is
    reached over HTTP). "shm" is the device and inode of where runs keep their segments: /dev/shm,
    or the portable mode's segment folder.
    """
    boot_id: str | None = None
    if sys.platform.startswith("linux"):  # (elsewhere there is no /proc)
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot_id = f.read().strip() or None
        except OSError:
            pass
    shm: tuple[int, int] | None = None
    if SHARED:
        where = "/dev/shm" if MODE == "shm" else SHM_DIR
        try:
            if where == SHM_DIR:
                prepare_shm_dir(where)
            st = os.stat(where)
            shm = (st.st_dev, st.st_ino)
        except OSError:
            pass
    return {"boot_id": boot_id or f"process\x00{_PROCESS[0]}", "process_scoped": boot_id is None,
            "uid": os.getuid() if hasattr(os, "getuid") else None, "shm": shm}


_NONCE = re.compile(r"^[0-9a-f]{32,128}$")


def host_info(nonce: str) -> dict[str, Any]:
    """Keyed digests of this host, user and /dev/shm (where runs are process-local: of this
    process), for the same-host check over HTTP.

    Each digest mixes the asker's ``nonce`` with the boot id, which another machine cannot read:
    the asker compares them with its own :func:`host_info` of the same nonce, and learns only
    whether they match, never a uid, a pid or the boot id itself.
    """
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise ValueError("nonce must be 32-128 lowercase hex digits")
    facts = host_facts()

    def digest(*parts: Any) -> str | None:
        if facts["boot_id"] is None or any(p is None for p in parts):
            return None
        text = "\x00".join(str(p) for p in (nonce, facts["boot_id"], *parts))
        return hashlib.sha256(text.encode()).hexdigest()

    return {
        "nonce": nonce,
        "host": digest("host"),
        "user": digest("user", facts["uid"]),
        # Where a run's memory is: /dev/shm, or (a process-local store) this process: the same
        # digest for the editor panel asking its own server, another for any other process.
        "shm": digest("shm", *(facts["shm"] or (None,))) if SHARED else _process_digest(nonce),
        "version": _package_version(),
    }


def _process_digest(nonce: str) -> str:
    return hashlib.sha256(f"{nonce}\x00process\x00{_PROCESS[0]}".encode()).hexdigest()


def _package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("discomfort")
    except metadata.PackageNotFoundError:
        return None


def new_nonce() -> str:
    return secrets.token_hex(16)


def same_host(a: dict, b: dict) -> bool:
    """Whether two host_info() answers of the same nonce can share POSIX shared memory."""
    return not host_differences(a, b)


def host_differences(a: dict, b: dict) -> list[str]:
    """Why two host_info() answers cannot share memory, in words; empty when they can."""
    a, b = a or {}, b or {}
    if a.get("nonce") is None or a.get("nonce") != b.get("nonce"):
        return ["the answers were made for different nonces"]
    if not SHARED:  # ``a`` is this process's answer (Windows: a process-local store)
        if a.get("shm") is not None and a.get("shm") == b.get("shm"):
            return []  # the same process: its runs are in its own memory
        return ["this process keeps its runs in a process-local store (no shared memory on this system), "
                "and the server is another process"]
    why = []
    if a.get("host") is None or a.get("host") != b.get("host"):
        why.append("another process, and this system has no boot id to tell whether it is the same host"
                   if host_facts()["process_scoped"] else "another host or kernel (boot id differs)")
    elif a.get("user") is None or a.get("user") != b.get("user"):
        why.append("another user")
    if a.get("host") is not None and a.get("host") == b.get("host") \
            and (a.get("shm") is None or a.get("shm") != b.get("shm")):
        why.append("another /dev/shm or segment folder (device or inode differs: a container?)")
    return why
