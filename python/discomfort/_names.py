"""The names of a run (docs/FORMAT.md, "Names"): what a key and a run id may be, and the file
names a run uses in the segment directory and its disk directory. The bottom layer: imports
nothing of discomfort but errors. The core checks the same rules (cpp/src/layout.cpp).
"""

from __future__ import annotations

import re

from .errors import InvalidKeyError, InvalidRunIdError

RUN_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_RUN_ID = re.compile(RUN_ID_PATTERN)

#: A run's control segment: dcf-{run_id}.
CONTROL_FILE = re.compile(rf"^dcf-({RUN_ID_PATTERN})$")
#: A run's other files in the segment directory: a RAM chunk (.c{n}) or, in portable mode, a
#: lock file (.lk for the metadata lock, .lk{slot}).
RUN_FILE = re.compile(rf"^dcf-({RUN_ID_PATTERN})\.(?:c\d+|lk\d*)$")
#: A file of a process's chunk pool: dcf-pool-{random}.{n}.
POOL_FILE = re.compile(r"^dcf-pool-[0-9a-f]{16}\.\d+$")


def control_name(run_id: str) -> str:
    """The control segment's name in the segment directory (also the run's disk directory's)."""
    return f"dcf-{run_id}"


def chunk_name(run_id: str, index: int) -> str:
    return f"dcf-{run_id}.c{index}"


def object_file_name(file_id: int) -> str:
    """A disk-tier object's file in the run's disk directory."""
    return f"{file_id:016x}.obj"


def is_run_file(name: str, run_id: str) -> bool:
    """Whether `name` is a chunk or lock file of run `run_id` (not its control segment)."""
    m = RUN_FILE.match(name)
    return m is not None and m.group(1) == run_id


def check_key(key: object) -> bytes:
    """The key's UTF-8 bytes; InvalidKeyError unless it is a non-empty str of at most 255 UTF-8
    bytes without NUL."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if "\0" in key:
        raise InvalidKeyError(f"key {key!r} contains a NUL character")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} is not valid UTF-8: {exc}") from None
    if len(raw) > 255:
        raise InvalidKeyError(f"key is {len(raw)} UTF-8 bytes long; the limit is 255")
    return raw


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidRunIdError(f"run id {run_id!r} is not 1-64 characters of [A-Za-z0-9_-]")
    return run_id
