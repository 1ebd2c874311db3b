"""Internal: ``discomfort run``'s loops over files and widgets: ``--input-dir`` (one run per input file)
and ``--set NODE.INPUT=VALUE`` (a widget of a node named by id or title, in every workflow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._names import safe_file_stem, unique_stem

__all__ = ["parse_set_spec", "input_dir_jobs", "apply_sets"]


def parse_set_spec(spec: str) -> tuple[str, str, Any]:
    """``NODE.INPUT=VALUE`` -> (node, input, value): VALUE as JSON, else the text itself."""
    target, sep, text = spec.partition("=")
    node, _, name = target.rpartition(".")
    if not sep or not node or not name:
        raise ValueError(f"--set {spec!r}: expected NODE.INPUT=VALUE (NODE: a node id or title), e.g. KSampler.seed=42")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return node, name, value


def input_dir_jobs(specs: list[str], inputs: dict,
                   extensions: tuple[str, ...]) -> list[tuple[str | None, str | None, dict[str, Path]]]:
    """One job per input file (``--input-dir KEY=DIR``; several directories: files paired by
    name without extension), or one job without files: (name, the job's output subfolder, files).
    The subfolder is the name made a file stem valid on every system (_names.safe_file_stem),
    distinct ignoring case: "Photo" and "photo" would be one folder on Windows and macOS."""
    if not specs:
        return [(None, None, {})]
    dirs: dict[str, dict[str, Path]] = {}
    for spec in specs:
        key, sep, folder = spec.partition("=")
        if not sep or not key or not folder:
            raise ValueError(f"--input-dir {spec!r}: expected KEY=DIR, e.g. image=photos/")
        if key in dirs or key in inputs:
            raise ValueError(f"--input-dir {key}=...: {key!r} is given twice")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"--input-dir {key}={folder}: no such folder")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise ValueError(f"--input-dir {key}={folder}: no input files ({', '.join(extensions)}) in it")
        by_name = {p.stem: p for p in files}
        if len(by_name) != len(files):
            raise ValueError(f"--input-dir {key}={folder}: several files share a name without extension")
        dirs[key] = by_name
    names = [set(d) for d in dirs.values()]
    common = set.intersection(*names)
    lonely = sorted(set.union(*names) - common)
    if lonely:
        raise ValueError(f"--input-dir: the folders hold different names, e.g. {lonely[0]!r}: each run takes one "
                         "file of each folder, paired by name")
    folders: set[str] = set()
    return [(name, unique_stem(safe_file_stem(name), folders), {key: d[name] for key, d in dirs.items()})
            for name in sorted(common)]


def apply_sets(paths: list, sets: list[tuple[str, str, Any]], object_info: dict) -> tuple[list[dict], dict]:
    """The workflows as API prompts with ``--set``'s values, and the UI widgets' controls (by
    "NODE.INPUT", as ``controls=`` takes them)."""
    from ..controls import find_node
    from ..workflows.format import is_link, is_ui_format, load_workflow, ui_to_api
    from ..workflows.tools import read_workflows
    from ..workflows.widgets import input_defs

    prompts: list[dict] = []
    controls: dict[str, str] = {}
    for item in read_workflows(paths):
        if is_ui_format(item):
            found: list = []
            prompts.append(ui_to_api(item, object_info, controls=found))
            controls.update({f"{c.node}.{c.input}": c.mode for c in found})
        else:
            prompts.append(load_workflow(item))
    for node, name, value in sets:
        what = f"--set {node}.{name}"
        hits = 0
        for k, prompt in enumerate(prompts):
            nid = find_node(prompt, node, what, k)
            if nid is None:
                continue
            entry = prompt[nid]
            inputs = entry.setdefault("inputs", {})
            cls = entry.get("class_type")
            known = set(inputs) | (set(input_defs(cls, object_info[cls])) if cls in object_info else set())
            if name not in known:
                raise ValueError(f"{what}: node {nid} ({cls}) has no input {name!r}; it has "
                                 f"{', '.join(sorted(known)) or 'none'}")
            if is_link(inputs.get(name)):
                raise ValueError(f"{what}: input {name!r} of node {nid} ({cls}) is linked to node "
                                 f"{inputs[name][0]}; --set gives widget values")
            inputs[name] = value
            hits += 1
        if not hits:
            raise ValueError(f"{what}: no node with id or title {node!r} in the workflows")
    return prompts, controls
