"""Benchmark fixtures: tensors of the sizes DESIGN.md names, and contexts per backend and tier."""

from __future__ import annotations

import os
import tempfile

import pytest

torch = pytest.importorskip("torch")

from discomfort import _backend  # noqa: E402
from discomfort.context import WorkflowContext  # noqa: E402

MiB = 1 << 20
SHAPES = {
    "1MiB": (1, 256, 256, 4),
    "12MiB": (1, 1024, 1024, 3),
    "192MiB": (16, 1024, 1024, 3),
    "512MiB": (32, 1024, 1024, 4),
}
SIZES = [s for s in os.environ.get("DISCOMFORT_BENCH_SIZES", "1MiB,12MiB,192MiB").split(",") if s]


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", SIZES)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend.available())
    if "tier" in metafunc.fixturenames:
        metafunc.parametrize("tier", ["ram", "disk"])


@pytest.fixture
def image(size):
    return torch.rand(SHAPES[size])


@pytest.fixture
def ctx(backend, tier, image):
    nbytes = image.numel() * image.element_size()
    budget = 3 * nbytes + 64 * MiB if tier == "ram" else MiB
    with tempfile.TemporaryDirectory() as tmp, WorkflowContext(
        backend=backend, ram_budget=budget, disk_dir=tmp
    ) as c:
        yield c
