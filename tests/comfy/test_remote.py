"""The HTTP transport: values as binary bodies into a run the ComfyUI server owns.

The session's server runs on this machine, so it could share memory; ``transport="http"`` forces
the path a container or another machine would take.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings

import numpy as np
import pytest
import requests
import torch

import discomfort
from discomfort.errors import (
    ReferenceUnavailableError,
    RunFinishedError,
    SerializationError,
    UnknownKeyError,
    UnknownRunError,
    WorkflowError,
)
from discomfort.remote import FrameBody, RemoteContext, TransportWarning, frame_header, parse_header
from discomfort.remote.framing import TOKEN_HEADER
from discomfort.sequential import run_sequential
from discomfort.sysinfo import host_differences, host_facts, host_info, new_nonce, same_host
from discomfort.workflows.tools import choose_transport

from _helpers import leftovers

class Recorder:
    """Wraps the server executor; keeps the prompts and what the run looked like during each one."""

    def __init__(self, inner):
        self.inner = inner
        self.url = inner.url
        self.sizes: list[int] = []
        self.prompts: list[dict] = []
        self.during: list[tuple[list[str], bool]] = []

    def host_info(self):
        return self.inner.host_info()

    def object_info(self, *a):
        return self.inner.object_info(*a)

    def execute(self, prompt, timeout=None):
        text = json.dumps(prompt)
        self.sizes.append(len(text))
        self.prompts.append(json.loads(text))
        run_id = next(n["inputs"]["run_id"] for n in prompt.values() if "run_id" in n["inputs"])
        # The run's store exists (the server made it) but this process holds no context for it.
        self.during.append((leftovers(run_id), run_id in discomfort.context.active_runs()))
        return self.inner.execute(prompt, timeout=timeout)

    @property
    def run_id(self) -> str:
        return next(n["inputs"]["run_id"] for n in self.prompts[0].values() if "run_id" in n["inputs"])


def _http(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransportWarning)
        return fn(*a, **kw)


# ------------------------------------------------------------------------------- unit tests


def test_same_host_compares_keyed_digests_only():
    nonce = new_nonce()
    here = host_info(nonce)
    assert same_host(here, dict(here)) and host_differences(here, dict(here)) == []
    # Nothing but digests, the nonce and the version: no uid, pid or boot id.
    assert set(here) == {"nonce", "host", "user", "shm", "version"}
    facts = host_facts()
    text = json.dumps(here)
    assert facts["boot_id"] not in text and str(os.getpid()) not in text
    assert host_info(new_nonce())["host"] != here["host"]  # a fresh nonce, fresh digests
    for key, why in [("host", "boot id"), ("user", "another user"), ("shm", "/dev/shm")]:
        other = {**here, key: "0" * 64}
        assert not same_host(here, other), key
        assert any(why in w for w in host_differences(here, other)), key
    assert not same_host(here, {**here, "host": None})
    assert not same_host(here, {})
    assert not same_host(here, host_info(new_nonce()))  # answers for another nonce prove nothing
    with pytest.raises(ValueError, match="nonce"):
        host_info("not hex")


def test_frame_header_round_trip():
    head = frame_header(7, [0, 5, 1 << 33])
    meta_len, sizes, end = parse_header(head + b"x" * 7)
    assert (meta_len, sizes, end) == (7, [0, 5, 1 << 33], len(head))
    with pytest.raises(ValueError, match="not a discomfort value frame"):
        parse_header(b"XXXX" + head[4:])
    body = FrameBody(b"meta", [memoryview(b"abc"), memoryview(bytearray(10))], chunk=4)
    assert len(body) == len(b"".join(bytes(c) for c in body)) == len(frame_header(4, [3, 10])) + 4 + 13


@pytest.mark.comfy
def test_transport_choice_without_a_server(monkeypatch, inprocess):
    assert choose_transport(inprocess)[0] == "shm"
    assert choose_transport(inprocess, "shm")[0] == "shm"
    with pytest.raises(ValueError, match="transport='http' needs a ComfyUI server"):
        choose_transport(inprocess, "http")
    with pytest.raises(ValueError, match="transport must be one of"):
        choose_transport(inprocess, "tcp")
    monkeypatch.setenv("DISCOMFORT_TRANSPORT", "http")
    with pytest.raises(ValueError, match="needs a ComfyUI server"):
        choose_transport(inprocess)


# ------------------------------------------------------------------------------ with the server

@pytest.mark.comfy
def test_auto_picks_http_when_the_server_cannot_share(server, workflow, monkeypatch, caplog):
    real = server.host_info()
    assert choose_transport(server)[0] == "shm"  # same machine, same user: shared memory
    monkeypatch.setattr(server, "host_info", lambda: {**real, "host": "f" * 64})
    path, why = choose_transport(server)
    assert path == "http" and "boot id" in why
    with pytest.raises(WorkflowError, match="transport='shm'.*cannot share memory"):
        choose_transport(server, "shm")
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="discomfort"), pytest.warns(TransportWarning, match="over HTTP"):
        result = run_sequential(workflow("run_loop_invert.json"), {"image": image}, executor=server, timeout=120)
    assert torch.equal(result["image"], 1.0 - image)
    assert any("over HTTP" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(server, "host_info", lambda: {**real, "shm": "0" * 64})
    assert choose_transport(server)[0] == "http"


@pytest.mark.comfy
def test_env_var_chooses_the_transport(server, workflow, monkeypatch, caplog):
    image = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("DISCOMFORT_TRANSPORT", "http")
    with pytest.warns(TransportWarning):
        assert torch.equal(run_sequential(workflow("run_loop_invert.json"), {"image": image},
                                          executor=server, timeout=120)["image"], 1.0 - image)
    monkeypatch.setenv("DISCOMFORT_TRANSPORT", "shm")
    with caplog.at_level(logging.INFO, logger="discomfort"), warnings.catch_warnings():
        warnings.simplefilter("error", TransportWarning)  # the shm path warns nothing
        run_sequential(workflow("run_loop_invert.json"), {"image": image}, executor=server, timeout=120)
    assert any("shared memory" in r.getMessage() for r in caplog.records)


@pytest.mark.comfy
@pytest.mark.parametrize("iterations", [1, 4])
def test_http_loop_gives_the_same_pixels_as_shm(server, workflow, iterations):
    image = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(iterations))
    shm = run_sequential(workflow("run_loop_invert.json"), {"image": image}, iterations=iterations,
                         executor=server, transport="shm", timeout=120)
    rec = Recorder(server)
    http = _http(run_sequential, workflow("run_loop_invert.json"), {"image": image}, iterations=iterations,
                 executor=rec, transport="http", timeout=120)
    expected = image if iterations % 2 == 0 else 1.0 - image
    assert torch.equal(shm["image"], expected) and torch.equal(http["image"], expected)
    assert http["image"].dtype == torch.float32 and http["image"].shape == image.shape
    # The prompts carry the run id and keys only.
    assert len(rec.prompts) == iterations and max(rec.sizes) < 1024
    assert rec.prompts[0]["1"]["class_type"] == "DiscomfortDataLoader"
    # During the run its store lived in the server process; afterwards it is gone.
    for names, held_here in rec.during:
        assert names and not held_here
    run_id = rec.run_id
    assert leftovers(run_id) == []
    assert requests.get(f"{server.url}/discomfort/runs/{run_id}", headers={TOKEN_HEADER: "x"},
                        timeout=10).status_code == 404


@pytest.mark.comfy
def test_http_big_image_and_no_payload_in_prompts(server, workflow):
    big = torch.rand(1, 1024, 1024, 3, generator=torch.Generator().manual_seed(3))  # 12 MiB
    rec = Recorder(server)
    result = _http(run_sequential, workflow("run_loop_invert.json"), {"image": big}, iterations=2,
                   executor=rec, transport="http", timeout=120)
    assert torch.equal(result["image"], big)
    assert max(rec.sizes) < 1024, rec.sizes


@pytest.mark.comfy
def test_http_latent_chain_matches_shm(server, workflow):
    a, b = workflow("run_latent_a.json"), workflow("run_latent_b.json")
    shm = run_sequential([a, b], executor=server, transport="shm", timeout=120)
    http = _http(run_sequential, [a, b], executor=server, transport="http", timeout=120)
    assert set(shm) == set(http) == {"latent", "latent2"}
    for key in shm:
        assert torch.equal(shm[key]["samples"], http[key]["samples"])
    assert http["latent2"]["samples"].shape == (2, 4, 12, 24)

    samples = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    latent = {"samples": samples, "batch_index": [0]}
    out = _http(run_sequential, b, {"latent": latent}, executor=server, transport="http", timeout=120)["latent2"]
    expected = torch.nn.functional.interpolate(samples, size=(12, 24), mode="nearest-exact")
    assert torch.equal(out["samples"], expected) and out["batch_index"] == [0]


@pytest.mark.comfy
def test_http_values_string_mask_int(server, workflow):
    image = torch.rand(1, 5, 7, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(2))
    inputs = {"image": image, "mask": mask, "text": "héllo wörld ✓", "count": 3}
    result = _http(run_sequential, workflow("run_values.json"), inputs, executor=server, transport="http",
                   timeout=120)
    assert torch.equal(result["image_inv"], 1.0 - image)
    assert torch.equal(result["mask_inv"], 1.0 - mask)
    assert result["text_out"] == "héllo wörld ✓" and result["count_out"] == 3


@pytest.mark.comfy
def test_remote_context_api(server):
    values = {
        "t": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),  # non-contiguous
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "arr": np.arange(10, dtype=np.int16),
        "plain": {"a": [1, 2.5, None, True, 2 ** 80, float("inf")], "b": ("x", b"\x00\x01"),
                  "c": bytearray(b"xy"), "n": np.float32(2.5)},
        "key/with spaces ü": "str",
    }
    with RemoteContext(server.url) as rc:
        versions = {k: rc.save(k, v) for k, v in values.items()}
        assert len(set(versions.values())) == len(values)
        assert rc.keys() == sorted(values)
        for k, v in values.items():
            assert k in rc
            got = rc.load(k)
            if isinstance(v, torch.Tensor):
                assert got.dtype == v.dtype and torch.equal(got, v)
            elif isinstance(v, np.ndarray):
                assert got.dtype == v.dtype and np.array_equal(got, v)
            else:
                assert got == v and type(got) is type(v)
        for bad, what in [({1, 2}, "set"), (1 + 2j, "complex"), ({"k": {1: 2}}, "dict key of type int")]:
            with pytest.raises(SerializationError, match=what):
                rc.save("bad", bad)
        assert "bad" not in rc
        assert rc.info("t")["version"] == versions["t"] and rc.info("t")["nbytes"] == 96
        assert rc.delete("arr") and not rc.delete("arr") and "arr" not in rc
        with pytest.raises(UnknownKeyError, match=f"'arr'.*{rc.run_id}"):
            rc.load("arr")
        with pytest.raises(UnknownKeyError, match="'nope'"):
            rc.info("nope")
        run_id = rc.run_id
        assert leftovers(run_id)  # the server's store, on this machine
    assert rc.closed and leftovers(run_id) == []
    with pytest.raises(RunFinishedError):
        rc.load("t")
    rc.shutdown()  # idempotent


@pytest.mark.comfy
def test_routes_answer_clear_errors(server):
    url = server.url
    r = requests.get(f"{url}/discomfort/runs/no-such-run/values/x", headers={TOKEN_HEADER: "t"}, timeout=10)
    assert r.status_code == 404
    body = r.json()
    assert body["type"] == "UnknownRunError" and "no-such-run" in body["error"] and body["run_id"] == "no-such-run"
    with RemoteContext(server.url) as rc:
        auth = {TOKEN_HEADER: rc._token}
        base = f"{url}/discomfort/runs/{rc.run_id}/values"
        r = requests.get(f"{base}/missing", headers=auth, timeout=10)
        assert r.status_code == 404 and r.json()["type"] == "UnknownKeyError" and "'missing'" in r.json()["error"]
        r = requests.get(f"{base}/missing/info", headers=auth, timeout=10)
        assert r.status_code == 404 and "'missing'" in r.json()["error"]
        assert requests.delete(f"{base}/missing", headers=auth, timeout=10).status_code == 404
        r = requests.put(f"{base}/k", data=b"not a frame at all, no", headers=auth, timeout=10)
        assert r.status_code == 400 and "not a discomfort value frame" in r.json()["error"]
        r = requests.put(f"{base}/k", data=frame_header(4, [100]) + b"meta" + b"x" * 10, headers=auth, timeout=10)
        assert r.status_code == 400 and "frame" in r.json()["error"]
        r = requests.put(f"{base}/k", data=frame_header(0, [2]) + b"xyz", headers=auth, timeout=10)
        assert r.status_code == 400
        assert "k" not in rc  # nothing half-written stays
        # A run that ended on the server is an UnknownRunError on the client.
        assert requests.delete(f"{url}/discomfort/runs/{rc.run_id}", headers=auth, timeout=10).status_code == 200
        with pytest.raises(UnknownRunError, match=rc.run_id):
            rc.load("x")


@pytest.mark.comfy
def test_references_cannot_travel(server):
    with RemoteContext(server.url) as rc:
        with pytest.raises(ReferenceUnavailableError, match="'lock'.*references never leave"):
            rc.save("lock", threading.Lock())
        with pytest.raises(ReferenceUnavailableError, match="'t'"):
            rc.save("t", torch.zeros(2), pass_by="ref")
        assert rc.keys() == []


class _Custom:
    def __init__(self, x):
        self.x = x


@pytest.mark.comfy
def test_server_stores_network_values_as_data_only(server, tmp_path):
    """A value sent over HTTP is stored as data: its readers never unpickle it."""
    with RemoteContext(server.url) as rc:
        with pytest.raises(SerializationError, match="_Custom"):
            rc.save("obj", _Custom(1))
        rc.save("fine", {"samples": torch.ones(1, 4, 2, 2)})
        prompt = {
            "4": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": rc.run_id, "unique_id": "fine"}},
            "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["4", 0],
                                                             "run_id": rc.run_id}},
        }
        digest = rc.allow_prompt(prompt)
        server.execute(prompt, timeout=60)
        rc.revoke_prompt(digest)
        assert torch.equal(rc.load("y")["samples"], torch.ones(1, 4, 2, 2))
        # Another process of this user attaches to the server's run and reads what the client
        # sent: the data-only decoder, never pickle.
        import subprocess
        import sys

        code = (
            "import sys, discomfort\n"
            "ctx = discomfort.WorkflowContext.attach(sys.argv[1])\n"
            "kind = ctx.load_encoded('fine')[0]\n"
            "print(kind, float(ctx.load('fine')['samples'].sum()))\n"
        )
        out = subprocess.run([sys.executable, "-c", code, rc.run_id], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["data", "16.0"]
