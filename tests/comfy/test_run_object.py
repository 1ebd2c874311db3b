"""A run held across calls (``Run``) and loops that stop on a condition (``until``), on every
executor: ComfyUI in this process, a launched server over shared memory, and over HTTP."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from discomfort import Run
from discomfort.errors import ReferenceUnavailableError, WorkflowError
from discomfort.remote import TransportWarning
from discomfort.sequential import run_sequential

pytestmark = pytest.mark.comfy

WHITE = 0xFFFFFF


def _port(uid: str, source: list | None = None) -> dict:
    inputs: dict = {"unique_id": uid}
    if source is not None:
        inputs["input_data"] = source
    return {"class_type": "DiscomfortPort", "inputs": inputs}


def _brighten(factor: float | list, threshold: float = 0.9) -> dict:
    """image -> blend toward white by ``factor`` -> image, and done = mean > threshold."""
    return {
        "1": _port("image"),
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": WHITE}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0],
                                                     "blend_factor": factor, "blend_mode": "normal"}},
        "4": _port("image", ["3", 0]),
        "5": {"class_type": "DiscomfortTestMeanAbove", "inputs": {"image": ["3", 0], "threshold": threshold}},
        "6": _port("done", ["5", 0]),
    }


@pytest.fixture(params=["inprocess", "server", "http"])
def where(request):
    """(executor, transport) for each way a run can live."""
    if request.param == "inprocess":
        return request.getfixturevalue("inprocess"), None
    return request.getfixturevalue("server"), ("http" if request.param == "http" else "shm")


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransportWarning)
        return fn(*a, **kw)


def test_until_a_key_stops_the_loop_after_the_iteration_it_holds(where):
    executor, transport = where
    black = torch.zeros(1, 8, 8, 3)
    out = _quiet(run_sequential, _brighten(0.25), {"image": black}, iterations=None, until="done",
                 executor=executor, transport=transport, timeout=120)
    # mean after k iterations: 1 - 0.75**k; the first above 0.9 is k = 9
    assert out.iterations == 9 and out.stopped == "until" and out["done"] is True
    assert torch.allclose(out["image"], torch.full((1, 8, 8, 3), 1 - 0.75 ** 9), atol=1e-5)
    bounded = _quiet(run_sequential, _brighten(0.25), {"image": black}, iterations=4, until="done",
                     executor=executor, transport=transport, timeout=120)
    assert bounded.iterations == 4 and bounded.stopped == "iterations" and bounded["done"] is False


def test_until_a_function_sees_the_values_and_the_iteration(inprocess):
    seen = []

    def bright_enough(iteration, values):
        seen.append((iteration, round(float(values["image"].mean()), 4), "done" in values))
        return float(values["image"].mean()) > 0.5

    events = []
    out = run_sequential(_brighten(0.25), {"image": torch.zeros(1, 8, 8, 3)}, iterations=100, until=bright_enough,
                         executor=inprocess, timeout=120, on_progress=events.append)
    assert out.iterations == 3 and out.stopped == "until"
    assert seen == [(0, 0.25, True), (1, 0.4375, True), (2, 0.5781, True)]
    assert {e.iterations for e in events} == {100} and events[-1].kind == "workflow_done"


def test_until_is_checked_before_the_run_starts(inprocess):
    wf = _brighten(0.25)
    with pytest.raises(ValueError, match="iterations=None.*needs until"):
        run_sequential(wf, {"image": torch.zeros(1, 8, 8, 3)}, iterations=None, executor=inprocess)
    with pytest.raises(ValueError, match="until='nope': no output port"):
        run_sequential(wf, {"image": torch.zeros(1, 8, 8, 3)}, until="nope", executor=inprocess)
    with pytest.raises(WorkflowError, match="until='image'.*array of 192 items"):
        run_sequential(wf, {"image": torch.zeros(1, 8, 8, 3)}, until="image", executor=inprocess, timeout=120)


def _load_model() -> dict:
    return {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "held"}},
            "2": _port("model", ["1", 0])}


def _use_model(then: dict) -> dict:
    """Report which model instance the run holds, then ``then`` (a workflow over "image")."""
    return {"m": _port("model"),
            "r": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["m", 0]}},
            "o": _port("report", ["r", 0]), **then}


def test_a_run_held_across_calls(where):
    """The original pattern: one run, a model loaded once, Python choosing each call's workflow
    and parameter, every result read after its call."""
    executor, transport = where
    a = _use_model({"i": _port("image"),
                    "w": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                "color": WHITE}},
                    "p": _port("param"),
                    "b": {"class_type": "ImageBlend", "inputs": {"image1": ["i", 0], "image2": ["w", 0],
                                                                 "blend_factor": ["p", 0], "blend_mode": "normal"}},
                    "x": _port("image", ["b", 0])})
    b = _use_model({"i": _port("image"), "v": {"class_type": "ImageInvert", "inputs": {"image": ["i", 0]}},
                    "x": _port("image", ["v", 0])})
    expected = torch.zeros(1, 8, 8, 3)
    with _quiet(Run, executor, transport=transport) as run:
        run.save("image", expected.clone())
        first = run.execute(_load_model(), timeout=120)
        assert first.iterations == 1
        serials = set()
        for i in range(10):
            param = round(0.1 * (i + 1), 2)
            run.save("param", param)  # a parameter from Python before each call
            out = run.execute(a if i % 2 == 0 else b, timeout=120)
            expected = expected * (1 - param) + param if i % 2 == 0 else 1.0 - expected
            assert torch.allclose(run.load("image"), expected, atol=1e-5), i
            assert torch.allclose(out["image"], expected, atol=1e-5)
            m = re.match(r"name=held serial=(\d+) constructed=(\d+) same=True", run.load("report"))
            assert m, run.load("report")
            serials.add(int(m.group(1)))
            constructed = int(m.group(2))
        assert len(serials) == 1 and constructed == serials.pop()  # built once, by the first call
        assert set(run.keys()) >= {"image", "param", "model", "report"}
        if transport is None:  # in this process, the model itself
            assert type(run.load("model")).__name__ == "CountingModel"
        else:  # it lives in the server's process
            with pytest.raises(ReferenceUnavailableError):
                run.load("model")
        run_id = run.run_id
    assert run.context.closed and run_id
