"""Internal: `discomfort bench`: what saving and loading cost here, as ratios to one memcpy.

Every figure is a median of several rounds, measured in the same run as the memcpy reference
(one single-threaded copy into memory that is already faulted in), because only ratios hold on a
shared, noisy machine.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

MiB = 1 << 20

# name -> a float32 tensor shape of what ComfyUI passes at that size
SIZES = {
    "64 KiB": (1, 4, 64, 64),  # a LATENT of a 512x512 image
    "256 KiB": (1, 64, 1024),  # CONDITIONING (a short prompt's embeddings)
    "1 MiB": (1, 256, 256, 4),  # IMAGE [B, H, W, C]
    "12 MiB": (1, 1024, 1024, 3),
    "192 MiB": (16, 1024, 1024, 3),
    "512 MiB": (32, 1024, 1024, 4),
}
QUICK_SIZES = ("64 KiB", "256 KiB", "1 MiB", "12 MiB", "192 MiB")
LEGACY_MAX_BYTES = 192 * MiB  # past this one legacy round trip takes tens of seconds
KINDS = {"64 KiB": "LATENT", "256 KiB": "CONDITIONING"}  # the rest are IMAGE batches

#: What each row measures; printed under the table.
NOTES = (
    "memcpy (reference): one single-threaded np.copyto into memory already faulted in; every ratio divides by it",
    "save: WorkflowContext.save alone, while a view of the key's previous value is still held (a loop's "
    "steady state); the view is taken outside the timed region",
    "load: WorkflowContext.load alone (a private view; its pages are not touched)",
    "save+load: both, timed together, in the same steady state: about save + load",
    "handoff: save here, then another process loads it and reads one byte per page; timed here, "
    "from the save to the reply (includes one pipe round trip, ~0.1 ms)",
    "load+touch (other process): the loading process's own time for its load and the page reads",
    "http save / http load: RemoteContext against a run server in another process (the node pack's "
    "routes, python -m discomfort.remote.standalone) over loopback; load makes a new value here",
    "legacy base64 round trip: torch.save -> base64 in prompt JSON -> back (the path this replaces)",
)
#: Why the rows that need a second process are missing for the process-local store.
LOCAL_LEFT_OUT = ("handoff rows: left out for the local backend (a process-local run cannot be reached from "
                  "another process; values go to a ComfyUI server over HTTP instead, the http rows)")


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


def median_ms_after(setup: Callable[[], Any], fn: Callable[[], Any], rounds: int, warmup: int = 1) -> float:
    """median_ms of `fn` alone, with `setup` run (untimed) before each call."""
    for _ in range(warmup):
        setup()
        fn()
    times = []
    for _ in range(rounds):
        setup()
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
    budget = 0 if disk else 3 * nbytes + 64 * MiB  # disk: every value goes to the disk tier
    with tempfile.TemporaryDirectory() as tmp, WorkflowContext(
        backend=backend, ram_budget=budget, disk_dir=tmp
    ) as ctx:
        held = {"view": None}
        ctx.save("image", tensor)

        def hold() -> None:  # the steady state of an iteration loop: last round's value in use
            held["view"] = ctx.load("image")

        def save() -> None:
            ctx.save("image", tensor)

        def load() -> None:
            ctx.load("image")

        def round_trip() -> None:
            ctx.save("image", tensor)
            held["view"] = ctx.load("image")

        out = {"save": (median_ms_after(hold, save, rounds), False), "load": (median_ms(load, rounds), True),
               "save+load": (median_ms(round_trip, rounds), False)}
        loaded = ctx.load("image")
        if ctx.backend == "local" or not sys.platform.startswith("linux"):  # no segments, or no /proc
            zero_copy = bool(ctx.load_encoded("image")[3]["zero_copy"])  # the store's own word
        else:  # a mapping of the run's own files, as the system itself lists it
            mapping = ctx.store.disk_dir if disk else ctx.store.shm_dir.rstrip("/") + "/"
            zero_copy = _lies_in(loaded.data_ptr(), mapping)
        out["load"] = (out["load"][0], zero_copy)
        del loaded
        held.clear()  # no view maps a file of the run when it ends (Windows cannot delete a mapped file)
        return out


def _handoff_child(run_id: str, backend: str, conn: Any) -> None:
    """The other process of the handoff rows: load what the parent saved, read one byte per page."""
    from .context import WorkflowContext

    ctx = WorkflowContext.attach(run_id, backend=backend)
    try:
        view = None
        while True:
            key = conn.recv()
            if key is None:
                return
            t0 = time.perf_counter_ns()
            view = ctx.load(key)
            flat = view.reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].sum()  # one read per page
            conn.send(time.perf_counter_ns() - t0)
    finally:
        del view
        ctx.close()


def bench_handoff(backend: str, tensor: Any, rounds: int) -> dict[str, tuple[float, bool]]:
    """save in this process, load and touch in another (spawned, so it shares nothing with us)."""
    import multiprocessing

    from .context import WorkflowContext

    nbytes = tensor.numel() * tensor.element_size()
    mp = multiprocessing.get_context("spawn")
    with WorkflowContext(backend=backend, ram_budget=3 * nbytes + 64 * MiB) as ctx:
        ours, theirs = mp.Pipe()
        child = mp.Process(target=_handoff_child, args=(ctx.run_id, backend, theirs), daemon=True)
        child.start()
        child_ns: list[int] = []
        try:
            def handoff() -> None:
                ctx.save("image", tensor)
                ours.send("image")
                child_ns.append(ours.recv())

            total = median_ms(handoff, rounds)
            ours.send(None)
            child.join(60)
        finally:
            if child.is_alive():
                child.kill()
        return {"handoff": (total, True),
                "load+touch (other process)": (statistics.median(child_ns[1:] or child_ns) / 1e6, True)}


def http_available() -> bool:
    """Whether this Python has what the HTTP rows need (aiohttp for the server, requests)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "requests"))


def bench_http(tensor: Any, rounds: int) -> dict[str, tuple[float, bool]]:
    """save and load over HTTP, to a run server in a process of its own, over loopback."""
    import secrets

    from .remote import RemoteContext, standalone

    secret = secrets.token_urlsafe(24)
    nbytes = tensor.numel() * tensor.element_size()
    with standalone.start(secret, timeout=30) as (url, _), \
            RemoteContext(url, secret=secret, ram_budget=2 * nbytes + 64 * MiB) as rc:
        return {"http save": (median_ms(lambda: rc.save("image", tensor), rounds), False),
                "http load": (median_ms(lambda: rc.load("image"), rounds), False)}


def _lies_in(addr: int, prefix: str) -> bool:
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return len(parts) > 5 and parts[5].startswith(prefix)
    return False


def run(sizes: tuple[str, ...], backends: list[str], rounds: int, disk_tier: bool = True,
        legacy: bool = True, progress: Callable[[str], None] | None = None, http: bool = False) -> list[Row]:
    import torch

    rows: list[Row] = []
    handoffs = [b for b in backends if b != "local"]  # a local run has no second process to hand off to
    steps = len(sizes) * (1 + len(backends) * (2 if disk_tier else 1) + len(handoffs) + (1 if legacy else 0)
                          + (1 if http else 0))
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
        # Small values take microseconds: more rounds make their medians steady.
        r = max(3, rounds if nbytes < 100 * MiB else rounds // 2) * (20 if nbytes <= MiB else 1)

        def add(method: str, backend: str, ms: float, zero_copy: bool) -> None:
            rows.append(Row(size, nbytes, method, backend, round(ms, 6),
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
            if backend not in handoffs:
                continue
            for method, (ms, zc) in bench_handoff(backend, tensor, r).items():
                add(f"{method} [ram]", backend, ms, zc)
            step(f"{size}: {backend} handoff to another process")
        if http:
            for method, (ms, zc) in bench_http(tensor, max(5, r // 2)).items():
                add(method, "-", ms, zc)
            step(f"{size}: HTTP to a server process")
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
        out.append(f"\n{size} {KINDS.get(size, 'IMAGE')} ({_bytes(sub[0].nbytes)})")
        out.append("  " + " ".join(format(h, f"<{w}" if not spec else f">{w}") for h, w, spec, _ in columns))
        for r in sub:
            out.append("  " + " ".join(cell(w, spec, get(r)) for _h, w, spec, get in columns))
    return "\n".join(out)


def _bytes(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def format_table(rows: list[Row]) -> str:
    notes = NOTES + ((LOCAL_LEFT_OUT,) if any(r.backend == "local" for r in rows) else ())
    return _table(rows) + "\n\nWhat each row measures (medians; ratios to the memcpy of the same size, same run):\n" + \
        "\n".join(f"  - {note}" for note in notes)


def _table(rows: list[Row]) -> str:
    return size_table(rows, [
        ("method", 36, "", lambda r: r.method), ("backend", 8, "", lambda r: r.backend),
        ("median ms", 10, ".4f", lambda r: r.median_ms), ("GB/s", 8, ".2f", lambda r: r.gbps),
        ("x memcpy", 9, ".3f", lambda r: r.ratio), ("zero-copy", 9, "", lambda r: "yes" if r.zero_copy else "no"),
    ])


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def machine_line() -> str:
    """CPU model, cores, memory and kernel, for the plot and the README."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    if sys.platform == "win32":  # no /proc there
        return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
        mem = f", {kib / (1 << 20):.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def legend_label(method: str, backend: str) -> str:
    """ "save [ram]", "native" -> "save, RAM tier (native)"; rows without a backend keep their name."""
    name, _, tier = method.partition(" [")
    tier = tier.rstrip("]")
    where = {"ram": "RAM tier", "disk": "disk tier"}.get(tier, tier)
    parts = [name] + ([where] if where else [])
    label = ", ".join(parts)
    return f"{label} ({backend})" if backend not in ("", "-") else label


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [k for k in dict.fromkeys((r.method, r.backend) for r in rows) if "memcpy" not in k[0]]
    sizes = list(dict.fromkeys(r.size for r in rows))
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / max(1, len(series))
    for i, (method, backend) in enumerate(series):
        vals = [next((r.ratio for r in rows if r.size == s and (r.method, r.backend) == (method, backend)), 0)
                for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=legend_label(method, backend))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_yscale("log")
    ax.set_ylabel("time / memcpy of the same bytes (lower is better)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("discomfort: save and load as multiples of one memcpy (medians, same run)", fontsize=11)
    fig.text(0.01, 0.01, machine_line(), fontsize=8, color="dimgray")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
