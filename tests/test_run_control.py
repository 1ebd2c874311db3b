"""run_control without ComfyUI: the release plan of a loop, the cancel token, errors saying where."""

from __future__ import annotations

import threading

import pytest

from discomfort.errors import DiscomfortError, RunCancelled, RunInterrupted, WorkflowError
from discomfort.run_control import CancelToken, accepts_keyword, plan_releases


def test_plan_of_a_three_workflow_loop():
    # a: img -> mid, b: mid -> tmp, c: tmp -> img; the caller gets "img" back.
    reads, writes = [["img"], ["mid"], ["tmp"]], [["mid"], ["tmp"], ["img"]]
    plan = plan_releases(reads, writes, iterations=2, keep=["img"], initial=["img", "unused"])
    assert plan[0] == ["unused"]  # given but never read and not returned
    assert plan[1:] == [["img"], ["mid"], ["tmp"], ["img"], ["mid"], ["tmp"]]


def test_plan_keeps_a_value_read_in_the_next_iteration_and_returned_keys():
    # a: reads state, writes state and out; b: reads out, writes log. Nothing but "log" returned.
    reads, writes = [["state"], ["out"]], [["state", "out"], ["log"]]
    plan = plan_releases(reads, writes, iterations=3, keep=["log"], initial=["state"])
    assert plan[0] == []
    # After a: state is read by the next iteration's a (kept); out is read by b (kept).
    # After b: out is rewritten by the next a (dropped); log is rewritten by the next b (dropped),
    # except after the last b, where it is returned. The last a's state is never read again.
    assert plan[1:] == [[], ["log", "out"], [], ["log", "out"], ["state"], ["out"]]


def test_plan_of_one_iteration_keeps_every_returned_key():
    plan = plan_releases([["x"]], [["y"]], iterations=1, keep=["x", "y"], initial=["x"])
    assert plan == [[], []]


def test_cancel_token_calls_back_once_from_another_thread():
    token = CancelToken()
    heard: list[str] = []
    unsubscribe_b = token.subscribe(lambda: heard.append("b"))
    token.subscribe(lambda: heard.append("a"))
    unsubscribe_b()
    t = threading.Thread(target=token.cancel, args=("because",))
    t.start()
    assert token.wait(30)
    t.join()
    token.cancel("again")  # idempotent: the first reason stays, callbacks ran once
    assert heard == ["a"] and token.cancelled and token.reason == "because"
    token.subscribe(lambda: heard.append("late"))  # already cancelled: called at once
    assert heard == ["a", "late"]
    assert "cancelled" in repr(token)


def test_cut_run_errors_carry_where_and_keep_ctrl_c_semantics():
    exc = RunCancelled("run r cut", run_id="r", iteration=2, iterations=5, workflow=1, workflow_name="b.json",
                       inside=True)
    assert isinstance(exc, WorkflowError) and isinstance(exc, DiscomfortError)
    assert (exc.run_id, exc.iteration, exc.workflow, exc.workflow_name, exc.inside) == ("r", 2, 1, "b.json", True)
    assert str(exc) == "run r cut"
    ki = RunInterrupted("run r cut", run_id="r")
    assert isinstance(ki, KeyboardInterrupt) and not isinstance(ki, Exception)
    with pytest.raises(KeyboardInterrupt):
        try:
            raise ki
        except Exception:  # noqa: BLE001 - must not catch a Ctrl-C
            pytest.fail("except Exception caught RunInterrupted")


def test_accepts_keyword():
    def plain(prompt, timeout=None):
        return None

    def with_cancel(prompt, timeout=None, *, cancel=None):
        return None

    def anything(prompt, **kw):
        return None

    assert not accepts_keyword(plain, "cancel")
    assert accepts_keyword(with_cancel, "cancel") and not accepts_keyword(with_cancel, "on_event")
    assert accepts_keyword(anything, "on_event")
