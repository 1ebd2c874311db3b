"""Internal: benchmark: the Ray backend against the shared-memory store, as ratios measured in one run.

    python -m discomfort.distributed.bench [--sizes "12 MiB,192 MiB"] [--rounds 7] [--address ADDR] [--json FILE]

Without ``--address`` it starts a two-node Ray cluster on this machine (the second node on
127.0.0.2, one CPU each), which is what the "cross-node" rows cross: a real network between
machines adds its own transfer time on top. Rows, per IMAGE size:

* ``save``: ``ctx.save`` with the previous value's view held (the steady state of a loop);
* ``load``: ``ctx.load`` in the saving process (zero-copy on both backends);
* ``handoff``: ``save`` here, then ``load`` in a worker process: on this node for the
  shared-memory store (it cannot leave the machine), on the other node for Ray (the object is
  copied between the nodes' stores). Both include one Ray actor call (the worker's round trip).

Every row is a steady state: the Ray rows first cycle through the object store once (a fresh Ray
object store pays a page fault per page the first time through, several times a memcpy; setting
``RAY_preallocate_plasma_memory=1`` when starting the nodes moves that cost to start-up).

``x memcpy`` divides by one single-threaded copy of the same bytes into prefaulted memory;
``x shm`` divides a Ray row by the shared-memory row of the same operation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..bench import SIZES, median_ms, memcpy_ms, size_table

MiB = 1 << 20
DEFAULT_SIZES = ("12 MiB", "192 MiB")


@dataclass
class Row:
    size: str
    nbytes: int
    method: str
    backend: str
    median_ms: float
    x_memcpy: float
    x_shm: float | None


class _Loader:
    """A worker process that loads a key of a run (through get_context, as a ComfyUI node does)."""

    def where(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def load(self, run_id: str, key: str) -> int:
        from ..context import get_context

        value = get_context(run_id).load(key)
        return int(value.numel())


def _start_cluster(store_bytes: int) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    args: dict[str, Any] = {"num_cpus": 1, "object_store_memory": store_bytes}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**args, "include_dashboard": False})
    cluster.add_node(**args, node_ip_address="127.0.0.2")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    return cluster


def run(sizes: tuple[str, ...] = DEFAULT_SIZES, rounds: int = 7, address: str | None = None,
        progress: Any = None) -> list[Row]:
    import ray
    import torch
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..context import WorkflowContext
    from ._context import RayContext

    say = progress or (lambda msg: None)
    largest = max(SIZES[s][0] * SIZES[s][1] * SIZES[s][2] * SIZES[s][3] * 4 for s in sizes)
    store_bytes = max(512 * MiB, 5 * largest)
    cluster = None
    if address is None and not ray.is_initialized():
        say("starting a two-node Ray cluster on this machine")
        cluster = _start_cluster(store_bytes)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, ignore_reinit_error=True)
    rows: list[Row] = []
    try:
        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        other = next((n for n in nodes if n != here), None)
        remote: Any = ray.remote(num_cpus=0)(_Loader)
        local_loader = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        far_loader = (remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)).remote()
                      if other else None)
        ray.get([a.where.remote() for a in (local_loader, far_loader) if a is not None])

        for size in sizes:
            tensor = torch.rand(SIZES[size])
            nbytes = tensor.numel() * tensor.element_size()
            r = max(3, rounds if nbytes < 100 * MiB else max(3, rounds // 2))
            ref = memcpy_ms(nbytes, r)
            shm: dict[str, float] = {}

            def add(method: str, backend: str, ms: float) -> None:
                base = shm.get(method) if backend == "ray" else None
                rows.append(Row(size, nbytes, method, backend, round(ms, 4), round(ms / ref, 3),
                                round(ms / base, 2) if base else None))

            add("memcpy (reference)", "-", ref)
            say(f"{size}: shared-memory store")
            with WorkflowContext(ram_budget=4 * nbytes + 64 * MiB) as ctx:
                shm.update(_measure(ctx, tensor, r, local_loader, 1))
            for method, ms in shm.items():
                add(method, "shm", ms)
            say(f"{size}: Ray backend")
            with RayContext() as rctx:
                # Warm up through the whole object store first: Ray puts each new object in fresh
                # memory while the previous one is being freed, and a first pass pays page faults.
                warmup = min(64, store_bytes // nbytes + 2)
                for method, ms in _measure(rctx, tensor, r, far_loader or local_loader, warmup).items():
                    add(method, "ray", ms)
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    return rows


def _measure(ctx: Any, tensor: Any, rounds: int, loader: Any, warmup: int) -> dict[str, float]:
    import ray

    held = {"view": None}

    def save() -> None:
        ctx.save("image", tensor)
        held["view"] = ctx.load("image")

    def load() -> None:
        ctx.load("image")

    def handoff() -> None:
        held["view"] = None
        ctx.save("image", tensor)
        ray.get(loader.load.remote(ctx.run_id, "image"))

    out = {"save": median_ms(save, rounds, warmup), "load": median_ms(load, rounds),
           "handoff": median_ms(handoff, rounds, warmup)}
    held.clear()
    return out


def format_table(rows: list[Row]) -> str:
    return size_table(rows, [
        ("method", 20, "", lambda r: r.method), ("backend", 8, "", lambda r: r.backend),
        ("median ms", 10, ".3f", lambda r: r.median_ms), ("x memcpy", 9, ".3f", lambda r: r.x_memcpy),
        ("x shm", 8, ".2f", lambda r: r.x_shm),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m discomfort.distributed.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start one here)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose among {list(SIZES)}")
    t0 = time.monotonic()
    rows = run(sizes, args.rounds, args.address, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows))
    print(f"\n({time.monotonic() - t0:.0f}s, pid {os.getpid()})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
