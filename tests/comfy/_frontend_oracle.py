"""The two ComfyUI frontends the converter is checked against (a plain module, not a test).

* the one ComfyUI 0.3.75 pins and serves by default, ``comfyui-frontend-package`` 1.32.9 from the
  test environment;
* the newest, ``comfyui-frontend-package`` 1.58.1, never installed: ``scripts/fetch_frontend.py``
  unpacks it into the cache (``scripts/test.sh`` exports its ``static`` folder as
  ``$DISCOMFORT_FRONTEND_NEWEST``) and a server gets ``--front-end-root`` on it.

Each version is read from the package itself (its dist-info), and checked against what the page
reports (``window.__COMFYUI_FRONTEND_VERSION__``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest

from discomfort.workflows import ids as workflow_ids

REPO = Path(__file__).resolve().parents[2]
PINNED, NEWEST = "1.32.9", "1.58.1"
MODE_NEVER, MODE_BYPASS = 2, 4

CONVERT_JS = """async (wf) => { await app.loadGraphData(wf, true, true, null);
  const r = await app.graphToPrompt(); return JSON.parse(JSON.stringify(r.output)); }"""
#: The prompt, and the workflow as this frontend saves it after loading (``app.graph.serialize()``).
CONVERT_AND_SAVE_JS = """async (wf) => { await app.loadGraphData(wf, true, true, null);
  const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
  const r = await app.graphToPrompt(); return [JSON.parse(JSON.stringify(r.output)), saved]; }"""
VERSION_JS = "() => window.__COMFYUI_FRONTEND_VERSION__"


def pinned_version() -> str:
    """The installed ``comfyui-frontend-package`` (what ComfyUI serves without --front-end-root)."""
    from importlib.metadata import version

    return version("comfyui-frontend-package")


def newest_static() -> Path:
    """The newest frontend's ``static`` folder: ``$DISCOMFORT_FRONTEND_NEWEST``, else fetched now."""
    root = os.environ.get("DISCOMFORT_FRONTEND_NEWEST")
    if not root:
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_frontend.py"), "--version", NEWEST],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail(f"fetching comfyui-frontend-package {NEWEST} failed:\n{out.stderr[-2000:]}")
        root = out.stdout.strip().splitlines()[-1]
    static = Path(root)
    if not (static / "index.html").is_file():
        pytest.fail(f"{static} is not a frontend's static folder (no index.html)")
    return static


def unpacked_version(static: Path) -> str:
    """The version in the dist-info beside the unpacked package's ``static`` folder."""
    for meta in sorted(static.parent.parent.glob("*.dist-info/METADATA")):
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    pytest.fail(f"no dist-info METADATA beside {static}")


def server_args(which: str) -> tuple[list[str], str]:
    """(extra main.py arguments, package version) for ``which`` (PINNED or NEWEST)."""
    if which == PINNED:
        return [], pinned_version()
    static = newest_static()
    return ["--front-end-root", str(static)], unpacked_version(static)


def disabled_instances(workflow: Mapping, nested_only: bool = True) -> list[str]:
    """Prompt-id prefixes (``"2:21:"``) of muted or bypassed subgraph nodes inside active ones
    (``nested_only=False``: of the root graph too).

    1.58.1 leaves out the nodes of a muted or bypassed subgraph node of the root graph but not of
    one nested in another subgraph: those still run (an output node in them too). That is a plain
    bug; the converter leaves them out at every depth, and the comparison drops them from
    1.58.1's prompt."""
    root_nodes, definitions = workflow_ids.normalise(workflow)
    by_id = {sg["id"]: sg for sg in definitions}
    found: list[str] = []

    def walk(nodes: list, path: tuple, seen: frozenset) -> None:
        for node in nodes:
            sg = by_id.get(node.get("type"))
            if sg is None or node.get("type") in seen:
                continue
            disabled = node.get("mode") in (MODE_NEVER, MODE_BYPASS)
            here = (*path, node.get("id"))
            if disabled and (path or not nested_only):
                found.append(":".join(map(str, here)) + ":")
            elif not disabled:
                walk(sg.get("nodes") or [], here, seen | {node.get("type")})

    walk(root_nodes, (), frozenset())
    return found


def without_disabled(prompt: Mapping[str, Any], workflow: Mapping, nested_only: bool = True) -> dict:
    """A frontend's prompt without the nodes of disabled subgraph nodes (nested ones only: what
    1.58.1 still sends; all: what 1.32.9 sends), and without links to them, as graphToPrompt drops
    links to nodes it does not send."""
    prefixes = disabled_instances(workflow, nested_only)
    kept = {k: dict(v) for k, v in prompt.items() if not any(k.startswith(p) for p in prefixes)}
    for entry in kept.values():
        entry["inputs"] = {k: v for k, v in (entry.get("inputs") or {}).items()
                           if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in kept)}
    return kept


def renumbering(workflow: Mapping) -> dict[Any, dict[str, str]]:
    """``{subgraph id: {old inner id: new inner id}}``: the ids 1.58.1 gives colliding inner nodes."""
    before = workflow_ids.flatten_definitions(workflow)
    _, after = workflow_ids.normalise(workflow)
    out: dict[Any, dict[str, str]] = {}
    for old, new in zip(before, after):
        kept = workflow_ids.first_by_id(list(old.get("nodes") or ()))
        changed = {str(a["id"]): str(b["id"]) for a, b in zip(kept, new["nodes"]) if str(a["id"]) != str(b["id"])}
        if changed:
            out[old["id"]] = changed
    return out


def renumber_prompt(prompt: Mapping[str, Any], workflow: Mapping) -> dict:
    """A prompt of a frontend that keeps colliding inner ids (1.32.9), with 1.58.1's ids."""
    mapping = renumbering(workflow)
    if not mapping:
        return dict(prompt)
    types = {str(n.get("id")): n.get("type") for n in workflow.get("nodes") or ()}
    inner_types = {sg["id"]: {str(n.get("id")): n.get("type") for n in sg.get("nodes") or ()}
                   for sg in workflow_ids.flatten_definitions(workflow)}

    def new_id(old: str) -> str:
        parts, graph_types, sg_id, out = old.split(":"), types, None, []
        for part in parts:
            out.append(mapping.get(sg_id, {}).get(part, part) if sg_id is not None else part)
            sg_id = graph_types.get(part)
            graph_types = inner_types.get(sg_id, {})
        return ":".join(out)

    renamed = {}
    for node_id, entry in prompt.items():
        inputs = {k: [new_id(str(v[0])), v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v
                  for k, v in (entry.get("inputs") or {}).items()}
        renamed[new_id(node_id)] = dict(entry, inputs=inputs)
    return renamed
