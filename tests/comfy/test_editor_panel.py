"""The Discomfort panel of the ComfyUI editor (issue 19): its routes, and the panel in the real frontend.

One ComfyUI 0.3.75 server as a user has it: a copy of the tree with discomfort installed from the
built wheel by ``discomfort install-comfyui`` and started by its own ``main.py``
(``_installed_comfy``; the test pack is one of its custom nodes); the test writes saved workflows
(UI format) into its user folder and an image into its input folder. The routes are exercised
over HTTP (progress by long-polling the run's event route with its token); the panel in headless
Chromium through its real frontend (1.32.9), and a second browser context that must neither see
nor cancel the first one's runs. Screenshots of the panel go to ``$DISCOMFORT_ARTIFACTS`` (default
``/tmp/discomfort-artifacts``). Browser tests need Debian's chromium and playwright (see
``test_frontend_parity.py``); ``DISCOMFORT_SKIP_BROWSER=1`` skips them.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from _browser import artifacts_dir, close_templates, launch, open_editor, require_browser
from _helpers import Fifo

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfy_nodes"
START = 51  # the input image's value (0.2)
BLEND = 0.25


# ------------------------------------------------------------------------------------ helpers


class UIGraph:
    """A small UI-format workflow, as the editor saves it."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, typ: str, widgets=(), inputs=(), outputs=(), title: str | None = None) -> int:
        nid = len(self.nodes) + 1
        self.nodes.append({
            "id": nid, "type": typ, "pos": [60 + 260 * (nid - 1), 80 + 40 * (nid % 2)], "size": [220, 90],
            "flags": {}, "order": nid - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
            "properties": {"Node name for S&R": typ}, "widgets_values": list(widgets),
            **({"title": title} if title else {})})
        return nid

    def port(self, key: str) -> int:
        return self.node("DiscomfortPort", [key], [("input_data", "*")], [("output_data", "*")], title=f"port {key}")

    def link(self, a: int, a_slot: int, b: int, b_slot: int) -> None:
        lid = len(self.links) + 1
        src, dst = self.nodes[a - 1], self.nodes[b - 1]
        src["outputs"][a_slot]["links"].append(lid)
        dst["inputs"][b_slot]["link"] = lid
        self.links.append([lid, a, a_slot, b, b_slot, src["outputs"][a_slot]["type"]])

    def json(self) -> dict:
        return {"id": str(uuid.uuid4()), "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {}, "version": 0.4}


def invert_workflow() -> dict:
    """A: image -> ImageInvert -> ImageBlend(x, x, 1) -> DiscomfortTestSteps (4 steps, like a sampler)
    -> inverted. The blend is the identity; its FLOAT widget is saved as the integer 1, as the
    editor saves it, which ComfyUI's validation turns into 1.0."""
    g = UIGraph()
    src = g.port("image")
    inv = g.node("ImageInvert", [], [("image", "IMAGE")], [("IMAGE", "IMAGE")])
    same = g.node("ImageBlend", [1, "normal"], [("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")])
    steps = g.node("DiscomfortTestSteps", [4], [("value", "*")], [("*", "*")])
    out = g.port("inverted")
    g.link(src, 0, inv, 0)
    g.link(inv, 0, same, 0)
    g.link(inv, 0, same, 1)
    g.link(same, 0, steps, 0)
    g.link(steps, 0, out, 0)
    return g.json()


def blend_workflow() -> dict:
    """B: image = blend(inverted, image, 0.25): reads both keys, writes image back (the loop)."""
    g = UIGraph()
    inv = g.port("inverted")
    img = g.port("image")
    blend = g.node("ImageBlend", [BLEND, "normal"], [("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")])
    out = g.port("image")
    g.link(inv, 0, blend, 0)
    g.link(img, 0, blend, 1)
    g.link(blend, 0, out, 0)
    return g.json()


def save_workflow() -> dict:
    """D: image = invert(image) (a loop: each iteration's input differs, so ComfyUI's cache does
    not answer for it), the same picture through ComfyUI's SaveImage."""
    g = UIGraph()
    src = g.port("image")
    inv = g.node("ImageInvert", [], [("image", "IMAGE")], [("IMAGE", "IMAGE")])
    save = g.node("SaveImage", ["dcf_panel_save"], [("images", "IMAGE")], [])
    out = g.port("image")
    g.link(src, 0, inv, 0)
    g.link(inv, 0, save, 0)
    g.link(inv, 0, out, 0)
    return g.json()


def hold_workflow(fifo: str, release: str) -> dict:
    """C: image -> DiscomfortTestGate (tells the FIFO it started, holds until ``release`` exists) -> held."""
    g = UIGraph()
    src = g.port("image")
    gate = g.node("DiscomfortTestGate", [fifo, release], [("value", "*")], [("*", "*")], title="Gate")
    out = g.port("held")
    g.link(src, 0, gate, 0)
    g.link(gate, 0, out, 0)
    return g.json()


def expected_values(iterations: int) -> dict[str, int]:
    """The pixel values A then B give after ``iterations`` (float32, like ComfyUI's CPU tensors)."""
    v = np.float32(START) / np.float32(255)
    inverted = v
    for _ in range(iterations):
        inverted = np.float32(1) - v
        v = inverted * np.float32(1 - BLEND) + v * np.float32(BLEND)
    to8 = lambda x: int(np.clip(255.0 * x, 0, 255).astype(np.uint8))  # noqa: E731 - like SaveImage
    return {"image": to8(v), "inverted": to8(inverted)}


TOKEN = "X-Discomfort-Panel-Token"


def until_finished(http, run_id: str, token: str) -> list[dict]:
    """The run's progress events, read from its event route (long poll) until "finished"."""
    seen: list[dict] = []
    after = 0
    while not seen or seen[-1]["kind"] != "finished":
        resp = http("GET", f"/discomfort/panel/runs/{run_id}/events", params={"after": after},
                    headers={TOKEN: token})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["dropped"] == 0, body
        seen += body["events"]
        after = body["next"]
    return seen


def shm_files(run_id: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dcf-{run_id}")]


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def panel(copy_server, tmp_path_factory):
    """The session's ComfyUI with discomfort installed from the wheel (``_installed_comfy``: its
    own main.py, its own folders); saved workflows in its user folder, an image in its input folder."""
    from PIL import Image

    work = Path(copy_server.work_dir)
    workflows = work / "user" / "default" / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    (workflows / "invert.json").write_text(json.dumps(invert_workflow()))
    (workflows / "blend.json").write_text(json.dumps(blend_workflow()))
    (workflows / "broken.json").write_text("{not json")
    (workflows / "save.json").write_text(json.dumps(save_workflow()))
    Image.fromarray(np.full((8, 8, 3), START, np.uint8)).save(work / "input" / "start.png")
    (work / "input" / "notes.txt").write_text("hello")
    secret = tmp_path_factory.mktemp("outside") / "secret.json"
    secret.write_text(json.dumps(invert_workflow()))
    (workflows / "escape.json").symlink_to(secret)  # a symlink out of the folder
    return copy_server


@pytest.fixture()
def http(panel):
    import requests

    session = requests.Session()

    def call(method: str, route: str, **kw):
        return session.request(method, panel.url + route, timeout=60, **kw)

    yield call
    session.close()


def assert_error(resp, status: int, kind: str | None = None, says: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) >= {"error", "type"} and body["error"], body
    if kind is not None:
        assert body["type"] == kind, body
    if says is not None:
        assert says in body["error"], body
    return body


def start_body(workflows=("invert", "blend"), iterations=3, **extra) -> dict:
    return {"workflows": list(workflows), "iterations": iterations, "inputs": {"image": {"file": "start.png"}},
            **extra}


# ------------------------------------------------------------------------------------ the install


def test_the_pack_as_installed(comfy_copy, panel):
    """The server runs the pack install-comfyui placed (the wheel's, web/ included) and the
    discomfort of the copy's own venv, and serves the panel's script to the frontend."""
    import subprocess

    placed = comfy_copy.root / "custom_nodes" / "discomfort_nodes"
    assert not placed.is_symlink() and (placed / "web" / "discomfort_panel.js").read_bytes() == \
        (NODE_PACK / "web" / "discomfort_panel.js").read_bytes()
    assert sorted(p.name for p in placed.glob("*.py")) == sorted(p.name for p in NODE_PACK.glob("*.py"))
    where = subprocess.run([str(comfy_copy.python), "-c", "import discomfort; print(discomfort.__file__)"],
                           capture_output=True, text=True, check=True, cwd=comfy_copy.root).stdout.strip()
    if comfy_copy.source.startswith("wheel"):
        assert Path(where).is_relative_to(comfy_copy.root / "venv"), where  # the wheel, not the test's own
    assert "/extensions/discomfort_nodes/discomfort_panel.js" in panel.get_json("/extensions")


# ------------------------------------------------------------------------------------ routes


def test_listing_routes(panel, http):
    """Saved workflows, input files, and each workflow's ports (converted with the server's object_info)."""
    names = [w["name"] for w in http("GET", "/discomfort/panel/workflows").json()["workflows"]]
    assert {"invert.json", "blend.json", "broken.json"} <= set(names)
    assert "escape.json" not in names  # a symlink out of the folder is not listed
    files = [f["name"] for f in http("GET", "/api/discomfort/panel/inputs").json()["files"]]
    assert {"notes.txt", "start.png"} <= set(files) and files == sorted(files), files  # the tree's example.png too
    ports = {p["unique_id"]: p for p in http("GET", "/discomfort/panel/ports", params={"workflow": "blend"}).json()["ports"]}
    assert ports["inverted"] == {"unique_id": "inverted", "type": "IMAGE", "mode": "INPUT", "reads": True, "writes": False}
    assert ports["image"]["mode"] == "PASSTHRU" and ports["image"]["reads"] and ports["image"]["writes"]
    assert ports["image"]["type"] == "IMAGE"
    a = {p["unique_id"]: p for p in http("GET", "/discomfort/panel/ports", params={"workflow": "invert.json"}).json()["ports"]}
    assert a["image"]["mode"] == "INPUT" and a["image"]["type"] == "IMAGE" and a["inverted"]["writes"]
    assert_error(http("GET", "/discomfort/panel/ports", params={"workflow": "broken"}), 400, says="not valid JSON")


@pytest.mark.parametrize("name, status", [
    ("../invert", 400), ("../../../etc/passwd", 400), ("/etc/passwd", 400), ("sub/../invert", 400),
    ("C:\\x", 400), ("missing", 404), ("escape", 400), ("", 400), ("a" * 300, 400),
])
def test_bad_workflow_names(http, name, status):
    """Names outside the workflows folder (.., absolute, symlinks out) are 400; missing ones 404."""
    assert_error(http("GET", "/discomfort/panel/ports", params={"workflow": name}), status)
    body = start_body(workflows=[name])
    assert_error(http("POST", "/discomfort/panel/runs", json=body), status)


@pytest.mark.parametrize("change, status, says", [
    ({"iterations": 10**6}, 413, "at most"),
    ({"iterations": 0}, 400, "positive"),
    ({"iterations": True}, 400, "positive"),
    ({"workflows": ["invert"] * 17}, 413, "at most 16"),
    ({"workflows": []}, 400, "non-empty"),
    ({"inputs": {"image": {"file": "../user/default/workflows/invert.json"}}}, 400, "file"),
    ({"inputs": {"image": {"file": "/etc/hostname"}}}, 400, "file"),
    ({"inputs": {"image": {"file": "nope.png"}}}, 404, "no such file"),
    ({"inputs": {"image": {"value": 3}}}, 400, "bind a file"),
    ({"inputs": {"image": {"file": "start.png"}, "nobody": {"value": 1}}}, 400, "nobody"),
    ({"inputs": {}}, 400, "bind 'image'"),
    ({"until": "nobody"}, 400, "until"),
])
def test_start_refusals(http, change, status, says):
    """Every refusal is a 4xx JSON {"error", "type"} before any run starts."""
    body = {**start_body(), **change}
    assert_error(http("POST", "/discomfort/panel/runs", json=body), status, says=says)


def test_malformed_bodies(http):
    assert_error(http("POST", "/discomfort/panel/runs", data=b"[1, 2]"), 400, "ValueError")
    assert_error(http("POST", "/discomfort/panel/runs", data=b"{nope"), 400, "ValueError")
    assert_error(http("POST", "/discomfort/panel/runs", data=b"x" * (65 << 10)), 413, "RemoteLimitError")
    assert http("GET", "/discomfort/panel/runs").json() == {"runs": []}  # no token, no runs
    assert_error(http("GET", "/discomfort/panel/runs/" + "ab" * 16, headers={TOKEN: "x" * 43}), 404)
    assert_error(http("GET", "/discomfort/panel/runs/" + "ab" * 16 + "/events", params={"after": "-1"}), 404)


def test_run_through_the_routes(panel, http):
    """A then B, 3 iterations: progress from the run's event route, outputs in ComfyUI's output folder."""
    resp = http("POST", "/discomfort/panel/runs", json=start_body())
    assert resp.status_code == 202, resp.text
    run_id, token = resp.json()["run_id"], resp.json()["token"]
    assert len(token) >= 43  # 256 random bits
    seen = until_finished(http, run_id, token)
    kinds = [e["kind"] for e in seen]
    assert kinds.count("workflow_start") == 6 and kinds.count("workflow_done") == 6, seen[-1].get("error")
    assert [(e["iteration"], e["workflow"], e["name"]) for e in seen if e["kind"] == "workflow_start"] == [
        (i, k, n) for i in range(3) for k, n in enumerate(["invert.json", "blend.json"])]
    steps = [(e["value"], e["max"]) for e in seen if e["kind"] == "step"]
    assert (4, 4) in steps, steps
    assert any(e["kind"] == "node" and e["node_title"] == "Invert Image" for e in seen), [(e["node"], e["node_title"]) for e in seen if e["kind"] == "node"]
    final = seen[-1]
    assert final["state"] == "finished", final
    out = {o["key"]: o for o in final["outputs"]}
    assert set(out) == {"image", "inverted"} and out["image"]["kind"] == "image"
    assert out["image"]["subfolder"] == f"discomfort/{run_id}"
    want = expected_values(3)
    for key in ("image", "inverted"):
        got = pixels(Path(panel.work_dir) / "output" / "discomfort" / run_id / out[key]["filename"])
        assert got.shape == (8, 8, 3) and abs(int(got.max()) - want[key]) <= 1 and got.min() == got.max(), (key, got.max(), want)
    view = http("GET", "/view", params={"filename": out["image"]["filename"], "subfolder": out["image"]["subfolder"],
                                        "type": "output"})
    assert view.status_code == 200 and view.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = http("GET", "/discomfort/panel/runs", headers={TOKEN: f"{'y' * 43},{token}"}).json()["runs"]
    assert [r["run_id"] for r in listed] == [run_id] and listed[0]["state"] == "finished"
    assert "token" not in listed[0]
    assert http("GET", f"/discomfort/panel/runs/{run_id}", headers={TOKEN: token}).json()["outputs"] == final["outputs"]
    assert_error(http("GET", f"/discomfort/panel/runs/{run_id}"), 404)
    assert_error(http("GET", f"/discomfort/panel/runs/{run_id}", headers={TOKEN: token[:-1] + ("B" if token[-1] == "A" else "A")}), 404)
    assert_error(http("GET", f"/discomfort/panel/runs/{run_id}/events", headers={TOKEN: "y" * 43}), 404)
    assert shm_files(run_id) == []
    check_history(panel, seen, 3)


def check_history(panel, seen: list[dict], iterations: int) -> None:
    """Each iteration's outputs were announced as that iteration ended (after its last workflow,
    before the next iteration's first) and saved with that iteration's values."""
    it_events = [(i, e) for i, e in enumerate(seen) if e["kind"] == "iteration"]
    assert [e["iteration"] for _, e in it_events] == list(range(iterations)), [e["kind"] for e in seen]
    for at, ev in it_events:
        before = [e for e in seen[:at] if e["kind"] == "workflow_done"]
        after = [e for e in seen[at:] if e["kind"] == "workflow_start"]
        assert before[-1]["iteration"] == ev["iteration"] and before[-1]["workflow"] == 1
        assert not after or after[0]["iteration"] == ev["iteration"] + 1
        assert ev["files"] == [] and "note" not in ev  # no SaveImage in these workflows; under the cap
        assert sorted(o["key"] for o in ev["outputs"]) == ["image", "inverted"]
        want = expected_values(ev["iteration"] + 1)
        for o in ev["outputs"]:
            assert o["subfolder"].endswith(f"/{ev['iteration'] + 1:05d}"), o
            got = pixels(Path(panel.work_dir) / "output" / o["subfolder"] / o["filename"])
            assert abs(int(got.max()) - want[o["key"]]) <= 1 and got.min() == got.max(), (o, got.max(), want)
    assert [h["iteration"] for h in seen[-1]["history"]] == list(range(iterations))


def test_output_node_files_per_iteration(panel, http):
    """The files ComfyUI's own SaveImage wrote in each iteration are listed with it (where
    ComfyUI put them, no copy), beside the values the run wrote."""
    resp = http("POST", "/discomfort/panel/runs", json=start_body(["save"], iterations=2))
    assert resp.status_code == 202, resp.text
    run_id, token = resp.json()["run_id"], resp.json()["token"]
    seen = until_finished(http, run_id, token)
    assert seen[-1]["state"] == "finished", seen[-1]
    events = [e for e in seen if e["kind"] == "iteration"]
    assert [e["iteration"] for e in events] == [0, 1]
    names = []
    for ev, want in zip(events, (255 - START, START)):  # inverted once, then back
        assert [o["key"] for o in ev["outputs"]] == ["image"]
        [f] = ev["files"]
        assert (f["node"], f["type"], f["workflow"]) == ("3", "output", 0) and "path" not in f, f
        assert f["filename"].startswith("dcf_panel_save_") and f["filename"] not in names
        names.append(f["filename"])
        for where in (Path(f["subfolder"]) / f["filename"], Path(ev["outputs"][0]["subfolder"]) / "image.png"):
            got = pixels(Path(panel.work_dir) / "output" / where)
            assert got.min() == got.max() and abs(int(got.max()) - want) <= 1, (where, got.max(), want)
    view = http("GET", "/view", params={"filename": names[1], "subfolder": "", "type": "output"})
    assert view.status_code == 200 and view.content[:4] == b"\x89PNG"


def test_history_is_capped(panel, http):
    """Per-iteration outputs stop at the run's cap (8 files here, DISCOMFORT_PANEL_HISTORY_FILES):
    5 iterations of 2 keys keep 4, say why once, and the run itself goes on to the end."""
    resp = http("POST", "/discomfort/panel/runs", json=start_body(iterations=5))
    assert resp.status_code == 202, resp.text
    run_id, token = resp.json()["run_id"], resp.json()["token"]
    final = until_finished(http, run_id, token)[-1]
    assert final["state"] == "finished", final
    assert [h["iteration"] for h in final["history"]] == [0, 1, 2, 3]
    assert sum(len(h["outputs"]) for h in final["history"]) == 8
    assert final["history_note"].startswith("iterations after 4:") and "DISCOMFORT_PANEL_HISTORY_FILES" in final["history_note"]
    run_dir = Path(panel.work_dir) / "output" / "discomfort" / run_id
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["00001", "00002", "00003", "00004"]
    want = expected_values(5)  # the final values are those of all 5 iterations
    for o in final["outputs"]:
        got = pixels(run_dir / o["filename"])
        assert abs(int(got.max()) - want[o["key"]]) <= 1, (o, got.max(), want)


def test_second_run_and_cancel(panel, http, tmp_path):
    """While a run is held inside a workflow: a second one from the same address is 429 (this
    server allows one per address), a request without its token cannot cancel it, its token can;
    the queue is then empty and the run's memory gone."""
    fifo = Fifo(tmp_path / "started")
    workflows = Path(panel.work_dir) / "user" / "default" / "workflows"
    (workflows / "hold_routes.json").write_text(json.dumps(hold_workflow(fifo.path, str(tmp_path / "never"))))
    try:
        resp = http("POST", "/discomfort/panel/runs", json=start_body(["hold_routes"], client_id="spoofed-1"))
        assert resp.status_code == 202, resp.text
        run_id, token = resp.json()["run_id"], resp.json()["token"]
        assert fifo.wait(), "the gate node never started"
        assert shm_files(run_id), "the running run has no shared memory?"
        second = start_body(client_id="spoofed-2")  # another client id is no other slot
        assert_error(http("POST", "/discomfort/panel/runs", json=second), 429, "RemoteLimitError", "this address")
        listed = http("GET", "/discomfort/panel/runs", headers={TOKEN: token}).json()["runs"]
        assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "running")]
        assert_error(http("POST", f"/discomfort/panel/runs/{run_id}/cancel", json={"client_id": "spoofed-1"}), 404)
        resp = http("POST", f"/discomfort/panel/runs/{run_id}/cancel", headers={TOKEN: token})
        assert resp.status_code == 200 and resp.json()["cancelling"] is True
        final = until_finished(http, run_id, token)[-1]
    finally:
        fifo.close()
    assert final["state"] == "cancelled" and final["error_type"] == "RunCancelled", final
    assert final["error"].startswith("cancelled inside workflow 1/1 (hold_routes.json) of iteration 1/3"), final
    queue = http("GET", "/queue").json()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert shm_files(run_id) == []
    assert not (Path(panel.work_dir) / "output" / "discomfort" / run_id).exists()


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def page(panel):
    sync_playwright = require_browser()

    with sync_playwright() as pw:
        browser = launch(pw)
        pg = open_editor(browser, panel.url, "window.app && window.app.graph && window.comfyAPI.api.api.clientId")
        close_templates(pg)
        listen(pg)
        yield pg
        browser.close()


def add_workflows(pg, names) -> None:
    """Add saved workflows to the panel's list, in order, as a user picks them."""
    for name in names:
        pg.select_option("[data-dcf=workflow-select]", name)
        pg.click("[data-dcf=add-workflow]")


def open_panel(pg) -> None:
    """Open the Discomfort tab of the sidebar as a user does: its button, named by its tooltip."""
    pg.get_by_role("button", name=re.compile(r"^Discomfort: run saved workflows")).click()


def listen(pg) -> None:
    """Collect the panel's progress events of this page (and any that ComfyUI's socket would bring),
    and how many iterations' outputs the panel showed when each workflow started (the panel
    handles an event before it dispatches it)."""
    pg.evaluate("""() => { window.__dcf = []; window.__dcfShown = [];
        window.addEventListener('discomfort.progress', e => window.__dcf.push(e.detail));
        window.addEventListener('discomfort.progress', e => { if (e.detail.kind === 'workflow_start')
            window.__dcfShown.push([e.detail.run_id, e.detail.iteration,
                                    document.querySelectorAll('[data-dcf=iteration-outputs]').length]); });
        window.comfyAPI.api.api.addEventListener('discomfort.progress', e => window.__dcf.push(e.detail)); }""")


def fetch_status(pg, method: str, route: str) -> int:
    """The status a page's own fetch (with its cookies, no token) gets."""
    return pg.evaluate("""async ([m, r]) => (await fetch(r, {method: m, headers: {'Content-Type': 'application/json'},
        body: m === 'POST' ? '{}' : undefined})).status""", [method, route])


def finished_event(pg, run_id: str) -> dict:
    pg.wait_for_function("(id) => window.__dcf.some(e => e.kind === 'finished' && e.run_id === id)", arg=run_id,
                         timeout=120_000)
    return pg.evaluate("(id) => window.__dcf.filter(e => e.run_id === id)", run_id)


def test_panel_in_the_editor(panel, page, tmp_path):
    """Open the panel, choose A then B, bind the image, 3 iterations, run; check the outputs; then
    cancel a held run from the panel (confirmed in the frontend's dialog)."""
    pg = page
    art = artifacts_dir()
    open_panel(pg)
    pg.wait_for_selector("[data-dcf=workflow-select] option[value='blend.json']", state="attached")
    add_workflows(pg, ("invert.json", "blend.json"))
    pg.wait_for_selector("li[data-workflow='blend.json'] .dcf-ports li[data-key=inverted]")
    pg.wait_for_selector("li[data-workflow='invert.json'] .dcf-ports li[data-key=image]")
    chips = pg.locator("li[data-workflow='invert.json'] .dcf-ports li").all_inner_texts()
    assert chips == ["image IMAGE input", "inverted * output"], chips
    assert pg.locator("[data-binding]").evaluate_all("els => els.map(e => e.dataset.binding)") == ["image"]
    pg.select_option("[data-dcf=input-file-image]", "start.png")
    pg.fill("[data-dcf=iterations]", "3")
    pg.screenshot(path=str(art / "panel_before.png"))

    pg.click("[data-dcf=run]")
    pg.wait_for_selector("[data-dcf=status][data-state=running], [data-dcf=status][data-state=finished]")
    run_id = pg.get_attribute("[data-dcf=status]", "data-run")
    seen = finished_event(pg, run_id)
    pg.wait_for_selector("[data-dcf=status][data-state=finished]")
    pg.locator("[data-dcf=outputs]").scroll_into_view_if_needed()  # its images load once in view
    pg.wait_for_function("() => { const i = [...document.querySelectorAll('[data-dcf=outputs] img')];"
                         " return i.length === 2 && i.every(x => x.complete && x.naturalWidth === 8); }")
    # Every iteration's outputs, newest first, each image loaded (found by its name, as a reader would).
    for n in (1, 2, 3):
        for key in ("image", "inverted"):
            img = pg.get_by_role("img", name=f"{key}, iteration {n}", exact=True)
            img.scroll_into_view_if_needed()
            pg.wait_for_function("(e) => e.complete && e.naturalWidth === 8", arg=img.element_handle())
    assert [int(x) for x in pg.locator("[data-dcf=iteration-outputs]").evaluate_all(
        "els => els.map(e => e.dataset.iteration)")] == [3, 2, 1]
    pg.get_by_text("Iteration 1", exact=True).scroll_into_view_if_needed()
    pg.screenshot(path=str(art / "panel_after.png"))
    pg.locator("section", has=pg.locator("[data-dcf-slot=history]")).screenshot(path=str(art / "panel_iterations.png"))
    kinds = [e["kind"] for e in seen]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("workflow_done") == 6
    assert any(e["kind"] == "step" and e["max"] == 4 for e in seen)
    assert sorted(f.get_attribute("data-key") for f in pg.locator("[data-dcf=outputs] figure").all()) == ["image", "inverted"]
    want = expected_values(3)
    for o in seen[-1]["outputs"]:
        got = pixels(Path(panel.work_dir) / "output" / o["subfolder"] / o["filename"])
        assert abs(int(got.max()) - want[o["key"]]) <= 1 and got.min() == got.max(), (o, got.max(), want)
    check_history(panel, seen, 3)
    # As they arrived: when iteration k's first workflow started, the panel showed k iterations' outputs.
    shown = pg.evaluate("(id) => window.__dcfShown.filter(r => r[0] === id).map(r => [r[1], r[2]])", run_id)
    assert shown == [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2], [2, 2]], shown

    # A second run, held by the gate, cancelled from the panel.
    fifo = Fifo(tmp_path / "started")
    workflows = Path(panel.work_dir) / "user" / "default" / "workflows"
    (workflows / "hold_panel.json").write_text(json.dumps(hold_workflow(fifo.path, str(tmp_path / "never"))))
    try:
        pg.click("[data-dcf=refresh]")
        pg.wait_for_selector("[data-dcf=workflow-select] option[value='hold_panel.json']", state="attached")
        while pg.locator("[data-dcf=remove]").count():
            pg.locator("[data-dcf=remove]").first.click()
        add_workflows(pg, ["hold_panel.json"])
        pg.wait_for_selector("li[data-workflow='hold_panel.json'] .dcf-ports li[data-key=held]")
        pg.select_option("[data-dcf=input-file-image]", "start.png")
        pg.click("[data-dcf=run]")
        assert fifo.wait(), "the gate node never started"
        pg.wait_for_selector("[data-dcf=status][data-state=running] [data-dcf=node]")
        run2 = pg.get_attribute("[data-dcf=status]", "data-run")
        assert run2 != run_id and shm_files(run2)
        pg.wait_for_function("() => document.querySelector('[data-dcf=node]').textContent.includes('Gate')")
        pg.screenshot(path=str(art / "panel_during.png"))
        token = pg.evaluate("() => sessionStorage.getItem('discomfort.panel.tokens')")
        assert run2 in token  # the page keeps its runs' tokens in its own tab

        # Another browser context on the same server: no token, so no run to see, follow or cancel.
        # (no Templates dialog there: the server's user settings say it was shown)
        other = open_editor(pg.context.browser, panel.url, "window.app && window.app.graph")
        listen(other)
        open_panel(other)
        other.wait_for_selector("[data-dcf=status][data-state=idle]")
        assert other.evaluate("async () => (await (await fetch('/discomfort/panel/runs')).json()).runs") == []
        assert fetch_status(other, "POST", f"/discomfort/panel/runs/{run2}/cancel") == 404
        assert fetch_status(other, "GET", f"/discomfort/panel/runs/{run2}/events?after=0") == 404
        assert fetch_status(other, "GET", f"/discomfort/panel/runs/{run2}") == 404
        other.screenshot(path=str(art / "panel_other_context.png"))
        assert pg.get_attribute("[data-dcf=status]", "data-state") == "running"  # not cancelled by it
        pg.click("[data-dcf=cancel]")
        pg.get_by_role("button", name="Confirm").click()
        seen2 = finished_event(pg, run2)
    finally:
        fifo.close()
    pg.wait_for_selector("[data-dcf=status][data-state=cancelled]")
    pg.screenshot(path=str(art / "panel_cancelled.png"))
    assert seen2[-1]["state"] == "cancelled", seen2[-1]
    assert other.evaluate("() => window.__dcf") == []  # the other context received none of its events
    assert other.get_attribute("[data-dcf=status]", "data-state") == "idle"
    other.context.close()
    import requests

    queue = requests.get(panel.url + "/queue", timeout=30).json()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert shm_files(run2) == []
