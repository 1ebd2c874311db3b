"""The guarded load (what a ComfyUI server's nodes use on an attached run: pread into fresh
memory, so a truncated chunk is an error, not a SIGBUS) beside the zero-copy load and a plain
copy of the same bytes, in one pytest-benchmark group per size.

Run: pytest benchmarks/test_bench_guarded.py --benchmark-only (DISCOMFORT_BENCH_SIZES=12MiB,192MiB).
"""

from __future__ import annotations

import numpy as np
import torch

from discomfort.context import WorkflowContext

ROUNDS = {"1MiB": 30, "12MiB": 15, "192MiB": 5, "512MiB": 3}


def _run(benchmark, fn, size):
    return benchmark.pedantic(fn, rounds=ROUNDS[size], warmup_rounds=1, iterations=1)


def test_memcpy_fresh(benchmark, size, image):
    """The floor of any copy: the same bytes into newly allocated memory (its pages fault in)."""
    benchmark.group = f"guarded load {size}"
    src = image.numpy().view(np.uint8).reshape(-1)
    _run(benchmark, lambda: src.copy(), size)


def test_memcpy_warm(benchmark, size, image):
    benchmark.group = f"guarded load {size}"
    src = image.numpy().view(np.uint8).reshape(-1)
    dst = np.ones_like(src)
    _run(benchmark, lambda: np.copyto(dst, src), size)


def test_load_zero_copy(benchmark, size, image, ctx, backend, tier):
    benchmark.group = f"guarded load {size}"
    ctx.save("image", image)
    with WorkflowContext.attach(ctx.run_id, backend=backend) as attached:
        out = _run(benchmark, lambda: attached.load("image"), size)
        assert torch.equal(out, image)


def test_load_guarded(benchmark, size, image, ctx, backend, tier):
    benchmark.group = f"guarded load {size}"
    ctx.save("image", image)
    with WorkflowContext.attach(ctx.run_id, backend=backend) as attached:  # as the server is
        out = _run(benchmark, lambda: attached.load_guarded("image"), size)
        assert torch.equal(out, image)
