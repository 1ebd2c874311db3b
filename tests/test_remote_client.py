"""The HTTP transport's two ends without ComfyUI: a client against a hostile server process, and
the server side's policies (budget, expiry, who may create runs) on real runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from discomfort.errors import ComfyConnectionError, SerializationError
from discomfort.remote import RemoteContext
from discomfort.remote import server as srv

from _helpers import status_kib

HERE = Path(__file__).resolve().parent


@pytest.fixture
def rogue(tmp_path):
    """A hostile server in a process of its own; yields (url, marker path)."""
    marker = tmp_path / "pwned"
    proc = subprocess.Popen([sys.executable, str(HERE / "_rogue_server.py"), str(marker)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", marker
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_client_decodes_a_hostile_server_safely(rogue):
    """What a server answers is data, never code: pickles, lies and bad bytes are clean errors."""
    url, marker = rogue
    rss0 = status_kib("self", "VmRSS")
    with RemoteContext(url) as rc:
        assert torch.equal(rc.load("good"), torch.tensor([1.5, -2.0]))  # the control case works
        for key, match in [("old_pickle", "not a discomfort value frame"),
                           ("pickle_meta", "not UTF-8 JSON"),
                           ("huge_buffer", "over this side's limit|at most"),
                           ("lying_length", "Content-Length"),
                           ("deep", "nested too deeply"),
                           ("short_body", "ended early")]:
            with pytest.raises(ComfyConnectionError, match=match):
                rc.load(key)
        with pytest.raises(SerializationError, match="bool tensor holds bytes other than 0 and 1"):
            rc.load("bool_bytes")
    assert not marker.exists()  # no code of the server's ran here
    assert status_kib("self", "VmRSS") - rss0 < 64 * 1024  # nothing sized by the server was allocated


def test_budget_is_parsed_strictly_and_capped():
    cap = 64 << 20
    assert srv.parse_budget(None, cap) == cap
    assert srv.parse_budget("1T", cap) == cap and srv.parse_budget(1 << 50, cap) == cap
    assert srv.parse_budget("16M", cap) == 16 << 20 and srv.parse_budget(1000, cap) == 1000
    for bad in (1e300, "lots", -5, True, [1], "1e999T"):
        with pytest.raises(ValueError, match="ram_budget"):
            srv.parse_budget(bad, cap)


def test_idle_runs_end_but_not_while_a_prompt_runs(monkeypatch):
    """A run nobody used for the idle time ends (its memory freed); one with a prompt in flight stays."""
    server = srv.RunServer(srv.ServerLimits(idle_seconds=60.0))
    idle = srv.ServedContext("127.0.0.1", ram_budget=1 << 22)
    busy = srv.ServedContext("127.0.0.1", ram_budget=1 << 22)
    try:
        server.runs = {idle.run_id: idle, busy.run_id: busy}
        busy.allow_prompt({"1": {"class_type": "X", "inputs": {}}})
        now = [1000.0]
        monkeypatch.setattr(srv.time, "monotonic", lambda: now[0])
        idle.touch(), busy.touch()
        now[0] += 59
        server._expire()
        assert set(server.runs) == {idle.run_id, busy.run_id}
        now[0] += 2
        server._expire()
        assert set(server.runs) == {busy.run_id} and idle.closed and not busy.closed
        assert not [n for n in os.listdir("/dev/shm") if idle.run_id in n]
    finally:
        idle.shutdown()
        busy.shutdown()


class _Request:
    def __init__(self, remote: str, headers: dict | None = None) -> None:
        self.remote = remote
        self.headers = headers or {}


def test_who_may_create_runs(monkeypatch):
    """No secret: loopback clients of a loopback-only ComfyUI. A secret: whoever presents it."""
    open_srv = srv.RunServer(secret="")
    monkeypatch.setattr(srv, "comfy_listens_on_loopback_only", lambda: True)
    open_srv._may_create(_Request("127.0.0.1"))
    open_srv._may_create(_Request("::1"))
    with pytest.raises(srv.HTTPRefusal, match="loopback only") as info:
        open_srv._may_create(_Request("192.0.2.7"))
    assert info.value.status == 403
    monkeypatch.setattr(srv, "comfy_listens_on_loopback_only", lambda: False)
    with pytest.raises(srv.HTTPRefusal, match="listens beyond loopback") as info:
        open_srv._may_create(_Request("127.0.0.1"))
    assert info.value.status == 403 and "DISCOMFORT_SERVER_SECRET" in open_srv.explain()
    locked = srv.RunServer(secret="s" * 32)
    locked._may_create(_Request("192.0.2.7", {"X-Discomfort-Secret": "s" * 32}))
    with pytest.raises(srv.HTTPRefusal) as info:
        locked._may_create(_Request("127.0.0.1"))
    assert info.value.status == 401
    with pytest.raises(srv.HTTPRefusal) as info:
        locked._may_create(_Request("127.0.0.1", {"X-Discomfort-Secret": "s" * 31 + "t"}))
    assert info.value.status == 403
    with pytest.raises(ValueError, match="at least 16"):
        srv.RunServer(secret="short")
