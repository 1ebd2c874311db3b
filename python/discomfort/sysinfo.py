"""What the machine offers a run: memory, /dev/shm (or the portable mode's segment directory),
cgroup limits, and the RAM budget from them.

Used to size a context's RAM tier and by `discomfort doctor`. Every reader takes its path as an
argument so tests never depend on the machine's live memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ._pystore import SHM_DIR, prepare_shm_dir, private_dir, read_meminfo, user_temp_dir

BUDGET_FRACTION = 0.5  # of what is available: the rest stays for the workflows themselves
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '2GiB', '1048576' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Cgroup:
    limit: int | None
    usage: int | None


def cgroup_memory(root: str = "/sys/fs/cgroup") -> Cgroup:
    """The cgroup v2 memory limit and usage of this process, when there is a limit."""
    try:
        with open(os.path.join(root, "memory.max")) as fh:
            raw = fh.read().strip()
        limit = None if raw == "max" else int(raw)
        with open(os.path.join(root, "memory.current")) as fh:
            usage = int(fh.read())
        return Cgroup(limit, usage)
    except (OSError, ValueError):
        return Cgroup(None, None)


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
    env = os.environ.get("DISCOMFORT_RAM_BUDGET")
    if env:
        return parse_size(env)
    return default_ram_budget(shm_dir)


def disk_root(explicit: str | os.PathLike | None = None) -> str:
    """Where runs put their disk tier: argument, DISCOMFORT_DISK_DIR, or a private temp folder."""
    if explicit is not None:
        return os.fspath(explicit)
    env = os.environ.get("DISCOMFORT_DISK_DIR")
    if env:
        return env
    try:
        return private_dir(user_temp_dir())
    except PermissionError as exc:
        raise PermissionError(f"{exc}; set DISCOMFORT_DISK_DIR") from None
