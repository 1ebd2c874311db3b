"""The pure-Python store: the same segment format and behaviour as the C++ core.

docs/FORMAT.md is the contract both follow. This package is the fallback where the core cannot
be built, and the reference the core is tested against. Its modules are named after their twins
in cpp/src (format.hpp, layout, sys, memprobe, lock, control, pins, table, alloc, objects, pool,
fork, store).
"""

from __future__ import annotations

from .format import COPY_LOAD_BYTES, FORMAT_VERSION, SMALL_OBJECT_BYTES
from .objects import Reservation
from .pool import pool_info, release_pool, set_pool_limit
from .store import Store

#: Which backend this module is (discomfort._core says "native").
BACKEND = "python"

# The public classes are this package's, whichever file defines them.
Store.__module__ = Reservation.__module__ = __name__

__all__ = ["BACKEND", "COPY_LOAD_BYTES", "FORMAT_VERSION", "SMALL_OBJECT_BYTES", "Reservation", "Store", "pool_info",
           "release_pool", "set_pool_limit"]
