"""Whether the machine has room for `nbytes` more of shared memory (docs/FORMAT.md, "Memory
probe"); the twin of cpp/src/memprobe.cpp."""

from __future__ import annotations

from .._platform import cgroup_memory, read_meminfo


def memory_allows(probe: str, nbytes: int) -> bool:
    """`probe` is a file in /proc/meminfo format. With the default probe a cgroup v2 memory limit
    must also leave room. A probe without MemTotal/MemAvailable does not refuse."""
    info = read_meminfo(probe)
    avail, total = info.get("MemAvailable"), info.get("MemTotal")
    if avail is None or total is None:
        return True
    reserve = min(1 << 30, total // 10)
    if avail - nbytes < reserve:
        return False
    if probe == "/proc/meminfo":
        cg = cgroup_memory()
        if cg.limit is not None and cg.usage is not None and cg.limit - cg.usage - nbytes < reserve:
            return False
    return True
