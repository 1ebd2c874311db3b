"""The store backend every process of the test run uses: this one (the orchestrator, and ComfyUI
in process), the launched ComfyUI server (its nodes and its HTTP run routes pick the same one),
and the standalone run server. scripts/test.sh runs the ComfyUI and HTTP suites a second time
with DISCOMFORT_BACKEND=python: these tests show the setting reached each process."""

from __future__ import annotations

import os

import pytest
import requests

import discomfort
from discomfort.remote import standalone
from discomfort.remote.framing import SECRET_HEADER, TOKEN_HEADER

SECRET = "a secret of more than sixteen characters"


def asked_for() -> str:
    """The backend the environment asks for ("auto": the one this process found)."""
    want = os.environ.get("DISCOMFORT_BACKEND", "").strip().lower()
    if want in ("native", "python"):
        return want
    if os.environ.get("DISCOMFORT_REQUIRE_NATIVE") == "1":
        return "native"
    return discomfort.backend


def served_backend(url: str, secret: str | None = None) -> str:
    """The backend of a run the server at `url` creates for us (POST /discomfort/runs), ended after."""
    made = requests.post(url + "/discomfort/runs", json={}, headers={SECRET_HEADER: secret} if secret else {},
                         timeout=60)
    assert made.status_code == 200, made.text
    answer = made.json()
    ended = requests.delete(f"{url}/discomfort/runs/{answer['run_id']}", headers={TOKEN_HEADER: answer["token"]},
                            timeout=60)
    assert ended.status_code == 200 and ended.json()["ended"], ended.text
    return answer["backend"]


def test_this_process_uses_the_backend_asked_for():
    """The orchestrator, and the nodes of ComfyUI in process (they attach with this process's)."""
    assert discomfort.backend == asked_for()
    with discomfort.WorkflowContext(ram_budget=1 << 24) as ctx:
        assert ctx.backend == asked_for()


def test_the_comfyui_server_uses_the_backend_asked_for(server):
    """The launched server inherits the environment: its runs, and its nodes, use the same backend."""
    assert served_backend(server.url) == asked_for()


def test_the_standalone_run_server_uses_the_backend_asked_for():
    pytest.importorskip("aiohttp")
    with standalone.start(SECRET) as (url, _proc):
        assert served_backend(url, SECRET) == asked_for()
