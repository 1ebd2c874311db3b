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


# ---- file names made from user- and workflow-given names -----------------------------------------
#
# Keys never become file names (a disk-tier file is named by its number, object_file_name), nor do
# run ids beyond "dcf-{run_id}". Where a name someone gave does become part of a file name (the
# command line's output files and --input-dir folders, the panel's per-iteration outputs), it goes
# through safe_file_stem on every system, so that a run writes the same names everywhere and never
# one that Windows cannot hold. Names that point at existing files (the panel's workflow and input
# names) are refused on Windows when Windows would read them as something else (windows_name_problem).

#: Names Windows gives to devices, in every folder and with any extension ("NUL.txt" is NUL).
WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in (*"123456789", "\u00b9", "\u00b2", "\u00b3")})
_WINDOWS_BAD = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_STEM_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def windows_name_problem(part: str) -> str | None:
    """Why ``part`` (one name of a path, no separators) cannot name a file on Windows, or None."""
    if not part:
        return "an empty name"
    bad = _WINDOWS_BAD.search(part)
    if bad:
        return f"the character {bad.group()!r}, which Windows does not allow in a file name"
    if part[-1] in ". " and part not in (".", ".."):
        return "a name ending in a dot or a space (Windows drops it, so it names another file)"
    if part.split(".", 1)[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        return f"{part.split('.', 1)[0].rstrip(' ')!r}, a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    return None


def safe_file_stem(name: object, limit: int = 120) -> str:
    """A file stem made from a name someone gave (a key, an input file's name): the same on every
    system and valid on Windows. Characters outside [A-Za-z0-9._-] become "_", dots and "_" at
    either end go, a device name gets a "_" in front ("CON" -> "_CON", "aux.txt" -> "_aux.txt");
    at most ``limit`` characters; "value" when nothing is left."""
    stem = _STEM_BAD.sub("_", str(name))[:limit].strip("._") or "value"
    if stem.split(".", 1)[0].upper() in WINDOWS_RESERVED:
        stem = "_" + stem[:limit - 1]
    return stem


def unique_stem(stem: str, taken: set[str], sep: str = "-") -> str:
    """``stem``, or ``stem{sep}2``, ``stem{sep}3``... : the first not in ``taken`` ignoring case
    (Windows and macOS folders do: "Image" and "image" are one file there); adds it to ``taken``."""
    name, n = stem, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}{sep}{n}"
    taken.add(name.lower())
    return name
