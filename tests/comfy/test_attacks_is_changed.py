"""A prompt's loaders are bound to the versions they read: a forged ``is_changed`` is refused.

The attack (issue 23, round two): ComfyUI takes a node's ``is_changed`` as sent, as the node's
cache key; a loader's own is ``[version]`` of its key, a small integer. With a cache that keeps
older entries (``--cache-lru``), a copy of the orchestrator's live prompt (read in /queue or
/history) whose loader carries an older ``is_changed`` gets the outputs computed from the older
value, and its port (which always runs) wrote that stale result over the run's value. The digest now covers a loader's
``is_changed`` and the orchestrator registers the one ComfyUI will compute (the key's version).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from discomfort import WorkflowContext
from discomfort.comfy import launch_server
from discomfort.errors import NodeExecutionError
from discomfort.prompt_forms import prompt_as_run
from discomfort.remote import RemoteContext

pytestmark = pytest.mark.comfy
HERE = Path(__file__).resolve().parent
NODE_PACK = HERE.parents[1] / "comfy_nodes"


@pytest.fixture(scope="module")
def lru_server(comfy_path, tmp_path_factory):
    """A server whose cache keeps older entries: the stale outputs the attack needs are there."""
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK], api_nodes=False, extra_args=["--cache-lru", "10"],
                       work_dir=tmp_path_factory.mktemp("lru-server"), startup_timeout=180) as srv:
        yield srv


def _workflow(run_id: str) -> dict:
    return {
        "1": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": run_id, "unique_id": "x"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["2", 0], "run_id": run_id}},
    }


@pytest.mark.filterwarnings("ignore::discomfort.remote.TransportWarning")
@pytest.mark.parametrize("transport", ["shm", "http"])
def test_an_older_is_changed_on_a_live_prompts_loader_is_refused(lru_server, transport):
    """Two iterations of the orchestrator (x = a, then b); while the second is registered the
    attacker queues copies with older loader fingerprints until one comes from the cache (the
    first iteration's): refused, y stays 1 - b."""
    a, b = (torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(s)) for s in (21, 22))
    with (WorkflowContext() if transport == "shm" else RemoteContext(lru_server.url)) as ctx:
        prompt = _workflow(ctx.run_id)
        versions, digest = [], None
        for value in (a, b):  # as the engine does each iteration: save, register, run, revoke
            if digest is not None:
                ctx.revoke_prompt(digest)
            versions.append(ctx.save("x", value))
            digest = ctx.allow_prompt(prompt_as_run(prompt, lru_server))
            lru_server.execute(prompt, timeout=60)  # the second stays registered: the attack's window
        assert torch.equal(ctx.load("y"), 1.0 - b)
        written = ctx.info("y")["version"]
        attacker = subprocess.run([sys.executable, str(HERE / "_attacker_is_changed.py"), lru_server.url, ctx.run_id],
                                  capture_output=True, text=True, timeout=120, check=True)
        got = json.loads(attacker.stdout)
        assert got["hit"] == versions[0], got  # the first iteration's loader, from the cache
        assert "discomfort.errors.PromptNotAllowedError" in got["errors"], got
        assert ctx.info("y")["version"] == written  # the port never wrote
        assert torch.equal(ctx.load("y"), 1.0 - b)
        ctx.revoke_prompt(digest)


def test_a_prompt_that_reads_and_writes_one_key_passes_every_check(lru_server):
    """A loop step (loader x, port x) and a second port after it: the key changes mid-prompt, the
    registered form still matches at each node; registered once and run again after that write
    (x changed), it is refused, as a copy queued by someone else would be."""
    a = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(23))
    with WorkflowContext() as ctx:
        prompt = _workflow(ctx.run_id)
        prompt["4"] = {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x", "input_data": ["2", 0],
                                                                  "run_id": ctx.run_id}}
        ctx.save("x", a)
        digest = ctx.allow_prompt(prompt_as_run(prompt, lru_server))
        lru_server.execute(prompt, timeout=60)
        assert torch.equal(ctx.load("x"), 1.0 - a) and torch.equal(ctx.load("y"), 1.0 - a)
        with pytest.raises(NodeExecutionError, match="PromptNotAllowedError|does not accept"):
            lru_server.execute(prompt, timeout=60)  # x has a new version: not the registered prompt
        assert torch.equal(ctx.load("y"), 1.0 - a)
        ctx.revoke_prompt(digest)
        ctx.allow_prompt(prompt_as_run(prompt, lru_server))  # registered again: the next step runs
        lru_server.execute(prompt, timeout=60)
        assert torch.allclose(ctx.load("x"), a) and torch.allclose(ctx.load("y"), a)


def test_without_a_cache_the_registered_prompt_runs_and_a_sent_is_changed_is_refused(comfy_path, tmp_path):
    """A server started with --cache-none never sets is_changed: the form without it (registered
    too) is what its nodes see; a copy that sends one is still refused."""
    a = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(24))
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK], api_nodes=False, extra_args=["--cache-none"],
                       work_dir=tmp_path, startup_timeout=180) as srv, WorkflowContext() as ctx:
        prompt = _workflow(ctx.run_id)
        version = ctx.save("x", a)
        digest = ctx.allow_prompt(prompt_as_run(prompt, srv))
        srv.execute(prompt, timeout=60)
        assert torch.equal(ctx.load("y"), 1.0 - a)
        written = ctx.info("y")["version"]
        forged = {**prompt, "1": {**prompt["1"], "is_changed": [version - 1]}}
        with pytest.raises(NodeExecutionError, match="does not accept"):
            srv.execute(forged, timeout=60)
        assert ctx.info("y")["version"] == written
        ctx.revoke_prompt(digest)
