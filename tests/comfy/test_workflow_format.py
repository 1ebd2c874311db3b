"""UI-format conversion, port discovery and stitching: pure data, no ComfyUI needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from discomfort.errors import UnsupportedWorkflowError
from discomfort.workflows.widgets import WidgetMismatchError
from discomfort.workflows.format import (
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
    "ui_subgraph_nested",  # subgraph in a subgraph, promoted widgets, bypass inside, links across
    # Expected prompts recorded from frontend 1.58.1 (tests/comfy/record_frontend_fixtures.py):
    "ui_subgraph_bypassed",  # a bypassed subgraph node: none of its nodes, IMAGE passed through
    "ui_subgraph_muted",  # a muted subgraph node: none of its nodes, links to it dropped
    "ui_subgraph_bypassed_nested",  # bypassed inside another subgraph (its preview node does not run)
    "ui_subgraph_muted_nested",
    "ui_subgraph_ids_collide",  # inner ids taken by outer nodes, two levels deep: renumbered on load
    "ui_preview_any",  # PreviewAny sends no preview; node pack ids in _meta
]
SAVED_BY_NEWEST = sorted(p.stem for p in (WORKFLOWS / "saved-1.58.1").glob("*.json"))


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_ui_to_api_matches_expected(name, object_info):
    converted = load_workflow(WORKFLOWS / f"{name}.json", object_info)
    expected = _load(f"{name}.api.json")
    assert converted == expected


@pytest.mark.parametrize("name", SAVED_BY_NEWEST)
def test_workflows_saved_by_the_newest_frontend_convert(name, object_info):
    """The fixtures as frontend 1.58.1 saves them after loading (renumbered ids, widgets_values_named,
    localized slot names) give the same prompt as the fixtures."""
    saved = _load(f"saved-1.58.1/{name}.json")
    assert load_workflow(saved, object_info) == _load(f"{name}.api.json")


def test_saved_by_the_newest_frontend_are_all_checked():
    assert len(SAVED_BY_NEWEST) == 6 and set(SAVED_BY_NEWEST) <= set(CONVERTIBLE)


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_converted_prompt_is_json_and_api_format(name, object_info):
    converted = load_workflow(_load(f"{name}.json"), object_info)
    assert is_api_format(converted)
    assert json.loads(json.dumps(converted)) == converted


@pytest.mark.parametrize(
    "name, node_id, node_type, words",
    [
        ("ui_subgraph", "2", "5a8c2e0f-3f7e-4c1a-9a57-0b6f6d2c9e11", "its subgraph does not have"),
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


def test_fewer_widget_values_take_the_defaults(object_info):
    """As the frontend: values fill widgets in order; the rest keep their defaults."""
    wf = _load("ui_basic.json")
    wf["nodes"][0]["widgets_values"] = [64, 32]
    out = load_workflow(wf, object_info)["1"]["inputs"]
    assert out == {"width": 64, "height": 32, "batch_size": 1, "color": 0}


def test_widget_values_without_control_slots_are_refused(object_info):
    """A save without the "control after generate" slots does not line up: refuse, name the input."""
    wf = _load("ui_seed_control.json")
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"] = [123456789, 20, 8, "euler", "normal", 1]
    with pytest.raises(WidgetMismatchError) as info:
        load_workflow(wf, object_info)
    assert (info.value.node_id, info.value.node_type, info.value.input, info.value.value) == (
        str(ks["id"]), "KSampler", "seed", 20)
    assert "control after generate" in str(info.value)


def test_link_objects_format(object_info):
    """Newer saves may store links as objects instead of arrays."""
    wf = _load("ui_bypass.json")
    wf["links"] = [
        {"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4], "type": l[5]}
        for l in wf["links"]
    ]
    assert load_workflow(wf, object_info) == _load("ui_bypass.api.json")


def test_widget_layout_control_slots(object_info):
    assert widget_layout(object_info["KSampler"], "KSampler") == [
        "seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_layout(object_info["RandomNoise"], "RandomNoise") == ["noise_seed", None]
    assert widget_layout(object_info["EmptyImage"], "EmptyImage") == ["width", "height", "batch_size", "color"]
    assert widget_layout(object_info["LoadImage"], "LoadImage") == ["image", None]
    assert widget_layout(object_info["DiscomfortPort"], "DiscomfortPort") == ["unique_id"]


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


# ---- issue 14: frontend-only widget values, widget-typed inputs, unknown types, subgraphs ----

# GeminiImageNode and MoonvalleyVideo2VideoNode as ComfyUI 0.3.75's /object_info describes them
# (API nodes; tooltips dropped): their seed-like widget is decided by the option, not the name.
GEMINI = {
    "input": {"required": {
        "prompt": ["STRING", {"default": "", "multiline": True}],
        "model": ["COMBO", {"default": "gemini-2.5-flash-image", "multiselect": False,
                            "options": ["gemini-2.5-flash-image-preview", "gemini-2.5-flash-image"]}],
        "seed": ["INT", {"default": 42, "min": 0, "max": 18446744073709551615, "control_after_generate": True}]},
        "optional": {"images": ["IMAGE", {}], "files": ["GEMINI_INPUT_FILES", {}],
                     "aspect_ratio": ["COMBO", {"default": "auto", "multiselect": False,
                                                "options": ["auto", "1:1", "16:9"]}],
                     "response_modalities": ["COMBO", {"multiselect": False, "options": ["IMAGE+TEXT", "IMAGE"]}]}},
    "input_order": {"required": ["prompt", "model", "seed"],
                    "optional": ["images", "files", "aspect_ratio", "response_modalities"]},
    "output": ["IMAGE", "STRING"], "display_name": "Google Gemini Image",
}
MOONVALLEY = {
    "input": {"required": {
        "prompt": ["STRING", {"multiline": True}], "negative_prompt": ["STRING", {"default": "", "multiline": True}],
        "seed": ["INT", {"default": 9, "min": 0, "max": 4294967295, "control_after_generate": False}],
        "video": ["VIDEO", {}], "steps": ["INT", {"default": 33, "min": 1, "max": 100}]},
        "optional": {"control_type": ["COMBO", {"default": "Motion Transfer", "multiselect": False,
                                                "options": ["Motion Transfer", "Pose Transfer"]}],
                     "motion_intensity": ["INT", {"default": 100, "min": 0, "max": 100}]}},
    "input_order": {"required": ["prompt", "negative_prompt", "seed", "video", "steps"],
                    "optional": ["control_type", "motion_intensity"]},
    "output": ["VIDEO"], "display_name": "Moonvalley Marey Video to Video",
}


def _one_node(typ, values, mode=0, inputs=()):
    return {"nodes": [{"id": 7, "type": typ, "mode": mode, "inputs": list(inputs), "outputs": [],
                       "widgets_values": values}], "links": []}


def test_gemini_control_value_is_not_taken_as_aspect_ratio(object_info):
    """(c) The template saved 5 values; the 6th widget (response_modalities) keeps its default."""
    info = dict(object_info, GeminiImageNode=GEMINI)
    out = load_workflow(_one_node("GeminiImageNode", ["a balloon", "gemini-2.5-flash-image-preview", 851454814947321,
                                                      "randomize", "auto"]), info)["7"]["inputs"]
    assert out == {"prompt": "a balloon", "model": "gemini-2.5-flash-image-preview", "seed": 851454814947321,
                   "aspect_ratio": "auto", "response_modalities": "IMAGE+TEXT"}


@pytest.mark.parametrize("values, input_name, bad", [
    (["p", "n", 3711400033, "randomize", "Motion Transfer", 100], "steps", "randomize"),
    (["p", "n", 7, 146344522, "randomize", 100], "control_type", "randomize"),
])
def test_moonvalley_stale_control_value_is_refused(values, input_name, bad, object_info):
    """(c) Saved when its seed had a control widget: the frontend would send these shifted."""
    info = dict(object_info, MoonvalleyVideo2VideoNode=MOONVALLEY)
    with pytest.raises(WidgetMismatchError) as err:
        load_workflow(_one_node("MoonvalleyVideo2VideoNode", values), info)
    assert (err.value.node_id, err.value.node_type, err.value.input, err.value.value) == (
        "7", "MoonvalleyVideo2VideoNode", input_name, bad)
    assert "node 7" in str(err.value) and "MoonvalleyVideo2VideoNode" in str(err.value)


@pytest.mark.parametrize("typ, values, expected", [
    ("Preview3D", ["", ""], {"model_file": "", "image": ""}),  # the 3D viewer's own value
    ("SaveGLB", ["mesh/ComfyUI", ""], {"filename_prefix": "mesh/ComfyUI", "image": ""}),
    ("GetImageSize", ["width: 1365, height: 768\n batch size: 1"], {}),  # its size display
    ("PreviewAny", [], {}),  # (f) 1.58.1 sends no preview (1.32.9 sent "preview": "")
    ("PreviewAny", ["old text"], {}),  # a value saved by an older frontend is not a widget's
    ("PreviewImage", ["extra", 1, 2], {}),  # trailing values the frontend ignores
])
def test_frontend_only_widget_values(typ, values, expected, object_info):
    """(b) Values only the frontend's widgets add: mapped or ignored as the frontend does."""
    assert load_workflow(_one_node(typ, values), object_info)["7"]["inputs"] == expected


@pytest.mark.parametrize("typ, values, widget_type", [
    ("WebcamCapture", ["", 512, 512, False, "capture"], "WEBCAM"),
    ("Load3D", ["example.glb", "upload3dmodel", "uploadExtraResources", "clear", "", 1024, 1024], "LOAD_3D"),
])
def test_browser_captured_widget_inputs_are_refused(typ, values, widget_type, object_info):
    """(d) Widget-typed inputs are widgets, not links; a browser capture cannot be reproduced."""
    with pytest.raises(UnsupportedWorkflowError, match=rf"node 7 .*{typ}.*'image' \({widget_type}\).*browser"):
        load_workflow(_one_node(typ, values), object_info)


def test_widget_typed_input_is_not_a_required_link(object_info):
    """(d) LOAD_3D / WEBCAM / PREVIEW_3D inputs are widgets: muted, such a node is just dropped."""
    assert load_workflow(_one_node("Load3D", ["example.glb"], mode=2), object_info) == {}


@pytest.mark.parametrize("mode", [2, 4])
def test_unknown_type_on_muted_or_bypassed_node(mode, object_info):
    """(e) A type the server lacks is dropped when muted; bypassed, its input passes through."""
    wf = {"nodes": [
        {"id": 1, "type": "EmptyImage", "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
         "widgets_values": [8, 8, 1, 0]},
        {"id": 2, "type": "SomeMissingCustomNode", "mode": mode,
         "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]},
        {"id": 3, "type": "PreviewImage", "inputs": [{"name": "images", "type": "IMAGE", "link": 2}]}],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}
    out = load_workflow(wf, object_info)
    assert set(out) == {"1", "3"}
    assert out["3"]["inputs"] == ({"images": ["1", 0]} if mode == 4 else {})


def test_dynamic_prompt_comments_and_single_choices(object_info):
    """CLIPTextEncode's text: comments stripped, {a} resolved; {a|b} is random: refused."""
    wf = {"nodes": [{"id": 4, "type": "CLIPTextEncode", "inputs": [], "widgets_values": ["a {red} cat // note"]}],
          "links": []}
    assert load_workflow(wf, object_info)["4"]["inputs"] == {"text": "a red cat "}
    wf["nodes"][0]["widgets_values"] = ["a {red|blue} cat"]
    with pytest.raises(UnsupportedWorkflowError, match="node 4 .*CLIPTextEncode.*'text'.*random"):
        load_workflow(wf, object_info)


def _nested():
    return _load("ui_subgraph_nested.json")


def test_nested_subgraph_ids_promoted_widgets_and_bypass(object_info):
    """Flattened as the frontend: "<outer>:<inner>" ids, values promoted across two levels."""
    out = load_workflow(_nested(), object_info)
    assert out["2:21:31"]["inputs"]["value"] == 0.9  # promoted twice, set on the outer instance
    assert out["2:22"]["inputs"]["blend_factor"] == 0.75
    assert out["2:21:30"]["inputs"]["image"] == ["1", 0]  # through the bypassed 2:20, across two boundaries
    assert "2:20" not in out and "2" not in out and "2:21" not in out
    assert out["4"]["inputs"]["mask"] == ["2:21:31", 0]  # out of two levels


def test_subgraph_input_linked_outside_wins_over_promoted_widget(object_info):
    wf = _nested()
    wf["nodes"].append({"id": 6, "type": "PrimitiveFloat", "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [5]}],
                        "widgets_values": [0.1]})
    wf["nodes"][1]["inputs"][1]["link"] = 5
    wf["links"].append([5, 6, 0, 2, 1, "FLOAT"])
    info = dict(object_info, PrimitiveFloat={"input": {"required": {"value": ["FLOAT", {}]}},
                                             "input_order": {"required": ["value"]}, "output": ["FLOAT"]})
    out = load_workflow(wf, info)
    assert out["2:22"]["inputs"]["blend_factor"] == ["6", 0]
    assert out["2:21:31"]["inputs"]["value"] == 0.9


def test_bypassed_subgraph_node_passes_its_input(object_info):
    wf = _nested()
    wf["nodes"][1]["mode"] = 4
    out = load_workflow(wf, object_info)
    assert out["3"]["inputs"]["images"] == ["1", 0]  # the instance's IMAGE output bypassed to its input
    assert "mask" not in out["4"]["inputs"]  # no MASK input to pass: the link is dropped


def test_subgraph_that_contains_itself_is_refused(object_info):
    wf = _nested()
    inner = wf["definitions"]["subgraphs"][1]
    inner["nodes"].append({"id": 40, "type": inner["id"], "inputs": [], "outputs": []})
    with pytest.raises(UnsupportedWorkflowError, match="contains itself"):
        load_workflow(wf, object_info)


# ---- discomfort convert --------------------------------------------------------------------


def test_cli_convert(tmp_path, capsys):
    from discomfort.cli import main

    out = tmp_path / "out.json"
    info = str(FIXTURES / "object_info_subset.json")
    assert main(["convert", str(WORKFLOWS / "ui_subgraph_nested.json"), "--object-info", info, "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == _load("ui_subgraph_nested.api.json")
    assert main(["convert", str(WORKFLOWS / "ui_unknown_node.json"), "--object-info", info]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node 2" in err and "SomeMissingCustomNode" in err
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(WORKFLOWS / "ui_basic.json")])  # neither --server nor --object-info
    assert usage.value.code == 2
