"""Internal: subgraph definitions as ComfyUI's newer frontends load them: nested definitions flattened, node
ids unique across the whole workflow.

Frontend 1.58.1 (``normalizeSubgraphDefinitions`` when the root graph is configured) renumbers a
node inside a subgraph definition whose id is already taken, by a root node or by a node of an
earlier definition: the new id is the next free one after the root's ``last_node_id`` (ids seen
so far raise it), the definition's links follow, and so do ``proxyWidgets`` entries of the
instances that name the node. Prompt ids are ``<outer>:<inner>``, so this decides them. Older
frontends (1.32.9) kept colliding ids; this follows what users run now.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping


def _definitions(container: Mapping) -> list:
    defs = (container.get("definitions") or {}) if isinstance(container.get("definitions"), Mapping) else {}
    found = defs.get("subgraphs") if isinstance(defs, Mapping) else None
    return [d for d in found or () if isinstance(d, Mapping)]


def flatten_definitions(workflow: Mapping) -> list[dict]:
    """Every subgraph definition, nested ones after their parent; a repeated id keeps the first."""
    out: list[dict] = []

    def walk(defs: list) -> None:
        for d in defs:
            out.append(dict(d))
            walk(_definitions(d))

    walk(_definitions(workflow))
    seen: set = set()
    unique = []
    for d in out:
        if "id" in d and d["id"] not in seen:
            seen.add(d["id"])
            unique.append(d)
    return unique


def _numeric(node_id: Any) -> int | None:
    """The id as an integer when its string form is one (``numericSerializedNodeId``)."""
    text = str(node_id)
    try:
        value = int(text)
    except ValueError:
        return None
    return value if str(value) == text else None


def _last_node_id(workflow: Mapping) -> int | None:
    state = workflow.get("state")
    last = state.get("lastNodeId") if isinstance(state, Mapping) else None
    if last is None:
        last = workflow.get("last_node_id")
    return last if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else None


class _Minter:
    """``mintSequentialId``: one past the last id, or the next free id after it."""

    def __init__(self, last: int | None, taken: set[int]):
        self.last, self.taken = last, taken

    def observe(self, node_id: Any) -> None:
        value = _numeric(node_id)
        if value is not None:
            self.taken.add(value)
            if value >= 0 and (self.last is None or value > self.last):
                self.last = value

    def mint(self) -> int:
        start = self.last + 1 if self.last is not None else 1
        while start in self.taken:
            start += 1
        self.last = start
        self.taken.add(start)
        return start


def normalise(workflow: Mapping) -> tuple[list[dict], list[dict]]:
    """(root nodes, subgraph definitions) with colliding inner node ids renumbered (copies)."""
    definitions = copy.deepcopy(flatten_definitions(workflow))
    root_nodes = [dict(n) for n in copy.deepcopy(list(workflow.get("nodes") or ())) if isinstance(n, Mapping)]
    used = {str(n["id"]) for n in root_nodes if "id" in n}
    minter = _Minter(_last_node_id(workflow), {v for v in map(_numeric, used) if v is not None})
    remapped: dict[Any, dict[str, int]] = {}
    for sg in definitions:
        sg["nodes"] = first_by_id([n for n in sg.get("nodes") or () if isinstance(n, Mapping)])
        mapping: dict[str, int] = {}
        for node in sg["nodes"]:
            key = str(node.get("id"))
            if key in used:
                new = minter.mint()
                mapping[key] = new
                node["id"] = new
                used.add(str(new))
            else:
                used.add(key)
                minter.observe(key)
        if mapping:
            remapped[sg["id"]] = mapping
            _patch_links(sg, mapping)
    if remapped:
        for nodes in [root_nodes, *(sg["nodes"] for sg in definitions)]:
            for node in nodes:
                if node.get("type") in remapped:
                    _patch_proxy_widgets(node, remapped[node["type"]])
    return root_nodes, definitions


def first_by_id(nodes: list) -> list[dict]:
    """``firstById``: a definition listing one id twice keeps the first node."""
    seen: set = set()
    out = []
    for node in nodes:
        key = str(node.get("id"))
        if key not in seen:
            seen.add(key)
            out.append(dict(node))
    return out


def _patch_links(sg: dict, mapping: dict[str, int]) -> None:
    links = []
    for link in list(sg.get("links") or ()) + list(sg.get("floatingLinks") or ()):
        if isinstance(link, Mapping):
            link = dict(link)
            for end in ("origin_id", "target_id"):
                if str(link.get(end)) in mapping:
                    link[end] = mapping[str(link[end])]
        elif isinstance(link, list) and len(link) >= 5:
            link = list(link)
            for index in (1, 3):
                if str(link[index]) in mapping:
                    link[index] = mapping[str(link[index])]
        links.append(link)
    count = len(sg.get("links") or ())
    sg["links"], sg["floatingLinks"] = links[:count], links[count:]
    widgets = []
    for w in sg.get("widgets") or ():
        if isinstance(w, Mapping) and str(w.get("id")) in mapping:
            w = dict(w, id=mapping[str(w["id"])])
        widgets.append(w)
    sg["widgets"] = widgets


def _patch_proxy_widgets(node: dict, mapping: dict[str, int]) -> None:
    props = node.get("properties")
    entries = props.get("proxyWidgets") if isinstance(props, Mapping) else None
    if not isinstance(props, Mapping) or not isinstance(entries, list):
        return
    patched = [[str(mapping[str(e[0])]), *e[1:]] if isinstance(e, list) and e and str(e[0]) in mapping else e
               for e in entries]
    node["properties"] = dict(props, proxyWidgets=patched)
