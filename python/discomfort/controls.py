"""Seed controls ("control after generate") between iterations, as ComfyUI's frontend applies them.

In the editor, an INT widget named ``seed`` (or one whose input asks for it) and a COMBO widget
with ``control_after_generate`` carry a control: after each queued prompt the frontend changes the
widget's value (``increment``, ``decrement``, ``randomize``, ``increment-wrap`` for combos,
``fixed``), so "Queue 4" runs four seeds. A loop does the same between its iterations: iteration 1
uses the saved value, each later one the value the control gave (:func:`next_value`, a copy of the
frontend's ``applyWidgetControl``). :class:`Controls` keeps the widgets' values for a run, so a
held :class:`~discomfort.sequential.Run` goes on where its last call stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .workflows.format import Control, is_link
from .workflows.widgets import InputDef, input_defs

__all__ = ["MODES", "JS_LIMIT", "ControlsOption", "WidgetControl", "Controls", "next_value", "check_controls", "with_values",
           "find_node"]

MODES = ("fixed", "increment", "increment-wrap", "decrement", "randomize")
#: The frontend bounds a number control to what JavaScript numbers hold exactly.
JS_LIMIT = 1125899906842624

#: What ``controls=`` may be: None (the workflows' own), "fixed" (none), or {"NODE.INPUT": mode}.
ControlsOption = None | str | Mapping[str, str]


@dataclass(frozen=True)
class WidgetControl:
    """One controlled widget of one workflow of a call; ``key`` names it across a run's calls."""

    node: str
    input: str
    mode: str
    spec: InputDef | None
    filter: str
    key: tuple
    frozen: bool = False  # controls="fixed": the value never changes (not even clamped, as "fixed" is)

    @property
    def name(self) -> str:
        return f"{self.node}.{self.input}"


def check_controls(controls: Any) -> dict[str, str] | str | None:
    """``controls=`` checked: None, "fixed", or a mapping of "NODE.INPUT" to a mode."""
    if controls is None or controls == "fixed":
        return controls
    if isinstance(controls, str):
        raise ValueError(f"controls={controls!r}: give None (each widget's own control), \"fixed\" (no control "
                         "changes anything) or a mapping {\"NODE.INPUT\": mode}")
    if not isinstance(controls, Mapping):
        raise TypeError(f"controls= is None, \"fixed\" or a mapping {{\"NODE.INPUT\": mode}}, not {controls!r}")
    out = {}
    for name, mode in controls.items():
        node, _, input_name = name.rpartition(".") if isinstance(name, str) else ("", "", "")
        if not node or not input_name:
            raise ValueError(f"controls= key {name!r}: expected NODE.INPUT (a node id or title, then the "
                             "input's name), e.g. \"3.seed\" or \"KSampler.seed\"")
        if mode not in MODES:
            raise ValueError(f"controls={{{name!r}: {mode!r}}}: the mode is one of {', '.join(MODES)}")
        out[name] = mode
    return out


def _js_round(x: float) -> int:
    """JavaScript's Math.round: halves go up."""
    return math.floor(x + 0.5)


def _js_rem(a: Any, b: Any) -> Any:
    """JavaScript's ``%``: the sign of the dividend."""
    if isinstance(a, int) and isinstance(b, int):
        r = abs(a) % abs(b)
        return r if a >= 0 else -r
    return math.fmod(a, b)


def _number_options(spec: InputDef | None) -> tuple[Any, Any, Any, bool]:
    """min, max, step2 and whether it is an INT, as the frontend's number widgets set them."""
    opts = spec.options if spec is not None else {}
    is_int = spec is None or spec.widget_type != "FLOAT"
    lo = opts.get("min") if opts.get("min") is not None else 0
    hi = opts.get("max") if opts.get("max") is not None else 2048
    step = opts.get("step") if opts.get("step") is not None else (1 if is_int else 0.5)
    return lo, hi, step, is_int


def _choices(spec: InputDef | None) -> list:
    if spec is None:
        return []
    return list(spec.choices if spec.choices is not None else spec.options.get("options") or ())


def _filtered(values: list, text: str) -> list:
    """The combo choices a control's filter list lets through ("/re/" is a regular expression)."""
    if not text:
        return values
    check = None
    if text.startswith("/") and text.endswith("/"):
        try:
            pattern = re.compile(text[1:-1] if len(text) > 1 else "/")
            check = lambda item: pattern.search(str(item)) is not None  # noqa: E731
        except re.error:
            check = None
    if check is None:
        lower = text.lower()
        check = lambda item: lower in str(item).lower()  # noqa: E731
    return [v for v in values if check(v)]


def next_value(value: Any, mode: str, spec: InputDef | None, filter_text: str = "",
               rng: random.Random | None = None) -> Any:
    """The widget's value after one queue with control ``mode`` (the frontend's ``applyWidgetControl``
    followed by the widget's own rounding)."""
    rng = rng or random.Random()
    is_combo = spec is not None and spec.widget_type == "COMBO"
    if is_combo and mode != "fixed":
        values = _filtered(_choices(spec), filter_text)
        index = values.index(value) if value in values else -1
        n = len(values)
        if mode in ("increment", "increment-wrap"):
            index += 1
            if mode == "increment-wrap" and index >= n:
                index = 0
        elif mode == "decrement":
            index -= 1
        elif mode == "randomize":
            index = math.floor(rng.random() * n)
        index = min(n - 1, max(0, index))
        return values[index] if index >= 0 else value
    if is_combo or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # "fixed" on a combo, or not a number: nothing changes
    lo, hi, step, is_int = _number_options(spec)
    hi, lo = min(JS_LIMIT, hi), max(-JS_LIMIT, lo)
    if mode == "increment":
        value = value + step
    elif mode == "decrement":
        value = value - step
    elif mode == "randomize":
        value = math.floor(rng.random() * ((hi - lo) / step)) * step + lo
    value = lo if value < lo else hi if value > hi else value
    return _int_rounding(value, spec, step) if is_int else _float_rounding(value, spec, step)


def _int_rounding(v: Any, spec: InputDef | None, step: Any) -> Any:
    """useIntWidget's onValueChange: round to the step, offset by ``min``."""
    step = step or 1
    if step == 1:
        return v if isinstance(v, int) else _js_round(v)
    lo = (spec.options.get("min") if spec is not None else None) or 0
    offset = _js_rem(lo, step)
    if all(isinstance(x, int) for x in (v, offset, step)) and step > 0:
        return (2 * (v - offset) + step) // (2 * step) * step + offset
    return _js_round((v - offset) / step) * step + offset


def _float_rounding(v: Any, spec: InputDef | None, step: Any) -> Any:
    """useFloatWidget's onFloatValueChange with the default settings (rounding on)."""
    opts = spec.options if spec is not None else {}
    precision = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    rnd = 10 ** -precision if precision and not opts.get("round") else opts.get("round")
    if not rnd:
        return v
    if opts.get("precision") is not None:
        precision = opts["precision"]
    lo = opts.get("min") if opts.get("min") is not None else -math.inf
    hi = opts.get("max") if opts.get("max") is not None else math.inf
    return min(max(round(_js_round(v / rnd) * rnd, int(precision)), lo), hi)


def _digest(workflow: Any) -> str:
    text = json.dumps(workflow, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Controls:
    """A run's controlled widgets: their current values, kept across calls by workflow identity
    (a digest of the workflow as given, which of its copies in the call, node, input)."""

    def __init__(self, seed: int | None = None) -> None:
        self._values: dict[tuple, Any] = {}
        self.rng = random.Random(seed)

    def plan(self, items: list, prompts: list[dict], found: list[list[Control]], option: Any,
             object_info: Mapping | None) -> list[list[WidgetControl]]:
        """Per workflow, the widgets a control changes between iterations: each UI widget's own
        control (``found``, from the conversion), then ``option``'s (None, "fixed", or a mapping)."""
        option = check_controls(option)
        seen: dict[str, int] = {}
        idents = []
        for item in items:
            ident = _digest(item)
            seen[ident] = seen.get(ident, -1) + 1
            idents.append((ident, seen[ident]))
        out = [[WidgetControl(c.node, c.input, "fixed" if option == "fixed" else c.mode, c.spec, c.filter,
                              (*idents[k], "primitive", c.group) if c.group else (*idents[k], c.node, c.input),
                              option == "fixed")
                for c in (found[k] if k < len(found) else [])] for k in range(len(prompts))]
        if isinstance(option, dict):
            for name, mode in option.items():
                self._override(name, mode, prompts, idents, out, object_info)
        return out

    @staticmethod
    def _override(name: str, mode: str, prompts: list[dict], idents: list[tuple], out: list[list[WidgetControl]],
                  object_info: Mapping | None) -> None:
        """``controls={name: mode}``: set (or add) that widget's control in every workflow that has the node."""
        node_name, _, input_name = name.rpartition(".")
        hits = 0
        for k, prompt in enumerate(prompts):
            node = find_node(prompt, node_name, f"controls= key {name!r}", k)
            if node is None:
                continue
            hits += 1
            entry = prompt[node]
            inputs = entry.get("inputs") or {}
            if input_name not in inputs or is_link(inputs[input_name]):
                why = "is linked to another node" if input_name in inputs else "has no such input"
                raise ValueError(f"controls= key {name!r}: input {input_name!r} of node {node} "
                                 f"({entry.get('class_type')}) in workflow {k} {why}; a control changes a "
                                 "widget's own value")
            spec = _spec(entry.get("class_type"), input_name, object_info, name)
            if mode == "increment-wrap" and spec.widget_type != "COMBO":
                raise ValueError(f"controls= key {name!r}: increment-wrap is for COMBO inputs (as in the "
                                 f"frontend); {input_name!r} is {spec.widget_type}")
            old = next((c for c in out[k] if (c.node, c.input) == (node, input_name)), None)
            out[k] = [c for c in out[k] if c is not old]
            out[k].append(WidgetControl(node, input_name, mode, spec, old.filter if old else "",
                                        (*idents[k], node, input_name)))
        if not hits:
            raise ValueError(f"controls= key {name!r}: no node with id or title {node_name!r} in these workflows")

    def values(self, controls: list[WidgetControl], prompt: Mapping) -> dict[str, Any]:
        """The value each widget has now (its saved value before its first queue)."""
        return {c.name: copy.deepcopy(self._values.get(c.key, prompt[c.node]["inputs"][c.input]))
                for c in controls}

    def advance(self, controls: list[WidgetControl], used: Mapping[str, Any]) -> None:
        """After a queue: each widget's next value (once per PrimitiveNode that feeds several)."""
        done = set()
        for c in controls:
            if c.key in done:
                continue
            done.add(c.key)
            value = used[c.name]
            self._values[c.key] = value if c.frozen else next_value(value, c.mode, c.spec, c.filter, self.rng)


def with_values(prompt: Mapping, controls: list[WidgetControl], values: Mapping[str, Any]) -> dict:
    """A copy of ``prompt`` whose controlled inputs hold ``values`` (the nodes it changes are copied)."""
    if not controls:
        return prompt  # type: ignore[return-value]
    out = dict(prompt)
    for c in controls:
        entry = out[c.node] = dict(out[c.node])
        entry["inputs"] = {**entry["inputs"], c.input: values[c.name]}
    return out


def find_node(prompt: Mapping, node: str, what: str, k: int = 0) -> str | None:
    """The id of the node named ``node`` (an id, else a unique title) in an API prompt, or None."""
    if node in prompt:
        return node
    titled = [nid for nid, entry in prompt.items() if ((entry.get("_meta") or {}).get("title")) == node]
    if len(titled) > 1:
        raise ValueError(f"{what}: several nodes of workflow {k} have the title {node!r} ({', '.join(titled)}); "
                         "name the node by its id")
    return titled[0] if titled else None


def _spec(class_type: Any, input_name: str, object_info: Mapping | None, name: str) -> InputDef:
    if object_info is None or class_type not in object_info:
        raise ValueError(f"controls= key {name!r}: the server's /object_info does not describe {class_type!r}, "
                         "so its min/max/choices are not known")
    spec = input_defs(str(class_type), object_info[class_type]).get(input_name)
    if spec is None:
        raise ValueError(f"controls= key {name!r}: {class_type} has no widget input {input_name!r}")
    return spec
