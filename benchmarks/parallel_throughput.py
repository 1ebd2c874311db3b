"""Throughput of ``run_parallel`` against the number of ComfyUI servers, and what a run costs.

    DISCOMFORT_COMFYUI=... python benchmarks/parallel_throughput.py [--runs 8] [--no-ray] [--json out.json]

Two workflows, each one node between two ports: ``DiscomfortTestSleep`` (its time is waiting, as
a CPU waits for a GPU) and ``DiscomfortTestBusy`` (a fixed amount of single-threaded CPU work),
from the test pack in tests/comfy/test_pack. Each runs ``--runs`` times on 1, 2 and 4 launched
servers over shared memory, then on a Ray pool of 1 and 2 servers (a two-node cluster on this
machine); beside each figure the ideal, k times one server's. Then the parts of a run's own cost:
its run context made and removed (shared memory, HTTP, Ray), the transport choice (once per
server per batch), and a whole trivial run. Prints a markdown table (docs/PARALLEL.md) and,
with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from discomfort import WorkflowContext, run_parallel
from discomfort.comfy import launch_server
from discomfort.workflows.tools import choose_transport

REPO = Path(__file__).resolve().parents[1]
PACKS = [REPO / "comfy_nodes", REPO / "tests" / "comfy" / "test_pack"]


def _workflow(node: str, **widgets) -> dict:
    return {
        "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
        "2": {"class_type": node, "inputs": {"value": ["1", 0], **widgets}} if node != "ImageInvert"
        else {"class_type": node, "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["2", 0]}},
    }


def _batch(workflow: dict, runs: int, executors) -> float:
    """Seconds for ``runs`` runs of ``workflow`` spread over ``executors`` (all must succeed)."""
    inputs = [{"image": torch.rand(1, 64, 64, 3)} for _ in range(runs)]
    t0 = time.perf_counter()
    results = run_parallel([workflow], inputs, executors, timeout=600)
    seconds = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return seconds


def _scaling(label: str, workflows: dict, runs: int, sets: list[tuple[int, object]], rows: list) -> None:
    for name, wf in workflows.items():
        base = None
        for k, executors in sets:
            _batch(wf, k, executors)  # each server runs the workflow once first (imports, caches)
            seconds = _batch(wf, runs, executors)
            rate = runs / seconds
            base = rate if base is None else base
            rows.append({"where": label, "workflow": name, "servers": k, "runs": runs, "seconds": seconds,
                         "runs_per_s": rate, "ideal_runs_per_s": k * base, "of_ideal": rate / (k * base)})
            print(f"{label:>16} {name:>8} k={k}: {rate:.2f} runs/s (ideal {k * base:.2f}, "
                  f"{rate / (k * base):.2f})", flush=True)


def _mean_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _local(args, rows: list, costs: dict) -> None:
    comfy = os.environ["DISCOMFORT_COMFYUI"]
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stack.enter_context, launch_server(comfy, isolated=True, custom_nodes=PACKS, api_nodes=False,
                                                                      startup_timeout=300)) for _ in range(4)]
            servers = [f.result() for f in futures]
        costs["4 servers started (s)"] = time.perf_counter() - t0
        sets = [(k, servers[:k]) for k in (1, 2, 4)]
        _scaling("launched servers", args.workflows, args.runs, sets, rows)

        server = servers[0]
        costs["transport choice, once per server per batch (ms)"] = _mean_ms(lambda: choose_transport(server), 20)
        costs["run context made and removed: shared memory (ms)"] = _mean_ms(lambda: WorkflowContext().shutdown(), 50)

        def remote() -> None:
            from discomfort.remote import RemoteContext

            RemoteContext(server.url).shutdown()

        costs["run context made and removed: HTTP (ms)"] = _mean_ms(remote, 20)
        trivial = _workflow("ImageInvert")
        _batch(trivial, 1, [server])
        n = 20
        costs["a whole trivial run on one server, end to end (ms)"] = 1000 * _batch(trivial, n, [server]) / n
        sleep_rows = [r for r in rows if r["workflow"] == "waiting" and r["servers"] == 1]
        if sleep_rows:
            r = sleep_rows[0]
            costs[f"a {args.sleep:g} s waiting run on one server: time beyond the wait (ms)"] = \
                1000 * (r["seconds"] / r["runs"] - args.sleep)


def _ray(args, rows: list, costs: dict) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from discomfort.distributed import RayComfyPool, RayRun

    parent = str(Path(sys.modules["discomfort"].__file__).resolve().parents[1])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([parent] + ([saved] if saved else []))
    node_args = {"num_cpus": 1, "object_store_memory": 200 << 20}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args, node_ip_address="127.0.0.2")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    try:
        comfy = os.environ["DISCOMFORT_COMFYUI"]
        for size in (1, 2):
            with RayComfyPool(comfy, isolated=True, size=size, custom_nodes=PACKS, startup_timeout=300) as pool:
                for name, wf in args.workflows.items():
                    _batch(wf, size, pool)
                    seconds = _batch(wf, args.runs, pool)
                    rate = args.runs / seconds
                    base = next((r["runs_per_s"] for r in rows if r["where"] == "Ray pool" and r["workflow"] == name
                                 and r["servers"] == 1), rate)
                    rows.append({"where": "Ray pool", "workflow": name, "servers": size, "runs": args.runs,
                                 "seconds": seconds, "runs_per_s": rate, "ideal_runs_per_s": size * base,
                                 "of_ideal": rate / (size * base)})
                    print(f"{'Ray pool':>16} {name:>8} k={size}: {rate:.2f} runs/s (ideal {size * base:.2f})",
                          flush=True)
                    if size == 1 and name == "waiting":
                        costs[f"Ray: a {args.sleep:g} s waiting run on a pool of one: time beyond the wait (ms)"] = \
                            1000 * (seconds / args.runs - args.sleep)
                if size == 2:
                    costs["Ray: a run (RayRun: its directory actor) made and removed (ms)"] = _mean_ms(
                        lambda: RayRun(pool).close(), 10)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _table(rows: list, costs: dict, args) -> str:
    out = ["| where | workflow | servers | runs/s | ideal (k x one server) | of ideal |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['where']} | {r['workflow']} | {r['servers']} | {r['runs_per_s']:.2f} | "
                   f"{r['ideal_runs_per_s']:.2f} | {r['of_ideal']:.2f} |")
    out += ["", "| per-run cost | ms |", "|---|---:|"]
    out += [f"| {k.removesuffix(' (ms)')} | {v:.1f} |" for k, v in costs.items() if k.endswith("(ms)")]
    out += ["", f"{args.runs} runs per figure; waiting: {args.sleep} s per run; CPU: {args.rounds} rounds of "
                f"SHA-256 over 64 KiB per run. {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                f"torch {torch.__version__}."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=12000)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    args.workflows = {"waiting": _workflow("DiscomfortTestSleep", seconds=args.sleep),
                      "CPU": _workflow("DiscomfortTestBusy", rounds=args.rounds)}
    rows: list = []
    costs: dict = {}
    _local(args, rows, costs)
    if not args.no_ray:
        _ray(args, rows, costs)
    print()
    print(_table(rows, costs, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "costs": costs}, indent=1))


if __name__ == "__main__":
    main()
