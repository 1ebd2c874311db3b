"""What the ComfyUI node pack (``comfy_nodes/``) needs from the package.

The node pack folder stays thin: its node classes call into this module, which has no ComfyUI
import of its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import uuid
from typing import Any

__all__ = [
    "AnyType",
    "ANY",
    "port_mode",
    "get_handler",
    "host_info",
    "host_facts",
    "new_nonce",
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


def get_handler(run_id: str, prompt: Any = None):
    """The run's context, for a node of ``prompt`` (ComfyUI's hidden PROMPT input).

    Registered in this process or attached; raises if the run is unknown, or if the run's
    orchestrator did not queue this prompt (someone else's prompt naming the run's id).
    """
    import discomfort

    ctx = discomfort.get_context(run_id)
    ctx.check_prompt(prompt)
    return ctx


def always_changed_token() -> str:
    """A fingerprint that never repeats: the node is never served from ComfyUI's cache."""
    return uuid.uuid4().hex


def host_facts() -> dict[str, Any]:
    """What decides whether two processes can share this run's memory; never sent anywhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id: str | None = f.read().strip() or None
    except OSError:
        boot_id = None
    try:
        st = os.stat("/dev/shm")
        shm: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        shm = None
    return {"boot_id": boot_id, "uid": os.getuid() if hasattr(os, "getuid") else None, "shm": shm}


_NONCE = re.compile(r"^[0-9a-f]{32,128}$")


def host_info(nonce: str) -> dict[str, Any]:
    """Keyed digests of this host, user and /dev/shm, for the same-host check over HTTP.

    Each digest mixes the asker's ``nonce`` with the boot id, which another machine cannot read:
    the asker compares them with its own :func:`host_info` of the same nonce, and learns only
    whether they match, never a uid, a pid or the boot id itself.
    """
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise ValueError("nonce must be 32-128 lowercase hex digits")
    import discomfort

    facts = host_facts()

    def digest(*parts: Any) -> str | None:
        if facts["boot_id"] is None or any(p is None for p in parts):
            return None
        text = "\x00".join(str(p) for p in (nonce, facts["boot_id"], *parts))
        return hashlib.sha256(text.encode()).hexdigest()

    return {
        "nonce": nonce,
        "host": digest("host"),
        "user": digest("user", facts["uid"]),
        "shm": digest("shm", *(facts["shm"] or (None,))),
        "version": getattr(discomfort, "__version__", None),
        "backend": getattr(discomfort, "backend", None),
    }


def new_nonce() -> str:
    return secrets.token_hex(16)


def same_host(a: dict, b: dict) -> bool:
    """Whether two host_info() answers of the same nonce can share POSIX shared memory."""
    return not host_differences(a, b)


def host_differences(a: dict, b: dict) -> list[str]:
    """Why two host_info() answers cannot share memory, in words; empty when they can."""
    a, b = a or {}, b or {}
    if a.get("nonce") is None or a.get("nonce") != b.get("nonce"):
        return ["the answers were made for different nonces"]
    why = []
    if a.get("host") is None or a.get("host") != b.get("host"):
        why.append("another host or kernel (boot id differs)")
    elif a.get("user") is None or a.get("user") != b.get("user"):
        why.append("another user")
    if a.get("host") is not None and a.get("host") == b.get("host") \
            and (a.get("shm") is None or a.get("shm") != b.get("shm")):
        why.append("another /dev/shm (device or inode differs: a container?)")
    return why
