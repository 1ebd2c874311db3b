"""run_parallel on real ComfyUI servers: two launched servers (the session's and one of this
module's) over shared memory and over HTTP, and a Ray pool of two servers on a two-node cluster.

Runs are held inside a workflow by the test pack's gate node, whose signal FIFO and release
file are each run's own inputs: a test knows where a run is without sleeping.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import discomfort
from discomfort import CancelToken
from discomfort.errors import NodeExecutionError, RunCancelled, WorkflowError

from _helpers import Fifo, in_thread, leftovers

pytestmark = [pytest.mark.comfy, pytest.mark.filterwarnings("ignore::discomfort.remote.TransportWarning")]

HERE = Path(__file__).resolve().parent
NODE_PACK = HERE.parents[1] / "comfy_nodes"
TEST_PACK = HERE / "test_pack"

# image -> gate (tells the FIFO named by "signal" it started, holds until the file "release" exists) -> invert -> out
GATED = {
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
    "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "signal"}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "release"}},
    "4": {"class_type": "DiscomfortTestGate", "inputs": {"value": ["1", 0], "signal": ["2", 0], "release": ["3", 0]}},
    "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
    "6": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["5", 0]}},
}


@pytest.fixture(scope="module")
def second(comfy_path, tmp_path_factory):
    """A second ComfyUI server for this module (the last test kills it)."""
    from discomfort.comfy import launch_server

    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], work_dir=tmp_path_factory.mktemp("second"),
                       startup_timeout=180, api_nodes=False) as srv:
        yield srv


@pytest.fixture
def opened(tmp_path):
    """A release file that exists: a gate that is given it passes at once."""
    path = tmp_path / "open"
    path.write_text("")
    return str(path)


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (1, 8, 8, 3), generator=g).float() / 256  # 1 - x is exact


def _run(seed: int, release: str, signal: str = "") -> dict:
    return {"image": _image(seed), "signal": signal, "release": release}


class _InProcess:
    """Stands for ComfyUI in this process (an executor without a url)."""

    def execute(self, prompt, timeout=None):
        raise AssertionError("never run")


@pytest.mark.parametrize("inputs, executors, options, error, match", [
    ({"image": 1}, ["http://127.0.0.1:1"], {}, TypeError, "list of input mappings"),
    ([{"image": 1}, 2], ["http://127.0.0.1:1"], {}, TypeError, r"inputs\[1\] is a int"),
    ([{}], [], {}, TypeError, "non-empty list"),
    ([{}], "http://127.0.0.1:1", {}, TypeError, "non-empty list"),
    ([{}], [_InProcess(), _InProcess()], {}, ValueError, "give it once"),
    ([{}], ["http://127.0.0.1:1"], {"retries": -1}, ValueError, "retries"),
    ([{}], ["http://127.0.0.1:1"], {"progress": print}, TypeError, "on_run= or on_progress="),
    ([{}], ["http://127.0.0.1:1"], {"iterations": None}, ValueError, "until"),
])
def test_bad_arguments_are_refused_before_anything_runs(inputs, executors, options, error, match):
    with pytest.raises(error, match=match):
        discomfort.run_parallel([GATED], inputs, executors, **options)


@pytest.mark.parametrize("transport", ["shm", "http"])
def test_results_come_in_input_order_and_a_failing_run_is_its_result(server, second, opened, transport, capsys):
    executors = [server, second] if transport == "shm" else [server.url, second.url]  # objects or URLs
    inputs = [_run(seed, opened) for seed in range(5)]
    inputs[3]["image"] = "not an image"  # ImageInvert fails on it: run 3 alone
    events: list = []
    run_ids: set = set()
    results = discomfort.run_parallel([GATED], inputs, executors, transport=transport, timeout=120, progress=True,
                                      on_run=events.append, on_progress=lambda ev: run_ids.add(ev.run_id))
    bar = capsys.readouterr().err.splitlines()[-1]  # runs done of the total, and per server
    assert "discomfort runs" in bar and "5/5" in bar and f"{server.url}: " in bar and f"{second.url}: " in bar
    assert len(results) == 5
    for i in (0, 1, 2, 4):
        assert set(results[i]) == {"out"}
        assert torch.equal(results[i]["out"], 1.0 - inputs[i]["image"]), i
    assert isinstance(results[3], NodeExecutionError)
    starts = {e.index: e.server for e in events if e.kind == "run_start"}
    assert starts[0] == server.url and starts[1] == second.url  # the first runs go in the executors' order
    last = [e for e in events if e.kind in ("run_done", "run_failed")]
    assert sorted(e.index for e in last) == list(range(5)) and last[-1].done == 5 and last[-1].total == 5
    assert sum(events[-1].by_server.values()) == 5 and set(events[-1].by_server) <= {server.url, second.url}
    assert [e.index for e in last if e.kind == "run_failed"] == [3]
    assert len(run_ids) == 5  # a run context each, all gone now
    assert all(leftovers(r) == [] for r in run_ids)

    if transport == "shm":  # raise_first: the first error is raised
        with pytest.raises(NodeExecutionError):
            discomfort.run_parallel([GATED], [inputs[3], inputs[0]], executors, timeout=120, raise_first=True)


def test_as_completed_yields_runs_as_they_end(server, second, opened, tmp_path):
    release = tmp_path / "release-0"
    fifo = Fifo(tmp_path / "started-0")
    inputs = [_run(0, str(release), fifo.path)] + [_run(seed, opened) for seed in (1, 2, 3)]
    events: list = []
    try:
        stream = discomfort.run_parallel([GATED], inputs, [server, second], timeout=120, as_completed=True,
                                         on_run=events.append)
        seen = []
        for index, result in stream:
            seen.append(index)
            assert torch.equal(result["out"], 1.0 - inputs[index]["image"])
            if len(seen) == 3:  # run 0 holds server 0; the others went to the free one
                release.write_text("")
    finally:
        fifo.close()
    assert sorted(seen[:3]) == [1, 2, 3] and seen[3] == 0
    on = {e.index: e.server for e in events if e.kind == "run_done"}
    assert on == {0: server.url, 1: second.url, 2: second.url, 3: second.url}


def test_each_run_has_its_controls_and_its_kept_history(server, second):
    """controls= and keep= reach every run of a batch: each run advances its seed from the
    workflow's saved value and keeps each iteration's value."""
    from test_loops import noise_workflow, seeds

    results = discomfort.run_parallel([noise_workflow(seed=40, control="increment", prefix="parallel")], [{}, {}],
                                      [server, second], iterations=3, keep=["noisy"], timeout=120)
    for result in results:
        assert not isinstance(result, Exception), result
        assert seeds(result) == [40, 41, 42]
        assert len(result.history["noisy"]) == 3
        assert torch.equal(result.history["noisy"][-1], result["noisy"])
        assert not torch.equal(result.history["noisy"][0], result.history["noisy"][1])
    assert torch.equal(results[0]["noisy"], results[1]["noisy"])  # same seeds, same noise
    fixed = discomfort.run_parallel([noise_workflow(seed=40, control="increment", prefix="parallel")], [{}],
                                    [server], iterations=2, controls="fixed", keep=["noisy"], timeout=120)[0]
    assert seeds(fixed) == [40, 40]
    assert torch.equal(fixed.history["noisy"][0], fixed.history["noisy"][1])


def test_cancel_stops_every_run(server, second, tmp_path):
    fifos = [Fifo(tmp_path / f"started-{k}") for k in range(2)]
    never = str(tmp_path / "never")
    inputs = [_run(k, never, fifos[k].path) if k < 2 else _run(k, never) for k in range(4)]
    token = CancelToken()
    events: list = []
    run_ids: set = set()
    t, box = in_thread(discomfort.run_parallel, [GATED], inputs, [server, second], timeout=300, cancel=token,
                        on_run=events.append, on_progress=lambda ev: run_ids.add(ev.run_id))
    try:
        assert all(f.wait() for f in fifos), "a gate never started"
        token.cancel("test")
        t.join(120)
        assert not t.is_alive()
    finally:
        for f in fifos:
            f.close()
    exc = box.get("error")
    assert isinstance(exc, RunCancelled), box
    assert "(test)" in str(exc) and "0 of 4 runs" in str(exc)
    assert exc.results == [None] * 4
    assert sorted(e.index for e in events if e.kind == "run_start") == [0, 1]  # runs 2 and 3 never started
    for srv in (server, second):
        q = srv.queue()
        assert q["queue_running"] == [] and q["queue_pending"] == []
    assert len(run_ids) == 2 and all(leftovers(r) == [] for r in run_ids)


def test_a_server_killed_mid_batch_has_its_run_retried_on_another(server, second, tmp_path):
    """It kills the module's second server: no later test uses it."""
    release = tmp_path / "release"
    fifo = Fifo(tmp_path / "started")
    inputs = [_run(0, str(release), fifo.path), _run(1, str(release)), _run(2, str(release))]
    events: list = []
    t, box = in_thread(discomfort.run_parallel, [GATED], inputs, [second, server], timeout=300,
                        on_run=events.append)
    try:
        assert fifo.wait(), "the gate never started"  # run 0 is held on the second server
        second.process.kill()
        second.process.wait(60)
        release.write_text("")  # the run starts again from its inputs on the other server, and passes
        t.join(180)
        assert not t.is_alive()
    finally:
        fifo.close()
    results = box.get("value")
    assert results is not None, box
    for i, result in enumerate(results):
        assert torch.equal(result["out"], 1.0 - inputs[i]["image"]), (i, result)
    kinds = [(e.kind, e.index, e.server, e.attempt) for e in events if e.index == 0]
    assert kinds[0] == ("run_start", 0, second.url, 1)
    assert ("run_retry", 0, second.url, 1) in kinds
    assert kinds[-1] == ("run_done", 0, server.url, 2)
    # the dead server took no more runs
    assert all(e.server == server.url for e in events if e.index != 0 and e.kind == "run_done")

    with pytest.raises(WorkflowError, match="no server is left"):  # only a dead server: nothing runs
        discomfort.run_parallel([GATED], [_run(5, str(release))], [second], timeout=60, raise_first=True)


# ---- a Ray pool: two servers on a two-node cluster --------------------------------------------------


@pytest.fixture(scope="module")
def pool(comfy_path):
    """Two ComfyUI servers, one per node of a two-node Ray cluster on this machine (the pattern of
    tests/test_distributed.py's fixtures)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: run_parallel on a pool needs it")
    from ray.cluster_utils import Cluster

    from discomfort.distributed import RayComfyPool

    saved = os.environ.get("PYTHONPATH")
    parent = str(Path(discomfort.__file__).resolve().parents[1])  # the cluster's workers import this discomfort
    os.environ["PYTHONPATH"] = os.pathsep.join([parent] + ([saved] if saved else []))
    node_args = {"num_cpus": 1, "object_store_memory": 200 << 20}
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={**node_args, "include_dashboard": False})
        cluster.add_node(**node_args, node_ip_address="127.0.0.2")
        cluster.wait_for_nodes()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    try:
        with RayComfyPool(comfy_path, isolated=True, size=2, custom_nodes=[NODE_PACK, TEST_PACK], startup_timeout=240) as servers:
            yield servers
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_runs_on_a_ray_pool_in_input_order_and_as_completed(pool, opened):
    inputs = [_run(seed, opened) for seed in range(4)]
    inputs[2]["image"] = "not an image"
    events: list = []
    results = discomfort.run_parallel([GATED], inputs, pool, timeout=120, on_run=events.append)
    for i in (0, 1, 3):
        assert torch.equal(results[i]["out"], 1.0 - inputs[i]["image"]), i
    assert isinstance(results[2], NodeExecutionError)
    assert {e.index: e.server for e in events if e.kind == "run_start" and e.index < 2} == {0: 0, 1: 1}
    assert {e.run_id[:4] for e in events if e.run_id} == {"ray-"}  # a RayRun each
    assert sum(events[-1].by_server.values()) == 4 and set(events[-1].by_server) <= {0, 1}

    seen = [index for index, result in discomfort.run_parallel([GATED], inputs[:2], pool, timeout=120,
                                                               as_completed=True)]
    assert sorted(seen) == [0, 1]


def test_a_ray_server_killed_mid_batch_is_replaced_and_its_run_goes_on(pool, opened, tmp_path):
    release = tmp_path / "release"
    fifo = Fifo(tmp_path / "started")
    inputs = [_run(0, str(release), fifo.path), _run(1, opened), _run(2, opened)]
    old_pid = pool.servers[0]["pid"]
    done: list = []
    t, box = in_thread(discomfort.run_parallel, [GATED], inputs, pool, timeout=300,
                        on_progress=lambda ev: ev.kind == "workflow_done" and done.append(ev))
    try:
        assert fifo.wait(), "the gate never started"  # run 0 is held on server 0
        os.kill(old_pid, signal.SIGKILL)  # not pool.kill_server: the pool may replace its actor at once
        release.write_text("")
        t.join(240)
        assert not t.is_alive()
    finally:
        fifo.close()
    results = box.get("value")
    assert results is not None, box
    for i, result in enumerate(results):
        assert torch.equal(result["out"], 1.0 - inputs[i]["image"]), (i, result)
    assert sorted(ev.attempts for ev in done) == [1, 1, 2]  # run 0's workflow ran again on the new server 0
    assert pool.servers[0]["replaced"] == 1 and pool.servers[0]["pid"] != old_pid

