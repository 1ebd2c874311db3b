"""WorkflowContext: values, references, registry, lifecycle and cross-process use, per backend."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from _helpers import leftovers, load_backend
from discomfort import context as context_mod
from discomfort import errors, sysinfo
from discomfort.context import WorkflowContext, get_context

MiB = 1 << 20


@pytest.fixture
def ctx_factory(backend, tmp_path):
    load_backend(backend)
    made = []

    def make(**kw):
        kw.setdefault("ram_budget", 256 * MiB)
        kw.setdefault("disk_dir", str(tmp_path))
        ctx = WorkflowContext(backend=backend, **kw)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.shutdown()
        assert leftovers(ctx.run_id, disk_root=str(tmp_path)) == []
        assert ctx.run_id not in context_mod.active_runs()


def mapped_file(addr: int) -> str | None:
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[-1] if len(parts) > 5 else None
    return None


@dataclasses.dataclass
class Point:
    x: int
    y: list


COMFY_VALUES = {
    "image": lambda: torch.rand(2, 64, 48, 3),
    "mask": lambda: torch.rand(2, 64, 48) > 0.5,
    "latent": lambda: {"samples": torch.randn(1, 4, 16, 16), "noise_mask": torch.ones(1, 1, 16, 16),
                       "batch_index": [0]},
    "conditioning": lambda: [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280), "strength": 0.5}]],
    "bf16": lambda: torch.randn(3, 5).to(torch.bfloat16),
    "noncontiguous": lambda: torch.arange(64.0).reshape(8, 8).t()[::2],
    "zero_size": lambda: torch.empty(0, 3),
    "scalar": lambda: torch.tensor(3.5),
    "ndarray": lambda: np.arange(100, dtype=np.int16).reshape(10, 10)[:, ::3],
    "string": lambda: "a prompt",
    "int": lambda: 7,
    "float": lambda: 0.25,
    "bool": lambda: True,
    "none": lambda: None,
    "nested": lambda: {"a": [1, (2, 3), {4, 5}], "b": b"bytes", "t": torch.ones(2)},
    "dataclass": lambda: Point(1, [2, 3]),
}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.requires_grad == b.requires_grad and torch.equal(a.detach(), b.detach()))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", sorted(COMFY_VALUES))
def test_values_round_trip(ctx_factory, kind):
    ctx = ctx_factory()
    value = COMFY_VALUES[kind]()
    ctx.save(kind, value)
    assert same(value, ctx.load(kind))


def test_closure_and_lambda(ctx_factory):
    ctx = ctx_factory()
    k = 3
    ctx.save("f", lambda x: x * k)
    assert ctx.load("f")(2) == 6


def test_requires_grad_restored(ctx_factory):
    ctx = ctx_factory()
    ctx.save("w", torch.ones(4, requires_grad=True))
    assert ctx.load("w").requires_grad


def test_large_tensor_is_zero_copy_and_independent(ctx_factory):
    ctx = ctx_factory()
    original = torch.rand(4, 256, 256, 3)
    ctx.save("image", original)
    loaded = ctx.load("image")
    info = ctx.info("image")
    assert mapped_file(loaded.data_ptr()) == os.path.realpath(ctx.store.chunk_path(info["chunk"]))
    original.add_(1.0)
    assert not torch.equal(original, loaded)
    loaded.mul_(0)  # writable and private
    assert float(ctx.load("image").sum()) > 0


def test_spilled_values_round_trip(ctx_factory):
    ctx = ctx_factory(ram_budget=MiB)
    value = torch.rand(16, 128, 128, 3)  # 3 MiB: over the budget
    ctx.save("big", value)
    assert ctx.info("big")["tier"] == "disk"
    loaded = ctx.load("big")
    assert torch.equal(loaded, value)
    assert mapped_file(loaded.data_ptr()).startswith(ctx.store.disk_dir)


def test_references_stay_in_process(ctx_factory):
    ctx = ctx_factory()
    lock = threading.Lock()
    model = torch.nn.Linear(2, 2)
    ctx.save("lock", lock)
    ctx.save("model", model)
    ctx.save("forced", [1, 2], pass_by="ref")
    assert ctx.load("lock") is lock and ctx.load("model") is model and ctx.load("forced") == [1, 2]
    ctx.save("model", torch.zeros(1))  # a value replaces the reference
    assert same(ctx.load("model"), torch.zeros(1))


def test_unpicklable_value_by_value_is_refused_and_auto_falls_back(ctx_factory):
    ctx = ctx_factory()

    class Holder:
        def __init__(self):
            self.gen = (i for i in range(3))

    with pytest.raises(errors.SerializationError, match="by value"):
        ctx.save("h", Holder(), pass_by="val")
    assert "h" not in ctx
    h = Holder()
    ctx.save("h", h)
    assert ctx.load("h") is h
    with pytest.raises(ValueError, match="pass_by"):
        ctx.save("x", 1, pass_by="copy")


def test_keys_contains_delete_info_stats(ctx_factory):
    ctx = ctx_factory()
    ctx.save("a", 1)
    ctx.save("b", torch.zeros(10))
    assert ctx.keys() == ["a", "b"] and list(ctx) == ["a", "b"]
    assert "a" in ctx and "zz" not in ctx
    v1 = ctx.info("a")["version"]
    ctx.save("a", 1)
    assert ctx.info("a")["version"] > v1
    assert ctx.delete("a") and not ctx.delete("a")
    with pytest.raises(errors.UnknownKeyError, match=ctx.run_id):
        ctx.load("a")
    stats = ctx.stats()
    assert stats["objects_ram"] == 1 and stats["owner"] is True


def test_registry_and_get_context(ctx_factory):
    ctx = ctx_factory()
    assert get_context(ctx.run_id) is ctx
    assert ctx.run_id in context_mod.active_runs()
    assert len(ctx.run_id) == 32 and int(ctx.run_id, 16) >= 0
    with pytest.raises(errors.UnknownRunError, match="nosuchrun"):
        get_context("nosuchrun")
    ctx.shutdown()
    ctx.shutdown()
    assert ctx.run_id not in context_mod.active_runs()
    with pytest.raises(errors.UnknownRunError, match=ctx.run_id):
        get_context(ctx.run_id)
    with pytest.raises(errors.RunFinishedError, match=ctx.run_id):
        ctx.load("x")


def test_exception_inside_the_block_cleans_up(backend, tmp_path):
    load_backend(backend)
    with pytest.raises(RuntimeError):
        with WorkflowContext(backend=backend, ram_budget=64 * MiB, disk_dir=tmp_path) as ctx:
            ctx.save("x", torch.zeros(1000))
            raise RuntimeError("boom")
    assert leftovers(ctx.run_id, disk_root=str(tmp_path)) == []
    assert ctx.run_id not in context_mod.active_runs()


@pytest.mark.parametrize("direction", ["child_saves", "child_loads"])
def test_cross_process(ctx_factory, backend, direction):
    ctx = ctx_factory()
    mp = multiprocessing.get_context("spawn")
    parent, child_end = mp.Pipe()
    proc = mp.Process(target=_context_child, args=(backend, ctx.run_id, child_end))
    proc.start()
    child_end.close()
    try:
        if direction == "child_saves":
            parent.send(("save_tensor", "t", 4096))
            assert parent.recv() == ("ok",)
            assert torch.equal(ctx.load("t"), torch.arange(4096, dtype=torch.float32).reshape(-1, 2))
        else:
            value = torch.rand(8, 128, 128, 3)
            ctx.save("image", value)
            parent.send(("load_sum", "image"))
            status, total, dtype, shape = parent.recv()
            assert (status, dtype, shape) == ("ok", "torch.float32", (8, 128, 128, 3))
            assert total == pytest.approx(float(value.double().sum()))
        ctx.save("lock", threading.Lock())
        parent.send(("load", "lock"))
        status, name, message = parent.recv()
        assert (status, name) == ("error", "ReferenceUnavailableError")
        assert "lock" in message and "pass_by='val'" in message
        parent.send(("stop",))
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


def _context_child(*args):
    import _workers

    _workers.context_child(*args)


def _serve_runs(*args):
    import _workers

    _workers.serve_runs(*args)


def test_attacher_releases_finished_runs(backend, tmp_path):
    """A long-lived attacher's shared memory stays flat across many runs."""
    load_backend(backend)
    mp = multiprocessing.get_context("spawn")
    parent, child_end = mp.Pipe()
    proc = mp.Process(target=_serve_runs, args=(backend, child_end))
    proc.start()
    child_end.close()
    rss = []
    try:
        for i in range(16):
            with WorkflowContext(backend=backend, ram_budget=64 * MiB, disk_dir=tmp_path) as ctx:
                ctx.save("image", torch.full((4, 512, 512, 3), float(i)))  # 12 MiB
                parent.send(ctx.run_id)
                total, shmem, runs = parent.recv()
                assert total == pytest.approx(float(i) * 4 * 512 * 3 * 512 / 1024)
                rss.append(shmem)
                assert runs <= 2, f"run {i}: the attacher still maps {runs} runs"
        parent.send(None)
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    # 16 runs of 12 MiB each, measured while the current value is held: about one run's worth.
    assert min(rss) >= 12 * MiB, rss
    assert max(rss) < 30 * MiB, rss


def test_sigterm_cleans_up(backend, tmp_path):
    load_backend(backend)
    script = textwrap.dedent(f"""
        import os, sys, torch
        from discomfort.context import WorkflowContext
        with WorkflowContext(backend={backend!r}, ram_budget=64 << 20, disk_dir={str(tmp_path)!r}) as ctx:
            ctx.save("x", torch.zeros(1 << 18))
            ctx.save("big", torch.zeros(1 << 25))  # 128 MiB: over the budget, so a disk file
            os.write(1, (ctx.run_id + "\\n").encode())
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    run_id = proc.stdout.readline().decode().strip()
    assert len(leftovers(run_id, disk_root=str(tmp_path))) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    proc.stdin.close()
    proc.stdout.close()
    assert leftovers(run_id, disk_root=str(tmp_path)) == []


def test_sigterm_handler_chains_and_only_raises():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    saved = (context_mod._signal_installed, context_mod._previous_sigterm)
    context_mod._signal_installed = False
    try:
        context_mod.install_signal_handler()
        with pytest.raises(SystemExit) as info:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert info.value.code == 128 + signal.SIGTERM and calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
        context_mod._signal_installed, context_mod._previous_sigterm = saved


def _start_owner(backend: str, tmp_path, attach_too: bool = False):
    script = textwrap.dedent(f"""
        import os, sys, torch
        from discomfort.context import WorkflowContext
        ctx = WorkflowContext(backend={backend!r}, ram_budget=64 << 20, disk_dir={str(tmp_path)!r})
        ctx.save("x", torch.ones(1 << 20))
        ctx.save("spill", torch.ones(1 << 25))  # 128 MiB: disk tier
        os.write(1, (ctx.run_id + "\\n").encode())
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    run_id = proc.stdout.readline().decode().strip()
    assert run_id
    return proc, run_id


def _sigkill(proc) -> None:
    proc.kill()
    proc.wait(30)
    proc.stdin.close()
    proc.stdout.close()


def test_sigkilled_owner_is_swept_unless_an_attacher_lives(backend, tmp_path):
    load_backend(backend)
    dead_proc, dead_run = _start_owner(backend, tmp_path)
    live_proc, live_run = _start_owner(backend, tmp_path)
    _sigkill(dead_proc)
    _sigkill(live_proc)
    survivor = WorkflowContext.attach(live_run, backend=backend)  # keeps live_run in use
    try:
        assert len(leftovers(dead_run, disk_root=str(tmp_path))) == 3
        with WorkflowContext(backend=backend, ram_budget=MiB, disk_dir=tmp_path) as fresh:
            assert fresh.run_id not in (dead_run, live_run)
            assert leftovers(dead_run, disk_root=str(tmp_path)) == []
            assert len(leftovers(live_run, disk_root=str(tmp_path))) == 3
            assert float(survivor.load("x").sum()) == 1 << 20
            survivor.save("after", 5)
            assert survivor.load("after") == 5
    finally:
        survivor.close()
    with WorkflowContext(backend=backend, ram_budget=MiB, disk_dir=tmp_path):
        assert leftovers(live_run, disk_root=str(tmp_path)) == []


def test_threads_share_a_context(ctx_factory):
    ctx = ctx_factory()
    errors_seen = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                key = f"k{i % 3}"
                value = torch.full((64, 64), float(t * 1000 + i))
                ctx.save(key, value)
                try:
                    loaded = ctx.load(key)
                    assert loaded.shape == (64, 64) and bool((loaded == loaded[0, 0]).all())
                except errors.UnknownKeyError:
                    pass
                if i % 5 == 0:
                    ctx.delete(key)
        except Exception as exc:  # pragma: no cover - reported below
            errors_seen.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors_seen == []


def test_forked_child_does_not_own_the_run(ctx_factory):
    ctx = ctx_factory()
    ctx.save("x", 1)
    pid = os.fork()
    if pid == 0:
        code = 0 if (not ctx.owner and context_mod.active_runs() == []) else 1
        ctx.shutdown()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ctx.load("x") == 1 and leftovers(ctx.run_id) != []


def test_ram_budget_sources(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemAvailable:  4000000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text("3000000000\n")
    (cg / "memory.current").write_text("1000000000\n")
    budget = sysinfo.default_ram_budget(meminfo=str(meminfo), cgroup_root=str(cg))
    assert budget == min(2_048_000_000, 1_000_000_000, sysinfo.shm_space()[1]) // 4096 * 4096
    (cg / "memory.max").write_text("max\n")
    assert sysinfo.default_ram_budget(meminfo=str(meminfo), cgroup_root=str(cg)) == min(
        2_048_000_000, sysinfo.shm_space()[1]) // 4096 * 4096
    monkeypatch.setenv("DISCOMFORT_RAM_BUDGET", "3M")
    assert sysinfo.ram_budget() == 3 * MiB
    assert sysinfo.ram_budget(5 * MiB) == 5 * MiB
    assert sysinfo.ram_budget("1GiB") == 1 << 30
    with pytest.raises(ValueError, match="not a size"):
        sysinfo.parse_size("lots")


def test_env_budget_reaches_the_store(ctx_factory, monkeypatch):
    monkeypatch.setenv("DISCOMFORT_RAM_BUDGET", "2M")
    ctx = ctx_factory(ram_budget=None)
    assert ctx.stats()["ram_budget"] == 2 * MiB
    ctx.save("big", torch.zeros(MiB))  # 4 MiB: over the budget, so the disk tier
    assert ctx.info("big")["tier"] == "disk"
