"""A prompt is bound exactly: its digest is taken over what ComfyUI hands its nodes, type for type.

The attack (issue 23, item 3): the old digest read ``["1", 0]`` (a link) and ``["1", "0"]`` alike,
and ComfyUI unwraps ``{"__value__": ["1", "0"]}`` into that literal list, so someone who reads a
live prompt in ``/queue`` could queue a variant that feeds a CONDITIONING input a list of strings
instead of the linked value, and its output port overwrote the run's value. Here: that attacker as
a process of its own, workflows whose widget values ComfyUI casts (they must still run), and a
seeded fuzz of value shapes through ComfyUI's own validation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from discomfort import WorkflowContext, run_sequential
from discomfort.prompt_forms import node_types, prompt_as_run, validated_form
from discomfort.remote import RemoteContext
from discomfort.runs import prompt_digest
from discomfort.workflows.tools import prepare_prompt

pytestmark = pytest.mark.comfy
HERE = Path(__file__).resolve().parent

#: Widget values ComfyUI casts: a FLOAT given an int, STRINGs given numbers, INTs given a float and a
#: string, a BOOLEAN given an int, a COMBO, and __value__ around a scalar and around a list.
CAST_WORKFLOW = {
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
    "2": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["1", 0], "blend_factor": 1,
                                                 "blend_mode": "multiply"}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "blended", "input_data": ["2", 0]}},
    "4": {"class_type": "StringSubstring", "inputs": {"string": 12345, "start": 1.0, "end": "3"}},
    "5": {"class_type": "StringConcatenate", "inputs": {"string_a": ["4", 0], "string_b": 45,
                                                        "delimiter": {"__value__": "-"}}},
    "6": {"class_type": "StringContains", "inputs": {"string": ["5", 0], "substring": {"__value__": 3},
                                                     "case_sensitive": 1}},
    "7": {"class_type": "CaseConverter", "inputs": {"string": "AbC", "mode": "lowercase"}},
    "8": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "joined", "input_data": ["5", 0]}},
    "9": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "contains", "input_data": ["6", 0]}},
    "10": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "lower", "input_data": ["7", 0]}},
    "11": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "cond"}},
    "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["11", 0],
                                                           "conditioning_2": {"__value__": []}}},
    "13": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "cond_out", "input_data": ["12", 0]}},
}


def _cond(fill: float) -> list:
    return [[torch.full((1, 2, 3), fill), {"pooled_output": None}]]


@pytest.mark.filterwarnings("ignore::discomfort.remote.TransportWarning")
@pytest.mark.parametrize("where, transport", [("inprocess", "shm"), ("server", "shm"), ("server", "http")])
def test_prompts_whose_widgets_comfyui_casts_run(where, transport, request):
    executor = request.getfixturevalue(where)
    image = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(3))
    # What the run registers is not what it sends: ComfyUI's casts are in it.
    assert prompt_digest(prompt_as_run(CAST_WORKFLOW, executor)) != prompt_digest(CAST_WORKFLOW)
    out = run_sequential([CAST_WORKFLOW], {"image": image, "cond": _cond(2.0)}, executor=executor,
                         transport=transport, timeout=120)
    assert torch.allclose(out["blended"], image * image)
    assert out["joined"] == "23-45" and out["contains"] is True and out["lower"] == "abc"
    assert len(out["cond_out"]) == 1 and torch.equal(out["cond_out"][0][0], torch.full((1, 2, 3), 2.0))


ATTACKED = {
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "a"}},
    "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "b"}},
    "3": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["1", 0], "conditioning_2": ["2", 0]}},
    "4": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["3", 0]}},
}


@pytest.mark.parametrize("transport", ["shm", "http"])
def test_a_value_wrapped_link_variant_of_a_live_prompt_is_refused(server, transport):
    """The orchestrator's prompt stays registered; the attacker's variant is refused, its replay
    of the very prompt (the control: the registration was live all along) is not."""
    ctx = WorkflowContext() if transport == "shm" else RemoteContext(server.url)
    with ctx:
        ctx.save("a", _cond(1.0))
        ctx.save("b", _cond(0.0))
        prompt = prepare_prompt(ATTACKED, ctx.run_id)
        ctx.allow_prompt(prompt_as_run(prompt, server))
        server.execute(prompt, timeout=60)
        written = ctx.info("out")["version"]
        attacker = subprocess.Popen([sys.executable, str(HERE / "_attacker_digest.py"), server.url, ctx.run_id],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            got = json.loads(attacker.stdout.readline())
            assert got["wrapped"] == ["3.conditioning_1", "3.conditioning_2"]
            assert "discomfort.errors.PromptNotAllowedError" in got["variant_errors"], got
            assert ctx.info("out")["version"] == written  # nothing overwrote the run's value
            out = ctx.load("out")
            assert len(out) == 2 and torch.equal(out[0][0], torch.ones(1, 2, 3)) and \
                torch.equal(out[1][0], torch.zeros(1, 2, 3))
            attacker.stdin.write("go\n")
            attacker.stdin.flush()
            replay = json.loads(attacker.stdout.readline())
        finally:
            attacker.stdin.close()
            assert attacker.wait(timeout=120) == 0
            attacker.stdout.close()
        assert replay["replay_errors"] == []  # the same prompt again: accepted (documented)
        assert ctx.info("out")["version"] != written


# ---- the fuzz: value shapes through ComfyUI's own validation -----------------------------------------

_KINDS = {  # class -> the type of each input, for the generator (the validation reads the real classes)
    "DiscomfortPort": {"unique_id": "STRING", "input_data": "*"},
    "PreviewAny": {"source": "*"},
    "DiscomfortTestSteps": {"value": "*", "steps": "INT"},
    "DiscomfortTestModelLoader": {"name": "STRING"},
    "DiscomfortTestModelReport": {"model": "MODEL"},
    "ConditioningCombine": {"conditioning_1": "CONDITIONING", "conditioning_2": "CONDITIONING"},
    "ImageBlend": {"image1": "IMAGE", "image2": "IMAGE", "blend_factor": "FLOAT", "blend_mode": "COMBO"},
    "EmptyImage": {"width": "INT", "height": "INT", "batch_size": "INT", "color": "INT"},
    "StringConcatenate": {"string_a": "STRING", "string_b": "STRING", "delimiter": "STRING"},
    "StringContains": {"string": "STRING", "substring": "STRING", "case_sensitive": "BOOLEAN"},
    "CaseConverter": {"string": "STRING", "mode": "COMBO"},
}
_OUTPUTS = {"DiscomfortPort": "*", "PreviewAny": None, "DiscomfortTestSteps": "*", "DiscomfortTestModelLoader":
            "MODEL", "DiscomfortTestModelReport": "STRING", "ConditioningCombine": "CONDITIONING", "ImageBlend":
            "IMAGE", "EmptyImage": "IMAGE", "StringConcatenate": "STRING", "StringContains": "BOOLEAN",
            "CaseConverter": "STRING"}
_COMBOS = {"blend_mode": ["normal", "multiply"], "mode": ["UPPERCASE", "lowercase"]}


_WIDGETS = {  # mostly values ComfyUI casts into range, a few it refuses
    "INT": [1, 2, 1.0, 2.7, "3", True, {"__value__": 2}, {"__value__": "4"}, "x", [1, 2, 3]],
    "FLOAT": [0, 1, 0.5, "0.25", True, False, {"__value__": 1}, -0.0, "nan?"],
    "STRING": [0, 7, 1.0, -0.0, "1", "", True, None, 2 ** 70, {"__value__": 5}, {"__value__": ["1", "0"]}],
    "BOOLEAN": [0, 1, 1.0, "", "0", True, False, None, {"__value__": 1}],
    "*": [0, 1, 2.5, "3", True, {"__value__": 1}, {"__value__": "7"}, "x"],
}


def _literal(rnd: random.Random, nodes: list[str]):
    """A value that validation does not take for a link, most of them shaped like one."""
    src = rnd.choice(nodes) if nodes else "1"
    return rnd.choice([
        lambda: {"__value__": [src, "0"]}, lambda: {"__value__": [src, 0]}, lambda: {"__value__": [src, 0.0]},
        lambda: {"__value__": [[src, 0]]}, lambda: {"__value__": []}, lambda: {"__value__": [1, [2, "3"]]},
        lambda: {"__value__": {"__value__": [src, 0]}}, lambda: {"__value__": 1, "x": [src, 0]},
        lambda: {"__value__": True}, lambda: 1, lambda: "1", lambda: 1.0, lambda: None,
    ])()


def _value(rnd: random.Random, kind: str, name: str, nodes: list[str], out_kinds: dict[str, str | None]):
    sources = [n for n in nodes if out_kinds[n] is not None]
    fitting = [n for n in sources if out_kinds[n] in (kind, "*") or kind == "*"]
    roll = rnd.random()
    if fitting and roll < 0.5:
        return [rnd.choice(fitting), 0]
    if roll > 0.97:
        return rnd.choice([[rnd.choice(sources or ["1"]), 0], ["1", 0.5], ["1", 0, 1]])  # mostly refused
    if kind == "COMBO":
        option = rnd.choice(_COMBOS[name])
        return rnd.choice([option, {"__value__": option}, option.upper()])
    if kind in _WIDGETS:
        return rnd.choice(_WIDGETS[kind] + ([_literal(rnd, nodes)] if kind == "STRING" else []))
    return _literal(rnd, nodes)  # a custom type: validation leaves any non-link value as it is


def _random_prompt(rnd: random.Random) -> dict:
    prompt: dict = {}
    out_kinds: dict[str, str | None] = {}
    for i in range(1, rnd.randint(2, 6) + 1):
        cls = rnd.choice(list(_KINDS)) if i > 1 else rnd.choice(["EmptyImage", "DiscomfortTestModelLoader",
                                                                "DiscomfortPort", "StringConcatenate"])
        nid = str(i)
        inputs = {name: _value(rnd, kind, name, list(prompt), out_kinds) for name, kind in _KINDS[cls].items()
                  if rnd.random() < 0.98}
        if rnd.random() < 0.2:
            inputs["run_id"] = rnd.choice(["r", 5])  # hidden or undeclared: never cast
        prompt[nid] = {"class_type": cls, "inputs": inputs}
        out_kinds[nid] = _OUTPUTS[cls]
    last = str(len(prompt))
    prompt[str(len(prompt) + 1)] = {"class_type": "PreviewAny", "inputs": {"source": [last, 0]}}
    return prompt


def _mutants(rnd: random.Random, prompt: dict) -> list[dict]:
    """The same prompt with one value in another shape that a stringifying digest would merge."""
    out = []
    for _ in range(2):
        p = copy.deepcopy(prompt)
        node = p[rnd.choice(list(p))]
        if not node["inputs"]:
            continue
        name = rnd.choice(list(node["inputs"]))
        v = node["inputs"][name]
        if isinstance(v, list) and len(v) == 2:
            node["inputs"][name] = rnd.choice([{"__value__": [v[0], str(v[1])]}, {"__value__": list(v)},
                                               [v[0], float(v[1])]])
        elif isinstance(v, dict) and "__value__" in v:
            node["inputs"][name] = v["__value__"]
        else:
            node["inputs"][name] = rnd.choice([str(v), {"__value__": v}, 1.0 if v == 1 else v, True if v == 1 else v])
        out.append(p)
    return out


def _typed(v):
    """A reference form independent of prompt_digest: every value with its exact type."""
    t = type(v)
    if t is dict:
        return ("dict", tuple(sorted((repr(_typed(k)), _typed(x)) for k, x in v.items())))
    if t in (list, tuple):
        return (t.__name__, tuple(_typed(x) for x in v))
    if t is float:
        return ("float", struct.pack(">d", v))
    return (t.__name__, v)


def _lenient(v):
    """The old canonical form: links, literals, numbers and bools all stringified."""
    if isinstance(v, dict):
        if set(v) == {"__value__"}:
            return _lenient(v["__value__"])
        return {str(k): _lenient(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_lenient(x) for x in v]
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v if v is None else str(v)


def _form(prompt: dict) -> dict:
    return {k: {f: n[f] for f in ("class_type", "inputs") if f in n} for k, n in prompt.items()}


def test_fuzz_no_two_prompts_that_run_differently_share_a_digest(inprocess):
    """300 prompts (100 seeded, two near-twins of each) through ComfyUI's validate_prompt: the
    orchestrator's form equals ComfyUI's, in-process and from /object_info; digests are equal
    exactly when the validated forms are."""
    execution = inprocess._execution
    info = json.loads(json.dumps(inprocess.object_info()))  # what a server answers
    from_info = node_types(info)
    rnd = random.Random(20231123)

    def validate(prompt: dict) -> tuple[dict, bool]:
        form = copy.deepcopy(prompt)
        logging.disable(logging.ERROR)  # ComfyUI logs each refused output
        try:
            ok = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, form, None))
        finally:
            logging.disable(logging.NOTSET)
        return form, bool(ok[0]) and not ok[3]

    cases = []
    for _ in range(100):
        base = _random_prompt(rnd)
        cases += [base, *_mutants(rnd, base)]
    by_digest: dict[str, tuple] = {}
    ran = exact_from_info = lenient_merges = 0
    lenient_seen: dict[str, tuple] = {}
    for prompt in cases:
        seen, runs = validate(prompt)
        if not runs:
            continue  # both executors refuse a prompt with node errors before anything runs
        ran += 1
        mine = prompt_as_run(prompt, inprocess)
        assert _typed(_form(mine)) == _typed(_form(seen)), prompt
        assert prompt_digest(mine) == prompt_digest(seen)
        sent = json.loads(json.dumps(prompt))
        over_http, _ = validate(sent)
        # From /object_info too, any-type inputs included (ComfyUI leaves their literals alone).
        assert _typed(_form(validated_form(sent, from_info))) == _typed(_form(over_http)), prompt
        exact_from_info += 1
        digest, typed = prompt_digest(seen), _typed(_form(seen))
        assert by_digest.setdefault(digest, typed) == typed, prompt  # no collision
        loose = json.dumps(_lenient(_form(seen)), sort_keys=True)
        if lenient_seen.setdefault(loose, typed) != typed:
            lenient_merges += 1
    assert len(set(by_digest.values())) == len(by_digest)
    assert ran >= 60, ran  # enough of them run
    assert lenient_merges >= 5, lenient_merges  # the fuzz makes the old collisions: it has teeth
    print(f"fuzz: {len(cases)} prompts, {ran} validated, {exact_from_info} exact from /object_info, "
          f"{lenient_merges} merged by the old digest")
