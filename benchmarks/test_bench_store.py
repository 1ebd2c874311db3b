"""save / load / round trip through the store, beside their peers, in pytest-benchmark groups.

Run: pytest benchmarks --benchmark-only (DISCOMFORT_BENCH_SIZES=1MiB,12MiB,192MiB,512MiB).
Every ratio that matters is taken against `memcpy` in the same group and run.
"""

from __future__ import annotations

import tempfile
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from discomfort import bench

ROUNDS = {"1MiB": 30, "12MiB": 15, "192MiB": 5, "512MiB": 3}


def _run(benchmark, fn, size, setup=None):
    return benchmark.pedantic(fn, setup=setup, rounds=ROUNDS[size], warmup_rounds=1, iterations=1)


def test_memcpy(benchmark, size, image):
    benchmark.group = f"save {size}"
    src = image.numpy().view(np.uint8).reshape(-1)
    dst = np.ones_like(src)
    _run(benchmark, lambda: np.copyto(dst, src), size)


def test_save_view_held(benchmark, size, image, ctx, backend, tier):
    """The loop's steady state: the same key saved again while a view of the last value lives."""
    benchmark.group = f"save {size}"
    benchmark.extra_info.update(backend=backend, tier=tier)
    held = []

    def save():
        ctx.save("image", image)
        held[:] = [ctx.load("image")]

    _run(benchmark, save, size)


def test_save_no_view(benchmark, size, image, ctx, backend, tier):
    benchmark.group = f"save {size}"
    _run(benchmark, lambda: ctx.save("image", image), size)


def test_load(benchmark, size, image, ctx, backend, tier):
    benchmark.group = f"load {size}"
    ctx.save("image", image)
    out = _run(benchmark, lambda: ctx.load("image"), size)
    assert torch.equal(out, image)


def test_round_trip(benchmark, size, image, ctx, backend, tier):
    benchmark.group = f"round trip {size}"

    def round_trip():
        ctx.save("image", image)
        return ctx.load("image")

    assert torch.equal(_run(benchmark, round_trip, size), image)


@pytest.mark.parametrize("kind", ["latent", "conditioning", "int", "short str"])
def test_other_values(benchmark, kind, backend):
    from discomfort.context import WorkflowContext

    value = {
        "latent": lambda: {"samples": torch.randn(1, 4, 128, 128), "batch_index": [0]},
        "conditioning": lambda: [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]],
        "int": lambda: 42,
        "short str": lambda: "a photo of a cat",
    }[kind]()
    benchmark.group = "round trip small values"
    with tempfile.TemporaryDirectory() as tmp, WorkflowContext(backend=backend, ram_budget=64 << 20,
                                                               disk_dir=tmp) as ctx:
        def round_trip():
            ctx.save("v", value)
            return ctx.load("v")

        benchmark.pedantic(round_trip, rounds=200, warmup_rounds=5, iterations=1)


# ---- peers -------------------------------------------------------------------------------------
def test_peer_legacy_base64(benchmark, size, image):
    if image.numel() * 4 > bench.LEGACY_MAX_BYTES:
        pytest.skip("the legacy path takes tens of seconds per round past 192 MiB")
    benchmark.group = f"round trip {size}"
    out = benchmark.pedantic(lambda: bench.legacy_round_trip(image), rounds=3, iterations=1)
    assert torch.equal(out, image)


def test_peer_memcpy_round_trip(benchmark, size, image):
    benchmark.group = f"round trip {size}"
    src = image.numpy().view(np.uint8).reshape(-1)
    dst = np.ones_like(src)
    _run(benchmark, lambda: np.copyto(dst, src), size)


def test_peer_shared_memory_fresh_segment(benchmark, size, image):
    benchmark.group = f"save {size}"
    src = image.numpy().view(np.uint8).reshape(-1)

    def save():
        shm = shared_memory.SharedMemory(create=True, size=src.nbytes)
        np.frombuffer(shm.buf, dtype=np.uint8)[:] = src
        return shm

    segments = []
    _run(benchmark, lambda: segments.append(save()), size)
    for shm in segments:
        shm.close()
        shm.unlink()


def test_peer_torch_save_load(benchmark, size, image, tmp_path):
    benchmark.group = f"round trip {size}"
    path = tmp_path / "t.pt"

    def round_trip():
        torch.save(image, path)
        return torch.load(path, mmap=True, weights_only=True)

    assert torch.equal(_run(benchmark, round_trip, size), image)


def test_peer_safetensors(benchmark, size, image, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    benchmark.group = f"round trip {size}"
    path = str(tmp_path / "t.safetensors")

    def round_trip():
        st.save_file({"image": image}, path)
        return st.load_file(path)["image"]

    assert torch.equal(_run(benchmark, round_trip, size), image)


def test_peer_arrow_ipc_mmap(benchmark, size, image, tmp_path):
    pa = pytest.importorskip("pyarrow")
    benchmark.group = f"round trip {size}"
    path = str(tmp_path / "t.arrow")
    arr = image.numpy()

    def round_trip():
        with pa.OSFile(path, "wb") as sink:
            pa.ipc.write_tensor(pa.Tensor.from_numpy(arr), sink)
        with pa.memory_map(path) as source:
            return pa.ipc.read_tensor(source).to_numpy()

    assert np.array_equal(_run(benchmark, round_trip, size), arr)


def test_peer_ray(benchmark, size, image):
    ray = pytest.importorskip("ray")
    benchmark.group = f"round trip {size}"
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    arr = image.numpy()
    out = _run(benchmark, lambda: ray.get(ray.put(arr)), size)
    assert np.array_equal(out, arr)


def test_cross_process_handoff(benchmark, size, image, backend):
    """The owner saves; a spawned process attached to the run loads and touches every page."""
    import multiprocessing

    from discomfort.context import WorkflowContext

    benchmark.group = f"cross-process {size}"
    mp = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, WorkflowContext(
        backend=backend, ram_budget=3 * image.numel() * 4 + (64 << 20), disk_dir=tmp
    ) as ctx:
        parent, child = mp.Pipe()
        proc = mp.Process(target=_touch_loader, args=(backend, ctx.run_id, child))
        proc.start()
        child.close()
        try:
            def handoff():
                ctx.save("image", image)
                parent.send("image")
                return parent.recv()

            total = _run(benchmark, handoff, size)
            assert total == pytest.approx(float(image.reshape(-1)[::1024].double().sum()))
        finally:
            parent.send(None)
            proc.join(30)


def _touch_loader(backend, run_id, conn):
    from discomfort.context import WorkflowContext

    ctx = WorkflowContext.attach(run_id, backend=backend)
    while (key := conn.recv()) is not None:
        value = ctx.load(key)
        conn.send(float(value.reshape(-1)[::1024].double().sum()))  # one read per 4 KiB page
        del value
    ctx.close()
