"""Seed controls against ComfyUI's real frontend, the oracle, in headless Chromium: one UI workflow
with a control of every kind (INT seeds stepping and clamped at the frontend's 2**50 bound and at
an input's min, an INT on a step of 3 from 1, a COMBO with text and /regex/ filters, wrap, values
that are not a choice) is queued five times in the editor (the prompt read with
``app.graphToPrompt()``, then every widget's ``afterQueued``, as ``app.queuePrompt`` does); the
prompts a loop sends in its five iterations must be the same. Randomized widgets are compared by
range and grid. Needs what tests/comfy/test_frontend_parity.py needs (chromium and playwright)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import requests

from _browser import launch, open_editor, require_browser
from test_loops import _ui_node

from discomfort.controls import JS_LIMIT, Controls, with_values
from discomfort.workflows.tools import plan_workflows

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
TEST_PACK = Path(__file__).resolve().parent / "test_pack"
ROUNDS = 5
QUEUE_JS = """async ([wf, rounds]) => {
  await app.loadGraphData(wf, true, true, null);
  const prompts = [];
  for (let i = 0; i < rounds; i++) {
    const r = await app.graphToPrompt();
    prompts.push(JSON.parse(JSON.stringify(r.output)));
    const nodes = [...app.graph.nodes];
    for (const sg of app.graph.subgraphs?.values() ?? []) nodes.push(...sg.nodes);
    for (const node of nodes) for (const w of node.widgets ?? []) w.afterQueued?.();
  }
  return prompts;
}"""

#: (node type, widgets_values): the deterministic cases, then the randomized ones.
CASES = [
    ("ImageAddNoise", [5, "increment", 0.5]),
    ("ImageAddNoise", [1, "decrement", 0.5]),  # stops at min 0
    ("ImageAddNoise", [2 ** 51, "fixed", 0.5]),  # "fixed" still clamps to 2**50 after the first queue
    ("ImageAddNoise", [JS_LIMIT - 2, "increment", 0.5]),  # stops at 2**50, not at the input's max
    ("PrimitiveInt", [-5, "decrement"]),
    ("PrimitiveInt", [-(2 ** 51), "increment"]),  # min -2**63 is bounded to -2**50
    ("DiscomfortTestChoices", ["a.png", "increment", "png", 7, "increment"]),  # text filter, case-insensitive
    ("DiscomfortTestChoices", ["d.png", "increment-wrap", "", 8, "decrement"]),  # wraps; 8 is off the 1+3k grid
    ("DiscomfortTestChoices", ["c.jpg", "decrement", "/^[a-c]/", 40, "increment"]),  # regex; max 40
    ("DiscomfortTestChoices", ["x.png", "increment", "", 1, "fixed"]),  # not a choice: from the first
    ("DiscomfortTestChoices", ["B.PNG", "increment", "/[/", 4, "decrement"]),  # a bad regex filters as text
    ("ImageAddNoise", [0, "randomize", 0.5]),
    ("DiscomfortTestChoices", ["a.png", "randomize", "", 7, "randomize"]),
]
#: PrimitiveNodes, each feeding the seeds of two ImageAddNoise nodes whose own controls say otherwise:
#: (primitive's widgets_values, the targets' own controls). The primitive's control wins.
PRIMITIVES = [
    ([10, "increment"], ("randomize", "decrement")),
    ([7, "randomize"], ("increment", "fixed")),
]
FIRST_PRIMITIVE = len(CASES) + 2  # node ids: the primitive, then its two targets
RANDOM = {str(i + 2) for i, case in enumerate(CASES) if "randomize" in case[1]} | {
    str(FIRST_PRIMITIVE + 3 * i + t) for i, (values, _own) in enumerate(PRIMITIVES) if "randomize" in values
    for t in (1, 2)}


def controls_workflow() -> dict:
    """Every case as a node of one UI workflow; the seeds' images come from one EmptyImage (node 1)."""
    nodes = [_ui_node(1, "EmptyImage", [8, 8, 1, 0], outputs=[("IMAGE", "IMAGE", [])])]
    links = []
    for i, (typ, widgets) in enumerate(CASES):
        nid = i + 2
        inputs = []
        if typ == "ImageAddNoise":
            links.append([len(links) + 1, 1, 0, nid, 0, "IMAGE"])
            nodes[0]["outputs"][0]["links"].append(len(links))
            inputs = [("image", "IMAGE", len(links))]
        nodes.append(_ui_node(nid, typ, copy.deepcopy(widgets), inputs=inputs))
    for i, (values, own) in enumerate(PRIMITIVES):
        pid = FIRST_PRIMITIVE + 3 * i
        seed_links = []
        for t, control in enumerate(own, start=1):
            links.append([len(links) + 1, 1, 0, pid + t, 0, "IMAGE"])
            nodes[0]["outputs"][0]["links"].append(len(links))
            links.append([len(links) + 1, pid, 0, pid + t, 1, "INT"])
            seed_links.append(len(links))
            node = _ui_node(pid + t, "ImageAddNoise", [0, control, 0.5],
                            inputs=[("image", "IMAGE", len(links) - 1), ("seed", "INT", len(links))])
            node["inputs"][1]["widget"] = {"name": "seed"}
            nodes.append(node)
        primitive = _ui_node(pid, "PrimitiveNode", list(values), outputs=[("INT", "INT", seed_links)])
        primitive["outputs"][0]["widget"] = {"name": "seed"}
        primitive["properties"] = {"Run widget replace on values": False}
        nodes.append(primitive)
    return {"id": "00000000-0000-4000-8000-0000000c0a25", "revision": 0, "last_node_id": len(nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {},
            "version": 0.4}


@pytest.fixture(scope="module")
def editor(comfy_path, tmp_path_factory):
    """(page, /object_info) of one ComfyUI serving its pinned frontend, with the test pack."""
    sync_playwright = require_browser()
    from discomfort.comfy import launch_server

    work = tmp_path_factory.mktemp("controls-frontend")
    with launch_server(comfy_path, isolated=True, custom_nodes=[REPO / "comfy_nodes", TEST_PACK], work_dir=work,
                       api_nodes=False, startup_timeout=240) as server, sync_playwright() as pw:
        browser = launch(pw)
        page = open_editor(browser, server.url)
        info = requests.get(f"{server.url}/object_info", timeout=60).json()
        yield page, info
        browser.close()


def loop_prompts(workflow: dict, info: dict, rounds: int) -> list[dict]:
    """The prompts a loop sends in ``rounds`` iterations (the engine's own steps)."""
    found: list = []
    prompts, _nodes, _ports = plan_workflows([workflow], info, found)
    controls = Controls()
    plan = controls.plan([workflow], prompts, found, None, info)
    out = []
    for _ in range(rounds):
        used = controls.values(plan[0], prompts[0])
        out.append(with_values(prompts[0], plan[0], used))
        controls.advance(plan[0], used)
    return out


def test_a_loops_controls_are_the_editors_queue(editor):
    page, info = editor
    workflow = controls_workflow()
    theirs = page.evaluate(QUEUE_JS, [workflow, ROUNDS])
    ours = loop_prompts(workflow, info, ROUNDS)
    assert len(theirs) == len(ours) == ROUNDS
    for i, (t, o) in enumerate(zip(theirs, ours)):
        assert set(t) == set(o)
        for nid in sorted(set(t) - RANDOM):
            assert o[nid]["inputs"] == t[nid]["inputs"], (i, nid, CASES[int(nid) - 2] if nid != "1" else None)
    # what the cases show, spelled out: increments, the 2**50 bound, the grid, the filters
    column = {nid: [p[nid]["inputs"] for p in ours] for nid in ours[0]}
    assert [v["seed"] for v in column["2"]] == [5, 6, 7, 8, 9]
    assert [v["seed"] for v in column["4"]] == [2 ** 51] + [JS_LIMIT] * 4
    assert [v["value"] for v in column["7"]][:3] == [-(2 ** 51), -JS_LIMIT, -JS_LIMIT + 1]
    assert [(v["choice"], v["stepped"]) for v in column["8"]] == \
        [("a.png", 7), ("B.PNG", 10), ("d.png", 13), ("d.png", 16), ("d.png", 19)]
    assert [(v["choice"], v["stepped"]) for v in column["9"]][:3] == [("d.png", 8), ("e.webp", 4), ("a.png", 1)]
    # a PrimitiveNode's control drives every widget it feeds, one value for all, over their own controls
    first = FIRST_PRIMITIVE
    assert [p[str(first + 1)]["inputs"]["seed"] for p in ours] == [10, 11, 12, 13, 14]
    assert [p[str(first + 2)]["inputs"]["seed"] for p in ours] == [10, 11, 12, 13, 14]
    for prompts in (theirs, ours):
        shared = [p[str(first + 4)]["inputs"]["seed"] for p in prompts]
        assert shared == [p[str(first + 5)]["inputs"]["seed"] for p in prompts]
        assert shared[0] == 7 and len(set(shared[1:])) == ROUNDS - 1
    # randomized: each iteration a value within the range, on the grid, from the choices, and not one value
    for prompts in (theirs, ours):
        seeds = [p["13"]["inputs"]["seed"] for p in prompts]
        assert seeds[0] == 0 and len(set(seeds[1:])) == ROUNDS - 1 and all(0 <= s < JS_LIMIT for s in seeds)
        picks = [p["14"]["inputs"] for p in prompts[1:]]
        assert all(v["choice"] in info["DiscomfortTestChoices"]["input"]["required"]["choice"][0] for v in picks)
        assert all(1 <= v["stepped"] <= 40 and (v["stepped"] - 1) % 3 == 0 for v in picks)
