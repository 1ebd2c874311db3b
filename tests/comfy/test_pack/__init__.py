"""Test-only ComfyUI nodes, loaded beside the discomfort node pack by the tests' ComfyUI.

- DiscomfortTestGate: passes its value through after telling a FIFO it started, then holds
  until a release file exists or ComfyUI interrupts it (to cut a run inside a workflow).
- DiscomfortTestSteps: reports progress through ``comfy.utils.ProgressBar`` like a sampler.
- DiscomfortTestModelLoader / DiscomfortTestModelReport: a weights-free MODEL stand-in that
  counts its constructions, and a node that says which instance it was given.
- DiscomfortTestMeanAbove: whether an image's mean is above a threshold (a loop's stop flag).
- DiscomfortTestSleep / DiscomfortTestBusy: a workflow's time spent waiting (as a CPU waits for a
  GPU) or computing (a fixed amount of single-threaded CPU work), for throughput benchmarks.
"""

import hashlib

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


class DiscomfortTestSleep:
    """Passes its value through after ``seconds`` of waiting (interruptible)."""

    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY,)
    FUNCTION = "wait"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {}), "seconds": ("FLOAT", {"default": 1.0, "min": 0.0})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def wait(self, value, seconds):
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(min(left, 0.05))
        return (value,)


class DiscomfortTestBusy:
    """Passes its value through after ``rounds`` of SHA-256 over 64 KiB: fixed single-threaded CPU work."""

    CATEGORY = "discomfort/test"
    RETURN_TYPES = (ANY,)
    FUNCTION = "work"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {}), "rounds": ("INT", {"default": 1000, "min": 1})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def work(self, value, rounds):
        block, digest = bytes(65536), b""
        for _ in range(rounds):
            digest = hashlib.sha256(digest + block).digest()
        return (value,)


class DiscomfortTestChoices:
    """Widgets with a "control after generate" of each kind the frontend has: a COMBO (with its
    filter list) and an INT on a step of 3 from 1, for the seed-control parity test."""

    CATEGORY = "discomfort/test"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "pick"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "choice": (["a.png", "B.PNG", "c.jpg", "d.png", "e.webp"], {"control_after_generate": True}),
            "stepped": ("INT", {"default": 7, "min": 1, "max": 40, "step": 3, "control_after_generate": True}),
        }}

    def pick(self, choice, stepped):
        return (f"{choice}:{stepped}",)


NODE_CLASS_MAPPINGS = {
    "DiscomfortTestChoices": DiscomfortTestChoices,
    "DiscomfortTestSleep": DiscomfortTestSleep,
    "DiscomfortTestBusy": DiscomfortTestBusy,
    "DiscomfortTestMeanAbove": DiscomfortTestMeanAbove,
    "DiscomfortTestGate": DiscomfortTestGate,
    "DiscomfortTestSteps": DiscomfortTestSteps,
    "DiscomfortTestModelLoader": DiscomfortTestModelLoader,
    "DiscomfortTestModelReport": DiscomfortTestModelReport,
}
