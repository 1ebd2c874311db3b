"""Attacks through recipes, against the session's launched ComfyUI server.

A recipe is code for the server that stitches it: data (an input, a file's JSON, a value another
server returned) never becomes one, and a Recipe that did not come from this process's own
workflows is checked against the server before it is stitched. Every recipe is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from discomfort import Run
from discomfort.errors import RunCancelled
from discomfort.recipes import MAX_STITCHED, Recipe, RecipeError, check_recipe, stitch_recipe, types_digest
from discomfort.remote import RemoteContext
from discomfort.run_control import CancelToken

pytestmark = pytest.mark.comfy

HERE = Path(__file__).resolve().parent


def _port(uid: str, source: list | None = None) -> dict:
    inputs: dict = {"unique_id": uid}
    if source is not None:
        inputs["input_data"] = source
    return {"class_type": "DiscomfortPort", "inputs": inputs}


PASS = {"1": _port("x"), "2": _port("y", ["1", 0])}  # y = x, whatever x is
USE = {"1": _port("model"), "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
       "3": _port("report", ["2", 0])}
SAVER = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "recipe_attack"}}}
READER = {"1": {"class_type": "LoadImage", "inputs": {"image": "private.png"}}}


def _recipe_json(key: str, nodes: dict, output: list, info: dict | None, inputs: dict | None = None) -> dict:
    types = {e["class_type"] for e in nodes.values()} - {"DiscomfortPort"}
    return {"discomfort_recipe": 1, "key": key, "nodes": nodes, "output": output, "inputs": inputs or {},
            "types": types_digest(types, info) if info is not None else ""}


@pytest.fixture(scope="module")
def info(server):
    return server.object_info()


def _files(server) -> list[Path]:
    return sorted(p for p in (Path(server.work_dir) / "output").rglob("*") if p.is_file())


@pytest.fixture
def hostile(info):
    """A second server in a process of its own whose values are recipe-shaped dicts."""
    values = {"saver": _recipe_json("x", SAVER, ["1", 0], info), "reader": _recipe_json("x", READER, ["1", 0], info)}
    proc = subprocess.Popen([sys.executable, str(HERE / "_hostile_recipe_server.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps(values) + "\n")
        proc.stdin.flush()
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}", values
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_recipe_shaped_value_from_another_server_stays_data(server, hostile):
    """(a) What a hostile server returns, passed on as an input, is a value: no node of it runs."""
    url, values = hostile
    with RemoteContext(url) as rc:
        got = {k: rc.load(k) for k in values}
    assert got == values  # the dicts arrived as they were sent
    before = _files(server)
    with Run(server, transport="shm") as run:
        for name, value in got.items():
            out = run.execute(PASS, {"x": value}, timeout=120)
            assert out["y"] == value, name  # stored as data and passed through as data
            assert "x" not in run._recipes
    assert _files(server) == before  # no SaveImage ran: nothing written in the server's output folder


def test_a_recipe_shaped_input_is_data_in_run_sequential(server, info):
    """(a) The same dict given directly (a panel or CLI .json input gets here the same way)."""
    from discomfort.sequential import run_sequential

    value = _recipe_json("x", SAVER, ["1", 0], info)
    before = _files(server)
    assert run_sequential(PASS, {"x": value}, executor=server, transport="shm", timeout=120)["y"] == value
    assert _files(server) == before


@pytest.mark.parametrize("nodes, output, match", [
    (SAVER, ["1", 0], r"node 2 \(SaveImage\) is an output node"),
    (READER, ["1", 0], r"node 1 \(LoadImage\) reads a file named by a value"),
    ({"1": {"class_type": "LoadImageOutput", "inputs": {"image": "x.png [output]"}}}, ["1", 0],
     r"node 1 \(LoadImageOutput\) reads a file"),
    ({"1": {"class_type": "NoSuchNode", "inputs": {}}}, ["1", 0], r"node 1 \(NoSuchNode\) is not a node type"),
    ({"1": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "someone-else", "unique_id": "k"}}},
     ["1", 0], r"node 1 \(DiscomfortDataLoader\)"),
])
def test_an_untrusted_recipe_with_a_refused_node_is_refused_naming_it(server, info, nodes, output, match):
    """(b) An explicit Recipe from outside this process: its nodes are checked against the server."""
    recipe = Recipe.from_json(_recipe_json("model", nodes, output, info))
    before = _files(server)
    with Run(server, transport="shm") as run:
        with pytest.raises(RecipeError, match=match):
            run.execute(USE, {"model": recipe}, timeout=120)
    assert _files(server) == before


def test_an_untrusted_recipe_needs_the_right_types_digest(server, info):
    """(b) No digest, or one made for other definitions: refused before anything runs."""
    nodes = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "travelling"}}}
    empty = Recipe.from_json({**_recipe_json("model", nodes, ["1", 0], info), "types": ""})
    wrong = Recipe.from_json({**_recipe_json("model", nodes, ["1", 0], info), "types": "0" * 64})
    with Run(server, transport="shm") as run:
        with pytest.raises(RecipeError, match="has no types digest"):
            run.execute(USE, {"model": empty}, timeout=120)
        with pytest.raises(RecipeError, match="other definitions of DiscomfortTestModelLoader"):
            run.execute(USE, {"model": wrong}, timeout=120)
        good = Recipe.from_json(_recipe_json("model", nodes, ["1", 0], info))  # the control case runs
        assert run.execute(USE, {"model": good}, timeout=120)["report"].startswith("name=travelling")


def test_cycles_are_refused_before_anything_runs(server, info):
    """(c) Ports linked to each other, a recipe that holds itself, a key whose recipe needs it further in."""
    loader = {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "travelling"}}
    ports = Recipe.from_json(_recipe_json("model", {"1": _port("a", ["2", 0]), "2": _port("b", ["1", 0]),
                                                    "3": loader}, ["1", 0], info))
    selfish = Recipe.from_json(_recipe_json("model", {"1": _port("inner"), "3": loader}, ["3", 0], info))
    selfish.inputs["inner"] = {"recipe": selfish}
    inner = _recipe_json("inner", {"1": _port("model"), "2": loader}, ["2", 0], info, {"model": {"key": "model"}})
    with pytest.raises(RecipeError, match="'model' needs 'model' itself, through its inputs: a cycle"):
        Recipe.from_json(_recipe_json("model", {"1": _port("inner"), "2": loader}, ["2", 0], info,
                                      {"inner": {"recipe": inner}}))
    events: list = []
    with Run(server, transport="shm") as run:
        for recipe, match in [(ports, r"links node \d back to node \d: a cycle"), (selfish, "holds itself")]:
            with pytest.raises(RecipeError, match=match):
                run.execute(USE, {"model": recipe}, timeout=120, on_progress=events.append)
    assert events == []  # refused before the workflow started


def _bomb(info: dict, width: int = 60, levels: int = 4) -> Recipe:
    """1 + width * levels nodes (241, 18 KB of JSON: within MAX_NODES and MAX_JSON): ``width``
    ports per level, each reading the level below, so that stitching it would make width**levels."""
    level = _recipe_json("l0", {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "b"}}},
                         ["1", 0], info)
    for d in range(1, levels + 1):
        nodes = {str(i): _port(f"l{d - 1}") for i in range(1, width + 1)}
        level = _recipe_json(f"l{d}", nodes, ["1", 0], info, {f"l{d - 1}": {"recipe": level}})
    return Recipe.from_json(level)


def test_a_nesting_bomb_is_refused_by_the_stitched_size_cap(server, info):
    """(d) Small as JSON, huge once stitched: refused by counting, before any node is stitched."""
    bomb = _bomb(info)
    assert bomb.node_count() == 241 and len(json.dumps(bomb.to_json())) < 20 << 10
    with Run(server, transport="shm") as run:
        with pytest.raises(RecipeError, match=f"over {MAX_STITCHED} nodes once its nested recipes are stitched"):
            run.execute(USE, {"model": bomb}, timeout=120)


def test_a_long_stitch_stops_when_the_run_is_cancelled(info):
    """Cancel is looked at between stitch steps: a token cancelled, or a callable saying so, stops it."""
    recipe = _bomb(info, width=8, levels=2)  # 64 nodes once stitched: within the cap
    sent = {"7": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "model"}}}
    token = CancelToken()
    out = stitch_recipe(dict(sent), "7", recipe, "r", info, cancel=token)
    assert [e["class_type"] for e in out.values()] == ["DiscomfortTestModelLoader"] * 64
    asked: list[int] = []
    with pytest.raises(RunCancelled, match="stitching"):  # cut after 5 of its 73 steps
        stitch_recipe(dict(sent), "7", recipe, "r", info, cancel=lambda: asked.append(1) or len(asked) > 5)
    assert len(asked) == 6
    token.cancel("stop")
    with pytest.raises(RunCancelled, match="stitching"):
        stitch_recipe(dict(sent), "7", recipe, "r", info, cancel=token)


def test_model_loaders_from_another_server_are_accepted(info):
    """(e) CheckpointLoaderSimple + LoraLoader as JSON from another server: accepted and stitched
    (these types exist without model files; running them needs the files)."""
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "style.safetensors",
                                                          "strength_model": 0.8, "strength_clip": 0.8}}}
    recipe = Recipe.from_json(json.loads(json.dumps(_recipe_json("model", nodes, ["2", 0], info))))
    assert not recipe.trusted and check_recipe(recipe, info) == 2
    sent = {"7": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "model"}},
            "8": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["7", 0]}}}
    out = stitch_recipe(sent, "7", recipe, "r", info)
    assert sorted(e["class_type"] for e in out.values()) == \
        ["CheckpointLoaderSimple", "DiscomfortTestModelReport", "LoraLoader"]
    lora = next(k for k, e in out.items() if e["class_type"] == "LoraLoader")
    assert out["8"]["inputs"]["model"] == [lora, 0]


def test_a_recipe_shaped_json_bound_in_the_panel_is_data(server, info):
    """(a) The reported attack: a .json uploaded through ComfyUI's /upload/image, bound to a port in
    the panel, used to run its SaveImage. Now the run passes it through as a value."""
    import requests

    workflows = Path(server.work_dir) / "user" / "default" / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    (workflows / "recipe_pass.json").write_text(json.dumps(PASS))
    evil = _recipe_json("x", SAVER, ["1", 0], info)
    with requests.Session() as http:
        up = http.post(server.url + "/upload/image", timeout=60,
                       files={"image": ("evil_recipe.json", json.dumps(evil).encode(), "application/json")})
        assert up.status_code == 200, up.text
        before = _files(server)
        resp = http.post(server.url + "/discomfort/panel/runs", timeout=60, json={
            "workflows": ["recipe_pass"], "iterations": 1, "inputs": {"x": {"file": up.json()["name"]}}})
        assert resp.status_code == 202, resp.text
        run_id, token = resp.json()["run_id"], resp.json()["token"]
        events, after = [], 0
        while not events or events[-1]["kind"] != "finished":  # the run's event route, long-polled
            body = http.get(f"{server.url}/discomfort/panel/runs/{run_id}/events", params={"after": after},
                            headers={"X-Discomfort-Panel-Token": token}, timeout=60).json()
            events, after = events + body["events"], body["next"]
    final = events[-1]
    assert final["state"] == "finished", final
    written = [p for p in _files(server) if p not in before]
    # the final value and iteration 1's (the panel keeps each iteration's outputs): nothing else was written
    assert sorted(p.name for p in written) == ["y.json", "y.json"]
    assert [o["filename"] for o in final["outputs"] if o["key"] == "y"] == ["y.json"]
    assert all(json.loads(p.read_text()) == evil for p in written)  # the dict came back as the value it was
