"""Attacks on a run's byte limits through uploads in flight, against a run server in a process of
its own (``python -m discomfort.remote.standalone``); the attacker is this process, on raw sockets.

Each PUT is counted from its start: its bytes are charged to its run and its client as soon as its
frame's sizes are read, before any is reserved, so parallel PUTs, deletes and overwrites racing
them, failed PUTs and trickling bodies cannot hold more than the limits. Sizes are a few MiB with
limits of a few MiB: the same logic as the 48 MiB PUTs against 64 MiB of the report."""

from __future__ import annotations

import json
import os
import selectors
import socket
import time

import numpy as np
import pytest

pytest.importorskip("aiohttp")

from discomfort import datacodec, errors  # noqa: E402
from discomfort.remote import RemoteContext, standalone  # noqa: E402
from discomfort.remote.framing import FRAME_VERSION, HEAD, MAGIC, frame_header  # noqa: E402

SECRET = "a secret of more than sixteen characters"
MiB = 1 << 20
RUN_BYTES, CLIENT_BYTES = 4 * MiB, 6 * MiB
WAIT = 30.0  # seconds before a test gives up waiting for an answer (a failure, never a pass)


def _start(tmp_path_factory, **limits: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_REMOTE_")}
    env.update({f"DISCOMFORT_REMOTE_{k.upper()}": v for k, v in limits.items()})
    log = tmp_path_factory.mktemp("run_server") / "stderr.log"
    return log, standalone.start(SECRET, env=env, stderr=open(log, "w"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, log) of a server with small byte limits, 8 PUTs at once per run, 12 per client, no rate."""
    log, started = _start(tmp_path_factory, max_run_bytes="4M", max_client_bytes="6M", max_value="4M",
                          max_uploads_per_run="8", max_uploads_per_client="12", stall="60", min_rate="0")
    with started as (url, proc):
        yield url, log
    assert proc.returncode == 0
    assert "unexpected error" not in log.read_text()  # every refusal was a 4xx, never a server bug


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server that wants 64 KiB/s on average after 1 s, and 5 s without a byte at most."""
    log, started = _start(tmp_path_factory, stall="5", min_rate="64K", rate_grace="1")
    with started as (url, proc):
        yield url, log
    assert proc.returncode == 0
    assert "unexpected error" not in log.read_text()


# ---------------------------------------------------------------------------------------- helpers


def _frame(n: int, byte: int = 0) -> tuple[bytes, bytes]:
    """(header + size table + metadata, buffer) of a bool array of ``n`` bytes all ``byte``: 7 is
    a byte a bool may not hold, so its PUT fails after the whole body arrived."""
    meta, _ = datacodec.encode(np.zeros(n, dtype=bool))
    return frame_header(len(meta), [n]) + bytes(meta), bytes([byte]) * n


class RawPut:
    """A PUT on a socket of its own, sent piece by piece as an attacker would. The answer is read
    by its Content-Length, so a server that answers early and drains the rest is understood."""

    def __init__(self, url: str, rc: RemoteContext, key: str, length: int) -> None:
        host, port = url.split("//")[1].split(":")
        self.key = key
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall((f"PUT /discomfort/runs/{rc.run_id}/values/{key} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           f"Content-Length: {length}\r\nX-Discomfort-Token: {rc._token}\r\n\r\n").encode())  # noqa: SLF001
        self._buf = b""
        self.answer: tuple[int | None, dict] | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> bool:
        """Read what has come; True once the whole answer is here (or the server closed)."""
        data = self.sock.recv(65536)
        self._buf += data
        head, sep, body = self._buf.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode().split("\r\n")
            length = next(int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:])
                          if k.lower() == "content-length")
            if len(body) >= length:
                self.answer = int(lines[0].split()[1]), json.loads(body[:length])
        if self.answer is None and not data:
            self.answer = None, {}
        if self.answer is not None:
            self.sock.close()
        return self.answer is not None

    def wait(self) -> tuple[int | None, dict]:
        while not self.receive():
            pass
        assert self.answer is not None
        return self.answer


def _answers(puts: list[RawPut], n: int) -> list[RawPut]:
    """Wait until ``n`` of ``puts`` have their answer; those that answered."""
    sel = selectors.DefaultSelector()
    for p in puts:
        sel.register(p.sock, selectors.EVENT_READ, p)
    done: list[RawPut] = []
    deadline = time.monotonic() + WAIT
    while len(done) < n:
        events = sel.select(max(0.0, deadline - time.monotonic()))
        assert events, f"only {len(done)} of {n} PUTs answered: {[p.answer for p in done]}"
        for ev, _ in events:
            p = ev.data
            if p.receive():
                sel.unregister(p.sock)
                done.append(p)
    sel.close()
    return done


def _until(check, what: str) -> None:
    """Ask the server until ``check()`` holds (its answers are the synchronisation)."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what


def _held(stats: dict) -> int:
    return stats["bytes_ram"] + stats["bytes_disk"]


# ------------------------------------------------------------------------------------------ tests


def test_parallel_puts_reserve_no_more_than_the_run_may_hold(server):
    """The report's attack: 8 PUTs at once to different keys, each fitting alone, none fitting
    all together. Two fit; six get 413 before a byte of theirs is reserved; the two are counted
    in the run's stats while they arrive; nothing stays counted once they end (one stored, one
    failed after its whole body)."""
    url, _log = server
    head, zeros = _frame(3 * MiB // 2)
    with RemoteContext(url, secret=SECRET) as rc:
        puts = [RawPut(url, rc, f"k{i}", len(head) + len(zeros)) for i in range(8)]
        for p in puts:
            p.send(head)  # the sizes, not the bytes: the server must decide now
        refused = _answers(puts, 6)
        assert {p.answer[0] for p in refused} == {413}, [p.answer for p in refused]  # type: ignore[index]
        assert all("per run (DISCOMFORT_REMOTE_MAX_RUN_BYTES)" in p.answer[1]["error"] for p in refused)  # type: ignore[index]
        arriving = [p for p in puts if p not in refused]
        stats = rc.stats()
        assert stats["uploads_in_flight"] == 2 and _held(stats) == 0
        charged = stats["in_flight_bytes"]
        assert 2 * len(zeros) <= charged <= RUN_BYTES

        good, bad = arriving
        good.send(zeros)
        assert good.wait()[0] == 200
        bad.send(bytes([7]) * len(zeros))
        status, answer = bad.wait()
        assert status == 400 and "bool" in answer["error"], answer
        stats = rc.stats()
        assert stats["uploads_in_flight"] == 0 and stats["in_flight_bytes"] == 0
        assert _held(stats) == charged // 2  # the charge was what the store holds once sealed
        assert rc.keys() == [good.key]
        assert np.array_equal(rc.load(good.key), np.zeros(len(zeros), dtype=bool))


def test_puts_at_once_are_capped_per_run_and_per_client(server):
    """PUTs that send nothing yet still hold a slot: the 9th and 10th on one run get 429, and on a
    second run of the same client the 13th and 14th; every slot comes back with its answer."""
    url, _log = server
    head, zeros = _frame(16)
    frame = head + zeros
    with RemoteContext(url, secret=SECRET) as a, RemoteContext(url, secret=SECRET) as b:
        on_a = [RawPut(url, a, f"a{i}", len(frame)) for i in range(10)]
        refused_a = _answers(on_a, 2)
        on_b = [RawPut(url, b, f"b{i}", len(frame)) for i in range(6)]
        refused_b = _answers(on_b, 2)
        for p, where in [(p, "PER_RUN") for p in refused_a] + [(p, "PER_CLIENT") for p in refused_b]:
            assert p.answer is not None and p.answer[0] == 429, p.answer
            assert f"DISCOMFORT_REMOTE_MAX_UPLOADS_{where}" in p.answer[1]["error"], p.answer
        assert a.stats()["uploads_in_flight"] == 8 and b.stats()["uploads_in_flight"] == 4
        going = [p for p in on_a + on_b if p not in refused_a + refused_b]
        for p in going:
            p.send(frame)
        assert [p.wait()[0] for p in going] == [200] * 12
        assert a.stats()["uploads_in_flight"] == 0 and b.stats()["uploads_in_flight"] == 0
        assert len(a.keys()) == 8 and len(b.keys()) == 4
        b.save("after", np.ones(3))  # the slots came back


def test_deletes_overwrites_and_failures_racing_puts_stay_within_the_run(server):
    url, _log = server
    big_head, big = _frame(5 * MiB // 2)
    with RemoteContext(url, secret=SECRET) as rc:
        rc.save("k", np.zeros(len(big), dtype=bool))
        stored = _held(rc.stats())

        # An overwrite counts once: the old value may go, so the new one fits.
        over = RawPut(url, rc, "k", len(big_head) + len(big))
        over.send(big_head)
        _until(lambda: rc.stats()["in_flight_bytes"] > 0, "the overwrite was charged")
        # A second PUT to the same key is not covered by the value both would replace.
        twin = RawPut(url, rc, "k", len(big_head) + len(big))
        twin.send(big_head)
        assert twin.wait()[0] == 413
        # Deleting the old value while the new one arrives frees no room: the new one is counted.
        rc.delete("k")
        assert _held(rc.stats()) == 0 and rc.stats()["in_flight_bytes"] == stored
        with pytest.raises(errors.RemoteLimitError, match="DISCOMFORT_REMOTE_MAX_RUN_BYTES"):
            rc.save("j", np.zeros(len(big), dtype=bool))
        over.send(big)
        assert over.wait()[0] == 200 and _held(rc.stats()) == stored

        # A small PUT that would replace the big value, then fails, never made room for another.
        small_head, small = _frame(MiB // 4)
        shrink = RawPut(url, rc, "k", len(small_head) + len(small))
        shrink.send(small_head)
        _until(lambda: rc.stats()["in_flight_bytes"] > 0, "the small overwrite was charged")
        with pytest.raises(errors.RemoteLimitError, match="DISCOMFORT_REMOTE_MAX_RUN_BYTES"):
            rc.save("j", np.zeros(2 * MiB, dtype=bool))  # would fit only if the small one succeeded
        shrink.send(bytes([7]) * len(small))
        assert shrink.wait()[0] == 400
        stats = rc.stats()
        assert _held(stats) == stored and stats["in_flight_bytes"] == 0 and rc.keys() == ["k"]
        assert _held(stats) <= RUN_BYTES
        rc.save("j", np.zeros(MiB, dtype=bool))  # what does fit still goes in


def test_announced_metadata_counts_before_it_is_read(server):
    """A frame of 2 MiB of metadata and no buffers, on a run holding 2.5 MiB: 413 as soon as its
    header is read, without waiting for (or holding in memory) the metadata it announced."""
    url, _log = server
    with RemoteContext(url, secret=SECRET) as rc:
        rc.save("k", np.zeros(5 * MiB // 2, dtype=bool))
        head = HEAD.pack(MAGIC, FRAME_VERSION, 0, 0, 2 * MiB)
        put = RawPut(url, rc, "m", len(head) + 2 * MiB)
        put.send(head)
        (done,) = _answers([put], 1)
        assert done.answer is not None and done.answer[0] == 413, done.answer
        assert rc.stats()["in_flight_bytes"] == 0 and rc.keys() == ["k"]


def test_a_client_cannot_spread_its_bytes_over_runs(server):
    """Each run just under its limit: the client's limit counts all of them, stored or arriving."""
    url, _log = server
    head, zeros = _frame(5 * MiB // 2)
    with RemoteContext(url, secret=SECRET) as a, RemoteContext(url, secret=SECRET) as b:
        a.save("x", np.zeros(len(zeros), dtype=bool))
        arriving = RawPut(url, b, "y", len(head) + len(zeros))
        arriving.send(head)
        _until(lambda: b.stats()["in_flight_bytes"] > 0, "the PUT on run b was charged")
        with RemoteContext(url, secret=SECRET) as c:
            with pytest.raises(errors.RemoteLimitError, match="DISCOMFORT_REMOTE_MAX_CLIENT_BYTES"):
                c.save("z", np.zeros(MiB, dtype=bool))
        arriving.send(zeros)
        assert arriving.wait()[0] == 200
        assert _held(a.stats()) + _held(b.stats()) <= CLIENT_BYTES


def test_ending_a_run_stops_its_puts_and_frees_their_bytes(server):
    url, _log = server
    head, zeros = _frame(3 * MiB)
    with RemoteContext(url, secret=SECRET) as rc:
        arriving = RawPut(url, rc, "x", len(head) + len(zeros))
        arriving.send(head)
        _until(lambda: rc.stats()["in_flight_bytes"] > 0, "the PUT was charged")
    status, answer = arriving.wait()  # ended with the run, not when its body would have come
    assert status == 404 and "ended while this value arrived" in answer["error"], answer
    with RemoteContext(url, secret=SECRET) as again:  # 3.5 MiB: fits only if the 3 MiB came back
        again.save("x", np.zeros(7 * MiB // 2, dtype=bool))


def test_a_trickling_body_gets_408_and_its_reservation_back(slow_server):
    """16 bytes every quarter second never trips the 5 s stall, but falls under the average rate
    once the grace second has passed: 408, and the bytes it had reserved are free again."""
    url, _log = slow_server
    head, zeros = _frame(MiB)
    with RemoteContext(url, secret=SECRET) as rc:
        rc.save("fast", np.zeros(MiB, dtype=bool))  # an ordinary upload meets the rate
        before = rc.stats()
        trickle = RawPut(url, rc, "slow", len(head) + len(zeros))
        trickle.send(head)
        sent = 0
        sel = selectors.DefaultSelector()
        sel.register(trickle.sock, selectors.EVENT_READ)
        deadline = time.monotonic() + WAIT
        while not (sel.select(0.25) and trickle.receive()):  # pacing of the attack, not a sync
            assert time.monotonic() < deadline, "no answer to the trickling body"
            trickle.send(zeros[sent : sent + 16])
            sent += 16
        sel.close()
        status, answer = trickle.answer or (None, {})
        assert status == 408 and "DISCOMFORT_REMOTE_MIN_RATE" in answer["error"], answer
        after = rc.stats()
        assert after["in_flight_bytes"] == 0 and after["uploads_in_flight"] == 0
        assert _held(after) == _held(before) and rc.keys() == ["fast"]
