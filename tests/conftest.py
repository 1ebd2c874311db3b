"""Fixtures shared by the whole suite: every store test runs on every backend."""

from __future__ import annotations

import secrets

import pytest

from _helpers import BACKENDS, leftovers, load_backend


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_mod(backend):
    return load_backend(backend)


@pytest.fixture
def run_id() -> str:
    return "t" + secrets.token_hex(12)


@pytest.fixture
def make_store(store_mod, tmp_path):
    """Create stores with an explicit RAM budget; destroy them and check nothing is left."""
    made = []

    def make(ram_budget: int = 256 << 20, disk: bool = True, run_id: str | None = None, module=None, **kw):
        rid = run_id or "t" + secrets.token_hex(12)
        mod = module or store_mod
        store = mod.Store.create(rid, ram_budget=ram_budget, disk_root=str(tmp_path) if disk else None, **kw)
        made.append((store, kw.get("shm_dir", "/dev/shm")))
        return store

    yield make
    for store, shm_dir in made:
        store.destroy()  # also after close(): a closed owner leaves its run for destroy
        assert leftovers(store.run_id, shm_dir, str(tmp_path)) == []
