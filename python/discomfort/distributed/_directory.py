"""The run directory: a named Ray actor holding ``unique_id -> (ObjectRef, info)`` for one run.

It holds every value's ObjectRef (so Ray keeps the value alive while the key exists) and the
store-wide version counter. It imports neither torch nor the codecs: it never sees payloads,
only references. Calls are served one at a time, so every update is atomic.
"""

from __future__ import annotations

import time
from typing import Any

FINISHED = "__finished__"


class RunDirectory:
    def __init__(self, run_id: str, owner: dict) -> None:
        self.run_id = run_id
        self.owner = dict(owner)
        self.created = time.time()
        self._entries: dict[str, tuple[Any, dict]] = {}
        self._next_version = 1
        self._finished = False
        self._puts = 0
        self._prompts: set[str] = set()

    # ---- liveness ------------------------------------------------------------------------------
    def ping(self) -> dict:
        return {"run_id": self.run_id, "owner": self.owner, "finished": self._finished}

    # ---- prompts that may use the run ----------------------------------------------------------
    def allow_prompt(self, digest: str) -> None:
        self._prompts.add(digest)

    def revoke_prompt(self, digest: str) -> None:
        self._prompts.discard(digest)

    def prompt_allowed(self, digest: str) -> bool:
        return digest in self._prompts

    # ---- updates -------------------------------------------------------------------------------
    def put(self, uid: str, box: list, info: dict) -> Any:
        """Store ``box[0]`` (an ObjectRef; empty box: a reference kept by its process) under uid."""
        if self._finished:
            return FINISHED
        version = self._next_version
        self._next_version += 1
        self._puts += 1
        entry = dict(info, key=uid, version=version)
        self._entries[uid] = (box[0] if box else None, entry)
        return version

    def adopt(self, uid: str, version: int, box: list, info: dict) -> bool:
        """Swap the object of ``uid`` for a copy with another owner, if it is still ``version``.

        The version does not change: the value is the same, so nothing that fingerprints it
        (a DataLoader's IS_CHANGED) sees a change.
        """
        current = self._entries.get(uid)
        if self._finished or current is None or current[1]["version"] != version:
            return False
        self._entries[uid] = (box[0], dict(current[1], **info))
        return True

    def delete(self, uid: str) -> Any:
        if self._finished:
            return FINISHED
        return self._entries.pop(uid, None) is not None

    def clear(self) -> int:
        """End the run: drop every reference (Ray frees the values) and refuse further puts."""
        n = len(self._entries)
        self._entries.clear()
        self._finished = True
        return n

    # ---- reads ----------------------------------------------------------------------------------
    def get(self, uid: str) -> Any:
        if self._finished:
            return FINISHED
        current = self._entries.get(uid)
        if current is None:
            return None
        ref, info = current
        return ([ref] if ref is not None else [], dict(info))

    def info(self, uid: str) -> Any:
        if self._finished:
            return FINISHED
        current = self._entries.get(uid)
        return None if current is None else dict(current[1])

    def versions(self, uids: list) -> Any:
        if self._finished:
            return FINISHED
        return {u: (self._entries[u][1]["version"] if u in self._entries else None) for u in uids}

    def entries(self, uids: list) -> Any:
        """``{uid: ([ref], info)}`` of the values among ``uids`` (for adoption)."""
        if self._finished:
            return FINISHED
        out = {}
        for u in uids:
            current = self._entries.get(u)
            if current is not None and current[0] is not None:
                out[u] = ([current[0]], dict(current[1]))
        return out

    def keys(self) -> Any:
        return FINISHED if self._finished else list(self._entries)

    def contains(self, uid: str) -> Any:
        return FINISHED if self._finished else uid in self._entries

    def stats(self) -> Any:
        if self._finished:
            return FINISHED
        by_node: dict[str, int] = {}
        nbytes = refs = 0
        for _ref, info in self._entries.values():
            if info.get("kind") == "ref":
                refs += 1
                continue
            size = int(info.get("size", 0))
            nbytes += size
            node = info.get("node") or "?"
            by_node[node] = by_node.get(node, 0) + size
        return {
            "run_id": self.run_id,
            "objects": len(self._entries) - refs,
            "refs": refs,
            "bytes": nbytes,
            "bytes_by_node": by_node,
            "next_version": self._next_version,
            "puts": self._puts,
            "created": self.created,
            "run_owner": self.owner,
        }
