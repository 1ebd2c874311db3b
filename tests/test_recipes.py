"""Recipes of values passed by reference: extracting the producing part of a workflow, stitching
it into another (no ComfyUI needed: prompts are plain JSON)."""

from __future__ import annotations

import json

import pytest

from discomfort.errors import RunCancelled
from discomfort.recipes import (MAX_DEPTH, MAX_NODES, MAX_STITCHED, Recipe, RecipeError, check_recipe, extract,
                                stitch_recipe, types_digest)

INFO = {
    "Loader": {"input": {"required": {"name": ["STRING", {}]}}, "output": ["MODEL"], "output_node": False},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {}]}}, "output": ["MODEL"],
              "output_node": False},
    "Use": {"input": {"required": {"model": ["MODEL", {}], "image": ["IMAGE", {}]}}, "output": ["IMAGE"],
            "output_node": False},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_node": True},
    "DiscomfortPort": {"input": {"required": {"unique_id": ["STRING", {}]}}, "output": ["*"], "output_node": True},
}


def port(uid, source=None):
    inputs = {"unique_id": uid}
    if source is not None:
        inputs["input_data"] = source
    return {"class_type": "DiscomfortPort", "inputs": inputs}


PRODUCER = {
    "1": {"class_type": "Loader", "inputs": {"name": "sd15"}},
    "2": port("strength"),
    "3": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": ["2", 0]}},
    "4": port("model", ["3", 0]),
    "5": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}},  # not an ancestor: left out
    "9": {"class_type": "Use", "inputs": {"model": ["3", 0], "image": ["2", 0]}},
}

CONSUMER = {  # as sent: the INPUT port of "model" is a loader
    "7": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "model"}},
    "8": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "image"}},
    "10": {"class_type": "Use", "inputs": {"model": ["7", 0], "image": ["8", 0]}},
    "11": port("out", ["10", 0]),
}


def test_extract_keeps_the_ancestors_only_and_names_the_inputs():
    r = extract(PRODUCER, "4", "model", INFO)
    assert set(r.nodes) == {"1", "2", "3"} and r.output == ["3", 0]
    assert r.inputs == {"strength": {"key": "strength"}}
    assert r.types and len(r.types) == 64
    again = Recipe.from_json(json.loads(json.dumps(r.to_json())))  # plain JSON, both ways
    assert again.to_json() == r.to_json()


def test_stitch_replaces_the_loader_and_renames_without_collisions():
    r = extract(PRODUCER, "4", "model", INFO)
    out = stitch_recipe(dict(CONSUMER), "7", r, "run1", INFO)
    assert "7" not in out
    new = {k: v for k, v in out.items() if k.startswith("7.")}
    assert sorted(v["class_type"] for v in new.values()) == ["DiscomfortDataLoader", "Loader", "Patch"]
    patch = next(k for k, v in new.items() if v["class_type"] == "Patch")
    loader = next(k for k, v in new.items() if v["class_type"] == "Loader")
    strength = next(k for k, v in new.items() if v["class_type"] == "DiscomfortDataLoader")
    assert out["10"]["inputs"]["model"] == [patch, 0]  # the consumer now reads the recipe's output
    assert out[patch]["inputs"] == {"model": [loader, 0], "strength": [strength, 0]}
    assert out[strength]["inputs"] == {"run_id": "run1", "unique_id": "strength"}  # a value input: from the run
    assert out["8"] == CONSUMER["8"] and out["11"] == CONSUMER["11"]


def test_pass_through_ports_inside_a_recipe_are_linked_across():
    prompt = {"1": {"class_type": "Loader", "inputs": {"name": "a"}},
              "2": port("raw", ["1", 0]),
              "3": {"class_type": "Patch", "inputs": {"model": ["2", 0], "strength": 0.5}},
              "4": port("model", ["3", 0])}
    r = extract(prompt, "4", "model", INFO)
    out = stitch_recipe(dict(CONSUMER), "7", r, "run1", INFO)
    assert not any(v["class_type"] == "DiscomfortPort" for k, v in out.items() if k.startswith("7."))
    patch = next(k for k, v in out.items() if v["class_type"] == "Patch")
    loader = next(k for k, v in out.items() if v["class_type"] == "Loader")
    assert out[patch]["inputs"]["model"] == [loader, 0]


def test_nested_recipes_are_stitched_recursively():
    inner = extract(PRODUCER, "4", "model", INFO)
    outer_prompt = {"1": port("model"), "2": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}},
                    "3": port("patched", ["2", 0])}
    outer = extract(outer_prompt, "3", "patched", INFO, known={"model": inner})
    assert "recipe" in outer.inputs["model"]
    sent = {"7": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "r", "unique_id": "patched"}},
            "8": port("out", ["7", 0])}
    out = stitch_recipe(sent, "7", outer, "r", INFO)
    assert sorted(v["class_type"] for v in out.values()) == \
        ["DiscomfortDataLoader", "DiscomfortPort", "Loader", "Patch", "Patch"]
    assert Recipe.from_json(outer.to_json()).node_count() == 5


def test_what_cannot_be_a_recipe_is_refused_naming_key_and_node():
    saver = {"1": {"class_type": "Loader", "inputs": {"name": "a"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
             "3": port("model", ["2", 0])}
    with pytest.raises(RecipeError, match=r"'model' is built by node 2 \(SaveImage\), an output node"):
        extract(saver, "3", "model", INFO)
    loop = {"1": port("model"), "2": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}},
            "3": port("model", ["2", 0])}
    with pytest.raises(RecipeError, match=r"reads 'model' itself \(port node 1\)"):
        extract(loop, "3", "model", INFO)
    chain = {str(i): {"class_type": "Patch", "inputs": {"model": [str(i - 1), 0], "strength": 1.0}}
             for i in range(2, MAX_NODES + 3)}
    chain["1"] = {"class_type": "Loader", "inputs": {"name": "a"}}
    chain["out"] = port("model", [str(MAX_NODES + 2), 0])
    with pytest.raises(RecipeError, match=f"at most {MAX_NODES}"):
        extract(chain, "out", "model", INFO)
    with pytest.raises(RecipeError, match="not a discomfort recipe"):
        Recipe.from_json({"nodes": {}})


def test_a_server_with_other_definitions_is_refused():
    r = extract(PRODUCER, "4", "model", INFO)
    other = json.loads(json.dumps(INFO))
    other["Patch"]["input"]["required"]["strength"] = ["INT", {}]
    with pytest.raises(RecipeError, match="other definitions of Loader, Patch"):
        stitch_recipe(dict(CONSUMER), "7", r, "r", other)


# ---- recipes from outside this process: data never becomes one, checked, bounded ------------------

UNTRUSTED_INFO = {**INFO,
                  "LoadImage": {"input": {"required": {"image": [[], {"image_upload": True}]}}, "output": ["IMAGE"],
                                "output_node": False},
                  "Fetch": {"input": {"required": {"file": ["COMBO", {"video_upload": True}]}}, "output": ["IMAGE"],
                            "output_node": False},
                  "Dalle": {"input": {"required": {"prompt": ["STRING", {}]}}, "output": ["IMAGE"],
                            "output_node": False, "api_node": True},
                  "Helper": {"input": {"required": {}}, "output": ["IMAGE"], "output_node": False,
                             "python_module": "comfy_api_nodes.nodes_openai"},
                  "DiscomfortDataLoader": {"input": {"required": {"run_id": ["STRING", {}]}}, "output": ["*"],
                                           "output_node": False}}


def outside(nodes, output, inputs=None, info=UNTRUSTED_INFO, key="model"):
    """A recipe as it arrives from outside: JSON, read back with from_json (untrusted)."""
    types = {e["class_type"] for e in nodes.values()} - {"DiscomfortPort"}
    return Recipe.from_json({"discomfort_recipe": 1, "key": key, "nodes": nodes, "output": output,
                             "inputs": inputs or {}, "types": types_digest(types, info)})


def test_only_recipe_objects_are_recipes_and_only_extract_makes_trusted_ones():
    r = extract(PRODUCER, "4", "model", INFO)
    assert r.trusted and not Recipe.from_json(r.to_json()).trusted
    assert Recipe.is_recipe(r) and not Recipe.is_recipe(r.to_json())  # the JSON of a recipe is data
    assert not Recipe("m", {"1": {"class_type": "Loader", "inputs": {}}}, ["1", 0]).trusted  # by hand


def test_an_untrusted_recipe_is_checked_node_by_node():
    loader = {"class_type": "Loader", "inputs": {"name": "a"}}
    ok = outside({"1": loader, "2": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}}},
                 ["2", 0])
    assert check_recipe(ok, UNTRUSTED_INFO) == 2
    for nodes, output, match in [
        ({"1": {"class_type": "SaveImage", "inputs": {}}}, ["1", 0], r"node 1 \(SaveImage\) is an output node"),
        ({"1": {"class_type": "LoadImage", "inputs": {"image": "secret.png"}}}, ["1", 0],
         r"node 1 \(LoadImage\) reads a file named by a value"),
        ({"1": {"class_type": "Fetch", "inputs": {"file": "x.mp4"}}}, ["1", 0],
         r"reads a file named by its input 'file'"),
        ({"1": {"class_type": "Dalle", "inputs": {"prompt": "x"}}}, ["1", 0], r"node 1 \(Dalle\) is an API node"),
        ({"1": {"class_type": "Helper", "inputs": {}}}, ["1", 0], r"node 1 \(Helper\) is an API node"),
        ({"1": {"class_type": "Nope", "inputs": {}}}, ["1", 0], r"node 1 \(Nope\) is not a node type"),
        ({"1": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "other"}}}, ["1", 0],
         r"node 1 \(DiscomfortDataLoader\) reads a value of the run its inputs name"),
        ({"1": {"class_type": "Patch", "inputs": {"model": ["9", 0], "strength": 1.0}}}, ["1", 0],
         "links to node 9, which is not in the recipe"),
        ({"1": port("secret"), "2": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}}},
         ["2", 0], "port node 1 reads 'secret', which is not one of the recipe's inputs"),
        ({"1": loader}, ["5", 0], r"its output \['5', 0\] is not one of its nodes"),
    ]:
        with pytest.raises(RecipeError, match=match):
            check_recipe(outside(nodes, output), UNTRUSTED_INFO)
    with pytest.raises(RecipeError, match="cannot be checked without the server's /object_info"):
        check_recipe(ok, None)
    no_digest = Recipe.from_json({**ok.to_json(), "types": ""})
    with pytest.raises(RecipeError, match="has no types digest"):
        stitch_recipe(dict(CONSUMER), "7", no_digest, "r", UNTRUSTED_INFO)
    with pytest.raises(RecipeError, match="other definitions of Loader, Patch"):
        stitch_recipe(dict(CONSUMER), "7", Recipe.from_json({**ok.to_json(), "types": "0" * 64}), "r", UNTRUSTED_INFO)


def test_cycles_are_refused_and_a_trusted_recipe_cannot_loop_either():
    loader = {"class_type": "Loader", "inputs": {"name": "a"}}
    two = {"1": port("a", ["2", 0]), "2": port("b", ["1", 0]), "3": loader}
    with pytest.raises(RecipeError, match="links node . back to node .: a cycle"):
        check_recipe(outside(two, ["1", 0]), UNTRUSTED_INFO)
    trusted = Recipe("model", two, ["1", 0])
    trusted.trusted = True  # as if extracted: its ports still cannot make the stitch loop
    with pytest.raises(RecipeError, match="its ports link to each other in a cycle"):
        stitch_recipe(dict(CONSUMER), "7", trusted, "r", INFO)
    selfish = outside({"1": port("m2"), "3": loader}, ["3", 0])
    selfish.inputs["m2"] = {"recipe": selfish}
    with pytest.raises(RecipeError, match="holds itself"):
        check_recipe(selfish, UNTRUSTED_INFO)
    with pytest.raises(RecipeError, match="holds itself"):
        selfish.node_count()
    inner = outside({"1": port("model"), "2": loader}, ["2", 0], {"model": {"key": "model"}}, key="inner")
    with pytest.raises(RecipeError, match="'model' needs 'model' itself"):
        Recipe.from_json({**outside({"1": port("inner"), "2": loader}, ["2", 0]).to_json(),
                          "inputs": {"inner": {"recipe": inner.to_json()}}})


def test_nesting_is_bounded_in_nodes_once_stitched_and_in_depth():
    level = outside({"1": {"class_type": "Loader", "inputs": {"name": "a"}}}, ["1", 0], key="l0").to_json()
    for d in range(1, 5):  # 60 ports per level: 241 nodes, 60**4 once stitched
        level = {**outside({str(i): port(f"l{d - 1}") for i in range(1, 61)}, ["1", 0], key=f"l{d}").to_json(),
                 "inputs": {f"l{d - 1}": {"recipe": level}}}
    bomb = Recipe.from_json(level)
    assert bomb.node_count() == 241 <= MAX_NODES
    with pytest.raises(RecipeError, match=f"over {MAX_STITCHED} nodes once its nested recipes are stitched in"):
        stitch_recipe(dict(CONSUMER), "7", bomb, "r", UNTRUSTED_INFO)
    deep = outside({"1": {"class_type": "Loader", "inputs": {"name": "a"}}}, ["1", 0], key="k0").to_json()
    for d in range(1, MAX_DEPTH + 3):
        deep = {**outside({"1": port(f"k{d - 1}")}, ["1", 0], key=f"k{d}").to_json(),
                "inputs": {f"k{d - 1}": {"recipe": deep}}}
    with pytest.raises(RecipeError, match=f"over {MAX_DEPTH} deep"):
        Recipe.from_json(deep)


def test_a_stitch_looks_at_cancel_between_steps():
    inner = extract(PRODUCER, "4", "model", INFO)
    outer_prompt = {"1": port("model"), "2": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}},
                    "3": port("patched", ["2", 0])}
    outer = extract(outer_prompt, "3", "patched", INFO, known={"model": inner})
    asked: list[int] = []
    with pytest.raises(RunCancelled, match="stitching"):  # the outer step passes, the nested one is cut
        stitch_recipe({"7": CONSUMER["7"]}, "7", outer, "r", INFO, cancel=lambda: asked.append(1) or len(asked) > 1)
    assert len(asked) == 2


def test_malformed_recipe_json_is_a_recipe_error():
    for bad in [{"discomfort_recipe": 1, "key": 3, "nodes": {}, "output": ["1", 0]},
                {"discomfort_recipe": 1, "key": "k", "nodes": [], "output": ["1", 0]},
                {"discomfort_recipe": 1, "key": "k", "nodes": {"1": "x"}, "output": ["1", 0]},
                {"discomfort_recipe": 1, "key": "k", "nodes": {}, "output": ["1", 0], "inputs": {"a": 5}}]:
        with pytest.raises(RecipeError):
            Recipe.from_json(bad)


def test_the_cli_writes_a_recipe_as_json_and_reads_json_back_as_data(tmp_path):
    from discomfort.cli.run import load_input, write_output

    r = extract(PRODUCER, "4", "model", INFO)
    [path] = write_output("model", r, tmp_path)
    assert path.name == "model.json"
    back = load_input(path)
    assert back == r.to_json() and not isinstance(back, Recipe)  # --input model=model.json is a dict
