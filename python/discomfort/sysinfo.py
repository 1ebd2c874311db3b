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
from typing import Any

from . import _settings
from ._platform import (  # noqa: F401  (Cgroup and cgroup_memory are part of this module's API)
    SHM_DIR, Cgroup, cgroup_memory, prepare_shm_dir, private_dir, read_meminfo, user_temp_dir,
)

BUDGET_FRACTION = 0.5  # of what is available: the rest stays for the workflows themselves
parse_size = _settings.parse_size  # '512M', '2GiB', '1048576' -> bytes (the settings' size parser)


def shm_space(shm_dir: str = SHM_DIR) -> tuple[int, int]:
    """(size, free bytes) of the filesystem holding the shared-memory segments."""
    prepare_shm_dir(shm_dir)
    st = os.statvfs(shm_dir)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def default_ram_budget(shm_dir: str = SHM_DIR, meminfo: str = "/proc/meminfo",
                       cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Half of MemAvailable, bounded by /dev/shm's free space and the cgroup's headroom."""
    avail = read_meminfo(meminfo).get("MemAvailable")
    candidates = [int(avail * BUDGET_FRACTION)] if avail is not None else []
    candidates.append(shm_space(shm_dir)[1])
    cg = cgroup_memory(cgroup_root)
    if cg.limit is not None and cg.usage is not None:
        candidates.append(max(0, int((cg.limit - cg.usage) * BUDGET_FRACTION)))
    return max(0, min(candidates)) // 4096 * 4096


def ram_budget(explicit: int | str | None = None, shm_dir: str = SHM_DIR) -> int:
    """The constructor argument wins, then DISCOMFORT_RAM_BUDGET, then the machine's default."""
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

def host_facts() -> dict[str, Any]:
    """What decides whether two processes can share this run's memory; never sent anywhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id: str | None = f.read().strip() or None
    except OSError:
        boot_id = None
    try:
        st = os.stat("/dev/shm")
        shm: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        shm = None
    return {"boot_id": boot_id, "uid": os.getuid() if hasattr(os, "getuid") else None, "shm": shm}


_NONCE = re.compile(r"^[0-9a-f]{32,128}$")


def host_info(nonce: str) -> dict[str, Any]:
    """Keyed digests of this host, user and /dev/shm, for the same-host check over HTTP.

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
        "shm": digest("shm", *(facts["shm"] or (None,))),
        "version": _package_version(),
    }


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
    why = []
    if a.get("host") is None or a.get("host") != b.get("host"):
        why.append("another host or kernel (boot id differs)")
    elif a.get("user") is None or a.get("user") != b.get("user"):
        why.append("another user")
    if a.get("host") is not None and a.get("host") == b.get("host") \
            and (a.get("shm") is None or a.get("shm") != b.get("shm")):
        why.append("another /dev/shm (device or inode differs: a container?)")
    return why
