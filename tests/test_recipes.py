"""Recipes of values passed by reference: extracting the producing part of a workflow, stitching
it into another (no ComfyUI needed: prompts are plain JSON)."""

from __future__ import annotations

import json

import pytest

from discomfort.recipes import MAX_NODES, Recipe, RecipeError, extract, stitch_recipe

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
