"""After fork() the child holds copies of every handle's descriptors, which share the parent's
OFD locks and flock: the child handler makes each handle let go of them; the child must attach
again to use a run. The twin of cpp/src/fork.cpp."""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

from .pool import POOL

if TYPE_CHECKING:
    from .control import StoreBase

#: The open handles of this process.
LIVE_STORES: weakref.WeakSet[StoreBase] = weakref.WeakSet()


def _forget_in_child() -> None:
    """A forked child inherits descriptors that share the parent's locks: let go of them."""
    POOL.forget_in_child()
    for store in list(LIVE_STORES):
        store._closed = True
        c = store._c
        c.released = True
        for fd in store._chunk_fds.values():
            os.close(fd)
        store._chunk_fds.clear()
        c.teardown()  # our copies only: the parent's locks stay (its descriptors remain open)
    LIVE_STORES.clear()


# The pool's lock is held across fork() so that the child's copy of the pool is consistent; the
# child then gets a new lock (looked up at each fork: the child replaces it). No fork on Windows.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: POOL.lock.acquire(), after_in_parent=lambda: POOL.lock.release(),
                        after_in_child=_forget_in_child)
