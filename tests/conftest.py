"""Fixtures shared by the whole suite: every store test runs on every backend."""

from __future__ import annotations

import os
import secrets
import signal

import pytest

from _helpers import BACKENDS, SHM, leftovers, load_backend

# A shell starts a background job (`cmd &`) with SIGINT ignored, and Python then keeps it ignored:
# the Ctrl-C tests need what a Python at a terminal has, whoever launched the suite.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The name of a backend; every test that takes it (or a fixture below) runs on each."""
    return request.param


@pytest.fixture
def store_mod(backend):
    return load_backend(backend)


@pytest.fixture
def run_id():
    rid = "t" + secrets.token_hex(12)
    yield rid
    for name in leftovers(rid):  # a failed test must not leak shared memory
        os.unlink(os.path.join(SHM, name))


@pytest.fixture
def disk_root(tmp_path) -> str:
    """The disk tier's root of the stores a test makes."""
    return str(tmp_path)


@pytest.fixture
def make_store(store_mod, disk_root, run_id):
    """Create stores with an explicit RAM budget; destroy them and check nothing is left.
    (It takes `run_id` so that fixture's leak sweep runs after these stores are destroyed.)"""
    made = []

    def make(ram_budget: int = 256 << 20, disk: bool = True, run_id: str | None = None, module=None, **kw):
        rid = run_id or "t" + secrets.token_hex(12)
        mod = module or store_mod
        store = mod.Store.create(rid, ram_budget=ram_budget, disk_root=disk_root if disk else None, **kw)
        made.append((store, kw.get("shm_dir", "/dev/shm")))
        return store

    yield make
    for store, shm_dir in made:
        store.destroy()  # also after close(): a closed owner leaves its run for destroy
        assert leftovers(store.run_id, shm_dir, disk_root) == []


@pytest.fixture
def store(run_id, make_store):
    """A store of the backend under test: run `run_id`, 256 MiB of RAM, a disk tier; destroyed
    after the test, and nothing of it left."""
    return make_store(run_id=run_id)
