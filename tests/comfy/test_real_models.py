"""A loop on a real architecture: an SD1.5-shaped checkpoint and a LoRA (ComfyUI's own model
classes, random fp16 weights, 1,066 M parameters, 2.1 GB; built once and cached beside the test
ComfyUI), loaded by one workflow into ports by reference and sampled by another, 3 iterations
at 64x64, 4 steps, on CPU.

On every executor (ComfyUI in process, in a fresh process; a server over shared memory; a server
over HTTP; a third server that builds the references from their recipes) the final
latent is finite and bitwise equal to the same computation sent as one prompt, the checkpoint
and the LoRA load once, and each CLIPTextEncode runs once: the load workflow is not queued again
(discomfort.reuse) and ComfyUI's default cache keeps the encodings. Only one process holds the
model at a time (a server holding it peaks at about 6.4 GB).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from discomfort import Run
from discomfort.comfy import launch_server

import _real_models as rm
from conftest import NODE_PACK

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(900)]
ONCE = {"CheckpointLoaderSimple": 1, "LoraLoader": 1, "CLIPTextEncode": 2}  # two encoders, each once


@pytest.fixture(scope="module")
def models(comfy_path):
    path, seconds = rm.ensure_models(comfy_path)
    if seconds:
        print(f"built the SD1.5-shaped checkpoint and LoRA in {seconds:.1f}s: {path}")
    return path


@pytest.fixture(scope="module")
def single(comfy_path, models, tmp_path_factory):
    """The loop and the single prompt in ComfyUI in a fresh process: the reference for every executor."""
    out = tmp_path_factory.mktemp("real-inprocess")
    env = {**os.environ, "DISCOMFORT_PROBE_LOG": str(out / "probe.log")}
    subprocess.run([sys.executable, str(rm.HERE / "_real_models.py"), str(comfy_path), str(out)], env=env,
                   check=True, timeout=900)
    report = __import__("json").loads((out / "report.json").read_text())
    return report, dict(np.load(out / "loop.npz")), dict(np.load(out / "single.npz"))


def _same(got: dict, reference: dict) -> None:
    assert np.isfinite(got["latent"]).all()
    assert got["latent"].shape == (1, 4, rm.SIZE // 8, rm.SIZE // 8)
    assert got["latent"].tobytes() == reference["latent"].tobytes()
    assert got["image"].tobytes() == reference["image"].tobytes()


def test_in_process(single):
    report, loop, reference = single
    assert report["single_calls"] == ONCE  # the single prompt: one load, one encoding
    assert float(np.abs(reference["latent"]).max()) > 0  # it sampled something
    _same(loop, reference)
    assert report["reused"] == [[1, 0], [2, 0]]
    assert report["loop_calls"] == ONCE


def _loop(server, transport: str, log) -> tuple[dict, dict[str, int], dict]:
    """The loop on ``server``: its latent and image, the watched nodes' calls, the recipes of its references."""
    before = rm.calls(log)
    with Run(server, transport=transport) as run:
        result = run.execute([rm.LOAD, rm.SAMPLE], {"latent": rm.first_latent()}, rm.ITERATIONS)
        recipes = {uid: run.recipe(uid) for uid in ("model", "clip", "vae")} if transport == "shm" else {}
    assert result.reused == [(1, 0), (2, 0)]
    return rm.arrays(result), rm.minus(rm.calls(log), before), recipes


def test_servers_shared_memory_http_and_a_recipe_on_a_third_server(comfy_path, models, single, tmp_path):
    """One server at a time, each loading the model once: a server that loads it again while the
    last run's model is still alive peaks at twice the memory."""
    _report, _loop_inprocess, reference = single
    config = rm.model_paths_config(models, tmp_path)

    def server(name):
        log = tmp_path / f"{name}.log"
        return log, launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, rm.PROBE_PACK],
                                  extra_args=["--extra-model-paths-config", str(config)], work_dir=tmp_path / name,
                                  env={**os.environ, "DISCOMFORT_PROBE_LOG": str(log)}, startup_timeout=180,
                                  api_nodes=False)

    recipes: dict = {}
    for transport in ("shm", "http"):
        log, launching = server(transport)
        with launching as srv:
            got, calls, found = _loop(srv, transport, log)
        _same(got, reference)
        assert calls == ONCE, transport
        recipes.update(found)
    # The references' recipes, taken where they were built, build them on another server.
    log, launching = server("recipes")
    with launching as third, Run(third, transport="shm") as run:
        for uid, recipe in recipes.items():
            run.save_recipe(uid, recipe)
        result = run.execute([rm.SAMPLE], {"latent": rm.first_latent()}, rm.ITERATIONS)
        _same(rm.arrays(result), reference)
        assert rm.calls(log) == ONCE
