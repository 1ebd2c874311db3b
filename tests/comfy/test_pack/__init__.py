"""Test-only ComfyUI nodes, loaded beside the discomfort node pack by the tests' ComfyUI.

- DiscomfortTestGate: passes its value through after telling a FIFO it started, then holds
  until a release file exists or ComfyUI interrupts it (to cut a run inside a workflow).
- DiscomfortTestSteps: reports progress through ``comfy.utils.ProgressBar`` like a sampler.
- DiscomfortTestModelLoader / DiscomfortTestModelReport: a weights-free MODEL stand-in that
  counts its constructions, and a node that says which instance it was given.
- DiscomfortTestMeanAbove: whether an image's mean is above a threshold (a loop's stop flag).
"""

import os
import time
import weakref

import comfy.model_management
import comfy.utils
import torch

from discomfort.nodes.support import ANY

CONSTRUCTED = [0]
_LIVE: "weakref.WeakValueDictionary[int, CountingModel]" = weakref.WeakValueDictionary()


class CountingModel(torch.nn.Module):
    """A MODEL with no weights; every construction is counted."""

    def __init__(self, name: str) -> None:
        super().__init__()
        CONSTRUCTED[0] += 1
        self.serial = CONSTRUCTED[0]
        self.name = name
        _LIVE[self.serial] = self


def _signal(path: str) -> None:
    if path:  # a FIFO the test holds open for reading
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"started\n")
        finally:
            os.close(fd)


class DiscomfortTestGate:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY,)
    FUNCTION = "hold"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {}), "signal": ("STRING", {"default": ""}),
                             "release": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def hold(self, value, signal, release):
        _signal(signal)
        while not (release and os.path.exists(release)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.005)
        return (value,)


class DiscomfortTestSteps:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY,)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {}), "steps": ("INT", {"default": 4, "min": 1})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def run(self, value, steps):
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            bar.update(1)
        return (value,)


class DiscomfortTestModelLoader:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "stand-in"})}}

    def load(self, name):
        return (CountingModel(name),)


class DiscomfortTestModelReport:
    CATEGORY = "discomfort/test"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def report(self, model):
        same = _LIVE.get(model.serial) is model
        return (f"name={model.name} serial={model.serial} constructed={CONSTRUCTED[0]} same={same}",)


class DiscomfortTestMeanAbove:
    """BOOLEAN: whether an image's mean is above a threshold (a loop's stop flag)."""

    CATEGORY = "discomfort/test"
    RETURN_TYPES = ("BOOLEAN",)
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {}), "threshold": ("FLOAT", {"default": 0.5})}}

    def check(self, image, threshold):
        return (bool(float(image.mean()) > threshold),)


NODE_CLASS_MAPPINGS = {
    "DiscomfortTestMeanAbove": DiscomfortTestMeanAbove,
    "DiscomfortTestGate": DiscomfortTestGate,
    "DiscomfortTestSteps": DiscomfortTestSteps,
    "DiscomfortTestModelLoader": DiscomfortTestModelLoader,
    "DiscomfortTestModelReport": DiscomfortTestModelReport,
}
