"""Recipes: how to build a value passed by reference again, in another process.

A MODEL (any object saved by reference) lives in the process whose node built it. When the next
workflow runs in another process (a second server, another Ray node, another run), the object is
not there; its recipe is: the part of the workflow that produced it (the output port's source and
every ancestor, with their widget values), its own port inputs (values by key, or other recipes),
and the node types it was made for. Stitched into the consuming prompt in place of the loader,
it makes the consuming server build the object itself (its ComfyUI cache makes the second time
cheap).

A recipe is code for the server that stitches it, so data never becomes one: only a
:class:`Recipe` object is a recipe (a mapping with a ``"discomfort_recipe"`` key is a plain
value). :func:`extract` makes trusted ones, from this process's own workflows; every other one
(built by hand, :meth:`Recipe.from_json`, another server's) is checked by :func:`check_recipe`
before it is stitched: known, local, file-free node types only, matching definitions, no cycles.
Every recipe is bounded: nodes after nesting, nesting depth.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError, RunCancelled, WorkflowError
from .workflows.format import INPUT, LOADER_CLASS, PORT_CLASS, PORT_DATA_INPUT, is_link, port_mode_in_prompt

__all__ = ["Recipe", "RecipeError", "extract", "stitch_recipe", "check_recipe", "MAX_NODES", "MAX_STITCHED",
           "MAX_DEPTH"]

FORMAT = 1
MAX_NODES = 256  # nodes in a recipe, nested ones counted once
MAX_JSON = 256 << 10  # bytes of a recipe's JSON
MAX_STITCHED = 1024  # nodes a recipe adds to a prompt once stitched (a nested recipe counts each time it is used)
MAX_DEPTH = 16  # recipes inside recipes

# Node types an untrusted recipe may not use, beyond what /object_info says of them: readers of a
# file named by a value (input/, output/, temp/, user/), and the run loader (it names a run id).
DENIED_TYPES = frozenset({
    "LoadImage", "LoadImageMask", "LoadImageOutput", "LoadLatent", "LoadAudio", "LoadVideo", "Load3D",
    "Load3DAnimation", "WebcamCapture", "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode",
    "LoadImageDataSetFromFolder", "LoadImageTextDataSetFromFolder", "LoadTrainingDataset", "RecordAudio", LOADER_CLASS,
})
# Nodes that run a pattern a value gives (Python's re holds the interpreter lock: a catastrophic
# pattern freezes the whole server, its HTTP routes and the run's cancel included).
UNBOUNDED_TYPES = frozenset({"RegexExtract", "RegexMatch", "RegexReplace"})
_FILE_FLAGS = ("image_upload", "audio_upload", "video_upload", "file_upload", "upload", "image_folder", "remote")
_FILE_INPUT_TYPES = frozenset({"WEBCAM", "LOAD_3D", "AUDIO_RECORD"})  # widgets whose value names a file


@dataclass
class Recipe:
    """The part of a workflow that builds ``key``'s value; ``output`` is the link that fed its port.

    ``inputs``: for each port the part reads, ``{"key": k}`` (a value the run holds) or
    ``{"recipe": Recipe}`` (another reference, built the same way). ``types``: a digest of the
    ``/object_info`` of the node types it uses, so a server that defines them differently is
    refused instead of building something else. ``trusted`` is set by :func:`extract` only.
    """

    key: str
    nodes: dict[str, dict]
    output: list
    inputs: dict[str, dict] = field(default_factory=dict)
    types: str = ""
    trusted: bool = field(default=False, init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        inputs = {k: ({"recipe": v["recipe"].to_json()} if "recipe" in v else dict(v)) for k, v in self.inputs.items()}
        return {"discomfort_recipe": FORMAT, "key": self.key, "nodes": copy.deepcopy(self.nodes),
                "output": list(self.output), "inputs": inputs, "types": self.types}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Recipe":
        """The explicit way to make JSON a recipe; the result is untrusted (checked before use)."""
        try:
            return cls._parse(data, 0)
        except RecursionError:  # a value nested thousands deep (an in-process mapping; JSON from HTTP is bounded)
            raise RecipeError("a recipe nested too deeply to read (in its values or its recipes)") from None

    @classmethod
    def _parse(cls, data: Mapping[str, Any], _depth: int) -> "Recipe":
        if not isinstance(data, Mapping) or data.get("discomfort_recipe") != FORMAT:
            raise RecipeError(f"not a discomfort recipe (format {FORMAT}): {str(data)[:80]}")
        if _depth > MAX_DEPTH:
            raise RecipeError(f"recipes nested over {MAX_DEPTH} deep")
        key, nodes, output = data.get("key"), data.get("nodes"), data.get("output")
        if not isinstance(key, str) or not isinstance(nodes, Mapping) or not isinstance(data.get("types", ""), str) \
                or not is_link(output) or not isinstance(data.get("inputs") or {}, Mapping):
            raise RecipeError(f"a malformed recipe (key, nodes, output, inputs, types): {str(data)[:80]}")
        inputs: dict[str, dict] = {}
        for k, v in dict(data.get("inputs") or {}).items():
            if isinstance(v, Mapping) and isinstance(v.get("recipe"), Mapping):
                inputs[str(k)] = {"recipe": cls._parse(v["recipe"], _depth + 1)}
            elif isinstance(v, Mapping) and isinstance(v.get("key"), str):
                inputs[str(k)] = {"key": v["key"]}
            else:
                raise RecipeError(f"the recipe of {key!r}: input {k!r} is neither {{'key': K}} nor {{'recipe': R}}")
        for nid, entry in nodes.items():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("class_type"), str) \
                    or not isinstance(entry.get("inputs", {}), Mapping):
                raise RecipeError(f"the recipe of {key!r}: node {nid} is not {{'class_type': str, 'inputs': {{}}}}")
        assert output is not None  # is_link above
        recipe = cls(key, {str(n): _node_entry(e) for n, e in nodes.items()}, [str(output[0]), output[1]],
                     inputs, data.get("types", ""))
        if _depth == 0:
            _check_size(recipe)
        return recipe

    @staticmethod
    def is_recipe(value: Any) -> bool:
        """Only a Recipe object is one: a mapping shaped like one is data."""
        return isinstance(value, Recipe)

    def node_count(self) -> int:
        """Nodes of this recipe and of the recipes it holds, each distinct one counted once."""
        return sum(len(r.nodes) for r in _walk(self)[0].values())


def _node_entry(entry: Mapping[str, Any]) -> dict:
    """A node of a recipe from JSON: its class, inputs and title only. Other fields are ComfyUI's
    own (an ``is_changed`` given in a prompt replaces the node's IS_CHANGED in its cache key)."""
    out: dict[str, Any] = {"class_type": entry["class_type"], "inputs": copy.deepcopy(dict(entry.get("inputs") or {}))}
    title = (entry.get("_meta") or {}).get("title") if isinstance(entry.get("_meta"), Mapping) else None
    if isinstance(title, str):
        out["_meta"] = {"title": title[:200]}
    return out


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
    recipe.trusted = True
    for uid, where in inputs.items():
        if "recipe" in where and key in _walk(where["recipe"])[1]:
            raise RecipeError(f"the recipe of {key!r} needs {uid!r}, whose recipe needs {key!r}: a cycle")
    _check_size(recipe)
    return recipe


def _walk(recipe: Recipe) -> tuple[dict[int, Recipe], frozenset[str]]:
    """Every distinct recipe inside ``recipe`` (itself included), and the keys they build or read;
    bounded: refuses nesting over :data:`MAX_DEPTH` and a recipe that needs itself (holds itself,
    or builds or reads its own key further in). Each distinct recipe is looked at once."""
    seen: dict[int, Recipe] = {}
    below: dict[int, tuple[frozenset[str], int]] = {}  # keys built or read, height

    def visit(r: Any, depth: int, path: frozenset[int], parent: str) -> tuple[frozenset[str], int]:
        if not isinstance(r, Recipe):
            raise RecipeError(f"an input of the recipe of {parent!r} holds a {type(r).__name__}, not a Recipe")
        if id(r) in path:
            raise RecipeError(f"the recipe of {r.key!r} holds itself: a cycle")
        if id(r) not in below:
            if depth > MAX_DEPTH:
                raise RecipeError(f"the recipe of {recipe.key!r} nests recipes over {MAX_DEPTH} deep")
            keys, height = set(r.inputs), 0
            for where in r.inputs.values():
                if isinstance(where, Mapping) and "recipe" in where:
                    inner, h = visit(where["recipe"], depth + 1, path | {id(r)}, r.key)
                    keys |= inner
                    height = max(height, h + 1)
            if r.key in keys:
                raise RecipeError(f"the recipe of {r.key!r} needs {r.key!r} itself, through its inputs: a cycle")
            seen[id(r)] = r
            below[id(r)] = (frozenset(keys | {r.key}), height)
        if depth + below[id(r)][1] > MAX_DEPTH:
            raise RecipeError(f"the recipe of {recipe.key!r} nests recipes over {MAX_DEPTH} deep")
        return below[id(r)]

    keys, _ = visit(recipe, 0, frozenset(), recipe.key)
    return seen, keys


def _check_size(recipe: Recipe) -> None:
    count = recipe.node_count()
    if count > MAX_NODES:
        raise RecipeError(f"the recipe of {recipe.key!r} has {count} nodes (at most {MAX_NODES})")
    size = len(json.dumps(recipe.to_json()))
    if size > MAX_JSON:
        raise RecipeError(f"the recipe of {recipe.key!r} is {size} bytes of JSON (at most {MAX_JSON})")


def _through(recipe: Recipe, nid: str) -> bool:
    """A port the value only passes through: left out when stitched, linked across."""
    entry = recipe.nodes[nid]
    return entry.get("class_type") == PORT_CLASS and is_link((entry.get("inputs") or {}).get(PORT_DATA_INPUT))


def _stitched_size(recipe: Recipe, sizes: dict[int, int]) -> int:
    """Nodes ``recipe`` adds once stitched: its kept nodes, each nested recipe once per loader it
    replaces. Refuses over :data:`MAX_STITCHED` as soon as the count passes it."""
    if id(recipe) in sizes:
        return sizes[id(recipe)]
    total = 0
    for nid, entry in recipe.nodes.items():
        if _through(recipe, nid):
            continue
        total += 1
        if entry.get("class_type") == PORT_CLASS:
            where = recipe.inputs.get(str((entry.get("inputs") or {}).get("unique_id")), {})
            if "recipe" in where:  # the loader is replaced by the nested recipe's nodes
                total += _stitched_size(where["recipe"], sizes) - 1
        if total > MAX_STITCHED:
            raise RecipeError(f"the recipe of {recipe.key!r} makes over {MAX_STITCHED} nodes once its nested "
                              "recipes are stitched in")
    sizes[id(recipe)] = total
    return total


def check_recipe(recipe: Recipe, object_info: Mapping | None = None, *, nodes: bool = True) -> int:
    """Check ``recipe`` and every recipe inside it before it is stitched for a server whose
    ``/object_info`` is ``object_info``; returns the nodes it adds.

    Every recipe: bounded nesting, no recipe needing itself, at most :data:`MAX_STITCHED` nodes
    once stitched, and its types digest, when it has one, must match. An untrusted one (not made
    by :func:`extract` here) must also have a digest, use only node types the server defines that
    are not output, API or file-reading nodes, link only inside itself, without cycles.
    ``nodes=False``: the bounds only (no server at hand yet).
    """
    recipes, _ = _walk(recipe)
    size = _stitched_size(recipe, {})
    for r in recipes.values() if nodes else ():
        _check_one(r, object_info)
    return size


def _check_one(recipe: Recipe, object_info: Mapping | None) -> None:
    types = {str(e.get("class_type")) for e in recipe.nodes.values()} - {PORT_CLASS}
    if not recipe.trusted:
        if object_info is None:
            raise RecipeError(f"the recipe of {recipe.key!r} comes from outside this process and cannot be checked "
                              "without the server's /object_info")
        if not recipe.types:
            raise RecipeError(f"the recipe of {recipe.key!r} has no types digest: a recipe from outside this "
                              "process must say which node definitions it was made for")
        _check_nodes(recipe, object_info)
    if object_info is not None and recipe.types and types_digest(types, object_info) != recipe.types:
        raise RecipeError(f"the recipe of {recipe.key!r} was made for other definitions of "
                          f"{', '.join(sorted(t for t in types if t))} than this ComfyUI has")


def _check_nodes(recipe: Recipe, object_info: Mapping) -> None:
    """The node-by-node checks of an untrusted recipe (see :func:`check_recipe`)."""
    key = recipe.key
    verdicts: dict[str, str] = {}  # class type -> why refused ("": allowed), looked up once each
    if not is_link(recipe.output) or str(recipe.output[0]) not in recipe.nodes:
        raise RecipeError(f"the recipe of {key!r}: its output {recipe.output!r} is not one of its nodes")
    for nid, entry in recipe.nodes.items():
        cls = entry.get("class_type")
        inputs = entry.get("inputs") or {}
        if not isinstance(cls, str) or not isinstance(inputs, Mapping):
            raise RecipeError(f"the recipe of {key!r}: node {nid} is not {{'class_type': str, 'inputs': {{}}}}")
        for name, value in inputs.items():
            if is_link(value) and str(value[0]) not in recipe.nodes:
                raise RecipeError(f"the recipe of {key!r}: node {nid} ({cls}) input {name!r} links to node "
                                  f"{value[0]}, which is not in the recipe")
            if is_link(value):
                _check_slot(recipe, nid, name, value, object_info)
        if cls == PORT_CLASS:
            uid = inputs.get("unique_id")
            if not _through(recipe, nid) and (not isinstance(uid, str) or uid not in recipe.inputs):
                raise RecipeError(f"the recipe of {key!r}: port node {nid} reads {uid!r}, which is not one of "
                                  "the recipe's inputs")
            continue
        why = verdicts[cls] if cls in verdicts else verdicts.setdefault(cls, _refused_type(cls, object_info.get(cls)))
        if why:
            raise RecipeError(f"the recipe of {key!r}: node {nid} ({cls}) {why}; a recipe from outside this process "
                              "may not use it")
        linked = sorted(n for n in _combo_inputs(object_info[cls]) if is_link(inputs.get(n)))
        if linked:  # ComfyUI checks a combo against its list only when it is a literal
            raise RecipeError(f"the recipe of {key!r}: node {nid} ({cls}) gets its choice {linked[0]!r} through a "
                              "link; in a recipe from outside this process a choice must be a literal value "
                              "(ComfyUI checks only those against its list)")
    _check_slot(recipe, "output", "output", recipe.output, object_info)
    _check_acyclic(recipe)


def _combo_inputs(info: Mapping) -> list[str]:
    """The inputs of a node type that are choices from a list (COMBO)."""
    spec = info.get("input") or {}
    out = []
    for section in ("required", "optional"):
        for name, what in (spec.get(section) or {}).items() if isinstance(spec, Mapping) else ():
            if isinstance(what, (list, tuple)) and what and (isinstance(what[0], (list, tuple)) or what[0] == "COMBO"):
                out.append(name)
    return out


def _check_slot(recipe: Recipe, nid: str, name: str, link: Any, object_info: Mapping) -> None:
    """A link of an untrusted recipe must name an output its source has (a port has one)."""
    src = recipe.nodes.get(str(link[0])) or {}
    cls = src.get("class_type")
    outputs = 1 if cls == PORT_CLASS else len((object_info.get(cls) or {}).get("output") or ())
    if not 0 <= link[1] < outputs:
        raise RecipeError(f"the recipe of {recipe.key!r}: node {nid} input {name!r} links to output {link[1]} of "
                          f"node {link[0]} ({cls}), which has {outputs}")


def _refused_type(cls: str, info: Any) -> str:
    """Why an untrusted recipe may not use node type ``cls`` ("" when it may)."""
    if not isinstance(info, Mapping):
        return "is not a node type of this ComfyUI"
    if info.get("output_node"):
        return "is an output node"
    if info.get("api_node") or str(info.get("python_module") or "").startswith("comfy_api_nodes"):
        return "is an API node (it reaches the network)"
    if cls == LOADER_CLASS:
        return "reads a value of the run its inputs name"
    if cls in DENIED_TYPES or re.match(r"Load[A-Z0-9_]", cls):  # ComfyUI names file readers Load*, models *Loader
        return "reads a file named by a value"
    if cls in UNBOUNDED_TYPES:
        return ("runs a regular expression a value gives, which can hold the server's interpreter (and its "
                "HTTP routes) without end")
    spec = info.get("input") or {}
    for section in ("required", "optional"):
        for name, what in (spec.get(section) or {}).items() if isinstance(spec, Mapping) else ():
            if not isinstance(what, (list, tuple)) or not what:
                continue
            options = what[1] if len(what) > 1 and isinstance(what[1], Mapping) else {}
            if (isinstance(what[0], str) and what[0] in _FILE_INPUT_TYPES) or any(options.get(f) for f in _FILE_FLAGS):
                return f"reads a file named by its input {name!r}"
    return ""


def _check_acyclic(recipe: Recipe) -> None:
    """Refuse a cycle among the recipe's links (two ports linked to each other, any loop)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in recipe.nodes:
        if start in state:
            continue
        stack = [(start, iter(_links(recipe, start)))]
        state[start] = 1
        while stack:
            nid, children = stack[-1]
            nxt = next(children, None)
            if nxt is None:
                state[nid] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise RecipeError(f"the recipe of {recipe.key!r} links node {nid} back to node {nxt}: a cycle")
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(_links(recipe, nxt))))


def _links(recipe: Recipe, nid: str) -> list[str]:
    return [str(v[0]) for v in (recipe.nodes[nid].get("inputs") or {}).values() if is_link(v)]


def _cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    return bool(cancel()) if callable(cancel) else bool(getattr(cancel, "cancelled", False))


def stitch_recipe(prompt: dict[str, Any], loader_node: str, recipe: Recipe, run_id: str,
                  object_info: Mapping | None = None, *, cancel: Any = None) -> dict[str, Any]:
    """``prompt`` (as sent: loaders in place of INPUT ports) with the loader ``loader_node``
    replaced by ``recipe``'s nodes, renamed ``"<loader>.<n>"`` so no id collides.

    Ports inside the recipe become loaders of the run (value inputs) or, recursively, recipes;
    every consumer of the loader is linked to the recipe's output instead. The recipe is checked
    first (:func:`check_recipe`). ``cancel``: a CancelToken or a callable, looked at between
    steps: when it says so, :class:`~discomfort.errors.RunCancelled` is raised.
    """
    check_recipe(recipe, object_info)
    return _stitch(prompt, loader_node, recipe, run_id, cancel)


def _stitch(prompt: dict[str, Any], loader_node: str, recipe: Recipe, run_id: str, cancel: Any) -> dict[str, Any]:
    if _cancelled(cancel):
        raise RunCancelled("cancelled while stitching a recipe")
    out = dict(prompt)
    del out[loader_node]
    kept = sorted(nid for nid in recipe.nodes if not _through(recipe, nid))
    rename = {nid: f"{loader_node}.{n}" for n, nid in enumerate(kept, 1)}

    def relink(link: list) -> list:
        nid, slot = str(link[0]), link[1]
        for _ in range(len(recipe.nodes) + 1):  # a chain of pass-through ports is at most every node
            if nid not in recipe.nodes or not _through(recipe, nid):
                break
            link = recipe.nodes[nid]["inputs"][PORT_DATA_INPUT]
            nid, slot = str(link[0]), link[1]
        else:
            raise RecipeError(f"the recipe of {recipe.key!r}: its ports link to each other in a cycle")
        if nid not in rename:
            raise RecipeError(f"the recipe of {recipe.key!r} links to node {nid}, which is not in it")
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
            out = _stitch(out, nid, recipe.inputs[uid]["recipe"], run_id, cancel)
    return out
