"""A same-user process truncates a run's chunk between the orchestrator's save and the prompt
that loads it in a launched ComfyUI server: the prompt fails with TruncatedStoreError naming the
key, and the server (which stays attached to runs between prompts) lives on and serves the next
run. Before the guard, its DiscomfortDataLoader read the value through a zero-copy mapping and
the server died of SIGBUS.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from discomfort import WorkflowContext
from discomfort.errors import NodeExecutionError
from discomfort.workflows.tools import prepare_prompt

pytestmark = pytest.mark.comfy

WORKFLOW = {
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["2", 0]}},
}


def _truncate(path: str) -> None:
    """ftruncate to 0 from a second, real process."""
    subprocess.run([sys.executable, "-c", "import os, sys; os.ftruncate(os.open(sys.argv[1], os.O_RDWR), 0)", path],
                   check=True, timeout=60)


def test_truncated_chunk_fails_the_prompt_and_the_server_lives(server):
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(5))  # 3 MiB: a RAM chunk
    with WorkflowContext() as ctx:
        prompt = prepare_prompt(WORKFLOW, ctx.run_id)
        ctx.save("x", image)
        ctx.allow_prompt(prompt)  # after its input: the digest binds the version it reads
        server.execute(prompt, timeout=120)  # the server attaches and keeps the run mapped
        assert torch.equal(ctx.load("y"), 1.0 - image)

        ctx.save("x", image.flip(1))  # a new value, then another process cuts its chunk
        ctx.allow_prompt(prompt)
        _truncate(ctx.store.chunk_path(ctx.info("x")["chunk"]))
        with pytest.raises(NodeExecutionError) as info:
            server.execute(prompt, timeout=120)
        assert info.value.node_id == "1"  # the loader in place of the INPUT port
        assert "truncated it" in info.value.message, info.value.message
        assert ctx.run_id in info.value.message and "'x'" in info.value.message
        assert server.process.poll() is None  # no SIGBUS: alive

    # and it still serves the next run
    with WorkflowContext() as ctx:
        prompt = prepare_prompt(WORKFLOW, ctx.run_id)
        ctx.save("x", image)
        ctx.allow_prompt(prompt)
        server.execute(prompt, timeout=120)
        assert torch.equal(ctx.load("y"), 1.0 - image)
