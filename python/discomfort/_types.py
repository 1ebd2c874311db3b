"""The dictionaries the store backends return, typed once here. Both backends (the C++ core's
binding and discomfort._pystore) return exactly these keys; tests/test_backend.py checks it."""

from __future__ import annotations

from typing import Literal, TypedDict

Tier = Literal["ram", "disk"]


class LoadInfo(TypedDict):
    """The third item of Store.get(): how the object came back."""

    version: int
    tier: Tier
    zero_copy: bool


class ObjectInfo(TypedDict):
    """Store.info(key): where an object lives and how large it is, without loading it."""

    key: str
    tier: Tier
    version: int
    size: int  # the extent's bytes (directory, meta, buffers, padding)
    nbuf: int
    nbytes: int  # the buffers' bytes
    meta_len: int
    chunk: int | None  # None for the disk tier
    offset: int


class StoreStats(TypedDict):
    """Store.stats(): the run's occupancy."""

    run_id: str
    objects_ram: int
    objects_disk: int
    bytes_ram: int
    bytes_disk: int
    reserved: int
    ram_capacity: int
    ram_budget: int
    chunks: int
    pins: int
    pinned_bytes: int
    slots_used: int
    epoch: int
    next_version: int


class PoolFile(TypedDict):
    path: str
    size: int
    inode: int


class PoolInfo(TypedDict):
    """pool_info(): this process's pool of chunks given back by finished runs."""

    prefix: str
    bytes: int
    limit: int
    files: list[PoolFile]
