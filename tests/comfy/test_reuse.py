"""A workflow that would build the same references again is not queued again (discomfort.reuse),
and saving the very object a key holds by reference keeps the key's version: inside a real
ComfyUI, in process and through a launched server (shared memory and HTTP)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from discomfort import Run, run_sequential

from conftest import NODE_PACK, TEST_PACK

pytestmark = pytest.mark.comfy
PROBE_PACK = NODE_PACK.parents[0] / "tests" / "comfy" / "probe_pack"

LOAD = {  # a MODEL stand-in that counts its constructions, into a port (by reference)
    "1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "m"}},
    "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model", "input_data": ["1", 0]}},
}
USE = {  # which instance it was given, and how many were built so far
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model"}},
    "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "report", "input_data": ["2", 0]}},
}


UNBOX = {  # the boxed value and the box's serial (which box it was)
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "box"}},
    "2": {"class_type": "DiscomfortProbeUnbox", "inputs": {"box": ["1", 0]}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image", "input_data": ["2", 0]}},
    "4": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "serial", "input_data": ["2", 1]}},
}


def _boxed(source: dict) -> dict:
    """``source`` (node "9") boxed into the port ``box``: a reference, as a model is."""
    return {"9": source, "2": {"class_type": "DiscomfortProbeBox", "inputs": {"value": ["9", 0]}},
            "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "box", "input_data": ["2", 0]}}}


def _empty_image(color: int) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}}


def _serials(history: list[str]) -> list[int]:
    return [int(re.search(r"serial=(\d+)", h).group(1)) for h in history]


@pytest.fixture(scope="module")
def probe_server(comfy_path, tmp_path_factory):
    """A server with the probe pack (boxes: any value kept by reference)."""
    from discomfort.comfy import launch_server

    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK, PROBE_PACK],
                       work_dir=tmp_path_factory.mktemp("reuse-server"), startup_timeout=180, api_nodes=False) as srv:
        yield srv


def test_a_loader_workflow_is_queued_once_per_run(executor):
    result = run_sequential([LOAD, USE], iterations=3, executor=executor, keep=["report"])
    assert result.reused == [(1, 0), (2, 0)]
    serials = _serials(result.history["report"])
    assert len(set(serials)) == 1, result.history["report"]  # one model for the three iterations
    assert len({re.search(r"constructed=(\d+)", h).group(1) for h in result.history["report"]}) == 1


def test_over_http_too(probe_server):
    result = run_sequential([LOAD, USE], iterations=3, executor=probe_server, transport="http", keep=["report"])
    assert result.reused == [(1, 0), (2, 0)]
    assert len(set(_serials(result.history["report"]))) == 1


def test_rerun_always_queues_it_and_the_default_cache_is_named(executor, caplog):
    caplog.set_level(logging.WARNING, logger="discomfort")
    result = run_sequential([LOAD, USE], iterations=3, executor=executor, keep=["report"], rerun="always")
    assert result.reused == []
    assert len(set(_serials(result.history["report"]))) == 3  # ComfyUI's default cache kept nothing
    warned = [r.getMessage() for r in caplog.records if "--cache-lru" in r.getMessage()]
    assert len(warned) == 1 and "Run.execute" in warned[0] and "'model'" in warned[0], warned


def test_rerun_must_be_known(inprocess):
    with pytest.raises(ValueError, match="rerun='sometimes'"):
        run_sequential([LOAD, USE], executor=inprocess, rerun="sometimes")


def test_the_same_reference_saved_again_keeps_its_version(inprocess, caplog):
    """On a cache that keeps the loader (LRU), the loader workflow queued again hands the port the
    same object: the key keeps its version, so ComfyUI's cache downstream stays valid."""
    caplog.set_level(logging.WARNING, logger="discomfort")
    versions: list[int] = []
    inprocess.set_cache(lru=16)
    try:
        with Run(inprocess) as run:
            result = run.execute([LOAD, USE], iterations=3, rerun="always", keep=["report"],
                                 on_iteration=lambda i, values: versions.append(run.context.info("model")["version"]))
    finally:
        inprocess.set_cache(0)
    assert result.reused == []
    assert len(set(_serials(result.history["report"]))) == 1
    assert len(versions) == 3 and len(set(versions)) == 1, versions
    assert not [r for r in caplog.records if "--cache-lru" in r.getMessage()]


def _image(server, name: str, rgb: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), rgb).save(server.work_dir / "input" / name)


def test_a_workflow_fed_by_load_image_runs_again_when_its_file_changed(probe_server):
    """LoadImage defines IS_CHANGED (the file's hash): the orchestrator cannot tell whether the
    file changed, so such a workflow is always queued, and the new file's pixels come out."""
    _image(probe_server, "reuse.png", (255, 0, 0))
    boxed = _boxed({"class_type": "LoadImage", "inputs": {"image": "reuse.png"}})
    with Run(probe_server) as run:
        first = run.execute([boxed, UNBOX])
        again = run.execute([boxed, UNBOX])
        _image(probe_server, "reuse.png", (0, 0, 255))
        changed = run.execute([boxed, UNBOX])
    assert first.reused == again.reused == changed.reused == []
    assert np.asarray(first["image"])[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert np.asarray(changed["image"])[0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert len({first["serial"], again["serial"], changed["serial"]}) == 3

    # The same workflow fed by a node without IS_CHANGED is reused: the box is not made again.
    plain = _boxed(_empty_image(255))
    with Run(probe_server) as run:
        first = run.execute([plain, UNBOX])
        again = run.execute([plain, UNBOX])
    assert first.reused == [] and again.reused == [(0, 0)]
    assert first["serial"] == again["serial"]


def test_an_output_node_is_never_skipped(probe_server):
    saving = {**LOAD, "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "reuse", "images": ["4", 0]}},
              "4": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    result = run_sequential([saving, USE], iterations=2, executor=probe_server)
    assert result.reused == []
    assert sum(len(files) for files in result.files) == 2


def test_the_server_lists_its_fingerprinted_nodes(probe_server):
    from discomfort.reuse import FINGERPRINTS_ROUTE

    names = set(probe_server.get_json(FINGERPRINTS_ROUTE)["is_changed"])
    assert {"LoadImage", "DiscomfortPort", "DiscomfortDataLoader", "DiscomfortTestGate"} <= names
    assert not names & {"CheckpointLoaderSimple", "KSampler", "DiscomfortTestModelLoader", "DiscomfortProbeBox"}


def test_a_widget_that_changes_per_iteration_makes_a_new_prompt(probe_server):
    """A seed control (here "increment" on EmptyImage's color) changes the prompt each iteration:
    nothing is reused; with "fixed" the box is made once."""
    boxed = _boxed(_empty_image(5))
    moving = run_sequential([boxed, UNBOX], iterations=3, executor=probe_server, keep=["serial"],
                            controls={"9.color": "increment"})
    assert moving.reused == [] and len(set(moving.history["serial"])) == 3
    assert [c[0]["9.color"] for c in moving.controls] == [5, 6, 7]
    fixed = run_sequential([boxed, UNBOX], iterations=3, executor=probe_server, keep=["serial"], controls="fixed")
    assert fixed.reused == [(1, 0), (2, 0)] and len(set(fixed.history["serial"])) == 1
