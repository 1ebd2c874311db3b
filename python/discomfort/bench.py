"""`discomfort bench`: what saving and loading cost here, as ratios to one memcpy.

Every figure is a median of several rounds, measured in the same run as the memcpy reference
(one single-threaded copy into memory that is already faulted in), because only ratios hold on a
shared, noisy machine.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

MiB = 1 << 20

# name -> IMAGE shape [B, H, W, C] (float32)
SIZES = {
    "1 MiB": (1, 256, 256, 4),
    "12 MiB": (1, 1024, 1024, 3),
    "192 MiB": (16, 1024, 1024, 3),
    "512 MiB": (32, 1024, 1024, 4),
}
QUICK_SIZES = ("1 MiB", "12 MiB", "192 MiB")
LEGACY_MAX_BYTES = 192 * MiB  # past this one legacy round trip takes tens of seconds


@dataclass
class Row:
    size: str
    nbytes: int
    method: str
    backend: str
    median_ms: float
    gbps: float
    ratio: float  # to memcpy of the same bytes, same run
    zero_copy: bool


def median_ms(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e6


def memcpy_ms(nbytes: int, rounds: int) -> float:
    """One single-threaded copy into prefaulted memory: the reference every ratio divides by."""
    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)  # touched, so no page faults are measured
    return median_ms(lambda: np.copyto(dst, src), rounds)


def legacy_round_trip(tensor: Any) -> Any:
    """The old path: torch.save, base64 inside prompt JSON, and back."""
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    prompt = json.dumps({"inputs": {"data": base64.b64encode(buf.getvalue()).decode("ascii")}})
    raw = base64.b64decode(json.loads(prompt)["inputs"]["data"])
    return torch.load(io.BytesIO(raw), weights_only=True)


def bench_store(backend: str, tensor: Any, rounds: int, disk: bool = False) -> dict[str, tuple[float, bool]]:
    """save (with a view of the previous value held, as a loop does), load, and round trip."""
    from .context import WorkflowContext

    nbytes = tensor.numel() * tensor.element_size()
    budget = 1 * MiB if disk else 3 * nbytes + 64 * MiB
    with tempfile.TemporaryDirectory() as tmp, WorkflowContext(
        backend=backend, ram_budget=budget, disk_dir=tmp
    ) as ctx:
        held = {"view": None}

        def save() -> None:
            ctx.save("image", tensor)
            held["view"] = ctx.load("image")  # the steady state of an iteration loop

        def load() -> None:
            ctx.load("image")

        def round_trip() -> None:
            ctx.save("image", tensor)
            held["view"] = ctx.load("image")

        out = {"save": (median_ms(save, rounds), False), "load": (median_ms(load, rounds), True),
               "save+load": (median_ms(round_trip, rounds), False)}
        loaded = ctx.load("image")
        mapping = ctx.store.disk_dir if disk else ctx.store.shm_dir.rstrip("/") + "/"
        out["load"] = (out["load"][0], _lies_in(loaded.data_ptr(), mapping))
        held.clear()
        return out


def _lies_in(addr: int, prefix: str) -> bool:
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return len(parts) > 5 and parts[5].startswith(prefix)
    return False


def run(sizes: tuple[str, ...], backends: list[str], rounds: int, disk_tier: bool = True,
        legacy: bool = True, progress: Callable[[str], None] | None = None) -> list[Row]:
    import torch

    rows: list[Row] = []
    steps = len(sizes) * (1 + len(backends) * (2 if disk_tier else 1) + (1 if legacy else 0))
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"[{done}/{steps}] {label}")

    for size in sizes:
        shape = SIZES[size]
        tensor = torch.rand(shape)
        nbytes = tensor.numel() * 4
        r = max(3, rounds if nbytes < 100 * MiB else rounds // 2)

        def add(method: str, backend: str, ms: float, zero_copy: bool) -> None:
            rows.append(Row(size, nbytes, method, backend, round(ms, 4),
                            round(nbytes / (ms / 1e3) / 1e9, 2) if ms > 0 else float("inf"),
                            round(ms / ref, 3), zero_copy))

        ref = memcpy_ms(nbytes, r)
        add("memcpy (reference)", "-", ref, False)
        step(f"{size}: memcpy")
        for backend in backends:
            tiers = [("ram", False)] + ([("disk", True)] if disk_tier else [])
            for tier, disk in tiers:
                for method, (ms, zc) in bench_store(backend, tensor, r, disk).items():
                    add(f"{method} [{tier}]", backend, ms, zc)
                step(f"{size}: {backend} {tier} tier")
        if legacy:
            if nbytes <= LEGACY_MAX_BYTES:
                add("legacy base64 round trip", "-", median_ms(lambda: legacy_round_trip(tensor), 3, 0), False)
            step(f"{size}: legacy")
    return rows


Column = tuple  # (header, width, format spec or "" for text, the row's value)


def size_table(rows: list[Any], columns: list[Column]) -> str:
    """Rows grouped by IMAGE size (each row has ``size`` and ``nbytes``), one line per row."""
    def cell(width: int, spec: str, value: Any) -> str:
        if value is None:
            return " " * width
        return format(value, f">{width}{spec}") if spec else format(str(value), f"<{width}")

    out = []
    for size in dict.fromkeys(r.size for r in rows):
        sub = [r for r in rows if r.size == size]
        out.append(f"\n{size} IMAGE ({sub[0].nbytes / MiB:.0f} MiB)")
        out.append("  " + " ".join(format(h, f"<{w}" if not spec else f">{w}") for h, w, spec, _ in columns))
        for r in sub:
            out.append("  " + " ".join(cell(w, spec, get(r)) for _h, w, spec, get in columns))
    return "\n".join(out)


def format_table(rows: list[Row]) -> str:
    return size_table(rows, [
        ("method", 28, "", lambda r: r.method), ("backend", 8, "", lambda r: r.backend),
        ("median ms", 10, ".3f", lambda r: r.median_ms), ("GB/s", 8, ".2f", lambda r: r.gbps),
        ("x memcpy", 9, ".3f", lambda r: r.ratio), ("zero-copy", 9, "", lambda r: "yes" if r.zero_copy else "no"),
    ])


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(f"{r.method} / {r.backend}" for r in rows) if "memcpy" not in m]
    sizes = list(dict.fromkeys(r.size for r in rows))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((r.ratio for r in rows if r.size == s and f"{r.method} / {r.backend}" == m), 0) for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_yscale("log")
    ax.set_ylabel("time / memcpy (lower is better)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
