"""The HTTP transport end to end between two processes: a server process with the node pack's run
routes (``python -m discomfort.remote.standalone``, no ComfyUI) and this process as the client. Memory on both ends,
bodies that arrive in odd pieces, bodies that stall or end early."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from discomfort.remote import RemoteContext, standalone  # noqa: E402
from discomfort.remote.framing import frame_header  # noqa: E402

from _helpers import leftovers, status_kib  # noqa: E402

SECRET = "a secret of more than sixteen characters"
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, pid, log path) of a run server in a process of its own; bodies that stall 2 s are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_REMOTE_")}
    env.update(DISCOMFORT_REMOTE_STALL="2")
    log = tmp_path_factory.mktemp("run_server") / "stderr.log"
    with open(log, "w") as err, standalone.start(SECRET, env=env, stderr=err) as (url, proc):
        yield url, proc.pid, log
    assert proc.returncode == 0


def _reset_peak(pid: int | str) -> int:
    """Start a new peak-RSS window (``clear_refs`` 5) and return the RSS now, in KiB."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return status_kib(pid, "VmRSS")


def _peak_growth_mib(pid: int | str, before_kib: int) -> float:
    return (status_kib(pid, "VmHWM") - before_kib) / 1024


def test_a_192_mib_tensor_each_way_with_memory_bounded_on_both_ends(server):
    """Both ends stream between the socket and the value's own memory: the peak grows by the value
    (where a new one is made) plus a few chunks, never by a whole-body copy."""
    url, pid, _log = server
    value = torch.rand(16, 1024, 1024, 3, generator=torch.Generator().manual_seed(3))  # 192 MiB
    with RemoteContext(url, secret=SECRET, ram_budget="1G") as rc:
        rc.save("warm", torch.ones(4))  # first-request costs out of the window
        assert torch.equal(rc.load("warm"), torch.ones(4))
        s0, c0 = _reset_peak(pid), _reset_peak("self")
        rc.save("image", value)
        put_server, put_client = _peak_growth_mib(pid, s0), _peak_growth_mib("self", c0)
        s0, c0 = _reset_peak(pid), _reset_peak("self")
        back = rc.load("image")
        get_server, get_client = _peak_growth_mib(pid, s0), _peak_growth_mib("self", c0)
        assert back.shape == value.shape and torch.equal(back, value)
        run_id = rc.run_id
    print(f"peak growth MiB: put server {put_server:.0f} client {put_client:.0f}; "
          f"get server {get_server:.0f} client {get_client:.0f}")
    assert put_server < 192 + 32  # the value lands in the store's memory, and nothing else grows
    assert put_client < 32  # the tensor's own memory goes to the socket
    assert get_server < 192 + 32  # a view of the stored value (its pages count again in RSS)
    assert get_client < 192 + 32  # the new value itself
    assert leftovers(run_id) == []  # the run's memory went with the run


def _raw_put(url: str, rc: RemoteContext, key: str, pieces: list[bytes], length: int,
             close_write: bool = False) -> tuple[int | None, dict]:
    """PUT a body piece by piece on a socket of its own; the server's status and JSON answer
    (None and {} when the server closed without one: after this side closed its own end)."""
    host, port = url.split("//")[1].split(":")
    path = f"/discomfort/runs/{rc.run_id}/values/{key}"
    head = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"
            f"X-Discomfort-Token: {rc._token}\r\nConnection: close\r\n\r\n").encode()  # noqa: SLF001
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(head)
        for p in pieces:
            s.sendall(p)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes; no sleeps
            answer += chunk
    if not answer:
        return None, {}
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _frame(value: torch.Tensor) -> bytes:
    from discomfort import datacodec

    meta, buffers = datacodec.encode(value)
    return frame_header(len(meta), [b.nbytes for b in buffers]) + bytes(meta) + b"".join(bytes(b) for b in buffers)


def test_a_body_in_odd_pieces_arrives_whole(server):
    """Piece boundaries anywhere: inside the header, the size table, the metadata, a buffer."""
    url, _pid, log = server
    value = torch.arange(300_000, dtype=torch.int32)
    frame = _frame(value)
    rng = random.Random(5)
    cuts = sorted({1, 3, 23, 25, 40, 61} | {rng.randrange(1, len(frame)) for _ in range(60)})
    pieces = [frame[a:b] for a, b in zip([0, *cuts], [*cuts, len(frame)])]
    with RemoteContext(url, secret=SECRET) as rc:
        status, answer = _raw_put(url, rc, "pieces", pieces, len(frame))
        assert status == 200 and isinstance(answer["version"], int)
        assert torch.equal(rc.load("pieces"), value)


@pytest.mark.parametrize("how", ["stall", "end_early"])
def test_a_body_that_stalls_or_ends_early_is_refused_and_leaves_nothing(server, how):
    url, _pid, log = server
    frame = _frame(torch.rand(MiB // 4))  # 1 MiB of buffer
    with RemoteContext(url, secret=SECRET) as rc:
        rc.save("kept", torch.ones(3))
        before = rc.stats()
        cut = len(frame) // 2
        status, answer = _raw_put(url, rc, "kept", [frame[:cut]], len(frame), close_write=how == "end_early")
        if how == "stall":  # the server's 2 s timer answers; the socket stays open until then
            assert status == 408 and answer["type"] == "RemoteLimitError", answer
            assert "sent nothing for 2 s" in answer["error"]
        else:  # the client closed its end: the server drops the body (nobody to answer)
            assert status in (None, 400), answer
        assert torch.equal(rc.load("kept"), torch.ones(3))  # the old value is intact
        after = rc.stats()
        assert after["bytes_ram"] == before["bytes_ram"] and rc.keys() == ["kept"]  # reservation returned
        rc.save("kept", torch.zeros(2))  # and the run goes on
        assert torch.equal(rc.load("kept"), torch.zeros(2))
    assert "unexpected error" not in log.read_text()  # a refusal, not a server bug


def test_a_frame_that_disagrees_with_its_content_length_is_refused(server):
    url, _pid, log = server
    frame = _frame(torch.rand(8))
    with RemoteContext(url, secret=SECRET) as rc:
        status, answer = _raw_put(url, rc, "x", [frame + b"\0" * 8], len(frame) + 8)
        assert status == 400 and "Content-Length" in answer["error"], answer
        status, answer = _raw_put(url, rc, "y", [frame[:10]], 10)
        assert status == 400 and "ended inside the frame header (10 of 20 bytes)" in answer["error"], answer
        assert rc.keys() == []
    assert "unexpected error" not in log.read_text()
