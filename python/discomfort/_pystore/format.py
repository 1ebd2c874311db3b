"""The shared-memory segment format, version 2 (docs/FORMAT.md is the contract); the twin of
cpp/include/discomfort/format.hpp. Offsets, sizes, states and the struct layouts of the
control segment's tables."""

from __future__ import annotations

import struct

from .._runfiles import CONTROL_SIZE, MAGIC
from .._types import Tier

FORMAT_VERSION = 2
SMALL_OBJECT_BYTES = 65536  # buffers from here are page-aligned; disk extents below come back as copies
COPY_LOAD_BYTES = 128 << 10  # RAM extents below this come back as copies made under the lock (format.hpp)

OBJ_MAGIC = 0x4F464344
PAGE = 4096
HEADER_SIZE = 4096
MAX_CHUNKS = 64
SLOT_CAP = 128
TABLE_CAP = 4096
PIN_CAP = 4096
CHUNK_OFF = 4096
SLOT_OFF = 6144
OBJ_OFF = 12288
ENTRY = 320
PIN_OFF = OBJ_OFF + TABLE_CAP * ENTRY
TOTAL = PIN_OFF + PIN_CAP * 32
assert TOTAL == CONTROL_SIZE, "discomfort._runfiles.CONTROL_SIZE is the size of this layout"
LOCK_BYTE = 1 << 40
SLOT_LOCK_BASE = LOCK_BYTE + 4096
MIN_CHUNK = 64 << 20
FLAG_FINISHED = 1

EMPTY, RESERVED, SEALED, TOMBSTONE = 0, 1, 2, 3
RAM, DISK = 0, 1
TIER_NAMES: tuple[Tier, Tier] = ("ram", "disk")

# Header fields: name -> (offset, struct format).
H = {
    "format_version": (8, "<I"),
    "header_size": (12, "<I"),
    "total_size": (16, "<Q"),
    "flags": (24, "<I"),
    "dirty": (28, "<I"),
    "epoch": (32, "<Q"),
    "next_version": (40, "<Q"),
    "ram_budget": (48, "<Q"),
    "creator_uid": (56, "<I"),
    "creator_pid": (60, "<I"),
    "max_chunks": (64, "<I"),
    "slot_capacity": (68, "<I"),
    "table_capacity": (72, "<I"),
    "pin_capacity": (76, "<I"),
    "chunk_table_off": (80, "<Q"),
    "slot_table_off": (88, "<Q"),
    "obj_table_off": (96, "<Q"),
    "pin_table_off": (104, "<Q"),
    "disk_dir_len": (176, "<I"),
    "created_ns": (184, "<Q"),
}
#: The header fields every segment of this version has these values in.
EXPECTED = {
    "header_size": HEADER_SIZE,
    "total_size": TOTAL,
    "max_chunks": MAX_CHUNKS,
    "slot_capacity": SLOT_CAP,
    "table_capacity": TABLE_CAP,
    "pin_capacity": PIN_CAP,
    "chunk_table_off": CHUNK_OFF,
    "slot_table_off": SLOT_OFF,
    "obj_table_off": OBJ_OFF,
    "pin_table_off": PIN_OFF,
}
ENTRY_STRUCT = struct.Struct("<IIIIQQQQQQ256s")  # an object table entry, key included
ENTRY_HEAD = struct.Struct("<IIIIQQQQQQ")  # the same without the key
PIN_STRUCT = struct.Struct("<IIQQQ")
DISK_PIN_CHUNK = (1 << 64) - 1  # a pin on a DISK object: chunk = this, offset = its file_id
RETIRED_OFF = 1280  # in the header: retired disk files, kept for the next disk save
RETIRED_SLOTS = 4
RETIRED_STRUCT = struct.Struct("<QQ")  # file_id (0: empty), length
CHUNK_STRUCT = struct.Struct("<IIQ")
SLOT_STRUCT = struct.Struct("<IIQ")
EXT_HEAD = struct.Struct("<IIQQQ")
BUFDESC = struct.Struct("<QQ")
#: bytes.translate table: every byte but 0 becomes 1 (then bytes.find finds the used entries).
NONZERO_TO_1 = bytes([0] + [1] * 255)
