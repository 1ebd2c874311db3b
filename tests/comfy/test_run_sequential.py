"""run_sequential inside a real ComfyUI, in-process and through a server (another process)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from discomfort import WorkflowContext
from discomfort.comfy import cached_nodes
from discomfort.errors import NodeExecutionError, UnknownKeyError
from discomfort.workflows.format import stitch
from discomfort.sequential import run_sequential
from discomfort.workflows.tools import prepare_prompt

from _helpers import leftovers

pytestmark = pytest.mark.comfy

WORKFLOWS = Path(__file__).resolve().parents[1] / "fixtures" / "workflows"


def _run_id(rec: "Recorder") -> str:
    for prompt in rec.prompts:
        for node in prompt.values():
            if "run_id" in node["inputs"]:
                return node["inputs"]["run_id"]
    raise AssertionError("no prompt carried a run_id")


class Recorder:
    """An executor wrapper that keeps what each prompt looked like on the wire."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes: list[int] = []
        self.prompts: list[dict] = []

    def execute(self, prompt, timeout=None):
        self.sizes.append(len(json.dumps(prompt)))
        self.prompts.append(json.loads(json.dumps(prompt)))
        return self.inner.execute(prompt, timeout=timeout)

    def object_info(self, *a):
        return self.inner.object_info(*a)


@pytest.mark.parametrize("iterations", [1, 4, 5])
def test_loop_of_image_inverts_gives_exact_pixels(executor, workflow, iterations, tmp_path):
    image = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(iterations))
    rec = Recorder(executor)
    result = run_sequential(workflow("run_loop_invert.json"), {"image": image}, iterations=iterations,
                            executor=rec, timeout=120, disk_dir=tmp_path)
    assert len(rec.prompts) == iterations
    expected = image if iterations % 2 == 0 else 1.0 - image
    assert set(result) == {"image"}
    assert result["image"].dtype == torch.float32 and result["image"].shape == image.shape
    assert torch.equal(result["image"], expected)
    # The run is over: its shared memory and files are gone, its values stay valid.
    assert leftovers(_run_id(rec)) == []
    assert list(tmp_path.iterdir()) == []
    gc.collect()
    assert torch.equal(result["image"], expected)


def test_chain_passes_a_latent(executor, workflow):
    a, b = workflow("run_latent_a.json"), workflow("run_latent_b.json")
    result = run_sequential([a, b], executor=executor, timeout=120)
    assert set(result) == {"latent", "latent2"}
    assert result["latent"]["samples"].shape == (2, 4, 12, 12)
    assert result["latent2"]["samples"].shape == (2, 4, 12, 24)
    assert not result["latent2"]["samples"].any()


def test_latent_input_through_upscale_is_exact(executor, workflow):
    samples = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    result = run_sequential(workflow("run_latent_b.json"), {"latent": {"samples": samples, "batch_index": [0]}},
                            executor=executor, timeout=120)
    expected = torch.nn.functional.interpolate(samples, size=(12, 24), mode="nearest-exact")
    out = result["latent2"]
    assert torch.equal(out["samples"], expected)
    assert out["batch_index"] == [0]  # the rest of the LATENT dict travels too


def test_image_mask_string_and_int(executor, workflow):
    image = torch.rand(1, 5, 7, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(2))
    inputs = {"image": image, "mask": mask, "text": "héllo wörld ✓", "count": 3}
    result = run_sequential(workflow("run_values.json"), inputs, executor=executor, timeout=120)
    assert set(result) == {"image_inv", "mask_inv", "text_out", "count_out", "red"}
    assert torch.equal(result["image_inv"], 1.0 - image)
    assert torch.equal(result["mask_inv"], 1.0 - mask)
    assert result["text_out"] == "héllo wörld ✓"
    assert result["count_out"] == 3 and isinstance(result["count_out"], int)
    red = result["red"]
    assert red.shape == (1, 4, 3, 3)
    assert torch.equal(red[..., 0], torch.ones(1, 4, 3)) and not red[..., 1:].any()


def test_stitched_prompt_gives_the_same_result(executor, workflow):
    a, b = workflow("run_latent_a.json"), workflow("run_latent_b.json")
    samples = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(5))
    chained = run_sequential([b, b], {"latent": {"samples": samples}}, executor=executor, timeout=120)
    one = run_sequential([stitch([b, b])], {"latent": {"samples": samples}}, executor=executor, timeout=120)
    assert set(one) == set(chained) == {"latent2"}
    assert torch.equal(one["latent2"]["samples"], chained["latent2"]["samples"])

    sep = run_sequential([a, b], executor=executor, timeout=120)
    joined = run_sequential(stitch([a, b]), executor=executor, timeout=120)
    assert set(sep) == set(joined) == {"latent", "latent2"}
    for key in sep:
        assert torch.equal(sep[key]["samples"], joined[key]["samples"])

    image = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(6))
    loop = workflow("run_loop_invert.json")
    looped = run_sequential(loop, {"image": image}, iterations=3, executor=executor, timeout=120)
    stitched = run_sequential(stitch([loop] * 3), {"image": image}, executor=executor, timeout=120)
    assert torch.equal(looped["image"], stitched["image"])
    assert torch.equal(stitched["image"], 1.0 - image)


def test_prompts_carry_no_payload(executor, workflow):
    rec = Recorder(executor)
    small = torch.rand(1, 8, 8, 3)
    big = torch.rand(1, 1024, 1024, 3)  # 12 MiB
    r1 = run_sequential(workflow("run_loop_invert.json"), {"image": small}, iterations=2, executor=rec, timeout=120)
    r2 = run_sequential(workflow("run_loop_invert.json"), {"image": big}, iterations=2, executor=rec, timeout=120)
    assert torch.equal(r1["image"], small) and torch.equal(r2["image"], big)
    assert len(set(rec.sizes)) == 1 and rec.sizes[0] < 1024, rec.sizes
    sent = rec.prompts[0]
    run_id = sent["1"]["inputs"]["run_id"]
    assert sent["1"] == {"class_type": "DiscomfortDataLoader",
                         "inputs": {"run_id": run_id, "unique_id": "image"}, "_meta": sent["1"]["_meta"]}
    assert sent["3"]["inputs"]["run_id"] == run_id and sent["3"]["inputs"]["port_mode"] == "OUTPUT"
    assert rec.prompts[2]["1"]["inputs"]["run_id"] != run_id  # a new context for every call


def test_a_failing_node_surfaces_with_its_id(executor, workflow, tmp_path):
    rec = Recorder(executor)
    with pytest.raises(NodeExecutionError) as info:
        run_sequential(workflow("run_loop_invert.json"), {"image": "not an image"}, executor=rec,
                       timeout=120, disk_dir=tmp_path)
    assert info.value.node_id == "2" and info.value.class_type == "ImageInvert"
    assert "node 2" in str(info.value)
    assert leftovers(_run_id(rec)) == [] and list(tmp_path.iterdir()) == []


def test_missing_input_is_an_error_naming_it(executor, workflow):
    with pytest.raises(UnknownKeyError, match="'image'"):
        run_sequential(workflow("run_loop_invert.json"), executor=executor, timeout=120)


def test_dataloader_missing_key_is_a_node_error(executor):
    with WorkflowContext() as ctx:
        prompt = {
            "4": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": ctx.run_id, "unique_id": "absent"}},
            "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["4", 0],
                                                             "run_id": ctx.run_id}},
        }
        ctx.allow_prompt(prompt)
        with pytest.raises(NodeExecutionError) as info:
            executor.execute(prompt, timeout=60)
    assert info.value.node_id == "4"
    assert "absent" in info.value.message and ctx.run_id in info.value.message


def test_dataloader_cache_follows_the_stored_version(executor, workflow):
    """Same value: served from ComfyUI's cache; new value, or delete and re-save: reruns."""
    img1 = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(11))
    img2 = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(12))
    wf = {
        "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["2", 0]}},
    }
    with WorkflowContext() as ctx:
        prompt = prepare_prompt(wf, ctx.run_id)

        def run():
            v = ctx.info("y")["version"] if "y" in ctx else None
            digest = ctx.allow_prompt(prompt)  # as run_sequential does for each prompt it queues
            executor.execute(prompt, timeout=60)
            ctx.revoke_prompt(digest)
            assert ctx.info("y")["version"] != v  # the port always runs and saves
            return set(cached_nodes(executor.last_messages)), ctx.load("y")

        ctx.save("x", img1)
        cached, y = run()
        assert "1" not in cached and torch.equal(y, 1.0 - img1)
        cached, y = run()  # same value
        assert {"1", "2"} <= cached and "3" not in cached and torch.equal(y, 1.0 - img1)
        ctx.save("x", img2)  # new value under the same key
        cached, y = run()
        assert "1" not in cached and torch.equal(y, 1.0 - img2)
        cached, y = run()
        assert {"1", "2"} <= cached
        assert ctx.delete("x")
        ctx.save("x", img2)  # delete and re-save, same bytes: a new version, so it reruns
        cached, y = run()
        assert "1" not in cached and "2" not in cached and torch.equal(y, 1.0 - img2)


def test_server_nodes_attach_to_the_orchestrators_context(server, workflow):
    """The server's nodes run in another process and reach the run through shared memory."""
    remote_pid = server.process.pid  # main.py runs in the launched process itself
    assert remote_pid != os.getpid()
    rec = Recorder(server)
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(21))
    result = run_sequential(workflow("run_loop_invert.json"), {"image": image}, iterations=3,
                            executor=rec, timeout=120)
    assert torch.equal(result["image"], 1.0 - image)
    assert max(rec.sizes) < 1024
    assert leftovers(_run_id(rec)) == []
    # The server still works for the next run (its attachment to the finished run is dropped).
    result = run_sequential(workflow("run_loop_invert.json"), {"image": image}, iterations=1,
                            executor=server, timeout=120)
    assert torch.equal(result["image"], 1.0 - image)


def test_ui_format_workflow_with_passthru_port(executor):
    """A UI-format file: converted with the executor's object_info; PASSTHRU ports save too."""
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(31))
    rec = Recorder(executor)
    result = run_sequential(WORKFLOWS / "ui_ports.json", {"image_in": image}, executor=rec, timeout=120)
    assert set(result) == {"blank", "inverted"}
    assert torch.equal(result["inverted"], 1.0 - image)
    assert torch.equal(result["blank"], torch.zeros(1, 8, 8, 3))
    sent = rec.prompts[0]
    assert sent["3"]["class_type"] == "DiscomfortDataLoader"
    assert sent["5"]["inputs"]["port_mode"] == "PASSTHRU" and sent["2"]["inputs"]["port_mode"] == "OUTPUT"


def test_several_writers_of_one_key_are_refused(inprocess):
    from discomfort.errors import WorkflowError

    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0}},
        "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "k", "input_data": ["1", 0]}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "k", "input_data": ["1", 0]}},
    }
    with pytest.raises(WorkflowError, match="'k' is written by several ports"):
        run_sequential(wf, executor=inprocess)


def test_concurrent_runs_through_one_server(server, workflow):
    """Two orchestrator threads share one server: each gets its own run and its own result."""
    from concurrent.futures import ThreadPoolExecutor

    images = [torch.rand(1, 6, 6, 3, generator=torch.Generator().manual_seed(40 + i)) for i in range(2)]

    def one(i):
        return run_sequential(workflow("run_loop_invert.json"), {"image": images[i]}, iterations=i + 1,
                              executor=server, timeout=120)["image"]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(one, range(2))
    assert torch.equal(first, 1.0 - images[0])
    assert torch.equal(second, images[1])
