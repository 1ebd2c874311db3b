"""Internal: the widgets ComfyUI's frontend gives a node, decided from ``/object_info`` as the frontend does.

A UI-format workflow stores a node's widget values by position (``widgets_values``), one per
widget the frontend created for the node, including widgets that never reach the API prompt
("control after generate", upload buttons, 3D viewers). Mapping them back needs that exact list:
this module rebuilds it from the node definition, following ComfyUI frontend 1.32.9
(``litegraphService`` node construction, ``widgets.ts``, the core extensions that add widgets),
then assigns values the way ``LGraphNode.configure`` does and serialises them the way
``graphToPrompt`` does. Values that cannot be what the frontend would send (a value that does not
fit its widget: misaligned ``widgets_values``; a value the browser computes at queue time) raise
:class:`UnsupportedWorkflowError` naming the node, its type and the input.
"""

from __future__ import annotations

import copy
import math
import re
from itertools import zip_longest
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..errors import UnsupportedWorkflowError, WidgetMismatchError

UNDEFINED: Any = type("Undefined", (), {"__repr__": lambda self: "undefined", "__copy__": lambda self: self,
                                         "__deepcopy__": lambda self, memo: self})()
"""A JavaScript ``undefined`` widget value: JSON drops the key."""

CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_NAMES = ("seed", "noise_seed")
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
AUDIO_UI_TYPES = frozenset({"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})
PREVIEW_3D_TYPES = frozenset({"Preview3D", "SaveGLB"})
TEXT_REPLACE_TYPES = frozenset({"SaveImage", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio",
                                "SaveGLB", "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave",
                                "LoraSave", "SaveLatent"})
# Widget types the frontend knows (core widgets and the core extensions' custom widgets); an
# input of any other type is a socket.
CORE_WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD",
                               "COLOR", "IMAGECOMPARE", "CHART", "GALLERIA", "TEXTAREA"})
EXTENSION_WIDGET_TYPES = frozenset({"AUDIO_UI", "AUDIOUPLOAD", "AUDIO_RECORD", "WEBCAM", "LOAD_3D",
                                    "PREVIEW_3D"})
WIDGET_TYPES = CORE_WIDGET_TYPES | EXTENSION_WIDGET_TYPES
# Widgets whose value the browser produces when queueing (a capture, a recording, an upload).
BROWSER_VALUE_TYPES = frozenset({"WEBCAM", "LOAD_3D", "AUDIO_RECORD"})


@dataclass(frozen=True)
class InputDef:
    """One input of a node definition, as the frontend's V2 node definition holds it."""

    name: str
    type: str
    options: Mapping[str, Any]
    optional: bool
    choices: tuple | None = None  # a V1 combo's list of values

    @property
    def widget_type(self) -> str:
        return str(self.options.get("widgetType") or self.type)

    @property
    def is_widget(self) -> bool:
        return self.widget_type in WIDGET_TYPES and not self.options.get("forceInput")


@dataclass
class Widget:
    """One frontend widget: ``saved`` (has a ``widgets_values`` slot), ``sent`` (in the prompt)."""

    name: str
    kind: str
    default: Any
    saved: bool = True
    sent: bool = True
    input: InputDef | None = None
    controls: str | None = None  # a control widget: the widget it drives
    value: Any = field(default=UNDEFINED)
    from_file: bool = False  # the value came from widgets_values
    driven_by: tuple | None = None  # (PrimitiveNode id, its control, its filter): the primitive sets the value

    def __post_init__(self) -> None:
        if self.value is UNDEFINED:
            self.value = copy.deepcopy(self.default)


# ---------------------------------------------------------------------------------------------
# The node definition as the frontend sees it


def _spec_parts(spec: Any) -> tuple[Any, dict]:
    if isinstance(spec, (list, tuple)) and spec:
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        return spec[0], dict(opts)
    return spec, {}


def _input_def(name: str, spec: Any, optional: bool) -> InputDef:
    typ, opts = _spec_parts(spec)
    if isinstance(typ, (list, tuple)):
        return InputDef(name, "COMBO", opts, optional, tuple(typ))
    return InputDef(name, str(typ), opts, optional)


def _frontend_sections(class_type: str, info: Mapping) -> tuple[dict, dict]:
    """required/optional specs after the core extensions' ``beforeRegisterNodeDef`` hooks."""
    inputs = info.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    if class_type in AUDIO_UI_TYPES:
        required["audioUI"] = ["AUDIO_UI", {}]
    media = next((n for n, s in required.items() if _is_media_upload(s)), None)
    if media is not None:
        required["upload"] = ["IMAGEUPLOAD", {"imageInputName": media}]
    audio = required.get("audio")
    if isinstance(audio, (list, tuple)) and len(audio) > 1 and isinstance(audio[1], Mapping) \
            and audio[1].get("audio_upload") is True:
        required["upload"] = ["AUDIOUPLOAD", {}]
    if class_type in PREVIEW_3D_TYPES:
        required["image"] = ["PREVIEW_3D"]
    return required, optional


def _is_media_upload(spec: Any) -> bool:
    typ, opts = _spec_parts(spec)
    return any(opts.get(o) is True for o in MEDIA_UPLOAD_OPTIONS) and (isinstance(typ, (list, tuple)) or typ == "COMBO")


def input_defs(class_type: str, info: Mapping) -> dict[str, InputDef]:
    """The frontend's V2 inputs (required, then optional; hidden inputs are not inputs)."""
    required, optional = _frontend_sections(class_type, info)
    defs = {n: _input_def(n, s, False) for n, s in required.items()}
    for n, s in optional.items():
        defs.setdefault(n, _input_def(n, s, True))
    return defs


def ordered_inputs(class_type: str, info: Mapping) -> list[InputDef]:
    """``getOrderedInputSpecs``: ``input_order`` first, then whatever it does not list."""
    defs = input_defs(class_type, info)
    order = info.get("input_order")
    if not order:
        return list(defs.values())
    out = [defs[n] for n in order.get("required") or () if n in defs and not defs[n].optional]
    out += [defs[n] for n in order.get("optional") or () if n in defs and defs[n].optional]
    seen = {d.name for d in out}
    return out + [d for d in defs.values() if d.name not in seen]


def node_inputs(class_type: str, info: Mapping) -> list[InputDef]:
    """The node's input slots in frontend order: sockets first, then one per widget input."""
    ordered = ordered_inputs(class_type, info)
    sockets = [d for d in ordered if not d.is_widget]
    widget_inputs = [d for d in ordered if d.is_widget and d.widget_type not in _SOCKETLESS]
    return sockets + widget_inputs


_SOCKETLESS: frozenset = frozenset()


# ---------------------------------------------------------------------------------------------
# Widgets


def _combo_default(d: InputDef) -> Any:
    options = d.choices if d.choices is not None else tuple(d.options.get("options") or ())
    if d.options.get("default"):
        return d.options["default"]
    if options:
        return options[0]
    if d.options.get("remote"):
        folder = d.options.get("image_folder")
        return f"Loading... [{folder}]" if d.options.get("image_upload") and folder and folder != "input" else "Loading..."
    return UNDEFINED


def _control_widgets(d: InputDef, target: str, with_filter: bool) -> list[Widget]:
    control = Widget(str(d.options["control_after_generate"]) if isinstance(d.options.get("control_after_generate"), str)
                     else "control_after_generate", "CONTROL", "randomize", sent=False, input=d, controls=target)
    if not with_filter:
        return [control]
    return [control, Widget("control_filter_list", "FILTER", "", sent=False, input=d, controls=target)]


def _remote_widgets(d: InputDef) -> list[Widget]:
    """A remote combo's auto-refresh toggle (never sent) and, if asked, its refresh button."""
    remote = d.options.get("remote")
    if not remote:
        return []
    toggle = Widget("Auto-refresh after generation", "TOGGLE", False, sent=False, input=d)
    button = [Widget("refresh", "BUTTON", "refresh", input=d)] if remote.get("refresh_button") else []
    return [toggle] + button


def _widgets_for(d: InputDef) -> list[Widget]:
    """The widgets one input's constructor adds (see the frontend's ``ComfyWidgets``)."""
    kind, opts, name = d.widget_type, d.options, d.name
    if kind == "INT":
        control = opts.get("control_after_generate")
        if control is None:
            control = name in SEED_NAMES
        main = Widget(name, kind, opts.get("default") if opts.get("default") is not None else 0, input=d)
        return [main] + (_control_widgets(d, name, False) if control else [])
    if kind == "FLOAT":
        return [Widget(name, kind, opts.get("default") if opts.get("default") is not None else 0, input=d)]
    if kind == "BOOLEAN":
        return [Widget(name, kind, opts.get("default") if opts.get("default") is not None else False, input=d)]
    if kind in ("STRING", "MARKDOWN", "TEXTAREA"):
        return [Widget(name, kind, opts.get("default") if opts.get("default") is not None else "", input=d)]
    if kind == "COMBO":
        main = Widget(name, kind, _combo_default(d), input=d)
        return [main] + _remote_widgets(d) + (_control_widgets(d, name, True) if opts.get("control_after_generate") else [])
    if kind == "IMAGEUPLOAD":
        return [Widget("upload", "BUTTON", "image", sent=False, input=d)]
    if kind == "AUDIOUPLOAD":
        return [Widget("upload", "BUTTON", "audio", sent=False, input=d)]
    if kind == "AUDIO_UI":
        return [Widget(name, "AUDIO_UI", "", saved=False, input=d)]
    if kind == "PREVIEW_3D":
        return [Widget("image", "VIEWER", "", input=d)]
    if kind == "LOAD_3D":
        return [Widget("upload 3d model", "BUTTON", "upload3dmodel", input=d),
                Widget("upload extra resources", "BUTTON", "uploadExtraResources", input=d),
                Widget("clear", "BUTTON", "clear", input=d),
                Widget("image", "LOAD_3D", "", input=d)]
    if kind in ("WEBCAM", "AUDIO_RECORD"):
        return [Widget(name, kind, "", input=d)]
    return [Widget(name, kind, opts.get("default", UNDEFINED), input=d)]


def node_widgets(class_type: str, info: Mapping) -> list[Widget]:
    """Every widget the frontend creates for a node of this type, in order."""
    widgets = [w for d in ordered_inputs(class_type, info) if d.is_widget for w in _widgets_for(d)]
    if class_type == "PreviewAny":  # 1.58.1: two display widgets, neither saved nor sent (1.32.9 sent "preview": "")
        widgets += [Widget("preview_text", "MARKDOWN", "", saved=False, sent=False),
                    Widget("preview_mode", "TOGGLE", False, saved=False, sent=False)]
    if class_type == "WebcamCapture":
        widgets.append(Widget("waiting for camera...", "BUTTON", "capture"))
    return widgets


# ---------------------------------------------------------------------------------------------
# Values


def _unsupported(node: Mapping, why: str) -> UnsupportedWorkflowError:
    return UnsupportedWorkflowError(f"node {node.get('id')} (type {node.get('type')!r}): {why}")


def migrate_values(class_type: str, info: Mapping, widgets: list[Widget], values: list) -> list:
    """``migrateWidgetsValues``: drop the values old saves kept for ``forceInput`` inputs."""
    names = {w.name for w in widgets}
    originals = [d for d in input_defs(class_type, info).values() if d.name in names or d.options.get("forceInput")]
    count = sum(2 if d.options.get("control_after_generate") or d.name in SEED_NAMES else 1 for d in originals)
    if count != len(values):
        return values
    # lodash's zip pads the shorter list: values past the inputs are kept.
    return [v for d, v in zip_longest(originals, values) if d is None or not d.options.get("forceInput")]


def assign_values(node: Mapping, widgets: list[Widget], values: Any, check: bool = True) -> None:
    """``LGraphNode.configure``: the i-th value goes to the i-th saved widget; extras are ignored."""
    if isinstance(values, Mapping):
        # Custom nodes that save a dict restore it by name in their own frontend code.
        for w in widgets:
            if w.name in values:
                w.value, w.from_file = copy.deepcopy(values[w.name]), True
        return
    if not isinstance(values, list):
        return
    saved = [w for w in widgets if w.saved]
    for w, value in zip(saved, values):
        w.value, w.from_file = copy.deepcopy(value), True
    if check:
        check_alignment(node, saved)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_alignment(node: Mapping, saved: list[Widget]) -> None:
    """Refuse values that cannot belong to their widget: the saved values do not line up."""
    for i, w in enumerate(saved):
        if not w.from_file:
            continue
        v = w.value
        if w.kind == "CONTROL" and v not in CONTROL_VALUES:
            what, name = f"the 'control after generate' value of {w.controls!r}", str(w.controls)
        elif w.kind in ("INT", "FLOAT") and not _is_number(v) and v is not None:
            what, name = f"{w.kind} input {w.name!r}", w.name
        elif w.kind == "COMBO" and v in CONTROL_VALUES and v not in _combo_choices(w):
            what, name = f"combo input {w.name!r} (not one of its choices)", w.name
        else:
            continue
        message = (f"node {node.get('id')} (type {node.get('type')!r}): widget value {i} is {v!r} for {what}: "
                   "its widgets_values do not line up with this node type's widgets (saved by another "
                   "version of the node?)")
        raise WidgetMismatchError(node, name, v, message)


def _combo_choices(w: Widget) -> tuple:
    d = w.input
    if d is None:
        return ()
    return d.choices if d.choices is not None else tuple(d.options.get("options") or ())


def serialise(node: Mapping, widgets: list[Widget], graph_nodes: Sequence[Mapping] | None,
              class_type: str) -> dict[str, Any]:
    """The prompt inputs of a node's widgets (``graphToPrompt``'s widget loop)."""
    inputs: dict[str, Any] = {}
    for w in widgets:
        if not w.name or not w.sent:
            continue
        value = serialised_value(node, w, graph_nodes, class_type)
        inputs[w.name] = {"__value__": value} if isinstance(value, list) else value
    return inputs


def serialised_value(node: Mapping, w: Widget, graph_nodes: Sequence[Mapping] | None, class_type: str) -> Any:
    """A widget's ``serializeValue``, where a core extension gives it one."""
    if w.kind in BROWSER_VALUE_TYPES:
        raise _unsupported(node, f"input {w.name!r} ({w.kind}) gets its value from the browser when the "
                                 "workflow is queued (a capture or recording): convert it in ComfyUI's editor")
    if w.kind == "BUTTON" and w.name == "waiting for camera...":
        return UNDEFINED
    value = w.value
    if w.kind == "STRING" and isinstance(value, str) and w.input is not None \
            and w.input.options.get("dynamicPrompts") is True:
        value = dynamic_prompt(node, w.name, value)
    if w.name == "filename_prefix" and class_type in TEXT_REPLACE_TYPES and isinstance(value, str):
        value = text_replacements(value, graph_nodes or [])
    return value


# ---------------------------------------------------------------------------------------------
# Frontend text processing


def dynamic_prompt(node: Mapping, name: str, text: str) -> str:
    """``processDynamicPrompt``: comments stripped; ``{a|b}`` choices must have one option."""
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    out, i = _dyn_parse(text, 0, node, name, top=True)
    return out


def _dyn_parse(text: str, i: int, node: Mapping, name: str, top: bool) -> tuple[str, int]:
    """Parse until the end (top) or the closing brace of a choice block; resolve nested blocks."""
    result, options, depth = "", [], 0
    while i < len(text):
        ch = text[i]
        i += 1
        if ch == "\\":
            result += "\\" + (text[i] if i < len(text) else "undefined")
            i += 1
            continue
        if top:
            if ch == "{":
                choice, i = _dyn_parse(text, i, node, name, top=False)
                result += choice
            else:
                result += ch
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            if not depth:
                break
            depth -= 1
        elif ch == "|" and not depth:
            options.append(result)
            result = ""
            continue
        result += ch
    if top:
        return result, i
    options.append(result)
    if len(options) > 1:
        raise _unsupported(node, f"input {name!r} has a dynamic-prompt choice {{{'|'.join(options)}}}: the "
                                 "frontend picks one at random when queueing; write the chosen text")
    return dynamic_prompt(node, name, options[0]), i


def text_replacements(value: str, graph_nodes: Sequence[Mapping]) -> str:
    """``applyTextReplacements``: ``%Node.widget%`` from another node's widget, ``%date:...%``."""
    def replace(m: re.Match) -> str:
        text = m.group(1)
        split = text.split(".")
        if len(split) != 2:
            if split[0].startswith("date:"):
                return format_date(split[0][5:], datetime.now())
            return m.group(0)
        target = _sr_node(graph_nodes, split[0])
        if target is None or split[1] not in target:
            return m.group(0)
        v = target[split[1]]
        return re.sub(r'[/?<>\\:*|"\x00-\x1F\x7F]', "_", _js_str(v))
    return re.sub(r"%([^%]+)%", replace, value)


def _sr_node(graph_nodes: Sequence[Mapping], key: str) -> dict | None:
    """Widget values (by name) of the first node whose S&R name, else title, is ``key``."""
    hits = [n for n in graph_nodes if (n.get("properties") or {}).get("Node name for S&R") == key]
    hits = hits or [n for n in graph_nodes if n.get("title") == key]
    return hits[0].get("_widget_values_by_name") if hits else None


def _js_str(v: Any) -> str:
    if v is None or v is UNDEFINED:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        return str(int(v))
    return str(v)


def format_date(fmt: str, date: datetime) -> str:
    """The frontend's ``formatDate``: yyyy MM dd hh mm ss (and single-letter forms)."""
    parts = {"d": date.day, "M": date.month, "h": date.hour, "m": date.minute, "s": date.second}
    def rep(m: re.Match) -> str:
        text = m.group(0)
        if text.startswith("yy"):
            return str(date.year)[-len(text):] if len(text) == 2 else str(date.year)
        return str(parts[text[0]]).zfill(len(text))
    return re.sub(r"(yyyy|yy|MM|M|dd|d|hh|h|mm|m|ss|s)", rep, fmt)
