"""Pure functions over the format: the key hash and the directory inside an extent; the twin of
cpp/src/layout.cpp (whose key and run-id checks are discomfort._names here)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from ..errors import CorruptedStoreError
from .format import BUFDESC, EXT_HEAD, OBJ_MAGIC, PAGE, SMALL_OBJECT_BYTES


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@lru_cache(maxsize=4096)
def fnv1a64(data: bytes) -> int:
    """FNV-1a 64 of the key's UTF-8 bytes: picks the key's home entry in the object table."""
    h = 0xCBF29CE484222325
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def layout(meta_len: int, sizes: Sequence[int]) -> tuple[int, list[int], int]:
    """Offsets of the meta and of each buffer inside an extent, and the extent's length."""
    meta_off = (32 + 16 * len(sizes) + 63) // 64 * 64
    pos = meta_off + meta_len
    offsets = []
    for n in sizes:  # align() written out: this runs on every put
        a = PAGE if n >= SMALL_OBJECT_BYTES else 64
        pos = (pos + a - 1) // a * a
        offsets.append(pos)
        pos += n
    return meta_off, offsets, (pos + PAGE - 1) // PAGE * PAGE


def byte_views(buffers: Sequence[Any]) -> list[memoryview]:
    """put()'s buffers as flat byte views (ValueError for one that is not C-contiguous)."""
    views = []
    for b in buffers:
        v = memoryview(b)
        if not v.c_contiguous:
            raise ValueError("put() needs C-contiguous buffers")
        views.append(v if v.ndim == 1 and v.format == "B" else v.cast("B"))
    return views


def write_directory(region: Any, meta_off: int, meta: bytes, offsets: Sequence[int], sizes: Sequence[int]) -> None:
    """An extent's directory and meta, written at the start of ``region`` (layout()'s offsets)."""
    EXT_HEAD.pack_into(region, 0, OBJ_MAGIC, len(sizes), meta_off, len(meta), 0)
    for i, (o, n) in enumerate(zip(offsets, sizes)):
        BUFDESC.pack_into(region, 32 + 16 * i, o, n)
    region[meta_off : meta_off + len(meta)] = meta


def parse_directory(view: Any, length: int, where: str) -> tuple[int, int, list[tuple[int, int]]]:
    """Validate an extent's directory; return (meta_off, meta_len, [(off, len)])."""
    if length < 32:
        raise CorruptedStoreError(f"{where}: extent of {length} bytes is too short")
    magic, nbuf, meta_off, meta_len, _ = EXT_HEAD.unpack_from(view, 0)
    if magic != OBJ_MAGIC:
        raise CorruptedStoreError(f"{where}: bad object magic {magic:#x}")
    if nbuf > 65536 or 32 + 16 * nbuf > length:
        raise CorruptedStoreError(f"{where}: buffer count {nbuf} does not fit the extent")
    if meta_off < 32 + 16 * nbuf or meta_off > length or meta_len > length - meta_off:
        raise CorruptedStoreError(f"{where}: metadata range out of bounds")
    bufs = []
    for i in range(nbuf):
        off, n = BUFDESC.unpack_from(view, 32 + 16 * i)
        if off > length or n > length - off:
            raise CorruptedStoreError(f"{where}: buffer {i} out of bounds")
        bufs.append((off, n))
    return meta_off, meta_len, bufs


def parse_extent(view: Any, length: int, where: str) -> tuple[bytes, list[tuple[int, int]]]:
    """The meta bytes and buffer ranges of a validated extent."""
    meta_off, meta_len, bufs = parse_directory(view, length, where)
    return bytes(view[meta_off : meta_off + meta_len]), bufs
