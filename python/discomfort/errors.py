"""Exception classes, defined once here and raised by every backend.

The C++ core looks these classes up by name, so each one keeps its name for good.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "DiscomfortError",
    "UnknownKeyError",
    "UnknownRunError",
    "RunFinishedError",
    "InvalidKeyError",
    "InvalidRunIdError",
    "StoreFullError",
    "DiskFullError",
    "CorruptedStoreError",
    "StoreAccessError",
    "StoreClosedError",
    "ReferenceUnavailableError",
    "SerializationError",
]


class DiscomfortError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownKeyError(DiscomfortError, KeyError):
    """No object is stored under the key in this run."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownRunError(DiscomfortError, LookupError):
    """No run of that id exists on this machine (or it is not ours)."""


class RunFinishedError(UnknownRunError):
    """The run exists but has ended: its data is being or has been released."""


class InvalidKeyError(DiscomfortError, ValueError, TypeError):
    """A key that is empty, not a str, longer than 255 UTF-8 bytes, or holds NUL."""


class InvalidRunIdError(DiscomfortError, ValueError):
    """A run id that is not 1-64 characters of [A-Za-z0-9_-]."""


class StoreFullError(DiscomfortError, MemoryError):
    """Neither tier can hold the object (or the object table is full)."""


class DiskFullError(DiscomfortError, OSError):
    """The disk tier's filesystem is full (ENOSPC)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1:
            super().__init__(_errno.ENOSPC, args[0])
        else:
            super().__init__(*args)

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


class CorruptedStoreError(DiscomfortError):
    """A segment that is not ours, of another format version, truncated or damaged."""


class StoreAccessError(DiscomfortError, PermissionError):
    """The segment belongs to another user: its data is never read."""


class StoreClosedError(DiscomfortError, ValueError):
    """An operation on a store handle that was closed or destroyed."""


class ReferenceUnavailableError(DiscomfortError):
    """A value saved by reference was loaded from a process that does not own it."""


class SerializationError(DiscomfortError, TypeError):
    """A value saved with pass_by="val" could not be serialized."""
