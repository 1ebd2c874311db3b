"""The HTTP transport in pytest-benchmark groups: save and load over loopback to a run server in a
process of its own (``python -m discomfort.remote.standalone``), beside a memcpy of the same bytes.

Run: pytest benchmarks/test_bench_http.py --benchmark-only. GB/s = bytes / median.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch

pytest.importorskip("aiohttp")
pytest.importorskip("requests")

from discomfort.remote import RemoteContext, standalone  # noqa: E402

ROUNDS = {"1MiB": 30, "12MiB": 15, "192MiB": 5, "512MiB": 3}


@pytest.fixture(scope="module")
def remote():
    secret = secrets.token_urlsafe(24)
    with standalone.start(secret) as (url, _), RemoteContext(url, secret=secret, ram_budget="2G") as rc:
        yield rc


def _run(benchmark, fn, size):
    return benchmark.pedantic(fn, rounds=ROUNDS[size], warmup_rounds=1, iterations=1)


def test_http_memcpy(benchmark, size, image):
    benchmark.group = f"http {size}"
    src = image.numpy().view(np.uint8).reshape(-1)
    dst = np.ones_like(src)
    _run(benchmark, lambda: np.copyto(dst, src), size)


def test_http_save(benchmark, size, image, remote):
    benchmark.group = f"http {size}"
    _run(benchmark, lambda: remote.save("image", image), size)


def test_http_load(benchmark, size, image, remote):
    benchmark.group = f"http {size}"
    remote.save("image", image)
    out = _run(benchmark, lambda: remote.load("image"), size)
    assert torch.equal(out, image)
