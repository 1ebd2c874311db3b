"""Recipes: how to build a value passed by reference again, in another process.

A MODEL (any object saved by reference) lives in the process whose node built it. When the next
workflow runs in another process (a second server, another Ray node, another run), the object is
not there; its recipe is: the part of the workflow that produced it (the output port's source and
every ancestor, with their widget values), its own port inputs (values by key, or other recipes),
and the node types it was made for. Stitched into the consuming prompt in place of the loader,
it makes the consuming server build the object itself (its ComfyUI cache makes the second time
cheap).

A :class:`Recipe` is plain JSON (``to_json`` / ``from_json``): it can be returned by
``run_sequential(..., outputs=[key])``, kept, and passed back as an input of a later call.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import WorkflowError
from .workflow_format import INPUT, LOADER_CLASS, PORT_CLASS, PORT_DATA_INPUT, is_link, port_mode_in_prompt

__all__ = ["Recipe", "RecipeError", "extract", "stitch_recipe", "MAX_NODES"]

FORMAT = 1
MAX_NODES = 256  # nodes in a recipe, nested ones included
MAX_JSON = 256 << 10  # bytes of a recipe's JSON


class RecipeError(WorkflowError):
    """A reference that cannot be rebuilt elsewhere: the error names the key and the node."""


@dataclass
class Recipe:
    """The part of a workflow that builds ``key``'s value; ``output`` is the link that fed its port.

    ``inputs``: for each port the part reads, ``{"key": k}`` (a value the run holds) or
    ``{"recipe": Recipe}`` (another reference, built the same way). ``types``: a digest of the
    ``/object_info`` of the node types it uses, so a server that defines them differently is
    refused instead of building something else.
    """

    key: str
    nodes: dict[str, dict]
    output: list
    inputs: dict[str, dict] = field(default_factory=dict)
    types: str = ""

    def to_json(self) -> dict[str, Any]:
        inputs = {k: ({"recipe": v["recipe"].to_json()} if "recipe" in v else dict(v)) for k, v in self.inputs.items()}
        return {"discomfort_recipe": FORMAT, "key": self.key, "nodes": copy.deepcopy(self.nodes),
                "output": list(self.output), "inputs": inputs, "types": self.types}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping) or data.get("discomfort_recipe") != FORMAT:
            raise RecipeError(f"not a discomfort recipe (format {FORMAT}): {str(data)[:80]}")
        inputs = {}
        for k, v in dict(data.get("inputs") or {}).items():
            inputs[k] = {"recipe": cls.from_json(v["recipe"])} if "recipe" in v else {"key": str(v["key"])}
        recipe = cls(str(data["key"]), copy.deepcopy(dict(data["nodes"])), list(data["output"]), inputs,
                     str(data.get("types", "")))
        _check_size(recipe)
        return recipe

    @staticmethod
    def is_recipe(value: Any) -> bool:
        return isinstance(value, Recipe) or (isinstance(value, Mapping) and "discomfort_recipe" in value)

    def node_count(self) -> int:
        return len(self.nodes) + sum(v["recipe"].node_count() for v in self.inputs.values() if "recipe" in v)


def types_digest(class_types: set[str], object_info: Mapping | None) -> str:
    """SHA-256 of the ``/object_info`` entries (inputs and outputs) of ``class_types``."""
    if object_info is None:
        return ""
    what = {c: {k: (object_info.get(c) or {}).get(k) for k in ("input", "output", "output_node")}
            for c in sorted(class_types)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def extract(prompt: Mapping[str, Any], port_node: str, key: str, object_info: Mapping | None,
            known: Mapping[str, Recipe] | None = None) -> Recipe:
    """The recipe of ``key``, written by the port ``port_node`` of an API ``prompt``.

    ``known``: recipes of other keys, used for the ports the part reads whose values are
    references too. Refuses output nodes (a SaveImage must not run twice), a part that reads its
    own key, and parts over :data:`MAX_NODES`.
    """
    source: Any = (prompt[port_node].get("inputs") or {}).get(PORT_DATA_INPUT)
    if not is_link(source):
        raise RecipeError(f"{key!r}: its port (node {port_node}) has no input to build a recipe from")
    nodes: dict[str, dict] = {}
    inputs: dict[str, dict] = {}
    todo = [str(source[0])]
    while todo:
        nid = todo.pop()
        if nid in nodes:
            continue
        entry = prompt.get(nid)
        if entry is None:
            raise RecipeError(f"{key!r}: node {nid} is linked to but not in the workflow")
        cls = entry.get("class_type")
        if cls == PORT_CLASS and port_mode_in_prompt(prompt, nid) == INPUT:
            uid = str((entry.get("inputs") or {}).get("unique_id"))
            if uid == key:
                raise RecipeError(f"the recipe of {key!r} reads {key!r} itself (port node {nid}): a loop over a "
                                  "reference cannot be rebuilt elsewhere; keep its workflows on one executor")
            inputs[uid] = {"recipe": known[uid]} if known and uid in known else {"key": uid}
        elif object_info is not None and (object_info.get(cls) or {}).get("output_node") and cls != PORT_CLASS:
            raise RecipeError(f"{key!r} is built by node {nid} ({cls}), an output node, which must not run twice; "
                              "it cannot be passed by recipe")
        nodes[nid] = copy.deepcopy(dict(entry))
        nodes[nid].pop("is_changed", None)
        for value in (entry.get("inputs") or {}).values():
            if is_link(value):
                todo.append(str(value[0]))
    types = {str(e.get("class_type")) for e in nodes.values()} - {PORT_CLASS}
    recipe = Recipe(key, nodes, [str(source[0]), source[1]], inputs, types_digest(types, object_info))
    _check_size(recipe)
    for uid, where in inputs.items():
        if "recipe" in where and _reads(where["recipe"], key):
            raise RecipeError(f"the recipe of {key!r} needs {uid!r}, whose recipe needs {key!r}: a cycle")
    return recipe


def _reads(recipe: Recipe, key: str) -> bool:
    return key in recipe.inputs or any(_reads(v["recipe"], key) for v in recipe.inputs.values() if "recipe" in v)


def _check_size(recipe: Recipe) -> None:
    count = recipe.node_count()
    if count > MAX_NODES:
        raise RecipeError(f"the recipe of {recipe.key!r} has {count} nodes (at most {MAX_NODES})")
    size = len(json.dumps(recipe.to_json()))
    if size > MAX_JSON:
        raise RecipeError(f"the recipe of {recipe.key!r} is {size} bytes of JSON (at most {MAX_JSON})")


def stitch_recipe(prompt: dict[str, Any], loader_node: str, recipe: Recipe, run_id: str,
                  object_info: Mapping | None = None) -> dict[str, Any]:
    """``prompt`` (as sent: loaders in place of INPUT ports) with the loader ``loader_node``
    replaced by ``recipe``'s nodes, renamed ``"<loader>.<n>"`` so no id collides.

    Ports inside the recipe become loaders of the run (value inputs) or, recursively, recipes;
    every consumer of the loader is linked to the recipe's output instead.
    """
    if object_info is not None and recipe.types:
        types = {str(e.get("class_type")) for e in recipe.nodes.values()} - {PORT_CLASS}
        if types_digest(types, object_info) != recipe.types:
            raise RecipeError(f"the recipe of {recipe.key!r} was made for other definitions of "
                              f"{', '.join(sorted(t for t in types if t))} than this ComfyUI has")
    out = dict(prompt)
    del out[loader_node]

    def through(nid: str) -> bool:  # a port the value only passes through: left out, linked across
        entry = recipe.nodes[nid]
        return entry.get("class_type") == PORT_CLASS and is_link((entry.get("inputs") or {}).get(PORT_DATA_INPUT))

    kept = sorted(nid for nid in recipe.nodes if not through(nid))
    rename = {nid: f"{loader_node}.{n}" for n, nid in enumerate(kept, 1)}

    def relink(link: list) -> list:
        nid, slot = str(link[0]), link[1]
        while through(nid):
            nid, slot = str(recipe.nodes[nid]["inputs"][PORT_DATA_INPUT][0]), recipe.nodes[nid]["inputs"][PORT_DATA_INPUT][1]
        return [rename[nid], slot]

    for nid in kept:
        new = copy.deepcopy(recipe.nodes[nid])
        if new.get("class_type") == PORT_CLASS:  # one of the recipe's own inputs
            uid = new["inputs"]["unique_id"]
            new = {"class_type": LOADER_CLASS, "inputs": {"run_id": run_id, "unique_id": uid},
                   "_meta": {"title": f"{uid} (recipe input)"}}
        else:
            for name, value in list((new.get("inputs") or {}).items()):
                if is_link(value):
                    new["inputs"][name] = relink(value)
        out[rename[nid]] = new
    target = relink(recipe.output)
    for entry in out.values():
        for name, value in list((entry.get("inputs") or {}).items()):
            if is_link(value) and str(value[0]) == loader_node:
                entry["inputs"][name] = list(target)
    for nid in list(rename.values()):
        entry = out[nid]
        uid = entry["inputs"].get("unique_id") if entry.get("class_type") == LOADER_CLASS else None
        if uid is not None and "recipe" in recipe.inputs.get(uid, {}):
            out = stitch_recipe(out, nid, recipe.inputs[uid]["recipe"], run_id, object_info)
    return out
