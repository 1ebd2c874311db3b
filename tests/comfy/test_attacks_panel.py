"""Attacks on the editor panel and the hosts the /discomfort routes answer (issue 23, items 2, 4-6),
each by a real attacker process (``_attacker_panel.py``) against the session's launched ComfyUI.

The victim is this test process: it starts panel runs with their tokens, as the panel's page does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from _helpers import Fifo, status_kib
from test_editor_panel import UIGraph, hold_workflow

pytestmark = pytest.mark.comfy

HERE = Path(__file__).resolve().parent
TOKEN = "X-Discomfort-Panel-Token"
T = 60


def attacker(mode: str, url: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "_attacker_panel.py"), mode, url, *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def two_images_workflow() -> dict:
    """a, b -> ImageBlend -> out: two IMAGE inputs."""
    g = UIGraph()
    a, b = g.port("a"), g.port("b")
    blend = g.node("ImageBlend", [0.5, "normal"], [("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")])
    out = g.port("out")
    g.link(a, 0, blend, 0)
    g.link(b, 0, blend, 1)
    g.link(blend, 0, out, 0)
    return g.json()


def invert_workflow() -> dict:
    """image -> ImageInvert -> inverted."""
    g = UIGraph()
    src = g.port("image")
    inv = g.node("ImageInvert", [], [("image", "IMAGE")], [("IMAGE", "IMAGE")])
    out = g.port("inverted")
    g.link(src, 0, inv, 0)
    g.link(inv, 0, out, 0)
    return g.json()


def pass_workflow() -> dict:
    """cfg -> cfg_out: one input of any type."""
    g = UIGraph()
    src, out = g.port("cfg"), g.port("cfg_out")
    g.link(src, 0, out, 0)
    return g.json()


@pytest.fixture(scope="module")
def folders(server):
    """The session server's saved workflows and input files for these attacks."""
    from PIL import Image

    work = Path(server.work_dir)
    workflows = work / "user" / "default" / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    inputs = work / "input"
    inputs.mkdir(exist_ok=True)
    (workflows / "atk_two.json").write_text(json.dumps(two_images_workflow()))
    (workflows / "atk_pass.json").write_text(json.dumps(pass_workflow()))
    (workflows / "atk_invert.json").write_text(json.dumps(invert_workflow()))
    (workflows / "atk_hold.json").write_text(json.dumps(hold_workflow("", str(work / "never"))))
    deep = "[" * 200_000 + "]" * 200_000
    (workflows / "atk_deep.json").write_text('{"nodes": ' + deep + ', "links": []}')
    chain = [{"id": f"sg{i}", "nodes": [{"id": 1, "type": f"sg{i + 1}", "inputs": [], "outputs": []}], "links": []}
             for i in range(5000)]  # subgraphs in subgraphs: shallow JSON, deep conversion
    (workflows / "atk_nested.json").write_text(json.dumps({
        "nodes": [{"id": 1, "type": "sg0"}], "links": [], "version": 0.4, "definitions": {"subgraphs": chain}}))
    (inputs / "deep.json").write_text(deep)
    Image.new("RGB", (8000, 8000)).save(inputs / "big.png", optimize=True)  # 8000x8000 in ~0.06 MB
    Image.new("RGB", (4000, 4000), (51, 51, 51)).save(inputs / "large.png")  # 192 MB as float32
    Image.fromarray(np.full((8, 8, 3), 51, np.uint8)).save(inputs / "start.png")
    return work


def error(resp: requests.Response, status: int, says: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert body["error"] and body["type"] and says in body["error"], body
    return body


def follow(url: str, run_id: str, token: str) -> dict:
    """Long-poll the run's events to its "finished" one."""
    after = 0
    while True:
        body = requests.get(f"{url}/discomfort/panel/runs/{run_id}/events", params={"after": after},
                            headers={TOKEN: token}, timeout=T).json()
        after = body["next"]
        done = [e for e in body["events"] if e["kind"] == "finished"]
        if done:
            return done[-1]


def test_dns_rebinding_is_refused(server):
    """A foreign Host (what a rebound name carries) or Origin gets 403 on every /discomfort route:
    no run, no token, no workflow list; IP literals and localhost still answer."""
    got = attacker("rebind", server.url)
    for name in ("runs_create", "runs_get", "panel_start", "panel_workflows", "panel_workflows_api", "panel_ports",
                 "host_info"):
        status, kind, token, listed = got[name]
        assert (status, kind, token, listed) == (403, "ForbiddenHost", False, False), (name, got[name])
    assert got["host_only"] == 403 and got["origin_null"] == 403 and got["origin_foreign"] == 403
    assert got["origin_other_port"] == 403
    assert got["control"] == 200
    port = server.url.rsplit(":", 1)[1]
    assert requests.get(f"http://localhost:{port}/discomfort/panel/workflows", timeout=T).status_code == 200


def test_dns_rebinding_on_the_standalone_run_server():
    """The run server outside ComfyUI checks hosts the same way."""
    from discomfort.remote.standalone import start

    with start("s" * 32) as (url, _proc):
        got = attacker("rebind", url)
        assert got["runs_create"][0] == 403 and got["runs_get"][0] == 403 and got["host_only"] == 403
        assert got["runs_create"][1] == "ForbiddenHost"
        assert requests.post(f"{url}/discomfort/runs", json={}, headers={"X-Discomfort-Secret": "s" * 32},
                             timeout=T).status_code == 200


def test_bystander_cannot_list_follow_or_cancel(server, folders, tmp_path):
    """The victim's client id is in /history and its run id in /queue: with them the attacker lists
    nothing, reads, follows and cancels nothing (404), and its sockets on /ws?clientId= of every
    client id it found carry no panel event; the victim's token cancels the run."""
    victim = "victim-" + uuid.uuid4().hex[:8]
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert requests.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": victim},
                         timeout=T).status_code == 200  # the victim's client id lands in /history
    fifo = Fifo(tmp_path / "started")
    work = folders / "user" / "default" / "workflows"
    (work / "atk_hold_fifo.json").write_text(json.dumps(hold_workflow(fifo.path, str(tmp_path / "never"))))
    proc = None
    try:
        body = {"client_id": victim, "workflows": ["atk_hold_fifo"], "inputs": {"image": {"file": "start.png"}}}
        resp = requests.post(f"{server.url}/discomfort/panel/runs", json=body, timeout=T)
        assert resp.status_code == 202, resp.text
        run_id, token = resp.json()["run_id"], resp.json()["token"]
        assert fifo.wait(), "the gate node never started"
        proc = subprocess.Popen([sys.executable, str(HERE / "_attacker_panel.py"), "snoop", server.url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert json.loads(proc.stdout.readline()) == {"ready": True}, proc.stderr.read()[-3000:]
        run = requests.get(f"{server.url}/discomfort/panel/runs/{run_id}", headers={TOKEN: token}, timeout=T).json()
        assert run["state"] == "running"  # the attacker's cancels did nothing
        assert requests.post(f"{server.url}/discomfort/panel/runs/{run_id}/cancel", headers={TOKEN: token},
                             timeout=T).json()["cancelling"] is True
        final = follow(server.url, run_id, token)
        out, err = proc.communicate("done\n", timeout=120)
        assert proc.returncode == 0, err[-3000:]
        got = json.loads(out.splitlines()[-1])
    finally:
        fifo.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
    assert final["state"] == "cancelled", final
    assert victim in got["editors"] and run_id in got["run_ids"]  # it had both ids
    for name, status, runs in got["routes"]:
        if name.startswith("list"):
            assert (status, runs) == (200, []), (name, status, runs)
        else:
            assert status == 404, (name, status)
    assert got["ws_discomfort"] == [] and "execution_success" in got["ws_types"], got["ws_types"]


def test_made_up_client_ids_take_no_more_slots(server, folders):
    """Runs started under four made-up client ids from one address: two go (the address's limit),
    the rest are 429; its own runs cancel and end, and their slots are free again."""
    got = attacker("slots", server.url, "atk_hold")
    assert got["statuses"] == [202, 202, 429, 429], got
    assert "this address" in got["refusal"]["error"] and got["refusal"]["type"] == "RemoteLimitError"
    assert got["ended"] == ["cancelled", "cancelled"]
    body = {"workflows": ["atk_pass"], "inputs": {"cfg": {"value": 7}}}
    resp = requests.post(f"{server.url}/discomfort/panel/runs", json=body, timeout=T)
    assert resp.status_code == 202, resp.text
    final = follow(server.url, resp.json()["run_id"], resp.json()["token"])
    assert final["state"] == "finished" and [o["kind"] for o in final["outputs"]] == ["json"], final


def test_inputs_cannot_amplify_memory_or_recurse(server, folders):
    """Two inputs bound to one 0.06 MB PNG of 8000x8000 (1.5 GB as float32): 413 before anything
    is decoded, the server's memory unchanged; a JSON input and a saved workflow nested 200000
    deep, and a saved workflow of 5000 subgraphs each inside the next: 400, not a RecursionError."""
    rss0 = status_kib(server.process.pid, "VmRSS")
    assert (folders / "input" / "big.png").stat().st_size < 200_000
    body = {"workflows": ["atk_two"], "inputs": {"a": {"file": "big.png"}, "b": {"file": "big.png"}}}
    error(requests.post(f"{server.url}/discomfort/panel/runs", json=body, timeout=T), 413,
          "DISCOMFORT_PANEL_MAX_RUN_INPUT_BYTES")
    assert status_kib(server.process.pid, "VmRSS") - rss0 < 200 * 1024
    body = {"workflows": ["atk_pass"], "inputs": {"cfg": {"file": "deep.json"}}}
    error(requests.post(f"{server.url}/discomfort/panel/runs", json=body, timeout=T), 400, "nests 200000 levels")
    error(requests.get(f"{server.url}/discomfort/panel/ports", params={"workflow": "atk_deep"}, timeout=T), 400,
          "nests 200001 levels")
    error(requests.get(f"{server.url}/discomfort/panel/ports", params={"workflow": "atk_nested"}, timeout=T), 400,
          "subgraphs nest 5000 levels")
    assert server.process.poll() is None


def test_ended_run_leaves_no_values_in_comfyui_cache(server, folders):
    """ComfyUI keeps its last prompt's outputs until the next prompt: once a panel run has ended,
    those of its own prompts (a 4000x4000 image: 192 MB each as float32) are released."""
    def one(image: str) -> dict:
        body = {"workflows": ["atk_invert"], "inputs": {"image": {"file": image}}}
        resp = requests.post(f"{server.url}/discomfort/panel/runs", json=body, timeout=T)
        assert resp.status_code == 202, resp.text
        return follow(server.url, resp.json()["run_id"], resp.json()["token"])

    assert one("start.png")["state"] == "finished"  # the same path, small
    anon0 = status_kib(server.process.pid, "RssAnon")
    final = one("large.png")
    assert final["state"] == "finished" and [o["kind"] for o in final["outputs"]] == ["image"], final
    # Private memory: the store's shared-memory pool keeps its segments mapped for the next runs
    # (RssShmem), by design and within its own limit.
    grown = status_kib(server.process.pid, "RssAnon") - anon0
    assert grown < 96 * 1024, f"the server holds {grown} KiB more after the run ended"
