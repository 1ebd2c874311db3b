"""Threads in several processes, on both backends at once, saving, loading and deleting the same
keys with checksums. Sized by a count of operations (DISCOMFORT_STRESS_OPS per thread)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

from _helpers import BACKENDS, load_backend

MiB = 1 << 20


def _stress(*args):
    import _workers

    _workers.stress(*args)


def test_stress_threads_and_processes(make_store):
    """The store is created by each backend in turn; workers of both backends attach to it."""
    for name in BACKENDS:
        load_backend(name)
    store = make_store(ram_budget=8 * MiB)  # small: objects also spill to the disk tier
    ops = int(os.environ.get("DISCOMFORT_STRESS_OPS", "600"))
    mp = multiprocessing.get_context("spawn")
    workers = []
    for w, backend in enumerate(["native", "python", "native", "python"]):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_stress, args=(backend, store.run_id, w, 2, ops, child))
        proc.start()
        child.close()
        workers.append((proc, parent))
    totals: dict[str, int] = {}
    for proc, parent in workers:
        counts = parent.recv()
        proc.join(120)
        assert proc.exitcode == 0
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    print("stress totals:", totals)
    assert totals["corrupt"] == 0
    assert totals["put"] + totals["get"] + totals["delete"] + totals["missing"] == 4 * 2 * ops
    assert totals["get"] > 0 and totals["put"] > 0
    stats = store.stats()
    assert stats["reserved"] == 0 and stats["pins"] == 0 and stats["slots_used"] == 1
    for key in store.keys():  # what is left is intact
        meta, views, _ = store.get(key)
        assert hashlib.sha256(bytes(views[0])).digest() == meta
