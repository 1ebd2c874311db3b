"""The UI-format converter against ComfyUI's real frontends, the oracles, in headless Chromium.

Two frontends, one ComfyUI 0.3.75 server each (API nodes loaded): the one it pins (1.32.9) and the
newest, ``comfyui-frontend-package`` 1.58.1 (``--front-end-root``; see ``_frontend_oracle``).
Every UI workflow of the template package ComfyUI pins, and every UI fixture, is loaded into the
page and converted with ``app.graphToPrompt()``; ``ui_to_api`` with the same server's
``/object_info`` must give the same prompt, or refuse for a reason the test can check (a node type
the server lacks, a saved value the frontend would send into a widget that cannot hold it, a
legacy group node). The workflow as the frontend saves it after loading
(``app.graph.serialize()``) must convert to the same prompt too.

Where the two frontends differ the converter follows 1.58.1, except for one plain bug of 1.58.1;
``DIFFERENCES`` lists each, and the comparison with the other frontend takes exactly that
difference out, so that everything else is still compared.

Needs Debian's chromium (``apt-get install -y chromium``) and ``playwright==1.65.2``; without them
these tests fail, unless ``DISCOMFORT_SKIP_BROWSER=1`` is set. Templates: ``$DISCOMFORT_TEMPLATES``
(``scripts/test.sh`` fetches them with ``scripts/fetch_templates.py``), else fetched here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _browser import artifacts_dir, launch, open_editor, require_browser
from _frontend_oracle import (CONVERT_AND_SAVE_JS, CONVERT_JS, NEWEST, PINNED, VERSION_JS, renumber_prompt,
                              server_args, without_disabled)

from discomfort.errors import UnsupportedWorkflowError
from discomfort.workflows.format import is_ui_format, ui_to_api
from discomfort.workflows.subgraphs import Network
from discomfort.workflows.widgets import UNDEFINED, WidgetMismatchError, node_widgets

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfy_nodes"
FIXTURES = REPO / "tests" / "fixtures" / "workflows"
EXPECTED_TEMPLATES = 188  # comfyui-workflow-templates 0.7.25, pinned by ComfyUI 0.3.75
# Hand-made, invalid: the frontend throws. 1.58.1 no longer expands legacy group nodes (it drops
# them, see judge()), so only the subgraph whose output has no link throws there.
FRONTEND_FAILS = {PINNED: {"ui_group_node.json", "ui_subgraph.json"}, NEWEST: {"ui_subgraph.json"}}
PACK_META = ("cnr_id", "aux_id", "ver")
DIFFERENCES = {
    "disabled subgraph": "a muted or bypassed subgraph node: 1.58.1 sends none of its nodes (1.32.9 sent them "
                         "all); the converter follows 1.58.1",
    "disabled nested subgraph": "a muted or bypassed subgraph node inside another subgraph: 1.58.1 still sends "
                                "its nodes (a plain bug: only the root graph's are left out); the converter "
                                "leaves them out at every depth",
    "renumbered ids": "an inner node id that another node of the workflow has: 1.58.1 renumbers it on load, "
                      "prompt ids and links follow (1.32.9 kept it); the converter follows 1.58.1",
    "PreviewAny preview": "PreviewAny's preview widget: 1.58.1 does not send it (1.32.9 sent \"preview\": \"\"); "
                          "the converter follows 1.58.1",
    "node pack meta": "_meta: 1.58.1 adds the node's cnr_id, aux_id and ver (when valid); 1.32.9 sent the "
                      "title only; the converter follows 1.58.1",
    "group node": "a legacy group node: 1.32.9 expands it (or throws), 1.58.1 drops it and sends its "
                  "consumers without the input; the converter refuses it",
}


@pytest.fixture(scope="module", params=[PINNED, NEWEST])
def frontend(request, comfy_path, tmp_path_factory):
    """(server, page, version): one ComfyUI with API nodes serving one frontend, one headless
    Chromium page on its editor; the version read from the package and checked in the page."""
    sync_playwright = require_browser()
    from discomfort.comfy import launch_server

    args, version = server_args(request.param)
    assert version == request.param, f"comfyui-frontend-package {version}, expected {request.param}"
    work = tmp_path_factory.mktemp("frontend-server")
    with launch_server(comfy_path, custom_nodes=[NODE_PACK], work_dir=work, api_nodes=True, extra_args=args,
                       startup_timeout=240) as server, sync_playwright() as pw:
        browser = launch(pw)
        page = open_editor(browser, server.url, viewport=(1600, 1000))
        assert page.evaluate(VERSION_JS) == version  # the page runs the package we meant
        print(f"\ncomfyui-frontend-package {version} (served by {server.url})")
        yield server, page, version
        browser.close()


@pytest.fixture(scope="module")
def object_info(frontend):
    import requests

    server = frontend[0]
    return requests.get(server.url + "/object_info", timeout=60).json()


@pytest.fixture(scope="module")
def templates(comfy_path) -> list[Path]:
    root = os.environ.get("DISCOMFORT_TEMPLATES")
    if not root:
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_templates.py"), "--comfyui",
                              str(comfy_path)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail(f"fetching the templates failed:\n{out.stderr[-2000:]}")
        root = out.stdout.strip().splitlines()[-1]
    files = [p for p in sorted(Path(root).glob("*.json")) if is_ui_format(json.loads(p.read_text()))]
    return files


def ui_fixtures() -> list[Path]:
    return [p for p in sorted(FIXTURES.glob("*.json"))
            if not p.name.endswith(".api.json") and is_ui_format(json.loads(p.read_text()))]


# ---------------------------------------------------------------------------------------------
# Comparison


def titled_ids(workflow: dict, object_info: dict) -> set[str]:
    """Executable ids whose node has a saved title (others get the frontend's own locale name)."""
    net = Network(workflow, object_info)
    return {i for i, dto in net.flatten().items() if dto.view.node.get("title")}


def normalise(prompt: dict, keep_titles: set[str]) -> dict:
    """Drop ``_meta`` titles the frontend takes from its bundled translations, not the workflow."""
    out = json.loads(json.dumps(prompt))
    for node_id, entry in out.items():
        if node_id not in keep_titles:
            (entry.get("_meta") or {}).pop("title", None)
    return out


def as_the_converter_does(expected: dict, workflow: dict, version: str) -> tuple[dict, list[str]]:
    """The frontend's prompt with each listed difference from the converter taken out, and their names."""
    applied = []

    def take_out(name: str, changed: dict) -> dict:
        if changed != expected:
            applied.append(name)
        return changed

    if version == NEWEST:
        return take_out("disabled nested subgraph", without_disabled(expected, workflow)), applied
    expected = take_out("renumbered ids", renumber_prompt(expected, workflow))
    expected = take_out("disabled subgraph", without_disabled(expected, workflow, nested_only=False))
    previews = [e for e in expected.values()
                if e.get("class_type") == "PreviewAny" and "preview" in (e.get("inputs") or {})]
    for entry in previews:
        entry["inputs"] = {k: v for k, v in entry["inputs"].items() if k != "preview"}
    return expected, applied + (["PreviewAny preview"] if previews else [])


def judge(workflow: dict, expected: dict, object_info: dict, version: str) -> tuple[str, str, list[str]]:
    """("identical" | "refused: why" | "MISMATCH", detail, differences between the frontends)."""
    expected, applied = as_the_converter_does(expected, workflow, version)
    try:
        converted = ui_to_api(workflow, object_info)
    except WidgetMismatchError as e:
        sent = (expected.get(e.node_id) or {}).get("inputs", {}).get(e.input, UNDEFINED)
        if sent == e.value:
            return "refused: the frontend sends a value its widget cannot hold", str(e), applied
        return "MISMATCH", f"refused ({e}) but the frontend sends {sent!r}", applied
    except UnsupportedWorkflowError as e:
        lacking = [n["type"] for n in all_nodes(workflow) if isinstance(n.get("type"), str)
                   and n["type"] not in object_info and n["type"] in str(e)]
        if "unknown node type" in str(e) and lacking:
            return "refused: a node type the server lacks", str(e), applied
        groups = [str(n["id"]) for n in workflow.get("nodes") or () if str(n.get("type")).startswith("workflow>")]
        if "group node" in str(e) and groups and not set(groups) & set(expected):
            return "refused: a legacy group node (the frontend drops it)", str(e), applied + ["group node"]
        return "MISMATCH", f"refused: {e}", applied
    if version == PINNED and any(k in (e.get("_meta") or {}) for e in converted.values() for k in PACK_META):
        applied.append("node pack meta")
        for entry in converted.values():
            entry["_meta"] = {k: v for k, v in entry["_meta"].items() if k not in PACK_META}
    keep = titled_ids(workflow, object_info)
    mine, theirs = normalise(converted, keep), normalise(expected, keep)
    if mine == theirs:
        return "identical", "", applied
    return "MISMATCH", first_difference(theirs, mine), applied


def all_nodes(workflow: dict) -> list[dict]:
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    return list(workflow.get("nodes") or []) + [n for sg in subgraphs for n in sg.get("nodes") or []]


def first_difference(expected: dict, got: dict) -> str:
    for node_id in sorted(set(expected) | set(got)):
        a, b = expected.get(node_id), got.get(node_id)
        if a != b:
            return f"node {node_id}: frontend {json.dumps(a)[:400]} / converter {json.dumps(b)[:400]}"
    return ""


# ---------------------------------------------------------------------------------------------
# Tests


def test_templates_and_fixtures_match_the_frontend(frontend, object_info, templates):
    """Every template and UI fixture: identical to graphToPrompt, or a checked refusal; each fixture
    as the frontend saves it after loading converts to the same prompt."""
    _, page, version = frontend
    assert len(templates) == EXPECTED_TEMPLATES, f"{len(templates)} UI templates, expected {EXPECTED_TEMPLATES}"
    t0 = time.monotonic()
    results: dict[str, tuple[str, str, list[str]]] = {}
    saved_results: dict[str, tuple[str, str, list[str]]] = {}
    fixtures = ui_fixtures()
    for path in templates + fixtures:
        workflow = json.loads(path.read_text())
        try:
            if path in fixtures:
                expected, saved = page.evaluate(CONVERT_AND_SAVE_JS, workflow)
                saved_results[path.name] = judge(saved, expected, object_info, version)
            else:
                expected = page.evaluate(CONVERT_JS, workflow)
        except Exception as e:  # the frontend itself cannot convert it
            results[path.name] = ("frontend fails", str(e).splitlines()[0], [])
            continue
        results[path.name] = judge(workflow, expected, object_info, version)
    summary = summarise(results, len(templates), version)
    differences = {n: r[2] for n, r in results.items() if r[2]}
    (artifacts_dir() / f"frontend_parity_{version}.json").write_text(json.dumps(
        {"summary": summary, "seconds": round(time.monotonic() - t0, 1), "differences": differences,
         "results": results, "saved": saved_results}, indent=1))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    print("differences from the other frontend, by workflow:\n" + "\n".join(
        f"  {n}: {', '.join(d)}" for n, d in sorted(differences.items())))
    mismatches = {k: v[1] for k, v in results.items() if v[0] == "MISMATCH"}
    assert not mismatches, json.dumps(mismatches, indent=1)
    frontend_fails = {k for k, v in results.items() if v[0] == "frontend fails"}
    assert frontend_fails == FRONTEND_FAILS[version], frontend_fails
    assert summary["templates identical"] >= 170  # 172 on 0.3.75 without torchaudio
    # A saved workflow converts as the frontend converts it (1.58.1 saves a legacy group node's
    # workflow without it, which then converts).
    saved_wrong = {k: (v[:2], results[k][:2]) for k, v in saved_results.items()
                   if v[0] == "MISMATCH" or (results[k][0] == "identical") != (v[0] == "identical")
                   and "group node" not in results[k][2]}
    assert not saved_wrong, json.dumps(saved_wrong, indent=1)[:4000]
    assert len(saved_results) == len(fixtures) - len(FRONTEND_FAILS[version])
    assert all(set(d) <= set(DIFFERENCES) for d in differences.values())


def summarise(results: dict, n_templates: int, version: str) -> dict:
    names = list(results)
    templates, fixtures = names[:n_templates], names[n_templates:]
    summary: dict = {"frontend": version,
                     "templates identical": sum(results[n][0] == "identical" for n in templates),
                     "templates": n_templates,
                     "fixtures identical": sum(results[n][0] == "identical" for n in fixtures),
                     "fixtures": len(fixtures)}
    for n in names:
        kind = results[n][0]
        if kind != "identical":
            summary[kind] = summary.get(kind, 0) + 1
    for n in names:
        for difference in results[n][2]:
            summary[f"differs: {difference}"] = summary.get(f"differs: {difference}", 0) + 1
    return summary


WIDGETS_JS = """(types) => { const out = {}; for (const t of types) { const n = LiteGraph.createNode(t);
  out[t] = (n.widgets || []).map(w => [w.name, w.serialize !== false, w.options?.serialize !== false]);
  } return out; }"""
# The widgets (name, saved, sent) where 1.32.9 differs from 1.58.1, which the converter follows.
WIDGET_DIFFERENCES = {PINNED: {"PreviewAny": [["preview", False, True]]}, NEWEST: {}}


def test_widget_model_matches_the_frontend(frontend, object_info):
    """For every node type the server has: the frontend's widgets (name, saved, sent) in order."""
    _, page, version = frontend
    theirs = page.evaluate(WIDGETS_JS, sorted(object_info))
    wrong = {}
    for typ, info in object_info.items():
        mine = [[w.name, w.saved, w.sent] for w in node_widgets(typ, info)]
        if mine != theirs[typ] and WIDGET_DIFFERENCES[version].get(typ) != theirs[typ]:
            wrong[typ] = {"frontend": theirs[typ], "converter": mine}
    assert not wrong, json.dumps(wrong, indent=1)[:4000]
    assert len(theirs) == len(object_info) > 400
