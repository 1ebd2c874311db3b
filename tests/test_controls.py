"""Seed controls without ComfyUI: the frontend's ``applyWidgetControl`` rules (numbers within
min/max, the clamp to 2**50, the step and its rounding, combos with their filter list), the
per-widget option, and which widgets of a converted UI workflow carry a control."""

from __future__ import annotations

import random

import pytest

from discomfort.controls import JS_LIMIT, Controls, check_controls, next_value, with_values
from discomfort.workflows.format import Control
from discomfort.workflows.widgets import InputDef


def INT(**opts) -> InputDef:
    return InputDef("seed", "INT", opts, False)


def FLOAT(**opts) -> InputDef:
    return InputDef("cfg", "FLOAT", opts, False)


def COMBO(*choices) -> InputDef:
    return InputDef("name", "COMBO", {"control_after_generate": True}, False, tuple(choices))


SEED = INT(min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)


def test_numbers_step_and_stay_within_min_and_max():
    assert next_value(5, "increment", SEED) == 6
    assert next_value(5, "decrement", SEED) == 4
    assert next_value(0, "decrement", SEED) == 0  # clamped to min
    assert next_value(5, "fixed", SEED) == 5
    assert next_value(JS_LIMIT, "increment", SEED) == JS_LIMIT  # the frontend's bound, not the input's max
    assert next_value(JS_LIMIT + 10, "fixed", SEED) == JS_LIMIT  # even "fixed" clamps, as the frontend does
    assert next_value(10, "increment", INT(min=0, max=10)) == 10
    assert next_value(7, "increment", INT(min=1, max=100, step=3)) == 10  # 1 + 3k: the step's offset
    assert next_value(8, "increment", INT(min=1, max=100, step=3)) == 10  # rounded onto the grid
    assert next_value(5, "increment", INT()) == 6 and next_value(2048, "increment", INT()) == 2048  # defaults
    assert next_value(5, "increment-wrap", SEED) == 5  # a number's control offers no wrap: nothing changes


def test_floats_round_to_their_step():
    assert next_value(0.5, "increment", FLOAT(min=0.0, max=1.0, step=0.01)) == 0.51
    assert next_value(0.99, "increment", FLOAT(min=0.0, max=1.0, step=0.01)) == 1.0
    assert next_value(8.0, "decrement", FLOAT(min=0.0, max=100.0, step=0.1)) == 7.9


def test_randomize_draws_from_the_range_on_the_step():
    rng = random.Random(1)
    draws = [next_value(0, "randomize", SEED, rng=rng) for _ in range(200)]
    assert all(isinstance(d, int) and 0 <= d < JS_LIMIT for d in draws) and len(set(draws)) == 200
    small = {next_value(0, "randomize", INT(min=10, max=20, step=5), rng=rng) for _ in range(200)}
    assert small == {10, 15}  # floor(random * range) * step + min: the max itself is never drawn
    floats = {next_value(0.0, "randomize", FLOAT(min=0.0, max=1.0, step=0.25), rng=rng) for _ in range(200)}
    assert floats == {0.0, 0.3, 0.5, 0.8}  # the widget rounds to 10**-precision (1 digit for 0.25), halves up


def test_combos_move_over_their_choices():
    spec = COMBO("a.png", "b.png", "c.jpg")
    assert next_value("a.png", "increment", spec) == "b.png"
    assert next_value("c.jpg", "increment", spec) == "c.jpg"  # stops at the end
    assert next_value("c.jpg", "increment-wrap", spec) == "a.png"  # wraps
    assert next_value("a.png", "decrement", spec) == "a.png"
    assert next_value("gone.png", "increment", spec) == "a.png"  # not a choice: from the start
    assert next_value("b.png", "fixed", spec) == "b.png"
    rng = random.Random(3)
    assert {next_value("a.png", "randomize", spec, rng=rng) for _ in range(100)} == {"a.png", "b.png", "c.jpg"}
    assert next_value("x", "increment", COMBO()) == "x"  # no choices: nothing changes


def test_a_combos_filter_list():
    spec = COMBO("a.png", "B.PNG", "c.jpg", "d.png")
    assert next_value("a.png", "increment", spec, "png") == "B.PNG"  # case-insensitive text
    assert next_value("a.png", "increment", spec, "/^[a-c]/") == "c.jpg"  # /regex/, case-sensitive
    assert next_value("B.PNG", "increment", spec, "/^[a-c]/") == "a.png"  # filtered out: from the start
    assert next_value("d.png", "increment-wrap", spec, "/p?ng$/") == "a.png"
    assert next_value("a.png", "increment", spec, "/[/") == "a.png"  # a bad regex is a plain text filter
    assert next_value("a.png", "randomize", spec, "nothing matches") == "a.png"


def test_the_option_is_checked():
    assert check_controls(None) is None and check_controls("fixed") == "fixed"
    assert check_controls({"My Sampler v1.5.seed": "increment"}) == {"My Sampler v1.5.seed": "increment"}
    for bad, message in [("random", "give None"), ({"seed": "fixed"}, "NODE.INPUT"), ({".seed": "fixed"}, "NODE"),
                         ({"3.seed": "up"}, "the mode is one of"), ({"3.": "fixed"}, "NODE.INPUT")]:
        with pytest.raises(ValueError, match=message):
            check_controls(bad)
    with pytest.raises(TypeError):
        check_controls(["3.seed"])


def _prompt(seed=5, title="KSampler"):
    return {"3": {"class_type": "KSampler", "inputs": {"seed": seed, "model": ["4", 0]}, "_meta": {"title": title}},
            "4": {"class_type": "Loader", "inputs": {}, "_meta": {"title": "Loader"}}}


INFO = {"KSampler": {"input": {"required": {"seed": ["INT", {"min": 0, "max": 100, "control_after_generate": True}],
                                            "model": ["MODEL"]}}}}


def test_a_runs_widgets_go_on_across_calls_by_workflow_identity():
    controls = Controls(seed=1)
    item = {"workflow": "one"}
    found = [[Control("3", "seed", "increment", SEED)]]
    used = []
    for _call in range(2):
        plan = controls.plan([item], [_prompt()], found, None, INFO)
        for _ in range(2):
            values = controls.values(plan[0], _prompt())
            used.append(values["3.seed"])
            controls.advance(plan[0], values)
    assert used == [5, 6, 7, 8]
    other = controls.plan([{"workflow": "two"}], [_prompt()], found, None, INFO)  # another workflow: its own
    assert controls.values(other[0], _prompt()) == {"3.seed": 5}
    twice = controls.plan([item, item], [_prompt(), _prompt()], [found[0], found[0]], None, INFO)
    assert [controls.values(p, _prompt())["3.seed"] for p in twice] == [9, 5]  # the second copy is another widget
    fixed = controls.plan([item], [_prompt()], found, "fixed", INFO)
    assert fixed[0][0].mode == "fixed"
    huge = _prompt(seed=JS_LIMIT * 4)  # "fixed" as a widget's mode clamps it (the frontend does); "fixed" as
    for option, expected in [("fixed", JS_LIMIT * 4), (None, JS_LIMIT)]:  # the option changes nothing at all
        plan = Controls().plan([item], [huge], [[Control("3", "seed", "fixed", SEED)]], option, INFO)
        c = Controls()
        c.advance(plan[0], c.values(plan[0], huge))
        assert c.values(plan[0], huge) == {"3.seed": expected}


def test_the_option_names_nodes_by_id_or_title():
    controls = Controls()
    by_title = controls.plan([{}], [_prompt()], [[]], {"KSampler.seed": "decrement"}, INFO)
    assert [(c.node, c.input, c.mode) for c in by_title[0]] == [("3", "seed", "decrement")]
    assert by_title[0][0].spec.options["max"] == 100
    for option, message in [({"Nope.seed": "fixed"}, "no node with id or title 'Nope'"),
                            ({"3.model": "increment"}, "linked"), ({"3.steps": "increment"}, "no such input"),
                            ({"Loader.x": "fixed"}, "no such input")]:
        with pytest.raises(ValueError, match=message):
            controls.plan([{}], [_prompt()], [[]], option, INFO)
    twins = {**_prompt(), "5": {"class_type": "KSampler", "inputs": {"seed": 1}, "_meta": {"title": "KSampler"}}}
    with pytest.raises(ValueError, match="several nodes"):
        controls.plan([{}], [twins], [[]], {"KSampler.seed": "fixed"}, INFO)
    with pytest.raises(ValueError, match="/object_info does not describe"):
        controls.plan([{}], [_prompt()], [[]], {"3.seed": "increment"}, None)


def test_with_values_copies_only_what_it_changes():
    prompt = _prompt()
    plan = Controls().plan([{}], [prompt], [[Control("3", "seed", "increment", SEED)]], None, INFO)
    out = with_values(prompt, plan[0], {"3.seed": 42})
    assert out["3"]["inputs"]["seed"] == 42 and prompt["3"]["inputs"]["seed"] == 5
    assert out["4"] is prompt["4"]
    assert with_values(prompt, [], {}) is prompt
