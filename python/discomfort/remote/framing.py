"""The frame a value travels in over HTTP, in both directions.

A fixed header (magic ``DCFD``, format version, flags, buffer count, metadata length), one 64-bit
length per buffer, the metadata (a :mod:`discomfort.datacodec` description, JSON), then the raw
buffers back to back. Both sides stream it; neither side allocates for a size before checking it
against its limits.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator, Sequence

from ..datacodec import DEFAULT_LIMITS, Limits

__all__ = ["SECRET_ENV", "SECRET_HEADER", "TOKEN_HEADER", "MAGIC", "FRAME_VERSION", "HEAD", "SIZE", "CHUNK", "frame_header", "frame_length",
           "parse_fixed", "parse_sizes", "parse_header", "FrameBody"]

MAGIC = b"DCFD"
FRAME_VERSION = 2
HEAD = struct.Struct("<4sHHIQ")  # magic, version, flags (0), buffer count, metadata length
SIZE = struct.Struct("<Q")
CHUNK = 1 << 20  # bytes per socket write / read on either side

SECRET_ENV = "DISCOMFORT_SERVER_SECRET"  # the server-wide secret, on both sides
SECRET_HEADER = "X-Discomfort-Secret"  # carries it when a run is created
TOKEN_HEADER = "X-Discomfort-Token"  # carries a run's token on each of its routes


def frame_header(meta_len: int, sizes: Sequence[int]) -> bytes:
    """The bytes in front of the metadata: fixed header plus one length per buffer."""
    return HEAD.pack(MAGIC, FRAME_VERSION, 0, len(sizes), meta_len) + b"".join(SIZE.pack(n) for n in sizes)


def frame_length(meta_len: int, sizes: Sequence[int]) -> int:
    return HEAD.size + SIZE.size * len(sizes) + meta_len + sum(sizes)


def parse_fixed(head: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """(buffer count, metadata length) from the fixed header; ValueError if it is not a frame."""
    if len(head) != HEAD.size:
        raise ValueError(f"truncated frame header ({len(head)} of {HEAD.size} bytes)")
    magic, version, flags, nbuf, meta_len = HEAD.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"not a discomfort value frame (magic {magic!r}, expected {MAGIC!r})")
    if version != FRAME_VERSION:
        raise ValueError(f"frame format version {version}, this side reads {FRAME_VERSION}")
    if flags:
        raise ValueError(f"unknown frame flags {flags:#x}")
    if nbuf > limits.max_buffers:
        raise ValueError(f"frame announces {nbuf} buffers (at most {limits.max_buffers})")
    if meta_len > limits.max_meta:
        raise ValueError(f"frame announces {meta_len} bytes of metadata (at most {limits.max_meta})")
    return nbuf, meta_len


def parse_sizes(raw: bytes, nbuf: int, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    if len(raw) != SIZE.size * nbuf:
        raise ValueError("truncated buffer table in the frame header")
    sizes = [v for (v,) in SIZE.iter_unpack(raw)] if nbuf else []
    if sum(sizes) > limits.max_bytes:
        raise ValueError(f"frame announces {sum(sizes)} bytes of buffers (at most {limits.max_bytes})")
    return sizes


def parse_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[int, list[int], int]:
    """(metadata length, buffer sizes, header length) of a frame that starts ``data``."""
    nbuf, meta_len = parse_fixed(bytes(data[: HEAD.size]), limits)
    end = HEAD.size + SIZE.size * nbuf
    return meta_len, parse_sizes(bytes(data[HEAD.size : end]), nbuf, limits), end


class FrameBody:
    """A request body that streams a frame: the header, the metadata, then each buffer's memory.

    ``requests`` sends an iterable with a length as a Content-Length body, chunk by chunk, so the
    buffers go to the socket without being joined into one big bytes object first.
    """

    def __init__(self, meta: bytes, buffers: Sequence[memoryview], chunk: int = 8 * CHUNK):
        self._views = [b if isinstance(b, memoryview) and b.format == "B" and b.ndim == 1
                       else memoryview(b).cast("B") for b in buffers]
        self._head = frame_header(len(meta), [v.nbytes for v in self._views]) + bytes(meta)
        self._chunk = chunk
        self._len = len(self._head) + sum(v.nbytes for v in self._views)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        yield self._head
        for v in self._views:
            for off in range(0, v.nbytes, self._chunk):
                yield v[off : off + self._chunk]
