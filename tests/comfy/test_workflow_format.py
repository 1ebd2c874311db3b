"""UI-format conversion, port discovery and stitching: pure data, no ComfyUI needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from discomfort.errors import UnsupportedWorkflowError
from discomfort.workflow_format import (
    INPUT,
    OUTPUT,
    PASSTHRU,
    discover_port_nodes,
    discover_ports,
    is_api_format,
    load_workflow,
    port_mode_in_prompt,
    stitch,
    widget_layout,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WORKFLOWS = FIXTURES / "workflows"


@pytest.fixture(scope="module")
def object_info():
    return json.loads((FIXTURES / "object_info_subset.json").read_text())


def _load(name):
    return json.loads((WORKFLOWS / name).read_text())


CONVERTIBLE = [
    "ui_basic",  # plain widgets and links
    "ui_seed_control",  # control_after_generate values after seed / noise_seed, upload button
    "ui_widget_input",  # a widget converted to an input, linked from a real node
    "ui_reroute",  # Reroute nodes followed through
    "ui_primitive",  # PrimitiveNode value inlined into its consumers
    "ui_notes_groups",  # Note / MarkdownNote dropped, groups ignored
    "ui_muted",  # mode 2: dropped, links to it removed
    "ui_bypass",  # mode 4: inputs passed through to outputs of the same type
    "ui_ports",  # DiscomfortPort nodes
]


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_ui_to_api_matches_expected(name, object_info):
    converted = load_workflow(WORKFLOWS / f"{name}.json", object_info)
    expected = _load(f"{name}.api.json")
    assert converted == expected


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_converted_prompt_is_json_and_api_format(name, object_info):
    converted = load_workflow(_load(f"{name}.json"), object_info)
    assert is_api_format(converted)
    assert json.loads(json.dumps(converted)) == converted


@pytest.mark.parametrize(
    "name, node_id, node_type, words",
    [
        ("ui_subgraph", "2", "5a8c2e0f-3f7e-4c1a-9a57-0b6f6d2c9e11", "subgraph"),
        ("ui_unknown_node", "2", "SomeMissingCustomNode", "unknown node type"),
        ("ui_group_node", "2", "workflow>InvertTwice", "group node"),
    ],
)
def test_unsupported_features_name_the_node(name, node_id, node_type, words, object_info):
    with pytest.raises(UnsupportedWorkflowError) as info:
        load_workflow(WORKFLOWS / f"{name}.json", object_info)
    msg = str(info.value)
    assert f"node {node_id}" in msg and node_type in msg and words in msg
    assert isinstance(info.value, ValueError)


def test_widget_count_mismatch_is_unsupported(object_info):
    wf = _load("ui_basic.json")
    wf["nodes"][0]["widgets_values"] = [64, 32]
    with pytest.raises(UnsupportedWorkflowError, match="node 1 .*EmptyImage.*2 widget values"):
        load_workflow(wf, object_info)


def test_widget_values_without_control_slots_are_accepted(object_info):
    wf = _load("ui_seed_control.json")
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"] = [123456789, 20, 8, "euler", "normal", 1]  # no "randomize"
    assert load_workflow(wf, object_info)["3"] == _load("ui_seed_control.api.json")["3"]


def test_link_objects_format(object_info):
    """Newer saves may store links as objects instead of arrays."""
    wf = _load("ui_bypass.json")
    wf["links"] = [
        {"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4], "type": l[5]}
        for l in wf["links"]
    ]
    assert load_workflow(wf, object_info) == _load("ui_bypass.api.json")


def test_widget_layout_control_slots(object_info):
    assert widget_layout(object_info["KSampler"]) == [
        "seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_layout(object_info["RandomNoise"]) == ["noise_seed", None]
    assert widget_layout(object_info["EmptyImage"]) == ["width", "height", "batch_size", "color"]
    assert widget_layout(object_info["LoadImage"]) == ["image", None]
    assert widget_layout(object_info["DiscomfortPort"]) == ["unique_id"]


def test_api_format_passes_through_unchanged(object_info):
    api = _load("ui_basic.api.json")
    out = load_workflow(copy.deepcopy(api))
    assert out == api
    assert load_workflow({"prompt": api}) == api  # a /prompt body
    assert load_workflow(WORKFLOWS / "ui_basic.api.json", object_info) == api


def test_ui_format_needs_object_info():
    with pytest.raises(ValueError, match="object_info"):
        load_workflow(WORKFLOWS / "ui_basic.json")


def test_not_a_workflow():
    with pytest.raises(ValueError, match="not a ComfyUI workflow"):
        load_workflow({"foo": 1})


# ---- ports -------------------------------------------------------------------------------------


def test_discover_ports_modes_and_types(object_info):
    prompt = _load("ui_ports.api.json")
    ports = discover_ports(prompt, object_info)
    assert set(ports) == {"blank", "image_in", "inverted"}
    assert (ports["blank"].node_id, ports["blank"].mode, ports["blank"].type) == ("2", OUTPUT, "IMAGE")
    assert (ports["image_in"].node_id, ports["image_in"].mode, ports["image_in"].type) == ("3", INPUT, "IMAGE")
    assert (ports["inverted"].node_id, ports["inverted"].mode, ports["inverted"].type) == ("5", PASSTHRU, "IMAGE")
    assert ports["image_in"].reads and not ports["image_in"].writes
    assert ports["inverted"].writes and not ports["inverted"].reads


def test_discover_ports_without_object_info():
    ports = discover_ports(_load("ui_ports.api.json"))
    assert {u: (p.mode, p.type) for u, p in ports.items()} == {
        "blank": (OUTPUT, "*"), "image_in": (INPUT, "*"), "inverted": (PASSTHRU, "*")}


def _loop():
    return {
        "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image", "input_data": ["2", 0]}},
    }


def test_a_key_read_and_written_is_passthru(object_info):
    ports = discover_ports(_loop(), object_info)
    port = ports["image"]
    assert port.mode == PASSTHRU and port.type == "IMAGE"
    assert port.input_node_ids == ("1",) and port.output_node_ids == ("3",)
    assert port.reads and port.writes
    nodes = discover_port_nodes(_loop(), object_info)
    assert {n: p.mode for n, p in nodes.items()} == {"1": INPUT, "3": OUTPUT}
    assert port_mode_in_prompt(_loop(), "1") == INPUT


def test_port_type_through_other_ports(object_info):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "a", "input_data": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "b", "input_data": ["2", 0]}},
        "4": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "c"}},
        "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "d", "input_data": ["4", 0]}},
        "6": {"class_type": "InvertMask", "inputs": {"mask": ["5", 0]}},
    }
    ports = discover_ports(prompt, object_info)
    assert ports["b"].type == "LATENT" and ports["b"].mode == OUTPUT
    assert ports["a"].mode == PASSTHRU
    assert ports["c"].type == "MASK" and ports["c"].mode == INPUT


def test_port_without_unique_id_is_refused():
    with pytest.raises(UnsupportedWorkflowError, match="node 7"):
        discover_ports({"7": {"class_type": "DiscomfortPort", "inputs": {"unique_id": ["1", 0]}}})


# ---- stitching ---------------------------------------------------------------------------------


def _chain():
    a = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                         "width": 96, "height": 96, "crop": "disabled"}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "latent", "input_data": ["2", 0]}},
    }
    b = {
        "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "latent"}},
        "2": {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                         "width": 128, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "latent2", "input_data": ["2", 0]}},
    }
    return a, b


def test_stitch_links_output_to_next_inputs_consumers(object_info):
    a, b = _chain()
    s = stitch([a, b])
    assert s == {
        "1": a["1"],
        "2": a["2"],
        "3": a["3"],
        # b's INPUT port (would be "4") is gone; its consumer takes a's port source directly.
        "5": {"class_type": "LatentUpscale", "inputs": {"samples": ["2", 0], "upscale_method": "nearest-exact",
                                                         "width": 128, "height": 64, "crop": "disabled"}},
        "6": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "latent2", "input_data": ["5", 0]}},
    }
    ports = discover_ports(s, object_info)
    assert {u: p.mode for u, p in ports.items()} == {"latent": OUTPUT, "latent2": OUTPUT}


def test_stitch_loop_keeps_one_writer_per_key(object_info):
    s = stitch([_loop(), _loop(), _loop()])
    ports = discover_ports(s, object_info)
    assert list(ports) == ["image"]
    port = ports["image"]
    assert port.input_node_ids == ("1",) and len(port.output_node_ids) == 1
    # Three inverts in a chain from the one input to the one output.
    node = s[port.output_node_ids[0]]
    chain = []
    while node["class_type"] != "DiscomfortPort" or not chain:
        link = node["inputs"].get("input_data") or node["inputs"].get("image")
        node_id = link[0]
        node = s[node_id]
        chain.append(node["class_type"])
    assert chain == ["ImageInvert", "ImageInvert", "ImageInvert", "DiscomfortPort"]
    assert node_id == "1"


def test_stitch_passthru_writer_superseded():
    first = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x", "input_data": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    second = {
        "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x", "input_data": ["2", 0]}},
    }
    s = stitch([first, second])
    assert "2" not in s  # superseded PASSTHRU writer of "x"
    assert s["3"]["inputs"]["images"] == ["1", 0]
    assert s["5"]["inputs"]["image"] == ["1", 0]
    assert [p.node_id for p in discover_port_nodes(s).values()] == ["6"]


def test_stitch_keeps_unfed_inputs_and_renumbers():
    a, b = _chain()
    s = stitch([b, a])  # b first: its INPUT "latent" has no producer and stays
    ports = discover_ports(s)
    assert ports["latent"].mode == PASSTHRU  # read by b (node 1) and written by a (node 6)
    assert ports["latent"].input_node_ids == ("1",)
    assert sorted(s, key=int) == [str(i) for i in range(1, 7)]


def test_stitch_rejects_dangling_links():
    with pytest.raises(UnsupportedWorkflowError, match="not in the workflow"):
        stitch([{"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}])
