"""Fixtures for the tests that run inside a real ComfyUI.

ComfyUI comes from ``scripts/setup_comfyui.py``, which prints its directory:

    export DISCOMFORT_COMFYUI=$(.venv/bin/python scripts/setup_comfyui.py --python .venv/bin/python | tail -n1)
    PYTHONPATH=python .venv/bin/python -m pytest tests/comfy -q

Tests marked ``comfy`` are skipped, with the reason, when ``DISCOMFORT_COMFYUI`` is unset. ComfyUI
starts once per test session: one in-process executor and one launched server, shared by all
tests (session-scoped fixtures).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _installed_comfy import comfy_copy, copy_server  # noqa: F401 - session fixtures: ComfyUI with the wheel installed

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfy_nodes"
TEST_PACK = Path(__file__).resolve().parent / "test_pack"  # test-only nodes (gate, steps, model stand-in)
WORKFLOWS = REPO / "tests" / "fixtures" / "workflows"
SKIP_REASON = (
    "DISCOMFORT_COMFYUI is not set: run `python scripts/setup_comfyui.py --python .venv/bin/python` "
    "and export DISCOMFORT_COMFYUI=<the directory it prints> to run the tests inside a real ComfyUI"
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DISCOMFORT_COMFYUI"):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("comfy") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    value = os.environ.get("DISCOMFORT_COMFYUI")
    if not value:
        pytest.skip(SKIP_REASON)
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "execution.py").is_file():
        pytest.fail(f"DISCOMFORT_COMFYUI={value} is not a ComfyUI tree (no main.py / execution.py)")
    return path


@pytest.fixture(scope="session")
def inprocess(comfy_path):
    """ComfyUI's PromptExecutor in this process, with the repository's node pack."""
    from discomfort.comfy import InProcessComfy

    return InProcessComfy(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK])


@pytest.fixture(scope="session")
def server(comfy_path, tmp_path_factory):
    """One ComfyUI server for the session, in another process, with the node pack."""
    from discomfort.comfy import launch_server

    work = tmp_path_factory.mktemp("comfy-server")
    # No API nodes (ComfyUI's default loads them): a faster start, and no test runs one.
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], work_dir=work, startup_timeout=180,
                       api_nodes=False) as srv:
        yield srv


@pytest.fixture(params=["inprocess", "server"])
def executor(request):
    """Each test that takes it runs once in-process and once through the server."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def workflow():
    def load(name: str) -> dict:
        return json.loads((WORKFLOWS / name).read_text())

    return load
