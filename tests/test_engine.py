"""The run engine without ComfyUI: one loop, any placement. A placement here is a stand-in whose
"server" saves what a real port would, so the loop's own steps (inputs, writes checked, retry,
release, outputs, progress, cancel) are seen directly; tests/comfy and test_distributed run the
same loop on real servers."""

from __future__ import annotations

import pytest

from discomfort import WorkflowContext
from discomfort.engine import LocalPlacement, RunEngine
from discomfort.errors import RunCancelled, UnknownKeyError, WorkflowError
from discomfort.run_control import CancelToken, ProgressEvent

# a: reads "x", writes "mid"; b: reads "mid", writes "x" (read by the next iteration's a).
A = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x"}},
     "2": {"class_type": "Add", "inputs": {"value": ["1", 0]}},
     "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid", "input_data": ["2", 0]}}}
B = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid"}},
     "2": {"class_type": "Add", "inputs": {"value": ["1", 0]}},
     "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x", "input_data": ["2", 0]}}}


class Died(Exception):
    pass


class Servers:
    """``n`` servers that add one to what their input port reads. ``die``: (slot, call) pairs at
    which that server dies once; ``silent``: slots whose ports save nothing."""

    def __init__(self, ctx: WorkflowContext, n: int = 2, die: tuple = (), silent: tuple = (), retries: int = 1):
        self.ctx, self.n, self.die, self.silent, self.retries = ctx, n, set(die), set(silent), retries
        self.calls = 0
        self.replaced: list[int] = []

    def choose(self, iteration, k, step):
        return k % self.n

    def where(self, slot):
        return f"server {slot}"

    def prompt_target(self, slot):
        return None

    def object_info(self, slot):
        return None

    def execute(self, slot, prompt, timeout, cancel, on_event):
        self.calls += 1
        if (slot, self.calls) in self.die:
            raise Died(f"server {slot} died")
        if slot in self.silent:
            return
        ports = {nid: n["inputs"] for nid, n in prompt.items() if "unique_id" in n["inputs"]}
        src = [i["unique_id"] for i in ports.values() if "input_data" not in i]
        value = self.ctx.load(src[0]) + 1
        for i in ports.values():
            if "input_data" in i:
                self.ctx.save(i["unique_id"], value)

    def settle(self, ctx, slot, written):
        pass

    def recover(self, slot, exc, attempts, run_id, iteration, k):
        if not isinstance(exc, Died) or attempts > self.retries:
            return False
        self.replaced.append(slot)
        return True

    def describe(self, slot):
        return {"server": slot, "node_id": f"node-{slot}"}


class EngineRun(RunEngine):
    def __init__(self, make_placement, **kw):
        self._start_engine(None)
        self.context = WorkflowContext()
        self.placement = make_placement(self.context, **kw)


def test_the_loop_on_two_servers_reports_one_event_type():
    events: list[ProgressEvent] = []
    with EngineRun(Servers) as run:
        out = run.run_loop([A, B], {"x": 1}, iterations=3, on_progress=events.append)
    assert dict(out) == {"mid": 6, "x": 7} and out.iterations == 3 and out.stopped == "iterations"
    done = [e for e in events if e.kind == "workflow_done"]
    assert [e.kind for e in events] == ["workflow_start", "workflow_done"] * 6
    assert [(e.iteration, e.workflow, e.server, e.node_id, e.attempts) for e in done] == \
        [(i, k, k, f"node-{k}", 1) for i in range(3) for k in range(2)]
    assert [e.done for e in done] == [1, 2, 3, 4, 5, 6] and done[-1].total == 6
    from discomfort.run_control import ProgressEvent as Same

    assert Same is ProgressEvent and (done[2].index, done[2].step) == (0, 3)  # WorkflowEvent's names


def test_a_server_that_dies_is_recovered_and_its_workflow_run_again():
    events: list[ProgressEvent] = []
    with EngineRun(Servers, die=[(1, 2)]) as run:  # server 1 dies in its first call
        out = run.run_loop([A, B], {"x": 1}, iterations=2, on_progress=events.append)
        assert run.placement.replaced == [1]
    assert dict(out) == {"mid": 4, "x": 5}
    assert [e.attempts for e in events if e.kind == "workflow_done"] == [1, 2, 1, 1]


def test_a_server_that_dies_more_than_retries_raises():
    with EngineRun(Servers, die=[(1, 2), (1, 3)]) as run, pytest.raises(Died):
        run.run_loop([A, B], {"x": 1})


def test_a_port_that_saved_nothing_is_named_in_one_wording():
    with EngineRun(Servers, silent=[1]) as run:
        with pytest.raises(WorkflowError, match=r"^workflow 1: the port\(s\) 3 writing 'x' did not save a value "
                                                r"in run " + run.run_id + "$"):
            run.run_loop([A, B], {"x": 1})


def test_missing_inputs_are_refused_before_the_workflow_runs():
    with EngineRun(Servers) as run:
        with pytest.raises(UnknownKeyError, match="'x'"):
            run.run_loop([A, B])
        with pytest.raises(TypeError, match="on_progress="):  # progress= is the bar only
            run.run_loop([A, B], {"x": 1}, progress=print)  # type: ignore[arg-type]
        assert run.placement.calls == 0


def test_outputs_and_release_unused():
    with EngineRun(Servers) as run:
        out = run.run_loop([A, B], {"x": 1}, iterations=2, outputs=["x"], release_unused=True)
        assert dict(out) == {"x": 5}
        assert sorted(run.keys()) == ["x"]  # "mid" was released once no workflow would read it
    with EngineRun(Servers) as run:
        run.run_loop([A, B], {"x": 1}, iterations=2)
        assert sorted(run.keys()) == ["mid", "x"]  # the default keeps every key's latest value


def test_until_and_cancel():
    with EngineRun(Servers) as run:
        out = run.run_loop([A, B], {"x": 1}, iterations=None, until=lambda i, v: v["x"] >= 5)
        assert (out.iterations, out.stopped, out["x"]) == (2, "until", 5)
    token = CancelToken()
    with EngineRun(Servers) as run:
        def cut(ev):
            if ev.kind == "workflow_done" and ev.done == 3:
                token.cancel("enough")

        with pytest.raises(RunCancelled) as info:
            run.run_loop([A, B], {"x": 1}, iterations=5, cancel=token, on_progress=cut)
    assert (info.value.iteration, info.value.workflow, info.value.inside) == (1, 1, False)
    assert "(enough)" in str(info.value)


def test_a_local_placement_passes_cancel_and_events_only_to_executors_that_take_them():
    seen = []

    class Plain:
        def execute(self, prompt, timeout=None):
            seen.append(("plain", timeout))

    class Full:
        url = "http://127.0.0.1:1"

        def execute(self, prompt, timeout=None, cancel=None, on_event=None):
            seen.append(("full", cancel is not None, on_event is not None))

    LocalPlacement(Plain()).execute(None, {}, 5, CancelToken(), print)
    LocalPlacement(Full()).execute(None, {}, 5, CancelToken(), print)
    assert seen == [("plain", 5), ("full", True, True)]
    assert LocalPlacement(Full()).where(None) == "http://127.0.0.1:1"
    assert LocalPlacement(Plain()).describe(None) == {"server": "this process"}
