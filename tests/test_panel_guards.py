"""The panel's and the routes' guards without a server: Host/Origin rules, slots of cancelled runs,
event numbering, input sizes from headers, JSON depth, and the output conversion's temporaries."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("aiohttp")  # the route modules are aiohttp handlers (the suite on 3.10/3.13 has none)

from discomfort import errors  # noqa: E402
from discomfort.panel.io import (PanelLimits, _to_uint8, check_subgraphs, input_bytes, json_depth, load_input,
                                       read_json)
from discomfort.panel.runs import EVENTS_KEPT, PanelRun, RunBook
from discomfort.remote.origin import refusal
from discomfort.remote.server import HTTPRefusal

ALLOWED = {"localhost", "studio.lan"}


@pytest.mark.parametrize("host, origin", [
    ("127.0.0.1:8188", None), ("127.0.0.1", None), ("[::1]:8188", None), ("::1", None), ("localhost:8188", None),
    ("LOCALHOST.:8188", None), ("10.0.0.5:8188", "http://10.0.0.5:8188"), ("studio.lan:8188", "http://studio.lan:8188"),
    ("127.0.0.1", "http://127.0.0.1:80"), ("[::1]:8188", "http://[::1]:8188"), ("127.0.0.1:443", "https://127.0.0.1"),
    ("studio.lan", "https://studio.lan"),  # behind a proxy that terminates TLS: the server sees http
])
def test_hosts_answered(host, origin):
    assert refusal(host, origin, ALLOWED) is None


@pytest.mark.parametrize("host, origin, says", [
    ("evil.example:8188", None, "not an IP address"),
    ("evil.example:8188", "http://evil.example:8188", "not an IP address"),
    ("127.0.0.1.nip.io:8188", None, "not an IP address"),
    (None, None, "needs a Host"),
    ("127.0.0.1:99999", None, "malformed"),
    ("[::1", None, "malformed"),
    ("127.0.0.1:8188", "null", "null"),
    ("127.0.0.1:8188", "http://evil.example:8188", "another site"),
    ("127.0.0.1:8188", "http://127.0.0.1:8189", "another site"),
    ("127.0.0.1:8188", "https://127.0.0.1:8188.evil", "malformed"),
    ("127.0.0.1:8188", "file://", "malformed"),
    ("localhost:8188", "http://127.0.0.1:8188", "another site"),
    ("studio.lan", "https://studio.lan:8443", "another site"),
])
def test_hosts_refused(host, origin, says):
    why = refusal(host, origin, ALLOWED)
    assert why is not None and says in why, why


def test_allowed_hosts_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISCOMFORT_ALLOWED_HOSTS", " Studio.LAN , render-box ")
    assert refusal("render-box:8188", None) is None and refusal("studio.lan", None) is None
    assert refusal("other-box:8188", None) is not None
    monkeypatch.setenv("DISCOMFORT_ALLOWED_ORIGINS", "https://tools.studio.lan/, *")
    assert refusal("127.0.0.1:8188", "https://tools.studio.lan") is None
    assert refusal("127.0.0.1:8188", "https://evil.example") is not None  # "*" allows nothing


def run(book: RunBook, address: str, n: int) -> PanelRun:
    r = PanelRun(f"{n:032x}", f"token-{n}", address, ["w.json"], 1, None)
    book.add(r)
    return r


def test_slots_per_address_and_cancel_grace():
    """Slots count per address, not per client id; a cancelled run stops counting after the grace."""
    book = RunBook(max_runs=3, per_address=2, kept=4, cancel_grace=30.0)
    a1, _a2 = run(book, "10.0.0.1", 1), run(book, "10.0.0.1", 2)
    with pytest.raises(HTTPRefusal) as exc:
        book.check_room("10.0.0.1")
    assert exc.value.status == 429 and "this address" in str(exc.value)
    book.check_room("10.0.0.2")
    run(book, "10.0.0.2", 3)
    with pytest.raises(HTTPRefusal, match="DISCOMFORT_PANEL_MAX_RUNS"):
        book.check_room("10.0.0.3")
    asked = a1.cancel_asked = time.monotonic() - 60  # cancelled a minute ago, its thread stuck in a node
    assert book.holds_slot(a1, now=asked + 29.9) and not book.holds_slot(a1, now=asked + 30.0)
    assert not book.holds_slot(a1)  # now: the address and the server have room again
    book.check_room("10.0.0.1")


def test_runs_are_found_by_token_only():
    book = RunBook(4, 2, 4, 30.0)
    r = run(book, "10.0.0.1", 1)
    assert book.find(r.run_id, "token-1") is r
    for bad in (None, "", "token-2", "token-1 ", "TOKEN-1"):
        with pytest.raises(errors.UnknownRunError):
            book.find(r.run_id, bad)
    assert book.owned(["x", "token-1"]) == [r] and book.owned([""]) == []


def test_events_numbered_and_bounded():
    r = PanelRun("ab" * 16, "t", "a", ["w"], 1, None)
    for i in range(EVENTS_KEPT + 10):
        r.publish({"kind": "step", "value": i})
    got, last, dropped = r.after(0)
    assert last == EVENTS_KEPT + 10 and len(got) == EVENTS_KEPT and dropped == 10
    assert got[0]["seq"] == 11 and got[-1]["value"] == EVENTS_KEPT + 9
    assert r.after(last) == ([], last, 0)


def test_long_poll_wakes_on_publish():
    async def main():
        r = PanelRun("ab" * 16, "t", "a", ["w"], 1, None, loop=asyncio.get_running_loop())
        waiter = asyncio.ensure_future(r.wait_after(0, 60))
        await asyncio.sleep(0)  # let it start waiting
        await asyncio.to_thread(r.publish, {"kind": "start"})
        first = await waiter
        r.publish({"kind": "finished"})
        # once "finished" is out, a poll past it answers at once (the bound only turns a hang into a failure)
        after_end = await asyncio.wait_for(r.wait_after(2, 3600), 60)
        return first, after_end

    (got, last, dropped), after_end = asyncio.run(main())
    assert [e["kind"] for e in got] == ["start"] and last == 1 and dropped == 0
    assert after_end == ([], 2, 0)


def test_input_sizes_from_headers(tmp_path):
    """An 8000x8000 PNG of 60 KB is 768 MB as float32 RGB: known from its header, nothing decoded."""
    from PIL import Image

    Image.new("RGB", (8000, 8000)).save(tmp_path / "big.png")
    np.save(tmp_path / "a.npy", np.zeros((3, 5), np.float64))
    lim = PanelLimits()
    tracemalloc.start()
    try:
        assert input_bytes(str(tmp_path / "big.png"), "IMAGE", lim) == 8000 * 8000 * 3 * 4
        assert input_bytes(str(tmp_path / "big.png"), "MASK", lim) == 8000 * 8000 * 4
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert input_bytes(str(tmp_path / "a.npy"), "*", lim) == 3 * 5 * 8
    np.save(tmp_path / "o.npy", np.array([{}, 1], dtype=object), allow_pickle=True)
    with pytest.raises(errors.DiscomfortError, match="Python objects"):
        input_bytes(str(tmp_path / "o.npy"), "*", lim)


def test_image_decoded_as_float32(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 6, 3), 51, np.uint8)).save(tmp_path / "s.png")
    t = load_input(str(tmp_path / "s.png"), "IMAGE", PanelLimits())
    assert tuple(t.shape) == (1, 4, 6, 3) and str(t.dtype) == "torch.float32" and abs(float(t.max()) - 0.2) < 1e-6


def test_json_depth_checked_before_parsing(tmp_path):
    lim = PanelLimits()
    assert json_depth('{"a": "[[[[", "b": [[1], {"c": "\\"]]"}]}') == 3
    assert read_json('[[1, {"a": [2]}]]', "x", lim) == [[1, {"a": [2]}]]
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(errors.DiscomfortError, match="nests 100000 levels"):
        read_json(deep, "x", lim)
    (tmp_path / "d.json").write_text(json.dumps({"a": deep}))  # depth inside a string is no depth
    assert load_input(str(tmp_path / "d.json"), "*", lim) == {"a": deep}


def test_outputs_converted_without_float64():
    """The uint8 conversion works a band of rows at a time in float32: its temporaries are a band's."""
    item = np.random.default_rng(0).random((2048, 2048, 3), dtype=np.float32) * 1.2 - 0.1
    tracemalloc.start()
    try:
        out = _to_uint8(item)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, np.clip(255 * item, 0, 255).astype(np.uint8))
    assert peak < out.nbytes + (10 << 20), peak  # the result and one 8 MiB band (float64: 100 MB)


def nested(levels: int, per_level: int = 1) -> dict:
    """A UI workflow whose subgraph sg0 holds ``per_level`` instances of sg1, which holds sg2..."""
    defs = [{"id": f"sg{i}", "nodes": [{"id": k + 1, "type": f"sg{i + 1}"} for k in range(per_level)]}
            for i in range(levels)]
    return {"nodes": [{"id": 1, "type": "sg0"}], "links": [], "definitions": {"subgraphs": defs}}


def test_subgraph_nesting_counted_without_recursion():
    lim = PanelLimits()
    check_subgraphs(nested(5, 2), "w", lim)  # 2^5 instances: fine
    with pytest.raises(errors.DiscomfortError, match="nest 5000 levels"):
        check_subgraphs(nested(5000), "w", lim)  # a chain deeper than Python's recursion limit
    with pytest.raises(errors.DiscomfortError, match="expand to"):
        check_subgraphs(nested(30, 2), "w", lim)  # 2^30 nodes from 30 small definitions
    loop = nested(3)
    loop["definitions"]["subgraphs"][-1]["nodes"] = [{"id": 1, "type": "sg0"}]  # a cycle: the conversion names it
    check_subgraphs(loop, "w", lim)
