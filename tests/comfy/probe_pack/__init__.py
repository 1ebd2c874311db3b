"""Test-only node pack that watches ComfyUI's own nodes, loaded beside the discomfort node pack.

- Every call of ``CheckpointLoaderSimple``, ``LoraLoader`` and ``CLIPTextEncode`` appends a line
  ``<pid> <class>`` to the file ``$DISCOMFORT_PROBE_LOG`` (when set): how often a server loaded a
  checkpoint or encoded a prompt, counted from outside. The nodes themselves run unchanged.
- DiscomfortProbeBox / DiscomfortProbeUnbox: wrap any value in a module (kept by reference by a
  port, as a model is) and take it out again, counting the boxes made.
"""

import functools
import os

import nodes
import torch

from discomfort.nodes.support import ANY

WATCHED = {"CheckpointLoaderSimple": "load_checkpoint", "LoraLoader": "load_lora", "CLIPTextEncode": "encode"}


def _watch(cls_name: str, method: str) -> None:
    cls = getattr(nodes, cls_name)
    inner = getattr(cls, method)
    if getattr(inner, "_probed", False):
        return

    @functools.wraps(inner)
    def probed(self, *args, **kwargs):
        path = os.environ.get("DISCOMFORT_PROBE_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {cls_name}\n")
        return inner(self, *args, **kwargs)

    probed._probed = True
    setattr(cls, method, probed)


for _name, _method in WATCHED.items():
    _watch(_name, _method)

BOXES = [0]


class Box(torch.nn.Module):
    """A value behind an object a port keeps by reference."""

    def __init__(self, value) -> None:
        super().__init__()
        BOXES[0] += 1
        self.value = value
        self.serial = BOXES[0]


class DiscomfortProbeBox:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY,)
    FUNCTION = "box"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {})}}

    def box(self, value):
        return (Box(value),)


class DiscomfortProbeUnbox:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY, "INT")
    FUNCTION = "unbox"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"box": (ANY, {})}}

    def unbox(self, box):
        return (box.value, box.serial)


NODE_CLASS_MAPPINGS = {"DiscomfortProbeBox": DiscomfortProbeBox, "DiscomfortProbeUnbox": DiscomfortProbeUnbox}
