"""The UI-format converter against ComfyUI's real frontend, the oracle, in headless Chromium.

One ComfyUI 0.3.75 server (API nodes loaded) serves its pinned frontend (1.32.9); every UI workflow
of the template package ComfyUI pins, and every UI fixture, is loaded into the page and converted
with ``app.graphToPrompt()``; ``ui_to_api`` with the same server's ``/object_info`` must give the
same prompt, or refuse for a reason the test can check (a node type the server lacks, or a saved
value the frontend would send into a widget that cannot hold it).

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

from discomfort.errors import UnsupportedWorkflowError
from discomfort.workflow_format import is_ui_format, ui_to_api
from discomfort.workflow_subgraphs import Network
from discomfort.workflow_widgets import UNDEFINED, WidgetMismatchError, node_widgets

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfy_nodes"
FIXTURES = REPO / "tests" / "fixtures" / "workflows"
EXPECTED_TEMPLATES = 188  # comfyui-workflow-templates 0.7.25, pinned by ComfyUI 0.3.75
FRONTEND_FAILS = {"ui_group_node.json", "ui_subgraph.json"}  # hand-made, invalid: the frontend throws
CONVERT_JS = """async (wf) => { await app.loadGraphData(wf, true, true, null);
  const r = await app.graphToPrompt(); return JSON.parse(JSON.stringify(r.output)); }"""


@pytest.fixture(scope="module")
def frontend(comfy_path, tmp_path_factory):
    """(server, page): one ComfyUI with API nodes and one headless Chromium page on its editor."""
    sync_playwright = require_browser()
    from discomfort.comfy import launch_server

    work = tmp_path_factory.mktemp("frontend-server")
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK], work_dir=work, api_nodes=True,
                       startup_timeout=240) as server, sync_playwright() as pw:
        browser = launch(pw)
        page = open_editor(browser, server.url, viewport=(1600, 1000))
        yield server, page
        browser.close()


@pytest.fixture(scope="module")
def object_info(frontend):
    import requests

    server, _ = frontend
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
            entry.pop("_meta", None)
    return out


def judge(name: str, workflow: dict, expected: dict, object_info: dict) -> tuple[str, str]:
    """("identical" | "refused: why" | "MISMATCH", detail) for one workflow."""
    try:
        converted = ui_to_api(workflow, object_info)
    except WidgetMismatchError as e:
        sent = (expected.get(e.node_id) or {}).get("inputs", {}).get(e.input, UNDEFINED)
        if sent == e.value:
            return "refused: the frontend sends a value its widget cannot hold", str(e)
        return "MISMATCH", f"refused ({e}) but the frontend sends {sent!r}"
    except UnsupportedWorkflowError as e:
        lacking = [n["type"] for n in all_nodes(workflow) if isinstance(n.get("type"), str)
                   and n["type"] not in object_info and n["type"] in str(e)]
        if "unknown node type" in str(e) and lacking:
            return "refused: a node type the server lacks", str(e)
        return "MISMATCH", f"refused: {e}"
    keep = titled_ids(workflow, object_info)
    mine, theirs = normalise(converted, keep), normalise(expected, keep)
    if mine == theirs:
        return "identical", ""
    return "MISMATCH", first_difference(theirs, mine)


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
    """Every template and UI fixture: identical to graphToPrompt, or a checked refusal."""
    _, page = frontend
    assert len(templates) == EXPECTED_TEMPLATES, f"{len(templates)} UI templates, expected {EXPECTED_TEMPLATES}"
    t0 = time.monotonic()
    results: dict[str, tuple[str, str]] = {}
    for path in templates + ui_fixtures():
        workflow = json.loads(path.read_text())
        try:
            expected = page.evaluate(CONVERT_JS, workflow)
        except Exception as e:  # the frontend itself cannot convert it
            results[path.name] = ("frontend fails", str(e).splitlines()[0])
            continue
        results[path.name] = judge(path.name, workflow, expected, object_info)
    summary = summarise(results, len(templates))
    (artifacts_dir() / "frontend_parity.json").write_text(json.dumps(
        {"summary": summary, "seconds": round(time.monotonic() - t0, 1), "results": results}, indent=1))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    mismatches = {k: v[1] for k, v in results.items() if v[0] == "MISMATCH"}
    assert not mismatches, json.dumps(mismatches, indent=1)
    frontend_fails = {k for k, v in results.items() if v[0] == "frontend fails"}
    assert frontend_fails == FRONTEND_FAILS, frontend_fails
    assert summary["templates identical"] >= 170  # 172 on 0.3.75 without torchaudio


def summarise(results: dict, n_templates: int) -> dict:
    names = list(results)
    templates, fixtures = names[:n_templates], names[n_templates:]
    summary = {"templates identical": sum(results[n][0] == "identical" for n in templates),
               "templates": n_templates,
               "fixtures identical": sum(results[n][0] == "identical" for n in fixtures),
               "fixtures": len(fixtures)}
    for n in names:
        kind = results[n][0]
        if kind != "identical":
            summary[kind] = summary.get(kind, 0) + 1
    return summary


WIDGETS_JS = """(types) => { const out = {}; for (const t of types) { const n = LiteGraph.createNode(t);
  out[t] = (n.widgets || []).map(w => [w.name, w.serialize !== false, w.options?.serialize !== false]);
  } return out; }"""


def test_widget_model_matches_the_frontend(frontend, object_info):
    """For every node type the server has: the frontend's widgets (name, saved, sent) in order."""
    _, page = frontend
    theirs = page.evaluate(WIDGETS_JS, sorted(object_info))
    wrong = {}
    for typ, info in object_info.items():
        mine = [[w.name, w.saved, w.sent] for w in node_widgets(typ, info)]
        if mine != theirs[typ]:
            wrong[typ] = {"frontend": theirs[typ], "converter": mine}
    assert not wrong, json.dumps(wrong, indent=1)[:4000]
    assert len(theirs) == len(object_info) > 400
