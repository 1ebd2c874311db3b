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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import UnsupportedWorkflowError
from .subgraphs import MODE_BYPASS, MODE_NEVER, Network, NodeView
from .widgets import UNDEFINED, InputDef, node_widgets, serialise

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
    "Control",
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
# UI format -> API format (graphToPrompt); widgets in workflow_widgets, graph in workflow_subgraphs


def _input_spec_type(spec: Any) -> Any:
    if isinstance(spec, (list, tuple)) and spec:
        return spec[0]
    return spec


def _input_spec(node_info: Mapping, name: str) -> Any:
    inputs = node_info.get("input", {}) or {}
    for category in ("required", "optional"):
        specs = inputs.get(category) or {}
        if name in specs:
            return specs[name]
    return None


def widget_layout(node_info: Mapping, class_type: str = "") -> list[str | None]:
    """The names behind a node's positional ``widgets_values``; None for frontend-only widgets."""
    return [w.name if w.sent else None for w in node_widgets(class_type, node_info) if w.saved]


@dataclass(frozen=True)
class Control:
    """A widget's "control after generate" in a converted prompt: what the frontend does to
    ``prompt[node]["inputs"][input]`` after each queue (``mode``: fixed, increment,
    increment-wrap, decrement, randomize); ``spec`` holds min/max/step or a combo's choices,
    ``filter`` a combo control's filter text. ``group``: the PrimitiveNode whose control it is
    (every widget it feeds gets the one value), else ""."""

    node: str
    input: str
    mode: str
    spec: InputDef
    filter: str = ""
    group: str = ""


def ui_to_api(workflow: Mapping, object_info: Mapping, *, controls: list[Control] | None = None) -> dict:
    """Convert a UI-format workflow into an API-format prompt, as the frontend's ``graphToPrompt``.

    Subgraphs are flattened (ids ``"<outer>:<inner>"``); muted and bypassed nodes are left out
    (bypassed ones pass a type-matched input through), even of node types the server lacks.
    Anything the frontend would not send as this, or could not convert, raises
    :class:`UnsupportedWorkflowError` naming the node. ``controls``: a list that receives the
    :class:`Control` of each sent widget value that has one (a value from a link has none).
    """
    _refuse_group_nodes(workflow)
    net = Network(workflow, object_info)
    executables = net.flatten()
    for dto in executables.values():
        _check_node_type(dto.view)
    net.apply_primitives()
    replacement_nodes = net.replacement_nodes()
    prompt: dict[str, dict] = {}
    for dto in executables.values():
        view = dto.view
        if view.kind in ("virtual", "subgraph") or view.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        inputs = serialise(view.node, view.widgets, replacement_nodes, view.type)
        for slot, inp in enumerate(view.inputs):
            resolved = net.resolve_input(dto, slot, set())
            if resolved is None:
                continue
            if isinstance(resolved, tuple):
                value = resolved[1]
                inputs[inp.name] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[inp.name] = resolved
        prompt[dto.id] = {"inputs": _drop_undefined(inputs), "class_type": view.type,
                          "_meta": {"title": view.title, **node_pack_meta(view.node)}}
        if controls is not None:
            controls.extend(_controls_of(dto.id, view, prompt[dto.id]["inputs"]))
    _drop_links_to_missing(prompt)
    return prompt


_PACK_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
_GITHUB_USER = re.compile(r"^(?!-)(?!.*--)[a-zA-Z0-9-]+(?<!-)$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([\da-z-]+(?:\.[\da-z-]+)*))?"
                     r"(?:\+([\da-z-]+(?:\.[\da-z-]+)*))?$")
_COMMIT = re.compile(r"^[0-9a-f]{4,40}$", re.IGNORECASE)


def node_pack_meta(node: Mapping) -> dict[str, str]:
    """The node pack fields 1.58.1 copies from a node's properties into ``_meta`` (each only when
    its value is valid: a registry id, ``github-user/repo``, a semantic version or commit hash
    with any leading ``v`` dropped, or ``unknown``)."""
    props = node.get("properties")
    if not isinstance(props, Mapping):
        return {}
    out = {}
    cnr = props.get("cnr_id")
    if isinstance(cnr, str) and _valid_pack_id(cnr):
        out["cnr_id"] = cnr
    aux = props.get("aux_id")
    if isinstance(aux, str) and re.fullmatch(r"[^/]+/[^/]+", aux):
        user, repo = aux.split("/")
        if 1 <= len(user) <= 39 and _GITHUB_USER.fullmatch(user) and _valid_pack_id(repo):
            out["aux_id"] = aux
    ver = props.get("ver")
    if isinstance(ver, str):
        bare = ver[1:] if ver.startswith("v") else ver
        if _SEMVER.fullmatch(bare) or _COMMIT.fullmatch(bare):
            out["ver"] = bare
        elif ver == "unknown":
            out["ver"] = ver
    return out


def _valid_pack_id(text: str) -> bool:
    return 1 <= len(text) <= 100 and bool(_PACK_ID.fullmatch(text)) and not re.search(r"^[_.-]|[_.-]$", text)


def _controls_of(node_id: str, view: NodeView, inputs: Mapping) -> list[Control]:
    """The controls of a node's widgets whose value is sent as a literal. A widget a PrimitiveNode
    feeds follows the primitive's control: the primitive writes its value into the widget before
    each queue, over whatever the widget's own control did."""
    filters = {w.controls: str(w.value) for w in view.widgets if w.kind == "FILTER" and w.controls}
    driven = {w.name: w for w in view.widgets if w.driven_by is not None and w.input is not None}
    out = [Control(node_id, w.controls, str(w.value), w.input, filters.get(w.controls, ""))
           for w in view.widgets
           if w.kind == "CONTROL" and w.controls and w.controls not in driven and w.input is not None
           and w.controls in inputs and not is_link(inputs[w.controls]) and isinstance(w.value, str)]
    for name, w in driven.items():
        if name in inputs and not is_link(inputs[name]):
            group, mode, text = w.driven_by  # type: ignore[misc]
            out.append(Control(node_id, name, mode, w.input, text, group))  # type: ignore[arg-type]
    return out


def _refuse_group_nodes(workflow: Mapping) -> None:
    """Legacy group nodes ("workflow>..."): 1.32.9 expands them with its own code (or throws),
    1.58.1 drops them and sends their consumers without the input."""
    extra = workflow.get("extra")
    group_nodes = extra.get("groupNodes") if isinstance(extra, Mapping) else None
    group_nodes = set(group_nodes) if isinstance(group_nodes, Mapping) else set()
    for node in workflow.get("nodes") or ():
        typ = node.get("type")
        if isinstance(typ, str) and (typ.startswith("workflow>") or typ.startswith("workflow/")) \
                or typ in group_nodes:
            raise _unsupported(node, "group nodes are not supported; convert the group node back to nodes")


def _check_node_type(view: NodeView) -> None:
    """A node type the server lacks is only acceptable on a muted or bypassed node."""
    if view.kind == "unknown" and view.mode not in (MODE_NEVER, MODE_BYPASS):
        raise _unsupported(view.node, "unknown node type (not in the server's object_info): a missing "
                                      "custom node, or a node this server cannot load")


def _drop_undefined(inputs: dict) -> dict:
    """JSON drops JavaScript ``undefined`` values (e.g. a combo with no choices and no value)."""
    return {k: v for k, v in inputs.items() if v is not UNDEFINED}


def _drop_links_to_missing(prompt: dict) -> None:
    """Inputs linked to nodes that are not in the prompt (muted, removed) are dropped."""
    for entry in prompt.values():
        for name in list(entry["inputs"]):
            value = entry["inputs"][name]
            if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                del entry["inputs"][name]


def _unsupported(node: Mapping, why: str) -> UnsupportedWorkflowError:
    return UnsupportedWorkflowError(f"node {node.get('id')} (type {node.get('type')!r}): {why}")


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
