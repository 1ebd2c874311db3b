"""The form of a prompt that ComfyUI hands its nodes, known before the prompt is queued.

Before any node runs, ComfyUI's validation (``execution.validate_inputs``) changes the prompt in
place: in each node it reaches from an output node, each declared input that is not a link has
``{"__value__": v}`` unwrapped to ``v`` and is then cast by its declared type (INT ``int()``,
FLOAT ``float()``, STRING ``str()``, BOOLEAN ``bool()``; a cast that fails leaves the value, and
the prompt is refused). Nodes digest exactly what they are handed (:func:`runs.prompt_digest`),
so an orchestrator registers :func:`prompt_as_run` of what it queues: the same changes, made to a
copy, with the input types the executor declares.

Which node classes ComfyUI fingerprints before it trusts its cache (:func:`fingerprinted_classes`)
is told by the node side (``GET`` :data:`FINGERPRINTS_ROUTE`) and read by the orchestrator's
:mod:`discomfort.reuse`: both sides' fact, so it lives here, below both.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
import weakref
from typing import Any, Callable, Mapping

__all__ = ["NodeTypes", "validated_form", "prompt_as_run", "node_types", "fingerprinted_classes", "FINGERPRINTS_ROUTE"]

log = logging.getLogger("discomfort")

#: class_type -> (its INPUT_TYPES, or /object_info's "input"; whether it is an output node), or None.
NodeTypes = Callable[[Any], "tuple[Mapping, bool] | None"]

# ComfyUI's casts, in its order: one input may pass through several (a type equal to every name).
_CASTS: tuple[tuple[str, Callable[[Any], Any]], ...] = (("INT", int), ("FLOAT", float), ("STRING", str),
                                                        ("BOOLEAN", bool))


def validated_form(prompt: Mapping, types: NodeTypes) -> dict:
    """A copy of ``prompt`` as ComfyUI 0.3's validation leaves it, for a prompt that validates.

    Only nodes reached from output nodes through links are changed, only their declared
    (required or optional) inputs, as ``validate_inputs`` does; classes ``types`` does not know
    are left alone.
    """
    return _validate(copy.deepcopy(dict(prompt)), types)


def _validate(out: dict, types: NodeTypes) -> dict:
    """``validated_form`` on ``out`` itself."""
    known: dict[Any, tuple[Mapping, bool] | None] = {}

    def spec(node: Any) -> tuple[Mapping, bool] | None:
        cls = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(cls, str):
            return None
        if cls not in known:
            known[cls] = types(cls)
        return known[cls]

    stack = [uid for uid, node in out.items() if (s := spec(node)) is not None and s[1]]
    seen: set[Any] = set()
    while stack:
        uid = stack.pop()
        if uid in seen:
            continue
        seen.add(uid)
        node = out[uid]
        s, inputs = spec(node), node.get("inputs")
        if s is None or not isinstance(inputs, dict):
            continue
        declared = s[0]
        required, optional = declared.get("required") or {}, declared.get("optional") or {}
        for name in set(required) | set(optional):
            if name not in inputs:
                continue
            value = inputs[name]
            if isinstance(value, list):  # a link (any other list fails validation)
                try:
                    if len(value) == 2 and value[0] in out:
                        stack.append(value[0])
                except TypeError:  # unhashable: ComfyUI refuses the prompt
                    pass
                continue
            try:
                input_type = (required[name] if name in required else optional[name])[0]
                if isinstance(value, dict) and "__value__" in value:
                    value = value["__value__"]
                    inputs[name] = value
                for kind, cast in _CASTS:
                    if input_type == kind:
                        value = cast(value)
                        inputs[name] = value
            except Exception:  # noqa: BLE001  (ComfyUI refuses the prompt: its form does not matter)
                continue
    return out


def prompt_as_run(prompt: Mapping, executor: Any) -> dict:
    """What ``executor``'s nodes will be handed for ``prompt``: register its digest, queue ``prompt``.

    In-process (an executor with ``node_class_mappings``) the node classes' own ``INPUT_TYPES``
    give the types; otherwise the prompt first goes through JSON, as it does on its way to a
    server, and ``executor.object_info()`` gives them. Without either, the prompt is taken as it
    is: a prompt whose values ComfyUI would cast then fails with PromptNotAllowedError, never the
    other way round (another prompt accepted).
    """
    inprocess = hasattr(executor, "node_class_mappings")
    sent = copy.deepcopy(dict(prompt)) if inprocess else json.loads(json.dumps(prompt))
    types = node_types(executor)
    if types is None:
        log.debug("discomfort: %r gives no node types: prompts are registered as they are", executor)
        return sent
    return _validate(sent, types)


_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, tuple[Mapping, bool]]]" = weakref.WeakKeyDictionary()


def node_types(source: Any) -> NodeTypes | None:
    """Node types from an in-process executor's classes, an ``/object_info`` mapping, or an object
    with ``object_info()`` (a server, a pool: asked once per class, or once, and remembered)."""
    mappings = getattr(source, "node_class_mappings", None)
    if mappings is not None:
        def from_classes(cls: Any) -> tuple[Mapping, bool] | None:
            node = mappings.get(cls)
            try:
                return None if node is None else (node.INPUT_TYPES(), getattr(node, "OUTPUT_NODE", False) is True)
            except Exception:  # noqa: BLE001  (ComfyUI's validation fails on it too)
                return None
        return from_classes
    if isinstance(source, Mapping):
        return lambda cls: _entry(source.get(cls))
    ask = getattr(source, "object_info", None)
    if not callable(ask):
        return None
    try:
        cache = _CACHE.setdefault(source, {})
    except TypeError:  # not weakly referable: no memory between prompts
        cache = {}
    per_class = "node_class" in _parameters(ask)

    def from_info(cls: Any) -> tuple[Mapping, bool] | None:
        if cls not in cache:
            info: Any = None
            if per_class:
                try:
                    info = ask(cls)
                except Exception:  # noqa: BLE001  (a name the route cannot carry: ask for all)
                    info = None
            if not isinstance(info, Mapping) or cls not in info:
                info = _whole(source, ask)
            found = _entry(info.get(cls))
            if found is None:
                return None  # not remembered: a node pack may bring it later
            cache[cls] = found
        return cache[cls]
    return from_info


_WHOLE: "weakref.WeakKeyDictionary[Any, Mapping]" = weakref.WeakKeyDictionary()


def _whole(source: Any, ask: Callable[[], Mapping]) -> Mapping:
    try:
        if source not in _WHOLE:
            _WHOLE[source] = ask()
        return _WHOLE[source]
    except TypeError:
        return ask()


def _entry(info: Any) -> tuple[Mapping, bool] | None:
    if not isinstance(info, Mapping) or not isinstance(info.get("input"), Mapping):
        return None
    return info["input"], info.get("output_node") is True


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


#: The node pack's route listing the node classes ComfyUI fingerprints (GET, no arguments).
FINGERPRINTS_ROUTE = "/discomfort/node_fingerprints"


def fingerprinted_classes(mappings: Mapping[str, Any]) -> list[str]:
    """The node classes of ``mappings`` (ComfyUI's ``NODE_CLASS_MAPPINGS``) that ComfyUI asks for
    a fingerprint before it trusts its cache: ``IS_CHANGED``, or a V3 node's own
    ``fingerprint_inputs``, as ``execution.IsChangedCache`` decides. Runs inside ComfyUI."""
    internal = sys.modules.get("comfy_api.internal")
    base = getattr(internal, "_ComfyNodeInternal", None)
    override = getattr(internal, "first_real_override", None)
    out = []
    for name, cls in mappings.items():
        if hasattr(cls, "IS_CHANGED"):
            out.append(name)
            continue
        if not hasattr(cls, "fingerprint_inputs"):
            continue
        try:
            if base is not None and override is not None and issubclass(cls, base):
                if override(cls, "fingerprint_inputs") is None:
                    continue
        except Exception:  # noqa: BLE001  (cannot tell: taken as fingerprinted, never reused)
            pass
        out.append(name)
    return sorted(out)
