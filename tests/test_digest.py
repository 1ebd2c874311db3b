"""Prompt digests bind a prompt exactly, and the orchestrator's form of a prompt is ComfyUI's.

The ComfyUI side of these (its own validation, a launched server, an attacker process) is in
tests/comfy/test_attacks_digest.py; here the digest and the validation model on their own.
"""

from __future__ import annotations

import json

import pytest

from discomfort import WorkflowContext
from discomfort.errors import PromptNotAllowedError
from discomfort.prompt_forms import node_types, prompt_as_run, validated_form
from discomfort.runs import prompt_digest, run_digests


def _one(value, name="x", cls="A"):
    return {"1": {"class_type": cls, "inputs": {name: value}}}


#: Values a widget or a link may hold, every one a different thing to ComfyUI.
SHAPES = [
    ["1", 0], ["1", "0"], ["1", 0.0], ["1", True], ("1", 0), {"__value__": ["1", "0"]}, {"__value__": ["1", 0]},
    {"__value__": {"__value__": ["1", "0"]}}, {"__value__": 1, "x": 2}, [["1", 0]], [], [[]], {}, {"": None},
    1, 1.0, -0.0, 0.0, 0, "1", "1.0", True, False, None, "", "None", "true", 2 ** 70, float(2 ** 70),
    float("inf"), float("nan"), "\udc80", "é", {"1": 1}, {1: 1}, {True: 1}, {(1,): 1}, {"a": 1, "b": 2},
]


def test_every_shape_has_its_own_digest():
    digests = [prompt_digest(_one(v)) for v in SHAPES]
    assert len(set(digests)) == len(SHAPES)


def test_the_issues_collision_is_gone():
    """The link and the __value__-wrapped literal that ComfyUI runs differently digest apart."""
    link = {"1": {"class_type": "EmptyCond", "inputs": {}},
            "2": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["1", 0],
                                                                  "conditioning_2": ["1", 0]}}}
    literal = json.loads(json.dumps(link))
    literal["2"]["inputs"]["conditioning_2"] = ["1", "0"]  # what validation leaves of {"__value__": ["1", "0"]}
    assert prompt_digest(link) != prompt_digest(literal)


def test_what_does_not_change_a_prompt_does_not_change_its_digest():
    a = {"1": {"class_type": "A", "inputs": {"x": 1, "y": ["2", 0]}}, "2": {"class_type": "B", "inputs": {}}}
    b = {"2": {"inputs": {}, "class_type": "B", "_meta": {"title": "b"}},
         "1": {"inputs": {"y": ["2", 0], "x": 1}, "class_type": "A", "is_changed": ["f00"]}}
    assert prompt_digest(a) == prompt_digest(b)
    assert prompt_digest(a) != prompt_digest({**a, "1": {"class_type": "A2", "inputs": a["1"]["inputs"]}})
    assert prompt_digest({"1": {"class_type": "A"}}) != prompt_digest({"1": {"class_type": "A", "inputs": {}}})
    assert prompt_digest({"1": {"class_type": "A"}}) != prompt_digest({"1": {"class_type": "A", "inputs": None}})


def test_the_encoding_is_pinned():
    """An orchestrator and a server of another version must agree: the encoding never drifts."""
    prompt = {"1": {"class_type": "A", "inputs": {"x": ["2", 0], "y": 1.5, "z": "s", "w": True, "v": None}},
              "2": {"class_type": "B", "inputs": {}}}
    assert prompt_digest(prompt) == "cadb5bd798a8490e4f590a17b3a47e68e30004b8462f78de044ff8602647e6ee"


def test_values_json_cannot_hold_are_refused_with_their_type():
    for bad, name in ((b"x", "bytes"), ({1, 2}, "set"), (object(), "object")):
        with pytest.raises(TypeError, match=name):
            prompt_digest(_one(bad))
    with pytest.raises(TypeError, match="API-format dict"):
        prompt_digest([])
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="containing itself"):
        prompt_digest(_one(loop))
    shared = [1, 2]  # the same list twice is no loop
    assert prompt_digest({"1": {"inputs": {"a": shared, "b": shared}}}) == \
        prompt_digest({"1": {"inputs": {"a": [1, 2], "b": [1, 2]}}})


def test_deep_values_digest_and_too_deep_ones_are_refused():
    deep: list = []
    cur = deep
    for _ in range(200):
        cur.append([])
        cur = cur[0]
    assert prompt_digest(_one(deep)) != prompt_digest(_one([]))
    for _ in range(100_000):  # ComfyUI's own JSON parser refuses this before a node could see it
        cur.append([])
        cur = cur[0]
    with pytest.raises(ValueError, match="too deeply"):
        prompt_digest(_one(deep))


# ---- ComfyUI's validation, modelled ----------------------------------------------------------------


class EqualsEverything(str):
    """Like an any-type whose ``==`` is always true: ComfyUI casts its values by every type in turn."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


TYPES = {
    "Out": ({"required": {"v": ("*", {})}}, True),
    "Mix": ({"required": {"i": ("INT", {}), "f": ("FLOAT", {}), "s": ("STRING", {}), "b": ("BOOLEAN", {}),
                          "c": (["a", "b"], {}), "cond": ("CONDITIONING", {})},
             "optional": {"anything": (EqualsEverything("*"), {})},
             "hidden": {"h": "INT"}}, False),
}


def _types(cls):
    return TYPES.get(cls)


def test_validated_form_casts_and_unwraps_like_comfyui():
    prompt = {
        "1": {"class_type": "Out", "inputs": {"v": ["2", 0]}},
        "2": {"class_type": "Mix", "inputs": {
            "i": 2.9, "f": 1, "s": 5, "b": 0, "c": "a", "cond": {"__value__": ["3", "0"]},
            "anything": 5, "h": "7", "extra": 1.5}},
        "3": {"class_type": "Mix", "inputs": {"i": "4", "f": {"__value__": 2}, "s": None, "b": "", "c": 1,
                                              "cond": ["2", 0]}},
        "4": {"class_type": "Mix", "inputs": {"i": "9"}},  # no output reaches it: left alone
    }
    got = validated_form(prompt, _types)
    two = got["2"]["inputs"]
    assert two == {"i": 2, "f": 1.0, "s": "5", "b": False, "c": "a", "cond": ["3", "0"], "anything": True,
                   "h": "7", "extra": 1.5}
    assert type(two["f"]) is float and type(two["i"]) is int and type(two["anything"]) is bool
    # Node 3 is reached only by the literal of node 2: not a link, so validation never goes there.
    assert got["3"] == prompt["3"] and got["4"] == prompt["4"]
    assert prompt["2"]["inputs"]["i"] == 2.9  # the caller's prompt is untouched


def test_validated_form_follows_links_and_keeps_failed_casts():
    prompt = {"1": {"class_type": "Out", "inputs": {"v": ["2", 0]}},
              "2": {"class_type": "Mix", "inputs": {"i": {"__value__": "x"}, "f": "nan", "cond": ["3", 0]}},
              "3": {"class_type": "Mix", "inputs": {"i": True, "anything": "text"}}}
    got = validated_form(prompt, _types)
    assert got["2"]["inputs"]["i"] == "x"  # unwrapped, then int("x") failed: ComfyUI refuses it
    assert got["2"]["inputs"]["f"] != got["2"]["inputs"]["f"]  # float("nan")
    assert got["3"]["inputs"] == {"i": 1, "anything": "text"}  # int("text") failed first
    assert type(got["3"]["inputs"]["i"]) is int


def test_prompt_as_run_sends_through_json_and_asks_each_class_once():
    asked: list = []

    class Server:
        def object_info(self, node_class=None):
            asked.append(node_class)
            if node_class == "Odd/Name":
                raise OSError("no such route")
            out = {k: {"input": v[0], "output_node": v[1]} for k, v in TYPES.items() if k != "Mix"}
            out["Mix"] = {"input": {"required": {"f": ["FLOAT", {}]}}, "output_node": False}
            out["Odd/Name"] = {"input": {"required": {"s": ["STRING"]}}, "output_node": True}
            return out if node_class is None else {node_class: out[node_class]} if node_class in out else {}

    server = Server()
    prompt = {"1": {"class_type": "Out", "inputs": {"v": ("2", 0)}},
              "2": {"class_type": "Mix", "inputs": {"f": 1}},
              "3": {"class_type": "Odd/Name", "inputs": {"s": 3}}}
    for _ in range(3):
        got = prompt_as_run(prompt, server)
        assert got["1"]["inputs"]["v"] == ["2", 0]  # a tuple travels as a list, then is a link
        assert type(got["2"]["inputs"]["f"]) is float and got["3"]["inputs"]["s"] == "3"
    assert sorted(asked, key=str) == ["Mix", None, "Odd/Name", "Out"]  # one whole answer for the odd name


def test_without_node_types_a_prompt_is_registered_as_sent():
    class Bare:
        def execute(self, prompt, timeout=None):
            raise AssertionError("not run here")

    prompt = {"1": {"class_type": "Mix", "inputs": {"f": 1, "c": {"__value__": [1]}}}}
    assert node_types(Bare()) is None
    assert prompt_as_run(prompt, Bare()) == prompt
    assert node_types({"Mix": {"input": {}}})("Mix") == ({}, False)


def test_a_run_accepts_its_prompt_as_run_and_nothing_near_it():
    """Real shared memory: the node side's check against what the orchestrator registered."""
    prompt = {"1": {"class_type": "Out", "inputs": {"v": ["2", 0]}},
              "2": {"class_type": "Mix", "inputs": {"f": 1, "cond": ["3", 0]}},
              "3": {"class_type": "Mix", "inputs": {"f": 0.5}}}
    with WorkflowContext() as ctx:
        registered = prompt_as_run(prompt, {k: {"input": v[0], "output_node": v[1]} for k, v in TYPES.items()})
        assert registered["2"]["inputs"]["f"] == 1.0 and type(registered["2"]["inputs"]["f"]) is float
        ctx.allow_prompt(registered)
        ctx.check_prompt(validated_form(prompt, _types))  # what ComfyUI hands the nodes
        variant = json.loads(json.dumps(registered))
        variant["2"]["inputs"]["cond"] = ["3", "0"]  # left by {"__value__": ["3", "0"]}
        for near in (variant, prompt):  # prompt: its FLOAT still an int, as if never validated
            with pytest.raises(PromptNotAllowedError):
                ctx.check_prompt(near)


# ---- a loader's is_changed: ComfyUI's cache key for its outputs ----------------------------------------


def _loader(run_id, uid="x", **extra):
    return {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": run_id, "unique_id": uid}, **extra}


def test_a_loaders_is_changed_is_digested_and_no_other_nodes():
    port = {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["1", 0], "run_id": "r"}}
    base = {"1": _loader("r"), "2": port}
    digests = {prompt_digest({**base, "1": _loader("r", is_changed=v)}) for v in ([1], [2], 1, ["1"], float("nan"))}
    assert len(digests) == 5 and prompt_digest(base) not in digests
    assert prompt_digest({**base, "2": {**port, "is_changed": ["a1b2"]}}) == prompt_digest(base)


def test_run_digests_fill_this_runs_loaders_as_comfyui_will():
    prompt = {"1": _loader("r"), "2": _loader("r", "gone"), "3": _loader("other"), "4": _loader("r", "x", is_changed=[9])}
    asked: list = []

    def versions(keys):
        asked.append(keys)
        return {"x": 5, "gone": None}

    pinned, plain = run_digests(prompt, "r", versions)
    assert asked == [["gone", "x"]]  # one question; node 4's sent is_changed stays as given
    assert plain == prompt_digest(prompt)
    expected = {**prompt, "1": _loader("r", is_changed=[5]), "2": _loader("r", "gone", is_changed=float("nan"))}
    assert pinned == prompt_digest(expected)
    assert run_digests({"1": _loader("other")}, "r", versions) == [prompt_digest({"1": _loader("other")})]


def test_a_run_accepts_its_loaders_current_versions_only():
    """Real shared memory: registered after saving x, the form ComfyUI hands the nodes passes
    (with is_changed, or without on a server with --cache-none); an older version, or the same
    prompt after x changed, is refused; revoking takes back both forms."""
    with WorkflowContext() as ctx:
        old = ctx.save("x", 1)
        new = ctx.save("x", 2)
        prompt = {"1": _loader(ctx.run_id), "2": {"class_type": "DiscomfortPort", "inputs": {
            "unique_id": "y", "input_data": ["1", 0], "run_id": ctx.run_id}}}
        digest = ctx.allow_prompt(prompt)
        assert len(ctx.prompt_digests()) == 2
        ctx.check_prompt({**prompt, "1": _loader(ctx.run_id, is_changed=[new])})
        ctx.check_prompt(prompt)
        for forged in ([old], [new + 1], new, float("nan")):
            with pytest.raises(PromptNotAllowedError):
                ctx.check_prompt({**prompt, "1": _loader(ctx.run_id, is_changed=forged)})
        ctx.save("x", 3)
        with pytest.raises(PromptNotAllowedError):  # the version the node would see now
            ctx.check_prompt({**prompt, "1": _loader(ctx.run_id, is_changed=[ctx.info("x")["version"]])})
        ctx.revoke_prompt(digest)
        assert ctx.prompt_digests() == frozenset()
