"""What the node pack's classes (``comfy_nodes/``) need from the package.

The node pack folder stays thin: its node classes call into this module, which has no ComfyUI
import of its own.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..context import get_context
from ..runs import SharedRunContext
from ..workflows.format import LOADER_CLASS, PORT_CLASS, port_mode_in_prompt

__all__ = ["AnyType", "ANY", "port_mode", "context_for", "load_value", "save_value", "always_changed_token",
           "PORT_CLASS", "LOADER_CLASS"]


class AnyType(str):
    """A ComfyUI type that matches every other type: ComfyUI compares a link's types with ``!=``.

    Only ``!=`` is changed, as in ComfyUI's own ``IO.ANY``: with ``==`` true as well, ComfyUI's
    validation took a literal on such an input for an INT, then a FLOAT, a STRING and a BOOLEAN
    (``"hello"`` failed; ``5`` became ``True``), which no orchestrator can foresee from
    ``/object_info`` ("*").
    """

    def __ne__(self, other: object) -> bool:
        return False

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
    if not prompt or node_id is None or str(node_id) not in prompt:
        # No graph to look at: a port with data is an output.
        return "OUTPUT"
    return port_mode_in_prompt(prompt, str(node_id))


def context_for(run_id: str, prompt: Any = None) -> SharedRunContext:
    """The run's context, for a node of ``prompt`` (ComfyUI's hidden PROMPT input).

    Registered in this process or attached; raises if the run is unknown, or if the run's
    orchestrator did not queue this prompt (someone else's prompt naming the run's id).
    """
    ctx = get_context(run_id)
    ctx.check_prompt(prompt)
    return ctx


def _guard(ctx: Any) -> bool:
    """Whether nodes copy a run's bytes instead of mapping them: for runs this process attached
    to (a ComfyUI server serving an orchestrator), or whose context asks (``guard_nodes = True``,
    e.g. a server's own long-lived runs); not for a run of the process itself (an in-process
    executor), which keeps zero-copy."""
    return bool(getattr(ctx, "guard_nodes", False)) or not ctx.owner


def load_value(ctx: Any, unique_id: str) -> Any:
    """A node's load: guarded (``load_guarded``, a pread copy) where :func:`_guard` says, so a
    chunk another process truncated fails this prompt with TruncatedStoreError instead of
    killing the server with SIGBUS. Other runs and run kinds load as usual, zero-copy."""
    guarded = getattr(ctx, "load_guarded", None)
    if guarded is not None and _guard(ctx):
        return guarded(unique_id)
    return ctx.load(unique_id)


def save_value(ctx: Any, unique_id: str, data: Any) -> int:
    """A port's save: guarded (``save_guarded``, pwrite instead of a mapping) on the same runs as
    :func:`load_value`, for the same reason."""
    guarded = getattr(ctx, "save_guarded", None)
    if guarded is not None and _guard(ctx):
        return guarded(unique_id, data)
    return ctx.save(unique_id, data)


def always_changed_token() -> str:
    """A fingerprint that never repeats: the node is never served from ComfyUI's cache."""
    return uuid.uuid4().hex
