"""The Ray backend (discomfort.distributed) on a two-node Ray cluster started by the tests.

The cluster (two nodes on this machine: the head, and a second node on 127.0.0.2, one CPU and a
200 MB object store each) and, for the ComfyUI tests, a pool of two ComfyUI servers (one per
node) start once for this module. Skipped, with the reason, when Ray is not installed; the
ComfyUI tests also need DISCOMFORT_COMFYUI (see tests/comfy/conftest.py).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import discomfort
from discomfort.errors import (
    InvalidRunIdError,
    RunFinishedError,
    UnknownKeyError,
    UnknownRunError,
)

REPO = Path(__file__).resolve().parents[1]
NODE_PACK = REPO / "comfy_nodes"
TEST_PACK = REPO / "tests" / "comfy" / "test_pack"  # test-only nodes (the gate used to cut a run)
WORKFLOWS = REPO / "tests" / "fixtures" / "workflows"
MB = 1 << 20

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(
    ray is None, reason="Ray is not installed (pip install -c .ci/constraints.txt 'ray[default]'): "
                        "the Ray backend's tests need it"
)
needs_comfy = pytest.mark.skipif(
    not os.environ.get("DISCOMFORT_COMFYUI"),
    reason="DISCOMFORT_COMFYUI is not set: export DISCOMFORT_COMFYUI=$(python scripts/setup_comfyui.py "
           "--python .venv/bin/python | tail -n1) to run the Ray tests inside real ComfyUI servers",
)

TIMINGS: dict[str, float] = {}


# ---- without a cluster ------------------------------------------------------------------------------


def test_ray_run_ids_without_ray_installed_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UnknownRunError, match="Ray is not installed"):
        discomfort.get_context("ray-0123456789abcdef")


def test_plain_run_ids_never_touch_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UnknownRunError) as info:
        discomfort.get_context("0123456789abcdef0123456789abcdef")
    assert "Ray" not in str(info.value)


@needs_ray
def test_ray_run_id_without_a_cluster_says_so():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import discomfort\n"
            "try:\n    discomfort.get_context('ray-0123456789abcdef')\n"
            "except discomfort.UnknownRunError as exc:\n    print('UnknownRunError:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "UnknownRunError:" in out.stdout, out.stdout + out.stderr
    assert "RAY_ADDRESS" in out.stdout


@needs_ray
def test_ray_runs_say_which_options_they_do_not_take():
    """run_sequential's store options size shared memory, which a Ray run does not use; progress=
    with on_progress= is ambiguous. Both are refused before the cluster is reached."""
    from discomfort.distributed import RayRun, run_sequential_ray

    with pytest.raises(ValueError, match="object store"):
        run_sequential_ray([{}], ram_budget="1G")
    with pytest.raises(ValueError, match="object store"):
        RayRun(None, disk_dir="/tmp")  # type: ignore[arg-type]
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="on_progress= only"):
        run_sequential_ray([{}], progress=print, on_progress=print)


# ---- the cluster --------------------------------------------------------------------------------------


def _node_pythonpath() -> str:
    """PYTHONPATH for the cluster's workers: this very discomfort (a source tree is not installed)."""
    parent = str(Path(discomfort.__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if Path(parent).name not in ("site-packages", "dist-packages") and parent not in parts:
        parts.insert(0, parent)
    return os.pathsep.join(parts)


@pytest.fixture(scope="module")
def cluster():
    if ray is None:
        pytest.skip("Ray is not installed")
    from ray.cluster_utils import Cluster

    import distributed_probes

    ray.cloudpickle.register_pickle_by_value(distributed_probes)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _node_pythonpath()
    t0 = time.monotonic()
    node_args = {"num_cpus": 1, "object_store_memory": 200 * MB}
    try:
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={**node_args, "include_dashboard": False})
        second = c.add_node(**node_args, node_ip_address="127.0.0.2")
        c.wait_for_nodes()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    TIMINGS["cluster start (s)"] = time.monotonic() - t0
    try:
        yield {"cluster": c, "head": c.head_node.node_id, "other": second.node_id}
    finally:
        ray.shutdown()
        c.shutdown()
        print(f"\n[test_distributed] timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")


def _on(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


@pytest.fixture(scope="module")
def probe(cluster):
    """A worker process on the second node."""
    from distributed_probes import Probe

    p = Probe.options(scheduling_strategy=_on(cluster["other"])).remote()
    assert ray.get(p.where.remote())["node_id"] == cluster["other"]
    yield p
    ray.kill(p)


def _store_usage() -> dict[str, tuple[int, int]]:
    """Per node: (bytes used, objects) in Ray's object store."""
    from ray._private.internal_api import node_stats

    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            s = node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False).store_stats
            out[n["NodeID"]] = (int(s.object_store_bytes_used), int(s.num_local_objects))
    return out


def _wait_usage_at_most(baseline: dict, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = _store_usage()
        if all(now[n][0] <= baseline[n][0] and now[n][1] <= baseline[n][1] for n in baseline):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.2)


# ---- RayContext -----------------------------------------------------------------------------------------


@needs_ray
def test_value_saved_on_one_node_loads_exact_on_the_other(cluster, probe):
    from distributed_probes import same, sample_values

    from discomfort.distributed import RayContext

    with RayContext() as ctx:
        assert ctx.run_id.startswith("ray-")
        # saved here (head node), loaded on the other node through discomfort.get_context
        for k, v in sample_values(1).items():
            ctx.save(k, v)
        report = ray.get(probe.check_samples.remote(ctx.run_id, 1))
        assert report["node_id"] == cluster["other"] and report["context"] == "RayContext"
        assert all(report["exact"].values()), report["exact"]
        assert report["image_in_plasma"]  # zero-copy in the other node's object store
        # saved on the other node, loaded here
        versions = ray.get(probe.save_samples.remote(ctx.run_id, 2))
        assert all(ctx.info(k)["node"] == cluster["other"] for k in versions)
        for k, v in sample_values(2).items():
            assert same(v, ctx.load(k)), k


@needs_ray
def test_loaded_tensors_are_zero_copy_and_read_only_by_contract(cluster):
    import numpy as np
    import torch
    from distributed_probes import lies_in_plasma

    from discomfort.distributed import RayContext

    image = torch.rand(1, 64, 64, 3)
    with RayContext() as ctx:
        ctx.save("image", image)
        ctx.save("array", np.arange(1000.0))
        view = ctx.load("image")
        assert torch.equal(view, image) and lies_in_plasma(view.data_ptr())  # no copy
        arr = ctx.load("array")
        assert not arr.flags.writeable  # numpy enforces read-only
        with pytest.raises(ValueError):
            arr[0] = 1.0
        # A private, writable copy on request: writes stay in it.
        own = ctx.load("image", copy=True)
        assert not lies_in_plasma(own.data_ptr())
        own.zero_()
        assert torch.equal(ctx.load("image"), image)
        assert ctx.load("array", copy=True).flags.writeable
        # The zero-copy tensor is NOT copied on write: torch has no read-only tensors, so writing
        # into it changes the stored value for readers on this node. That is why it is documented
        # read-only (and why run_sequential_ray returns copies).
        view[0, 0, 0, 0] = -1.0
        assert ctx.load("image")[0, 0, 0, 0].item() == -1.0


@needs_ray
def test_copies_can_be_the_default_of_a_process(cluster, monkeypatch):
    import torch
    from distributed_probes import lies_in_plasma

    from discomfort.distributed import RayContext

    monkeypatch.setenv("DISCOMFORT_RAY_LOAD", "copy")  # e.g. for ComfyUI servers with nodes that write inputs
    with RayContext() as ctx:
        ctx.save("image", torch.ones(1, 8, 8, 3))
        assert not lies_in_plasma(ctx.load("image").data_ptr())
        assert lies_in_plasma(ctx.load("image", copy=False).data_ptr())


@needs_ray
def test_the_workflow_context_api(cluster):
    import threading

    import torch

    from discomfort.distributed import RayContext

    with pytest.raises(InvalidRunIdError):
        RayContext("not-a-ray-id")
    ctx = RayContext()
    with ctx:
        assert discomfort.get_context(ctx.run_id) is ctx  # registered in this process
        v1 = ctx.save("a", torch.ones(3))
        v2 = ctx.save("b", "text")
        v3 = ctx.save("a", torch.zeros(3))
        assert v1 < v2 < v3
        assert sorted(ctx.keys()) == ["a", "b"] and sorted(ctx) == ["a", "b"] and "a" in ctx
        info = ctx.info("a")
        assert info["version"] == v3 and info["tier"] == "ray" and info["nbytes"] == 12
        lock = threading.Lock()
        ctx.save("lock", lock)  # auto: by reference
        assert ctx.load("lock") is lock and ctx.info("lock")["tier"] == "ref"
        stats = ctx.stats()
        assert stats["backend"] == "ray" and stats["owner"] and stats["objects"] == 2 and stats["refs"] == 1
        assert ctx.delete("b") and not ctx.delete("b") and "b" not in ctx
        with pytest.raises(UnknownKeyError, match="'b'"):
            ctx.load("b")
        with pytest.raises(UnknownKeyError):
            ctx.info("b")
        other = type(ctx).attach(ctx.run_id)
        assert not other.owner and torch.equal(other.load("a"), torch.zeros(3))
        other.close()
    with pytest.raises(RunFinishedError):
        ctx.load("a")
    with pytest.raises(UnknownRunError, match="finished, or never existed"):
        discomfort.get_context(ctx.run_id)


@needs_ray
def test_a_reference_stays_with_its_process_and_a_remote_load_says_so(cluster, probe):
    import threading

    from discomfort.distributed import RayContext

    with RayContext() as ctx:
        ctx.save("model", threading.Lock(), pass_by="ref")
        message = ray.get(probe.load_error.remote(ctx.run_id, "model"))
        assert "ReferenceUnavailableError" in message
        assert "'model'" in message and f"process {os.getpid()}" in message and "pass_by='val'" in message


@needs_ray
def test_a_value_whose_saver_died_is_lost_with_a_clear_error(cluster):
    from distributed_probes import Probe

    from discomfort.distributed import RayContext, ValueLostError

    saver = Probe.options(scheduling_strategy=_on(cluster["other"])).remote()
    with RayContext() as ctx:
        ray.get(saver.save.remote(ctx.run_id, "x", 1 * MB))
        ray.kill(saver)  # Ray frees what a dead process owned
        deadline = time.monotonic() + 120  # a bound, not a timing: a loaded machine takes longer
        while True:
            try:
                ctx.load("x")
            except ValueLostError as exc:
                assert "'x'" in str(exc) and "dies" in str(exc)
                break
            assert time.monotonic() < deadline, "the value of a dead saver is still readable"
            time.sleep(0.2)


@needs_ray
def test_a_run_being_shut_down_cannot_be_attached(cluster):
    """Between the owner's clear and Ray's kill the directory is still named: attaching refuses."""
    from discomfort.distributed import RayContext

    ctx = RayContext()
    ctx.save("x", 1)
    assert ray.get(ctx._actor.clear.remote()) == 1  # the first half of shutdown()
    with pytest.raises(UnknownRunError, match="has finished"):
        RayContext.attach(ctx.run_id)
    ctx.shutdown()
    with pytest.raises(UnknownRunError):
        RayContext.attach(ctx.run_id)


@needs_ray
def test_shutdown_frees_everything_the_run_put_into_ray(cluster, probe):
    import torch

    from discomfort.distributed import RayContext

    baseline = _wait_usage_at_most(_store_usage(), timeout=0)
    ctx = RayContext()
    for i in range(3):
        ctx.save(f"here{i}", torch.ones(2 * MB // 4))
        ray.get(probe.save.remote(ctx.run_id, f"there{i}", 2 * MB))
    held = ctx.load("there0")  # copied to this node, held as a view
    assert float(ray.get(probe.load_and_hold.remote(ctx.run_id, "here0"))) == 2 * MB // 4
    during = _store_usage()
    assert during[cluster["head"]][0] >= baseline[cluster["head"]][0] + 8 * MB
    assert during[cluster["other"]][0] >= baseline[cluster["other"]][0] + 8 * MB
    ctx.shutdown()
    with pytest.raises(UnknownRunError):
        discomfort.get_context(ctx.run_id)
    # Views still alive keep their bytes; once they are gone nothing of the run is left.
    assert held.sum().item() == 2 * MB // 4
    del held
    ray.get(probe.drop.remote())
    after = _wait_usage_at_most(baseline)
    for node in baseline:
        assert after[node][0] <= baseline[node][0] and after[node][1] <= baseline[node][1], (node, baseline, after)


# ---- run_sequential_ray on ComfyUI servers --------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(cluster):
    if not os.environ.get("DISCOMFORT_COMFYUI"):
        pytest.skip("DISCOMFORT_COMFYUI is not set")
    from discomfort.distributed import RayComfyPool

    t0 = time.monotonic()
    servers = RayComfyPool(isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], size=2, startup_timeout=240).start()
    TIMINGS["ComfyUI servers start (s)"] = time.monotonic() - t0
    try:
        assert {s["node_id"] for s in servers.servers} == {cluster["head"], cluster["other"]}
        yield servers
    finally:
        servers.close()


def _wf(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def _inputs():
    import torch

    g = torch.Generator().manual_seed(7)
    return {"image": torch.rand(2, 16, 24, 3, generator=g), "latent": {"samples": torch.randn(1, 4, 6, 5, generator=g)}}


def _same_result(a: dict, b: dict) -> None:
    from distributed_probes import same

    assert set(a) == set(b)
    for k in a:
        assert same(a[k], b[k]), k


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_run_on_two_servers_on_two_nodes_equals_one_machine(cluster, pool):
    from discomfort.comfy import ComfyServer
    from discomfort.distributed import run_sequential_ray
    from discomfort.sequential import run_sequential

    workflows = [_wf("run_loop_invert.json"), _wf("run_loop_invert.json"), _wf("run_latent_b.json")]
    baseline = _wait_usage_at_most(_store_usage(), timeout=0)
    events = []
    t0 = time.monotonic()
    with pytest.warns(DeprecationWarning, match="on_progress"):  # the older progress=callable still works
        result = run_sequential_ray(workflows, _inputs(), iterations=3, servers=pool, timeout=120,
                                    progress=events.append, free_after=True)
    TIMINGS["run_sequential_ray, 9 workflows (s)"] = time.monotonic() - t0
    assert [(e.iteration, e.index) for e in events] == [(i, k) for i in range(3) for k in range(3)]
    assert [e.node_id for e in events[:2]] == [pool.servers[0]["node_id"], pool.servers[1]["node_id"]]
    assert all(e.attempts == 1 for e in events)

    one_machine = run_sequential(workflows, _inputs(), iterations=3, executor=ComfyServer(pool.servers[0]["url"]),
                                 timeout=120)
    _same_result(result, one_machine)
    assert set(result) == {"image", "latent2"}
    result["image"].add_(1.0)  # results are private, writable copies

    # The run is over and the servers dropped their caches: nothing of it is left in Ray.
    after = _wait_usage_at_most(baseline)
    for node in baseline:
        assert after[node][0] <= baseline[node][0] and after[node][1] <= baseline[node][1], (node, baseline, after)


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_a_model_on_one_ray_server_reaches_the_other_by_recipe_until_a_condition(cluster, pool):
    """Workflow 0 loads the weights-free model on server 0; workflow 1 on server 1 gets it by
    recipe (built there once: ComfyUI's cache keeps it between its prompts); until= stops the loop."""
    import re

    from discomfort.distributed import run_sequential_ray

    load = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "ray-recipe"}},
            "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model", "input_data": ["1", 0]}}}
    use = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model"}},
           "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
           "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "report", "input_data": ["2", 0]}}}
    reports = []

    def third(iteration, values):
        reports.append(values["report"])
        return iteration == 2

    events = []
    result = run_sequential_ray([load, use], iterations=10, until=third, servers=pool, timeout=120,
                                on_progress=events.append)
    assert [(e.kind, e.iteration, e.workflow, e.server) for e in events] == \
        [(kind, i, k, k) for i in range(3) for k in range(2) for kind in ("workflow_start", "workflow_done")]
    found = [re.fullmatch(r"name=ray-recipe serial=(\d+) constructed=(\d+) same=True", r) for r in reports]
    assert all(found), reports
    assert len({(m.group(1), m.group(2)) for m in found}) == 1  # one construction on server 1, reused
    assert set(result) == {"report"}  # the model is a reference in a server: not returned


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_a_ray_run_held_across_calls(cluster, pool):
    """RayRun: one run across calls, Python choosing each call's workflow and parameter; the model
    loaded once on server 0 reaches server 1 by recipe."""
    import re

    import torch

    from discomfort.distributed import RayRun

    load = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "ray-held"}},
            "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model", "input_data": ["1", 0]}}}
    use = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model"}},
           "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
           "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "report", "input_data": ["2", 0]}},
           "4": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
           "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
           "6": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image", "input_data": ["5", 0]}}}
    image = torch.rand(1, 4, 4, 3)
    with RayRun(pool, assign=lambda it, k: 0) as run:  # the first call on server 0
        run.execute(load, timeout=120)
        run.save("image", image)
        reports = []
        for i in range(4):  # then every call on server 1
            out = run.execute(use, timeout=120, assign=lambda it, k: 1)
            reports.append(out["report"])
            assert torch.equal(run.load("image", copy=True), image if i % 2 else 1.0 - image)
        assert set(out) == {"report", "image"} and out.iterations == 1
        found = [re.fullmatch(r"name=ray-held serial=(\d+) constructed=(\d+) same=True", r) for r in reports]
        assert all(found) and len({m.groups() for m in found}) == 1, reports  # built once on server 1
        run_id = run.run_id
    assert run.context.closed and run_id.startswith("ray-")


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_a_ray_run_takes_the_options_of_run_and_says_what_run_says(cluster, pool):
    """One loop: outputs=, release_unused= and on_progress= (ProgressEvent) on Ray as with Run on
    one of the same servers; a missing input is refused in the same words; a Recipe given as an
    input is built where it is read."""
    import re

    from discomfort.comfy import ComfyServer
    from discomfort.distributed import RayRun, WorkflowEvent
    from discomfort.errors import UnknownKeyError
    from discomfort.run_control import ProgressEvent
    from discomfort.sequential import Run

    assert WorkflowEvent is ProgressEvent
    workflows = [_wf("run_loop_invert.json"), _wf("run_latent_b.json")]
    events: list = []
    kept, said = {}, {}
    with RayRun(pool) as ray_run, Run(ComfyServer(pool.servers[0]["url"])) as run:
        for name, r in (("ray", ray_run), ("run", run)):
            out = r.execute(workflows, _inputs(), iterations=2, timeout=120, outputs=["latent2"],
                            release_unused=True, on_progress=events.append if name == "ray" else None)
            kept[name] = (set(out), sorted(r.keys()), out["latent2"])
        with pytest.raises(UnknownKeyError) as on_ray:
            ray_run.execute(_wf("run_loop_invert.json"), timeout=120)  # "image" was released
        with pytest.raises(UnknownKeyError) as on_run:
            run.execute(_wf("run_loop_invert.json"), timeout=120)
        said = {"ray": str(on_ray.value).replace(ray_run.run_id, "RUN"),
                "run": str(on_run.value).replace(run.run_id, "RUN")}
    assert kept["ray"][:2] == kept["run"][:2] == ({"latent2"}, ["latent2"])
    _same_result({"latent2": kept["ray"][2]}, {"latent2": kept["run"][2]})
    assert said["ray"] == said["run"] and "'image'" in said["ray"]
    assert all(type(e) is ProgressEvent for e in events)
    assert [(e.kind, e.iteration, e.workflow, e.server) for e in events] == \
        [(kind, i, k, k) for i in range(2) for k in range(2) for kind in ("workflow_start", "workflow_done")]
    assert [e.node_id for e in events[::2][:2]] == [s["node_id"] for s in pool.servers]
    assert [e.done for e in events if e.kind == "workflow_done"] == [1, 2, 3, 4]

    # A model's recipe from one run, given to another as a Recipe: built on the server that reads it.
    load = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "ray-given"}},
            "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model", "input_data": ["1", 0]}}}
    use = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "model"}},
           "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
           "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "report", "input_data": ["2", 0]}}}
    with RayRun(pool, assign=lambda it, k: 0) as first:
        first.execute(load, timeout=120)
        recipe = first.recipe("model")
    with RayRun(pool, assign=lambda it, k: 1) as second:
        out = second.execute(use, {"model": recipe}, timeout=120, outputs=["report", "model"])
    assert re.fullmatch(r"name=ray-given serial=\d+ constructed=\d+ same=True", out["report"]), out
    assert out["model"] is recipe  # a key given as a recipe comes back as that recipe


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_cancel_inside_a_workflow_on_a_ray_server(cluster, pool, tmp_path):
    """A cancel while server 1 runs a gate node: its actor takes the prompt back, the run's values
    leave Ray, and RunCancelled says where."""
    import select
    import threading

    import torch

    from discomfort import CancelToken
    from discomfort.comfy import ComfyServer
    from discomfort.distributed import run_sequential_ray
    from discomfort.errors import RunCancelled

    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    invert = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "img"}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid", "input_data": ["2", 0]}}}
    gate = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "mid"}},
            "2": {"class_type": "DiscomfortTestGate",
                  "inputs": {"value": ["1", 0], "signal": str(fifo), "release": str(tmp_path / "never")}},
            "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["2", 0]}}}
    baseline = _wait_usage_at_most(_store_usage(), timeout=0)
    token = CancelToken()
    box: dict = {}

    def run():
        try:
            run_sequential_ray([invert, gate], {"img": torch.rand(1, 8, 8, 3)}, iterations=2, servers=pool,
                               timeout=300, cancel=token)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert select.select([fd], [], [], 120)[0] and os.read(fd, 64).startswith(b"started")
        token.cancel("test")
        t.join(120)
    finally:
        os.close(fd)
    exc = box.get("error")
    assert isinstance(exc, RunCancelled), box
    assert (exc.iteration, exc.workflow, exc.inside) == (0, 1, True) and "(test)" in str(exc)
    assert exc.run_id.startswith("ray-")
    q = ComfyServer(pool.servers[1]["url"]).queue()
    assert q["queue_running"] == [] and q["queue_pending"] == []
    pool.free()  # ComfyUI's cache holds views of the run's values until its next prompt
    after = _wait_usage_at_most(baseline)
    for node in baseline:
        assert after[node][0] <= baseline[node][0], (node, baseline, after)


@needs_comfy
@needs_ray
@pytest.mark.comfy
def test_servers_killed_mid_run_are_replaced_and_their_workflow_retried(cluster, pool):
    from discomfort.distributed import run_sequential_ray

    workflows = [_wf("run_loop_invert.json"), _wf("run_loop_invert.json")]
    expected = run_sequential_ray(workflows, {"image": _inputs()["image"]}, iterations=2, servers=pool, timeout=120)
    old = [dict(s) for s in pool.servers]
    killed = {}

    def chaos(event):
        if event.kind != "workflow_done":
            return
        if event.done == 1:  # server 0 has saved "image"; its ComfyUI process dies
            killed["comfy"] = pool.kill_server(0)
        elif event.done == 2:  # server 1's actor dies (its ComfyUI process goes with it)
            ray.kill(pool.slots[1].actor)

    events = []
    t0 = time.monotonic()
    result = run_sequential_ray(workflows, {"image": _inputs()["image"]}, iterations=2, servers=pool, timeout=120,
                                on_progress=lambda e: (events.append(e), chaos(e)))
    TIMINGS["run with two servers killed (s)"] = time.monotonic() - t0
    _same_result(result, expected)
    assert [e.attempts for e in events if e.kind == "workflow_done"] == [1, 1, 2, 2]
    new = pool.servers
    assert [s["replaced"] for s in new] == [1, 1]
    assert [s["node_id"] for s in new] == [s["node_id"] for s in old]  # replaced on the same nodes
    assert {s["pid"] for s in new}.isdisjoint({s["pid"] for s in old})
    # the ComfyUI process of the killed actor died with it (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 10
    while _running(old[1]["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(old[1]["pid"])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
