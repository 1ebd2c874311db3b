"""Workflow formats, port discovery and stitching: pure data, no ComfyUI import.

ComfyUI knows two JSON forms of a workflow:

* the **API format** ("prompt") that ``POST /prompt`` takes: ``{node_id: {"class_type": ...,
  "inputs": {name: value | [origin_node_id, origin_slot]}}}``;
* the **UI format** the editor saves: ``{"nodes": [...], "links": [...], "groups": [...], ...}``
  with positional ``widgets_values``.

:func:`load_workflow` turns either into an API prompt; the UI conversion follows what ComfyUI's
frontend does when it queues a workflow (``graphToPrompt``), using the server's ``/object_info``
to know each node type's widgets. :func:`discover_ports` finds the ``DiscomfortPort`` nodes of a
prompt and their mode; :func:`stitch` joins several prompts into one.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import UnsupportedWorkflowError

__all__ = [
    "Port",
    "PORT_CLASS",
    "LOADER_CLASS",
    "INPUT",
    "OUTPUT",
    "PASSTHRU",
    "load_workflow",
    "is_api_format",
    "is_ui_format",
    "ui_to_api",
    "is_link",
    "port_mode_in_prompt",
    "discover_port_nodes",
    "discover_ports",
    "stitch",
]

PORT_CLASS = "DiscomfortPort"
LOADER_CLASS = "DiscomfortDataLoader"
INPUT, OUTPUT, PASSTHRU = "INPUT", "OUTPUT", "PASSTHRU"
PORT_DATA_INPUT = "input_data"

# LiteGraph node modes.
MODE_ALWAYS, MODE_ON_EVENT, MODE_NEVER, MODE_ON_TRIGGER, MODE_BYPASS = 0, 1, 2, 3, 4

# Frontend-only nodes that never reach the API prompt.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPES = frozenset({"Reroute"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_WIDGET_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


# ---------------------------------------------------------------------------------------------
# Loading and format detection


def is_link(value: Any) -> bool:
    """An API-format input that is a link: ``[origin_node_id, origin_slot]``."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def is_ui_format(data: Any) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_format(data: Any) -> bool:
    if not isinstance(data, Mapping) or not data or is_ui_format(data):
        return False
    return all(isinstance(v, Mapping) and "class_type" in v for v in data.values())


def load_workflow(workflow: Mapping | str | os.PathLike, object_info: Mapping | None = None) -> dict:
    """An API-format prompt from a workflow (a dict or a JSON file, API or UI format).

    API format is returned as is (a deep copy, node ids as strings). UI format needs
    ``object_info`` (what the server's ``/object_info`` answers) to map positional widget
    values to input names. Features this cannot convert raise :class:`UnsupportedWorkflowError`.
    """
    if isinstance(workflow, (str, os.PathLike)):
        with open(Path(workflow), encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = workflow
    # A file saved with "Save (API)" under a wrapper, or a /prompt body.
    if isinstance(data, Mapping) and "prompt" in data and isinstance(data["prompt"], Mapping) \
            and not is_ui_format(data) and is_api_format(data["prompt"]):
        data = data["prompt"]
    if is_ui_format(data):
        if object_info is None:
            raise ValueError("converting a UI-format workflow needs object_info (the server's /object_info)")
        return ui_to_api(data, object_info)
    if is_api_format(data):
        out = {str(k): copy.deepcopy(dict(v)) for k, v in data.items()}
        for entry in out.values():
            inputs = entry.setdefault("inputs", {})
            for name, value in inputs.items():
                if is_link(value):
                    inputs[name] = [str(value[0]), value[1]]
        return out
    raise ValueError("not a ComfyUI workflow: expected an API-format prompt or a UI-format workflow")


# ---------------------------------------------------------------------------------------------
# UI format -> API format


def _input_spec_type(spec: Any) -> Any:
    if isinstance(spec, (list, tuple)) and spec:
        return spec[0]
    return spec


def _input_spec_options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], Mapping):
        return dict(spec[1])
    return {}


def _is_widget_spec(spec: Any) -> bool:
    typ = _input_spec_type(spec)
    opts = _input_spec_options(spec)
    if opts.get("forceInput"):
        return False
    if isinstance(typ, (list, tuple)):
        return True  # a combo: list of choices
    return isinstance(typ, str) and typ in WIDGET_TYPES


def widget_layout(node_info: Mapping) -> list[str | None]:
    """The names behind a node's positional ``widgets_values``; None for frontend-only extras.

    Order: required then optional inputs, in ``input_order``. A seed-like INT widget (option
    ``control_after_generate``, or named seed/noise_seed) is followed by the frontend's
    "control after generate" value; an upload combo by its upload button's value.
    """
    inputs = node_info.get("input", {}) or {}
    order = node_info.get("input_order") or {}
    layout: list[str | None] = []
    for category in ("required", "optional"):
        specs = inputs.get(category) or {}
        names = list(order.get(category) or specs.keys())
        for name in names:
            if name not in specs:
                continue
            spec = specs[name]
            if not _is_widget_spec(spec):
                continue
            layout.append(name)
            typ = _input_spec_type(spec)
            opts = _input_spec_options(spec)
            control = opts.get("control_after_generate")
            if control is None and typ == "INT" and name in SEED_WIDGET_NAMES:
                control = True
            if control:
                layout.append(None)  # "control after generate"
                if isinstance(typ, (list, tuple)) or typ == "COMBO":
                    layout.append(None)  # combos also get a "control filter list"
            if any(opts.get(o) for o in UPLOAD_OPTIONS):
                layout.append(None)
    return layout


def _input_spec(node_info: Mapping, name: str) -> Any:
    inputs = node_info.get("input", {}) or {}
    for category in ("required", "optional"):
        specs = inputs.get(category) or {}
        if name in specs:
            return specs[name]
    return None


@dataclass
class _Link:
    id: int
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any = None


def _parse_links(raw: Iterable) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for item in raw or ():
        if isinstance(item, Mapping):
            link = _Link(item["id"], item["origin_id"], int(item["origin_slot"]), item["target_id"],
                         int(item["target_slot"]), item.get("type"))
        else:
            link = _Link(item[0], item[1], int(item[2]), item[3], int(item[4]), item[5] if len(item) > 5 else None)
        links[link.id] = link
    return links


_VIRTUAL_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES


def _type_ok(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection: "*" and "" match anything; "A,B" unions overlap."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    sa = {t.strip().lower() for t in str(a).split(",")}
    sb = {t.strip().lower() for t in str(b).split(",")}
    return bool(sa & sb)


def _bypass_input_for(node: Mapping, out_slot: int, want_type: Any) -> int:
    """Which input of a bypassed node stands in for output ``out_slot`` (frontend rule); -1: none."""
    ins = node.get("inputs") or []
    outs = node.get("outputs") or []
    out_type = outs[out_slot].get("type") if out_slot < len(outs) else None
    if want_type in ("*", ""):
        return out_slot if len(ins) > out_slot else 0
    if out_slot < len(ins) and _type_ok(ins[out_slot].get("type"), out_type) \
            and _type_ok(ins[out_slot].get("type"), want_type):
        return out_slot
    for i, inp in enumerate(ins):
        if inp.get("type") == want_type:
            return i
    for i, inp in enumerate(ins):
        if _type_ok(inp.get("type"), out_type) and _type_ok(inp.get("type"), want_type):
            return i
    return -1


def _unsupported(node: Mapping, why: str) -> UnsupportedWorkflowError:
    return UnsupportedWorkflowError(f"node {node.get('id')} (type {node.get('type')!r}): {why}")


def ui_to_api(workflow: Mapping, object_info: Mapping) -> dict:
    """Convert a UI-format workflow into an API-format prompt (see :func:`load_workflow`)."""
    subgraph_ids = set()
    definitions = workflow.get("definitions") or {}
    for sg in definitions.get("subgraphs") or ():
        if isinstance(sg, Mapping) and "id" in sg:
            subgraph_ids.add(sg["id"])
    group_nodes = set(((workflow.get("extra") or {}).get("groupNodes") or {}).keys())

    nodes_by_id: dict[Any, Mapping] = {}
    for node in workflow["nodes"]:
        nodes_by_id[node["id"]] = node
    links = _parse_links(workflow.get("links") or [])

    # 1. Which nodes become API nodes; everything unknown is refused before any work.
    real: list[Mapping] = []
    for node in workflow["nodes"]:
        typ = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if typ in NOTE_TYPES or typ in REROUTE_TYPES or typ in PRIMITIVE_TYPES:
            continue
        if typ in subgraph_ids:
            raise _unsupported(node, "subgraphs are not supported; convert the subgraph back to nodes")
        if isinstance(typ, str) and (typ.startswith("workflow>") or typ.startswith("workflow/")) \
                or typ in group_nodes:
            raise _unsupported(node, "group nodes are not supported; convert the group node back to nodes")
        if typ not in object_info:
            raise _unsupported(node, "unknown node type (not in the server's object_info); "
                                     "a missing custom node, or a subgraph")
        if mode in (MODE_NEVER, MODE_BYPASS):
            continue
        real.append(node)

    def input_link(node: Mapping, slot: int) -> _Link | None:
        ins = node.get("inputs") or []
        if slot < 0 or slot >= len(ins):
            return None
        link_id = ins[slot].get("link")
        if link_id is None:
            return None
        return links.get(link_id)

    def resolve_input(node: Mapping, slot: int, want_type: Any, seen: set) -> list | None:
        """Where input ``slot`` of ``node`` really comes from, as the frontend resolves it."""
        key = (node.get("id"), "I", slot)
        if key in seen:
            raise UnsupportedWorkflowError(f"node {node.get('id')}: circular link through input {slot}")
        seen.add(key)
        link = input_link(node, slot)
        if link is None:
            return None
        origin = nodes_by_id.get(link.origin_id)
        if origin is None:
            return None
        if want_type is None:
            ins = node.get("inputs") or []
            want_type = ins[slot].get("type") if slot < len(ins) else None
        return resolve_output(origin, link.origin_slot, want_type, seen)

    def resolve_output(node: Mapping, slot: int, want_type: Any, seen: set) -> list | None:
        key = (node.get("id"), "O", slot)
        if key in seen:
            raise UnsupportedWorkflowError(f"node {node.get('id')}: circular link through output {slot}")
        seen.add(key)
        typ = node.get("type")
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS and typ not in _VIRTUAL_TYPES:
            idx = _bypass_input_for(node, slot, want_type)
            if idx < 0:
                return None
            return resolve_input(node, idx, None, seen)
        if typ in _VIRTUAL_TYPES:
            # A reroute's output slot k comes from its input slot k; a PrimitiveNode has no
            # input (its value reaches its consumers' widgets, below); notes have no links.
            if input_link(node, slot) is None:
                return None
            return resolve_input(node, slot, want_type, seen)
        # Muted nodes resolve like any other: the link is removed afterwards with the node.
        return [str(node["id"]), int(slot)]

    # What PrimitiveNodes write into their consumers' widgets (the frontend's applyToGraph).
    primitive_values: dict[Any, dict[str, Any]] = {}

    def push_primitive(value: Any, link_ids: Iterable, seen: set) -> None:
        for lid in link_ids or ():
            link = links.get(lid)
            if link is None or lid in seen:
                continue
            seen.add(lid)
            target = nodes_by_id.get(link.target_id)
            if target is None:
                continue
            if target.get("type") in REROUTE_TYPES:
                for out in target.get("outputs") or []:
                    push_primitive(value, out.get("links"), seen)
                continue
            ins = target.get("inputs") or []
            if link.target_slot >= len(ins):
                continue
            inp = ins[link.target_slot]
            widget = inp.get("widget")
            name = widget.get("name") if isinstance(widget, Mapping) and widget.get("name") else inp.get("name")
            if name:
                primitive_values.setdefault(target["id"], {})[name] = copy.deepcopy(value)

    for node in workflow["nodes"]:
        if node.get("type") in PRIMITIVE_TYPES:
            values = node.get("widgets_values")
            if isinstance(values, list) and values:
                for out in node.get("outputs") or []:
                    push_primitive(values[0], out.get("links"), set())

    prompt: dict[str, dict] = {}
    for node in real:
        typ = node["type"]
        info = object_info[typ]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, Mapping):
            for name, value in values.items():
                spec = _input_spec(info, name)
                if spec is not None and _is_widget_spec(spec):
                    inputs[name] = copy.deepcopy(value)
        elif isinstance(values, list) and values:
            layout = widget_layout(info)
            plain: list[str | None] = [n for n in layout if n is not None]
            if len(values) == len(layout):
                names = layout
            elif len(values) == len(plain):
                names = plain  # saved without the frontend-only extras
            else:
                raise _unsupported(node, f"{len(values)} widget values where this node type has "
                                         f"{len(layout)} ({', '.join(n or '<control>' for n in layout)}): "
                                         "a different version of the node?")
            for name, value in zip(names, values):
                if name is not None:
                    inputs[name] = copy.deepcopy(value)
        for name, value in primitive_values.get(node["id"], {}).items():
            if name in inputs or _input_spec(info, name) is not None:
                inputs[name] = value
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                inputs[name] = {"__value__": value}  # as the frontend does: never mistaken for a link

        for slot, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            if name is None:
                continue
            source = resolve_input(node, slot, None, set())
            if source is not None:
                inputs[name] = source

        title = node.get("title") or info.get("display_name") or typ
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": typ, "_meta": {"title": title}}

    # Inputs linked to nodes that are not in the prompt (muted, removed) are dropped.
    for entry in prompt.values():
        for name in list(entry["inputs"]):
            value = entry["inputs"][name]
            if is_link(value) and str(value[0]) not in prompt:
                del entry["inputs"][name]
    return prompt


# ---------------------------------------------------------------------------------------------
# Ports


@dataclass(frozen=True)
class Port:
    """A ``DiscomfortPort`` (or, for a key, all the port nodes sharing its ``unique_id``).

    ``mode``: INPUT (no incoming link, feeds other nodes), OUTPUT (incoming link, nothing
    downstream) or PASSTHRU (both). For a key, INPUT/OUTPUT when all its nodes agree, else
    PASSTHRU (a key read and written by the same workflow, e.g. a loop state).
    ``type``: the ComfyUI type inferred from what is linked to or from it ("*" when unknown).
    """

    node_id: str
    unique_id: str
    mode: str
    type: str = "*"
    node_ids: tuple[str, ...] = ()
    input_node_ids: tuple[str, ...] = ()
    output_node_ids: tuple[str, ...] = ()
    consumers: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def reads(self) -> bool:
        """The key is read by the workflow (some node of it is an INPUT port)."""
        return bool(self.input_node_ids)

    @property
    def writes(self) -> bool:
        """The key is written by the workflow (some node of it is an OUTPUT or PASSTHRU port)."""
        return bool(self.output_node_ids)


def _consumers(prompt: Mapping, node_id: str, slot: int | None = 0) -> list[tuple[str, str]]:
    out = []
    for nid, entry in prompt.items():
        for name, value in (entry.get("inputs") or {}).items():
            if is_link(value) and str(value[0]) == node_id and (slot is None or value[1] == slot):
                out.append((str(nid), name))
    return out


def port_mode_in_prompt(prompt: Mapping, node_id: str) -> str:
    """INPUT, OUTPUT or PASSTHRU of the port node ``node_id``, by its links in ``prompt``."""
    entry = prompt[str(node_id)]
    incoming = is_link((entry.get("inputs") or {}).get(PORT_DATA_INPUT))
    downstream = bool(_consumers(prompt, str(node_id), None))
    if incoming and downstream:
        return PASSTHRU
    if incoming:
        return OUTPUT
    return INPUT


def _output_type(prompt: Mapping, object_info: Mapping | None, link: Any, depth: int = 0) -> str:
    if object_info is None or depth > 64 or not is_link(link):
        return "*"
    origin = prompt.get(str(link[0]))
    if origin is None:
        return "*"
    cls = origin.get("class_type")
    if cls == PORT_CLASS:
        return _output_type(prompt, object_info, (origin.get("inputs") or {}).get(PORT_DATA_INPUT), depth + 1)
    info = object_info.get(cls) or {}
    outputs = info.get("output") or []
    if link[1] < len(outputs):
        t = outputs[link[1]]
        if isinstance(t, (list, tuple)):
            return "COMBO"
        return str(t)
    return "*"


def _input_type(prompt: Mapping, object_info: Mapping | None, node_id: str, depth: int = 0) -> str:
    if object_info is None or depth > 64:
        return "*"
    for cid, name in _consumers(prompt, node_id, 0):
        entry = prompt[cid]
        cls = entry.get("class_type")
        if cls == PORT_CLASS:
            t = _input_type(prompt, object_info, cid, depth + 1)
        else:
            spec = _input_spec(object_info.get(cls) or {}, name)
            if spec is None:
                spec = ((object_info.get(cls) or {}).get("input", {}).get("hidden") or {}).get(name)
            t = _input_spec_type(spec) if spec is not None else "*"
            if isinstance(t, (list, tuple)):
                t = "COMBO"
        if t and t != "*":
            return str(t)
    return "*"


def discover_port_nodes(prompt: Mapping, object_info: Mapping | None = None) -> dict[str, Port]:
    """Every DiscomfortPort node of an API prompt: ``{node_id: Port}``."""
    found: dict[str, Port] = {}
    for nid, entry in prompt.items():
        if entry.get("class_type") != PORT_CLASS:
            continue
        nid = str(nid)
        inputs = entry.get("inputs") or {}
        uid = inputs.get("unique_id")
        if not isinstance(uid, str) or not uid:
            raise UnsupportedWorkflowError(
                f"node {nid} ({PORT_CLASS}): its unique_id must be a non-empty string widget, got {uid!r}"
            )
        mode = port_mode_in_prompt(prompt, nid)
        if mode == INPUT:
            typ = _input_type(prompt, object_info, nid)
        else:
            typ = _output_type(prompt, object_info, inputs.get(PORT_DATA_INPUT))
            if typ == "*" and mode == PASSTHRU:
                typ = _input_type(prompt, object_info, nid)
        found[nid] = Port(
            node_id=nid, unique_id=uid, mode=mode, type=typ, node_ids=(nid,),
            input_node_ids=(nid,) if mode == INPUT else (),
            output_node_ids=(nid,) if mode != INPUT else (),
            consumers=tuple(_consumers(prompt, nid, 0)),
        )
    return found


def discover_ports(prompt: Mapping, object_info: Mapping | None = None) -> dict[str, Port]:
    """The ports of an API prompt by key: ``{unique_id: Port}``.

    Several port nodes may share a key (a loop reads and writes the same key): the Port then
    lists them all (``node_ids``, ``input_node_ids``, ``output_node_ids``), ``node_id`` is the
    first, and ``mode`` is PASSTHRU unless they all agree.
    """
    by_key: dict[str, list[Port]] = {}
    for port in discover_port_nodes(prompt, object_info).values():
        by_key.setdefault(port.unique_id, []).append(port)
    out: dict[str, Port] = {}
    for uid, ports in by_key.items():
        ports.sort(key=lambda p: _sort_key(p.node_id))
        modes = {p.mode for p in ports}
        mode = modes.pop() if len(modes) == 1 else PASSTHRU
        types = [p.type for p in ports if p.type != "*"]
        out[uid] = Port(
            node_id=ports[0].node_id, unique_id=uid, mode=mode, type=types[0] if types else "*",
            node_ids=tuple(p.node_id for p in ports),
            input_node_ids=tuple(n for p in ports for n in p.input_node_ids),
            output_node_ids=tuple(n for p in ports for n in p.output_node_ids),
            consumers=tuple(c for p in ports for c in p.consumers),
        )
    return out


def _sort_key(node_id: str):
    try:
        return (0, int(node_id), "")
    except ValueError:
        return (1, 0, node_id)


# ---------------------------------------------------------------------------------------------
# Stitching


def stitch(prompts: list[Mapping]) -> dict:
    """Join several API prompts into one, in order.

    Node ids are renumbered ("1", "2", ... across all prompts). An INPUT port of prompt k whose
    unique_id an earlier prompt writes (OUTPUT or PASSTHRU port) is removed, and its consumers
    are linked straight to what feeds the latest such port. An OUTPUT port whose key a later
    prompt writes again is removed too (its consumers, if any, linked to its source), so that
    each key is written once, by the last prompt that writes it. INPUT ports of keys no earlier
    prompt writes stay: they are the stitched prompt's inputs.
    """
    result: dict[str, dict] = {}
    producer: dict[str, Any] = {}  # unique_id -> link feeding the latest writer
    writer: dict[str, str] = {}  # unique_id -> new node id of the latest writer port
    counter = 0

    def rewire(old_link_target: str, replacement: Any) -> None:
        for entry in result.values():
            for name, value in list(entry["inputs"].items()):
                if is_link(value) and value[0] == old_link_target:
                    if replacement is None:
                        del entry["inputs"][name]
                    else:
                        entry["inputs"][name] = list(replacement)

    for prompt in prompts:
        prompt = load_workflow(prompt) if not is_api_format(prompt) else prompt
        ports = discover_port_nodes(prompt)
        mapping: dict[str, str] = {}
        for nid in sorted((str(k) for k in prompt), key=_sort_key):
            counter += 1
            mapping[nid] = str(counter)
        new_entries: dict[str, dict] = {}
        for nid, entry in prompt.items():
            entry = copy.deepcopy(dict(entry))
            inputs = entry.get("inputs") or {}
            for name, value in list(inputs.items()):
                if is_link(value):
                    if str(value[0]) not in mapping:
                        raise UnsupportedWorkflowError(
                            f"node {nid} ({entry.get('class_type')}): input {name!r} links to node "
                            f"{value[0]!r}, which is not in the workflow"
                        )
                    inputs[name] = [mapping[str(value[0])], value[1]]
            entry["inputs"] = inputs
            new_entries[mapping[str(nid)]] = entry
        result.update(new_entries)

        # INPUT ports fed by an earlier workflow: consumers take the producer's link directly.
        for old_id, port in ports.items():
            new_id = mapping[old_id]
            if port.mode == INPUT and port.unique_id in producer:
                rewire(new_id, producer[port.unique_id])
                del result[new_id]
        # Writers of this workflow supersede earlier writers of the same key.
        for old_id, port in sorted(ports.items(), key=lambda kv: _sort_key(kv[0])):
            if port.mode == INPUT:
                continue
            new_id = mapping[old_id]
            src = result[new_id]["inputs"].get(PORT_DATA_INPUT)
            previous = writer.get(port.unique_id)
            if previous is not None and previous in result and previous != new_id:
                prev_src = result[previous]["inputs"].get(PORT_DATA_INPUT)
                rewire(previous, prev_src if is_link(prev_src) else None)
                del result[previous]
            writer[port.unique_id] = new_id
            producer[port.unique_id] = src if is_link(src) else [new_id, 0]
    return result
