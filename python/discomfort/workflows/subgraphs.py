"""Internal: a UI-format workflow as the frontend's execution graph: nodes, subgraphs flattened, links resolved.

This follows ComfyUI frontend 1.32.9's ``ExecutableNodeDTO`` / ``SubgraphNode.getInnerNodes``: every
node inside a subgraph instance becomes one executable node with the id ``"<outer>:<inner>"`` (any
depth); a link is followed through reroutes, bypassed nodes (first type-matching input), subgraph
inputs (to the instance's own link, or its promoted widget's value) and subgraph outputs (to the
inner node that feeds them). Node inputs are rebuilt from the node definition, as the frontend does
on load, so saved slot positions do not matter, only link ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from . import ids as workflow_ids
from . import widgets as ww
from ..errors import UnsupportedWorkflowError

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID = -10, -20
VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
PRIMITIVE = "PrimitiveNode"


@dataclass
class Link:
    id: Any
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any = None


@dataclass
class Slot:
    name: str
    type: Any
    link: Any = None
    widget: str | None = None  # the widget this input stands for


@dataclass
class Graph:
    """The root graph or one subgraph definition."""

    id: Any
    nodes: dict[Any, Mapping]
    links: dict[Any, Link]
    inputs: list[Mapping] = field(default_factory=list)  # subgraph input slots
    outputs: list[Mapping] = field(default_factory=list)  # subgraph output slots


@dataclass
class NodeView:
    """One saved node as the frontend rebuilds it: kind, input/output slots, widgets."""

    graph: Graph
    node: Mapping
    kind: str  # "real", "virtual", "subgraph", "unknown"
    inputs: list[Slot]
    output_types: list[Any]
    widgets: list[ww.Widget]
    title: str

    @property
    def id(self) -> Any:
        return self.node["id"]

    @property
    def type(self) -> Any:
        return self.node.get("type")

    @property
    def mode(self) -> int:
        return self.node.get("mode", MODE_ALWAYS) or MODE_ALWAYS

    def widget(self, name: str | None) -> ww.Widget | None:
        return next((w for w in self.widgets if w.name == name), None) if name else None


@dataclass
class Executable:
    """``ExecutableNodeDTO``: a node at a path of subgraph instances."""

    view: NodeView
    path: tuple
    container: "Executable | None"  # the subgraph instance holding it

    @property
    def id(self) -> str:
        return ":".join(str(p) for p in (*self.path, self.view.id))


def unsupported(node: Mapping, why: str) -> UnsupportedWorkflowError:
    return UnsupportedWorkflowError(f"node {node.get('id')} (type {node.get('type')!r}): {why}")


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_links(raw: Any) -> dict[Any, Link]:
    """Links saved as arrays ``[id, origin, slot, target, slot, type]`` or as objects."""
    links: dict[Any, Link] = {}
    for item in raw or ():
        if isinstance(item, Mapping):
            link = Link(item["id"], item["origin_id"], int(item["origin_slot"]), item["target_id"],
                        int(item["target_slot"]), item.get("type"))
        elif isinstance(item, (list, tuple)) and len(item) >= 5:
            link = Link(item[0], item[1], int(item[2]), item[3], int(item[4]), item[5] if len(item) > 5 else None)
        else:
            continue
        links[link.id] = link
    return links


def parse_graph(data: Mapping, graph_id: Any = None) -> Graph:
    nodes = {n["id"]: n for n in data.get("nodes") or () if isinstance(n, Mapping) and "id" in n}
    return Graph(graph_id, nodes, parse_links(data.get("links")), list(data.get("inputs") or ()),
                 list(data.get("outputs") or ()))


# ---------------------------------------------------------------------------------------------
# Rebuilding nodes


class Network:
    """All graphs of a workflow and their rebuilt nodes; resolves links like the frontend."""

    def __init__(self, workflow: Mapping, object_info: Mapping):
        self.object_info = object_info
        root_nodes, definitions = workflow_ids.normalise(workflow)
        self.definitions = {sg["id"]: sg for sg in definitions}
        self.root = parse_graph(dict(workflow, nodes=root_nodes))
        self.subgraphs = {sid: parse_graph(sg, sid) for sid, sg in self.definitions.items()}
        self.views: dict[tuple, NodeView] = {}
        self._building: set = set()
        self.executables: dict[str, Executable] = {}

    # -- nodes ---------------------------------------------------------------------------------

    def view(self, graph: Graph, node_id: Any) -> NodeView:
        key = (graph.id, node_id)
        if key not in self.views:
            if key in self._building:
                raise unsupported(graph.nodes[node_id], "a subgraph that contains itself")
            self._building.add(key)
            self.views[key] = self._build_view(graph, graph.nodes[node_id])
            self._building.discard(key)
        return self.views[key]

    def _build_view(self, graph: Graph, node: Mapping) -> NodeView:
        typ = node.get("type")
        saved_inputs = [_slot(i) for i in node.get("inputs") or () if isinstance(i, Mapping)]
        saved_outputs = [o.get("type") for o in node.get("outputs") or () if isinstance(o, Mapping)]
        title = node.get("title") or ""
        if typ in VIRTUAL_TYPES:
            return NodeView(graph, node, "virtual", saved_inputs, saved_outputs, [], title or str(typ))
        if typ in self.subgraphs:
            sg = self.definitions[typ]
            slots = [Slot(str(i.get("name")), i.get("type")) for i in sg.get("inputs") or ()]
            view = NodeView(graph, node, "subgraph", _by_name(slots, saved_inputs),
                            [o.get("type") for o in sg.get("outputs") or ()], [], title or sg.get("name") or "")
            view.widgets = self._promoted_widgets(view)
            ww.assign_values(node, view.widgets, node.get("widgets_values"), check=False)
            view.widgets = _apply_proxy_widgets(node, view.widgets)
            ww.check_alignment(node, [w for w in view.widgets if w.saved])
            return view
        info = self.object_info.get(typ) if isinstance(typ, str) else None
        if info is None:
            return NodeView(graph, node, "unknown", saved_inputs, saved_outputs, [], title or str(typ))
        return self._real_view(graph, node, str(typ), info, saved_inputs, title)

    def _real_view(self, graph: Graph, node: Mapping, typ: str, info: Mapping,
                   saved_inputs: list[Slot], title: str) -> NodeView:
        """Inputs from the definition (links kept by name), widgets with their saved values."""
        by_name = {s.name: s for s in saved_inputs}
        inputs = [Slot(d.name, d.type, by_name[d.name].link if d.name in by_name else None,
                       d.name if d.is_widget else None) for d in ww.node_inputs(typ, info)]
        known = {s.name for s in inputs}
        inputs += [s for s in saved_inputs if s.name not in known]
        outputs = list(info.get("output") or ())
        widgets = ww.node_widgets(typ, info)
        values = node.get("widgets_values")
        if isinstance(values, list):
            values = ww.migrate_values(typ, info, widgets, values)
        ww.assign_values(node, widgets, values)
        return NodeView(graph, node, "real", inputs, outputs, widgets,
                        title or info.get("display_name") or typ)

    def _promoted_widgets(self, view: NodeView) -> list[ww.Widget]:
        """``SubgraphNode``: per input, a copy of the first inner widget its links reach."""
        sg = self.subgraphs[view.type]
        widgets: list[ww.Widget] = []
        for slot in view.inputs:
            sg_input = next((i for i in sg.inputs if i.get("name") == slot.name), None)
            if sg_input is None:
                continue
            for link_id in sg_input.get("linkIds") or ():
                link = sg.links.get(link_id)
                inner = sg.nodes.get(link.target_id) if link else None
                if inner is None:
                    continue
                inner_view = self.view(sg, inner["id"])
                target = next((s for s in inner_view.inputs if s.link == link_id), None)
                found = inner_view.widget(target.widget) if target and target.widget else None
                if found is None:
                    continue
                copy = ww.Widget(slot.name, found.kind, found.value, saved=found.saved, sent=found.sent,
                                 input=found.input, controls=found.controls)
                widgets.append(copy)
                slot.widget = slot.name
                break
        return widgets

    # -- flattening ----------------------------------------------------------------------------

    def flatten(self) -> dict[str, Executable]:
        """Every executable node by id (``getInnerNodes`` of every root node)."""
        for node_id in self.root.nodes:
            self._add(self.root, node_id, (), None, frozenset())
        return self.executables

    def _add(self, graph: Graph, node_id: Any, path: tuple, container: Executable | None,
             visiting: frozenset) -> None:
        view = self.view(graph, node_id)
        dto = Executable(view, path, container)
        self.executables[dto.id] = dto
        if view.kind != "subgraph" or view.mode in (MODE_NEVER, MODE_BYPASS):
            return  # a disabled subgraph's nodes do not run (1.58.1 at the root; here at any depth)
        if view.type in visiting:
            raise unsupported(view.node, "a subgraph that contains itself")
        inner = self.subgraphs[view.type]
        for inner_id in inner.nodes:
            self._add(inner, inner_id, (*path, view.id), dto, visiting | {view.type})

    def lookup(self, path: tuple, node_id: Any) -> Executable:
        key = ":".join(str(p) for p in (*path, node_id))
        if key not in self.executables:
            raise UnsupportedWorkflowError(f"node {key}: a link points at a node that is not in the workflow")
        return self.executables[key]

    # -- link resolution -----------------------------------------------------------------------

    def resolve_input(self, dto: Executable, slot: int, visited: set, want: Any = None) -> Any:
        """What input ``slot`` of ``dto`` receives: ``[id, slot]``, ``("widget", value)`` or None."""
        key = (dto.view.graph.id, dto.id, "I", slot)
        if key in visited:
            raise unsupported(dto.view.node, f"circular link through input {slot}")
        visited.add(key)
        if slot >= len(dto.view.inputs):
            raise unsupported(dto.view.node, f"a link reaches input {slot}, which it does not have")
        inp = dto.view.inputs[slot]
        if inp.link is None:
            return None
        link = dto.view.graph.links.get(inp.link)
        if link is None:
            raise unsupported(dto.view.node, f"input {inp.name!r} refers to link {inp.link}, which does not exist")
        if dto.container is not None and link.origin_id == SUBGRAPH_INPUT_ID:
            return self._resolve_from_subgraph_input(dto, link, visited)
        origin = self.lookup(dto.path, link.origin_id) if link.origin_id in dto.view.graph.nodes else None
        if origin is None:
            raise unsupported(dto.view.node, f"input {inp.name!r} links from node {link.origin_id}, which does not exist")
        return self.resolve_output(origin, link.origin_slot, want if want is not None else inp.type, visited)

    def _resolve_from_subgraph_input(self, dto: Executable, link: Link, visited: set) -> Any:
        holder = dto.container
        assert holder is not None
        if link.origin_slot >= len(holder.view.inputs):
            raise unsupported(holder.view.node, f"its subgraph uses input {link.origin_slot}, which it does not have")
        outer_input = holder.view.inputs[link.origin_slot]
        if outer_input.link is None:
            widget = holder.view.widget(outer_input.widget)
            return ("widget", widget.value) if widget is not None else None
        if outer_input.link not in holder.view.graph.links:
            raise unsupported(holder.view.node, f"input {outer_input.name!r} refers to a missing link")
        # The frontend re-slots links to the rebuilt inputs on load: the input holding the link.
        return self.resolve_input(holder, link.origin_slot, visited)

    def resolve_output(self, dto: Executable, slot: int, want: Any, visited: set) -> Any:
        key = (dto.view.graph.id, dto.id, "O", slot)
        if key in visited:
            raise unsupported(dto.view.node, f"circular link through output {slot}")
        visited.add(key)
        view = dto.view
        if view.mode == MODE_NEVER:
            return None
        if view.mode == MODE_BYPASS:
            index = bypass_slot(view, slot, want)
            return None if index < 0 else self.resolve_input(dto, index, visited)
        if view.kind == "subgraph":
            return self._resolve_subgraph_output(dto, slot, want, visited)
        if view.kind == "virtual":
            if slot >= len(view.inputs) or view.inputs[slot].link is None:
                return None
            link = view.graph.links.get(view.inputs[slot].link)
            if link is None:
                raise unsupported(view.node, f"input {slot} refers to a missing link")
            return self.resolve_input(dto, link.target_slot, visited, want)
        return [dto.id, int(slot)]

    def _resolve_subgraph_output(self, dto: Executable, slot: int, want: Any, visited: set) -> Any:
        sg = self.subgraphs[dto.view.type]
        if slot >= len(sg.outputs):
            raise unsupported(dto.view.node, f"a link leaves output {slot}, which its subgraph does not have")
        link_ids = sg.outputs[slot].get("linkIds") or ()
        link = sg.links.get(link_ids[0]) if link_ids else None
        if link is None or link.origin_id not in sg.nodes:
            return None
        inner = self.lookup((*dto.path, dto.view.id), link.origin_id)
        return self.resolve_output(inner, link.origin_slot, want, visited)

    # -- PrimitiveNode values ------------------------------------------------------------------

    def apply_primitives(self) -> None:
        """``applyToGraph``: each PrimitiveNode writes its value into the widgets it feeds."""
        for dto in self.executables.values():
            view = dto.view
            if view.type != PRIMITIVE:
                continue
            outputs = view.node.get("outputs") or []
            link_ids = (outputs[0].get("links") if outputs and isinstance(outputs[0], Mapping) else None) or []
            values = view.node.get("widgets_values")
            if not link_ids or not isinstance(values, list) or not values:
                continue
            value = values[0]
            if value and (view.node.get("properties") or {}).get("Run widget replace on values"):
                value = ww.text_replacements(value, self.replacement_nodes())
            control = (dto.id, values[1] if len(values) > 1 and isinstance(values[1], str) else "fixed",
                       values[2] if len(values) > 2 and isinstance(values[2], str) else "")
            for link_id in link_ids:
                self._apply_primitive_link(view, link_id, value, control)

    def _apply_primitive_link(self, view: NodeView, link_id: Any, value: Any, control: tuple) -> None:
        link = self.root.links.get(link_id)  # the frontend looks in the root graph, even in a subgraph
        if link is None:
            raise unsupported(view.node, f"its link {link_id} is not in the root graph (the frontend fails here)")
        if link.target_id not in view.graph.nodes:
            return
        target = self.view(view.graph, link.target_id)
        slot = next((s for s in target.inputs if s.link == link_id), None)
        widget = target.widget(slot.widget) if slot is not None else None
        if widget is not None:
            widget.value = value
            if widget.kind in ("INT", "FLOAT", "COMBO"):  # the primitive's own control drives it after a queue
                widget.driven_by = control

    def replacement_nodes(self) -> list[dict]:
        """What ``%Node.widget%`` replacements look up: every node, its S&R name and title."""
        out = []
        for view in self.views.values():
            out.append({"properties": view.node.get("properties") or {}, "title": view.title,
                        "_widget_values_by_name": {w.name: w.value for w in view.widgets}})
        return out

    def all_views(self) -> Iterator[NodeView]:
        for graph in (self.root, *self.subgraphs.values()):
            for node_id in graph.nodes:
                yield self.view(graph, node_id)


def _by_name(defined: list[Slot], saved: list[Slot]) -> list[Slot]:
    """A subgraph instance's inputs: the definition's, with the saved links matched by name."""
    by_name = {s.name: s for s in saved}
    out = [by_name.get(d.name, d) for d in defined]
    names = {d.name for d in defined}
    return out + [s for s in saved if s.name not in names]


def _apply_proxy_widgets(node: Mapping, widgets: list[ww.Widget]) -> list[ww.Widget]:
    """``properties.proxyWidgets`` (frontend's proxyWidget.ts ``onConfigure``).

    Entries ``["-1", name]`` keep the promoted widget ``name`` and give it the value saved at
    the entry's position; entries naming an inner node are display proxies that hide promoted
    widgets of the same name (they never reach the prompt).
    """
    parsed = (node.get("properties") or {}).get("proxyWidgets")
    if not isinstance(parsed, list):
        return widgets
    entries = [(str(e[0]), e[1]) for e in parsed if isinstance(e, (list, tuple)) and len(e) == 2]
    kept = [next((w for w in widgets if w.name == name), None) for nid, name in entries if nid == "-1"]
    names = {name for _, name in entries}
    result = [w for w in widgets if w.name not in names] + [w for w in kept if w is not None]
    values = node.get("widgets_values")
    for index, value in enumerate(values if isinstance(values, list) else ()):
        if index < len(entries) and entries[index][0] == "-1" and value is not None:
            widget = next((w for w in widgets if w.name == entries[index][1]), None)
            if widget is not None:
                widget.value, widget.from_file = value, True
    return result


def _slot(raw: Mapping) -> Slot:
    widget = raw.get("widget")
    return Slot(str(raw.get("name")), raw.get("type"), raw.get("link"),
                widget.get("name") if isinstance(widget, Mapping) else None)


def valid_connection(a: Any, b: Any) -> bool:
    """``LiteGraph.isValidConnection``."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    sa, sb = str(a).lower(), str(b).lower()
    if "," not in sa and "," not in sb:
        return sa == sb
    return any(valid_connection(x, y) for x in sa.split(",") for y in sb.split(","))


def bypass_slot(view: NodeView, slot: int, want: Any) -> int:
    """``#getBypassSlotIndex``: which input a bypassed node passes to output ``slot``; -1: none."""
    inputs = view.inputs
    out_type = view.output_types[slot] if slot < len(view.output_types) else None
    if isinstance(out_type, (list, tuple)):
        out_type = "COMBO"
    if want in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and valid_connection(inputs[slot].type, out_type) \
            and valid_connection(inputs[slot].type, want):
        return slot
    for i, inp in enumerate(inputs):
        if inp.type == want:
            return i
    for i, inp in enumerate(inputs):
        if valid_connection(inp.type, out_type) and valid_connection(inp.type, want):
            return i
    return -1
