"""Attacks on the trust boundaries, each by a real attacker process against a launched ComfyUI.

The victims are real: a server with the node pack, an orchestrator running ``run_sequential``.
Every case checks what must not happen (no marker file, no crash, no leak of another run's
bytes, memory and disk bounded) and what must (a clear 4xx, the victim's results intact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch

from discomfort.comfy import launch_server
from discomfort.errors import AuthenticationError
from discomfort.remote import RemoteContext
from discomfort.sequential import run_sequential

from _helpers import Fifo, status_kib

pytestmark = pytest.mark.comfy

HERE = Path(__file__).resolve().parent
NODE_PACK = HERE.parents[1] / "comfy_nodes"
TEST_PACK = HERE / "test_pack"  # the gate node
SECRET = "correct horse battery staple 0123456789"
LIMITS = {"DISCOMFORT_REMOTE_MAX_RUNS": "6", "DISCOMFORT_REMOTE_MAX_RUNS_PER_CLIENT": "3",
          "DISCOMFORT_REMOTE_MAX_VALUE": "4M", "DISCOMFORT_REMOTE_MAX_RUN_BYTES": "8M",
          "DISCOMFORT_REMOTE_MAX_BUDGET": "32M"}


def _attacker(mode: str, url: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "_attacker.py"), mode, url, *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def locked(comfy_path, tmp_path_factory):
    """A server with a secret and small limits (on loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_REMOTE_")}
    env.update(LIMITS, DISCOMFORT_SERVER_SECRET=SECRET)
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], api_nodes=False, work_dir=tmp_path_factory.mktemp("locked"),
                       env=env, startup_timeout=180) as s:
        yield s


@pytest.fixture(scope="module")
def exposed(comfy_path, tmp_path_factory):
    """A server that listens on every address and has no secret."""
    env = {k: v for k, v in os.environ.items() if k != "DISCOMFORT_SERVER_SECRET"}
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], api_nodes=False, extra_args=["--listen", "0.0.0.0"],
                       work_dir=tmp_path_factory.mktemp("exposed"), env=env, startup_timeout=180) as s:
        yield s


def test_pickles_that_broke_the_old_unpickler_are_refused(locked, tmp_path):
    """A rogue client with the secret: code, forged pointers, uninitialised memory, bombs: all 400."""
    marker = tmp_path / "pwned"
    rss0 = status_kib(locked.process.pid, "VmRSS")
    got = _attacker("payloads", locked.url, str(marker), env={"DISCOMFORT_SERVER_SECRET": SECRET})
    assert got["created"] == 200
    for name in ("os.system", "bytearray_bomb", "np_reconstruct", "np_object_array", "torch_empty"):
        assert got[f"old:{name}"] == 400, name  # the old frame is not a frame any more
        assert got[f"new:{name}"] == 400 and got[f"new:{name}:type"] == "SerializationError", name
    assert got["bool_bytes"] == 400 and got["shape_over_buffer"] == 400
    assert got["keys_after"] == []  # nothing half-written stays
    assert not marker.exists()
    assert locked.process.poll() is None  # alive
    assert status_kib(locked.process.pid, "VmRSS") - rss0 < 256 * 1024
    assert locked.object_info("DiscomfortPort")  # and still answering


def test_limits_answer_4xx_and_bound_memory_and_disk(locked):
    rss0 = status_kib(locked.process.pid, "VmRSS")
    got = _attacker("exhaust", locked.url, env={"DISCOMFORT_SERVER_SECRET": SECRET})
    assert got["create_statuses"] == [200, 200, 200, 429]  # 3 runs per client
    assert got["refusal"]["type"] == "RemoteLimitError" and "limit per client" in got["refusal"]["error"]
    assert got["budget_1T"] == [200, 32 << 20]  # the server's cap wins
    for bad in ("1e+300", "'lots'", "-5", "True", "[1]"):
        assert got[f"budget:{bad}"] == 400, bad
    assert got["announce_1TiB"] in (400, 413)  # refused before a byte is reserved
    assert got["over_max_value"] == 413
    assert got["over_run_bytes"] == [200, 200, 413, 413]  # 8 MiB per run
    assert got["chunked"] == 411 and got["big_create_body"] == 413
    assert locked.process.poll() is None
    assert status_kib(locked.process.pid, "VmRSS") - rss0 < 256 * 1024


def test_creating_runs_needs_the_secret(locked):
    with pytest.raises(AuthenticationError, match="needs the server secret"):
        RemoteContext(locked.url, secret="")
    with pytest.raises(AuthenticationError, match="wrong server secret"):
        RemoteContext(locked.url, secret="x" * 40)
    image = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(5))
    wf = json.loads((HERE.parents[0] / "fixtures" / "workflows" / "run_loop_invert.json").read_text())
    os.environ["DISCOMFORT_SERVER_SECRET"] = SECRET
    try:
        with pytest.warns(Warning):
            out = run_sequential(wf, {"image": image}, executor=locked, transport="http", timeout=120)
    finally:
        del os.environ["DISCOMFORT_SERVER_SECRET"]
    assert torch.equal(out["image"], 1.0 - image)


def test_a_server_beyond_loopback_without_secret_refuses_runs(exposed):
    r = requests.post(f"{exposed.url}/discomfort/runs", json={}, timeout=10)
    assert r.status_code == 403 and "DISCOMFORT_SERVER_SECRET" in r.json()["error"]
    assert "listens beyond loopback" in exposed.log_path.read_text()  # the log says how to enable
    # What the same-host check needs still works, and reveals only digests.
    info = exposed.host_info()
    assert set(info) == {"nonce", "host", "user", "shm", "version"}
    assert requests.get(f"{exposed.url}/discomfort/host_info", timeout=10).status_code == 400


def _gated_workflows(fifo: str, release: str) -> list[dict]:
    gate = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
            "2": {"class_type": "DiscomfortTestGate", "inputs": {"value": ["1", 0], "signal": fifo,
                                                                 "release": release}},
            "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid", "input_data": ["2", 0]}}}
    invert = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid"}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["2", 0]}}}
    return [gate, invert]


@pytest.mark.filterwarnings("ignore::discomfort.remote.TransportWarning")
@pytest.mark.parametrize("transport", ["shm", "http"])
def test_prompts_and_routes_cannot_reach_a_live_run(server, tmp_path, transport):
    """The run id is public (ComfyUI's /queue); it opens nothing: no route, no prompt of others."""
    started, release = Fifo(tmp_path / "started"), str(tmp_path / "release")
    image = torch.rand(1, 6, 6, 3, generator=torch.Generator().manual_seed(7))
    result: dict = {}

    def victim():
        try:
            result["out"] = run_sequential(_gated_workflows(started.path, release), {"image": image}, executor=server,
                                           transport=transport, timeout=300)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=victim)
    thread.start()
    try:
        assert started.wait(), result  # held at the gate
        attacker = subprocess.Popen([sys.executable, str(HERE / "_attacker.py"), "steal", server.url, "out"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        queued = json.loads(attacker.stdout.readline())["queued"]
        assert len(queued) >= 1  # its prompt waits behind the victim's
    finally:
        Path(release).touch()
        started.close()
    attacker.stdin.write("go\n")
    attacker.stdin.flush()
    got = json.loads(attacker.stdout.readline())
    assert attacker.wait(timeout=120) == 0
    attacker.stdin.close()
    attacker.stdout.close()
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert len(got["run_ids"]) >= 1
    for name, status in got["routes"]:
        assert status in (401, 403, 404), (name, status)  # 404: an older run that has ended
    assert any(status == 401 for name, status in got["routes"] if name.endswith(":none"))
    assert "discomfort.errors.PromptNotAllowedError" in got["prompt_errors"]
    assert torch.equal(result["out"]["out"], 1.0 - image)  # the victim's values are intact
