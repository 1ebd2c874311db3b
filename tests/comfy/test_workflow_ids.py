"""Workflows as frontend 1.58.1 loads them: inner ids renumbered, disabled subgraphs, node pack
metadata (pure data, no ComfyUI; the fixtures' prompts were recorded from 1.58.1)."""

from __future__ import annotations

import copy

import pytest

from test_workflow_format import _load, object_info  # noqa: F401 - the fixtures' object_info, shared

from discomfort.workflows.format import Control, load_workflow, node_pack_meta, ui_to_api
from discomfort.workflows.ids import normalise


def _inner_ids(workflow):
    return [[n["id"] for n in sg["nodes"]] for sg in normalise(workflow)[1]]


def test_colliding_ids_take_the_next_ids_after_last_node_id():
    wf = _load("ui_subgraph_ids_collide.json")  # root 1..5; inner [1, 3, 5] and [3, 4, 1]
    assert _inner_ids(wf) == [[6, 7, 8], [9, 10, 11]]
    wf["last_node_id"] = 40
    assert _inner_ids(wf) == [[41, 42, 43], [44, 45, 46]]  # as 1.58.1 gives (checked in the browser)
    wf["definitions"]["subgraphs"][1]["nodes"][0]["id"] = 41  # free before, taken by a minted id after
    assert _inner_ids(wf) == [[41, 42, 43], [44, 45, 46]]


def test_ids_free_in_the_workflow_stay_and_raise_the_next_id():
    wf = _load("ui_subgraph_nested.json")  # root 1..5, inner 20..22 and 30..31: no collision
    assert _inner_ids(wf) == [[20, 21, 22], [30, 31]]
    wf["definitions"]["subgraphs"][1]["nodes"][0]["id"] = 20  # taken by the first definition
    assert _inner_ids(wf) == [[20, 21, 22], [23, 31]]  # one past the highest id seen so far


def test_links_and_proxy_widgets_follow_renumbered_ids(object_info):
    wf = _load("ui_subgraph_ids_collide.json")
    wf["nodes"][1]["properties"]["proxyWidgets"] = [["5", "blend_mode"], ["-1", "value"]]
    _, definitions = normalise(wf)
    outer = definitions[0]
    assert {(link["origin_id"], link["target_id"]) for link in outer["links"]} >= {(6, 7), (7, 8), (8, -20)}
    root, _ = normalise(wf)
    assert root[1]["properties"]["proxyWidgets"] == [["8", "blend_mode"], ["-1", "value"]]
    assert wf["nodes"][1]["properties"]["proxyWidgets"][0] == ["5", "blend_mode"]  # the input is not changed


def test_nested_definitions_are_read():
    """A definition may carry its own ``definitions.subgraphs`` (flattened after it, as 1.58.1)."""
    wf = _load("ui_subgraph_nested.json")
    outer, inner = wf["definitions"]["subgraphs"]
    wf["definitions"]["subgraphs"] = [dict(outer, definitions={"subgraphs": [inner]})]
    assert _inner_ids(wf) == [[20, 21, 22], [30, 31]]


def test_controls_follow_the_renumbering(object_info):
    """A seed widget inside a renumbered subgraph node: its control names the node's prompt id."""
    wf = _load("ui_subgraph_ids_collide.json")
    inner = wf["definitions"]["subgraphs"][1]
    inner["nodes"].append({"id": 2, "type": "RandomNoise", "mode": 0, "inputs": [], "outputs": [],
                           "properties": {}, "widgets_values": [5, "increment"]})
    controls: list[Control] = []
    prompt = ui_to_api(wf, object_info, controls=controls)
    assert prompt["2:7:12"]["inputs"]["noise_seed"] == 5  # inner 2 collides with root 2: renumbered 12
    assert [(c.node, c.input, c.mode) for c in controls] == [("2:7:12", "noise_seed", "increment")]


@pytest.mark.parametrize("mode", [2, 4])
def test_disabled_subgraph_sends_none_of_its_nodes_even_of_unknown_types(mode, object_info):
    wf = _load("ui_subgraph_nested.json")
    wf["nodes"][1]["mode"] = mode
    inner = wf["definitions"]["subgraphs"][1]
    inner["nodes"].append({"id": 33, "type": "NotInstalledHere", "mode": 0, "inputs": [], "outputs": []})
    prompt = load_workflow(wf, object_info)
    assert not [k for k in prompt if k.startswith("2:")]
    assert ("images" in prompt["3"]["inputs"]) == (mode == 4)  # bypass passes IMAGE through; mute drops it


def test_a_muted_subgraph_node_output_is_dropped_not_followed(object_info):
    prompt = load_workflow(_load("ui_subgraph_muted_nested.json"), object_info)
    assert "image1" not in prompt["2:22"]["inputs"] and "mask" not in prompt["4"]["inputs"]


@pytest.mark.parametrize("props, meta", [
    ({"cnr_id": "comfy-core", "ver": "0.3.75"}, {"cnr_id": "comfy-core", "ver": "0.3.75"}),
    ({"aux_id": "someone/some-pack", "ver": "v1.2.3"}, {"aux_id": "someone/some-pack", "ver": "1.2.3"}),
    ({"cnr_id": "pack", "ver": "4f2a9c1"}, {"cnr_id": "pack", "ver": "4f2a9c1"}),  # a commit hash
    ({"ver": "unknown"}, {"ver": "unknown"}),
    ({"cnr_id": "-bad", "aux_id": "no-slash", "ver": "1.2"}, {}),  # invalid: left out
    ({"cnr_id": 3, "aux_id": "a/b/c", "ver": None}, {}),
    ({"aux_id": "bad--user/repo"}, {}),
])
def test_node_pack_meta(props, meta):
    assert node_pack_meta({"properties": props}) == meta


def test_recorded_fixture_still_matches_after_copying(object_info):
    """The converter does not change the workflow it converts (renumbering works on a copy)."""
    wf = _load("ui_subgraph_ids_collide.json")
    before = copy.deepcopy(wf)
    assert load_workflow(wf, object_info) == _load("ui_subgraph_ids_collide.api.json")
    assert wf == before
