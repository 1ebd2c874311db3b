"""What the ComfyUI node pack (``comfy_nodes/``) needs from the package.

The node pack folder stays thin: its node classes call into this module, which has no ComfyUI
import of its own.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

__all__ = [
    "AnyType",
    "ANY",
    "port_mode",
    "get_handler",
    "host_info",
    "same_host",
    "host_differences",
    "PORT_CLASS",
    "LOADER_CLASS",
]

PORT_CLASS = "DiscomfortPort"
LOADER_CLASS = "DiscomfortDataLoader"


class AnyType(str):
    """A ComfyUI type that matches every other type (ComfyUI compares types with ``!=``)."""

    def __ne__(self, other: object) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


ANY = AnyType("*")


def port_mode(prompt: dict | None, node_id: str | None, declared: str | None = None) -> str:
    """INPUT, OUTPUT or PASSTHRU of the port ``node_id`` in an API-format ``prompt``.

    ``declared`` (what an orchestrator wrote into the prompt) wins when it is one of the three.
    """
    if declared:
        d = str(declared).upper()
        if d in ("INPUT", "OUTPUT", "PASSTHRU"):
            return d
    from ..workflow_format import port_mode_in_prompt

    if not prompt or node_id is None or str(node_id) not in prompt:
        # No graph to look at: a port with data is an output.
        return "OUTPUT"
    return port_mode_in_prompt(prompt, str(node_id))


def get_handler(run_id: str):
    """The run's WorkflowContext: registered in this process, or attached (raises if unknown)."""
    import discomfort

    return discomfort.get_context(run_id)


def always_changed_token() -> str:
    """A fingerprint that never repeats: the node is never served from ComfyUI's cache."""
    return uuid.uuid4().hex


def host_info() -> dict[str, Any]:
    """Where this process runs, to decide whether another process can share its memory."""
    import discomfort

    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = None
    try:
        st = os.stat("/dev/shm")
        shm: dict[str, int | None] = {"st_dev": st.st_dev, "st_ino": st.st_ino}
    except OSError:
        shm = {"st_dev": None, "st_ino": None}
    return {
        "boot_id": boot_id,
        "uid": os.getuid() if hasattr(os, "getuid") else None,
        "shm_st_dev": shm["st_dev"],
        "shm_st_ino": shm["st_ino"],
        "pid": os.getpid(),
        "version": getattr(discomfort, "__version__", None),
        "backend": getattr(discomfort, "backend", None),
    }


_SHARING_KEYS = ("boot_id", "uid", "shm_st_dev", "shm_st_ino")


def same_host(a: dict, b: dict) -> bool:
    """Whether two host_info() answers can share POSIX shared memory."""
    return not host_differences(a, b)


def host_differences(a: dict, b: dict) -> list[str]:
    """Why two host_info() answers cannot share memory, in words; empty when they can."""
    a, b = a or {}, b or {}
    why = []
    if a.get("boot_id") is None or a.get("boot_id") != b.get("boot_id"):
        why.append("another host or kernel (boot id differs)")
    if a.get("uid") is None or a.get("uid") != b.get("uid"):
        why.append(f"another user (uid {a.get('uid')} here, {b.get('uid')} there)")
    if any(a.get(k) is None or a.get(k) != b.get(k) for k in ("shm_st_dev", "shm_st_ino")):
        why.append("another /dev/shm (device or inode differs: a container?)")
    return why
