"""Long runs on a real ComfyUI: flat memory over hundreds of iterations, cancel, progress,
video-sized values, and models passed by reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from discomfort import CancelToken, get_context
from discomfort.comfy import ComfyServer
from discomfort.errors import RunCancelled, RunInterrupted
from discomfort.sequential import run_sequential

from _helpers import Fifo, in_thread, leftovers, status_kib

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ workflows

def _port(uid: str, link: list | None = None) -> dict:
    inputs: dict = {"unique_id": uid}
    if link is not None:
        inputs["input_data"] = link
    return {"class_type": "DiscomfortPort", "inputs": inputs}


def _through(src: str, dst: str, *middle: tuple[str, dict]) -> dict:
    """INPUT port ``src`` -> each (class_type, extra inputs) node in turn -> OUTPUT port ``dst``."""
    wf = {"1": _port(src)}
    prev = "1"
    for n, (cls, extra) in enumerate(middle, start=2):
        key = "image" if cls == "ImageInvert" else ("model" if cls == "DiscomfortTestModelReport" else "value")
        wf[str(n)] = {"class_type": cls, "inputs": {key: [prev, 0], **extra}}
        prev = str(n)
    wf[str(len(middle) + 2)] = _port(dst, [prev, 0])
    return wf


INVERT = ("ImageInvert", {})


def _exact_image(shape, seed: int) -> torch.Tensor:
    """Pixels k/256: inverting (1 - x) is exact in float32, so any number of inverts is checkable."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, shape, generator=g).float() / 256


def _mapped_runs(pid: int) -> set[str]:
    """The discomfort runs whose segments process ``pid`` still maps."""
    runs = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            name = line.rsplit("/", 1)[-1] if "/dev/shm/dcf-" in line else ""
            if name.startswith("dcf-"):
                runs.add(name.split()[0][4:].split(".")[0])
    return runs


# ------------------------------------------------------------------------------------ bounded memory

def test_two_hundred_iterations_keep_memory_flat(server):
    """200 iterations of two workflows: store bytes, segments, the server's RssShmem and this
    process's RSS stay flat once warm; a server that served many runs does not keep them."""
    iterations, warm = 200, 20
    image = _exact_image((1, 256, 512, 3), 7)  # 1.5 MiB
    a, b = _through("img", "mid", INVERT), _through("mid", "img", INVERT)
    pid = server.process.pid
    samples: list[dict] = []

    def on_progress(ev):
        if ev.kind == "workflow_done" and ev.workflow == 1:
            st = get_context(ev.run_id).stats()
            samples.append({
                "bytes": st["bytes_ram"] + st["bytes_disk"], "capacity": st["ram_capacity"],
                "segments": len(leftovers(ev.run_id)), "server_shm": status_kib(pid, "RssShmem"),
                "rss": status_kib(os.getpid(), "VmRSS"), "run_id": ev.run_id,
            })

    result = run_sequential([a, b], {"img": image}, iterations=iterations, executor=server, timeout=120,
                            transport="shm", on_progress=on_progress)
    assert torch.equal(result["img"], image) and torch.equal(result["mid"], 1.0 - image)
    assert len(samples) == iterations
    ref, later = samples[warm - 1], samples[warm:]
    report = {k: (samples[0][k], ref[k], max(s[k] for s in later)) for k in ("bytes", "capacity", "segments",
                                                                          "server_shm", "rss")}
    print("first / warm / max after warm:", report)
    assert all(s["bytes"] == ref["bytes"] for s in later), report  # two keys, replaced in place
    assert all(s["capacity"] == ref["capacity"] for s in later), report
    assert all(s["segments"] == ref["segments"] for s in later), report
    assert max(s["server_shm"] for s in later) <= ref["server_shm"] + 4 * 1024, report
    assert max(s["rss"] for s in later) <= ref["rss"] + 16 * 1024, report
    assert leftovers(samples[0]["run_id"]) == []

    # Many runs through the same server: it keeps at most the last one's memory mapped.
    big = _exact_image((1, 1024, 1024, 3), 8)  # 12 MiB
    run_ids = []
    for n in range(6):
        seen: list[str] = []
        run_sequential([a], {"img": big + 0}, executor=server, timeout=120, transport="shm",
                       on_progress=lambda ev: seen.append(ev.run_id))
        run_ids.append(seen[0])
    mapped = _mapped_runs(pid) & set(run_ids)
    shm_kib = status_kib(pid, "RssShmem")
    print(f"after 6 runs of 12 MiB: server maps {len(mapped)} of them, RssShmem {shm_kib} KiB")
    assert mapped <= {run_ids[-1]}, mapped
    assert shm_kib <= ref["server_shm"] + 2 * 36 * 1024, shm_kib  # at most ~one run of 2 x 12 MiB (+ slack)
    assert all(leftovers(r) == [] for r in run_ids)


def test_a_loop_on_the_disk_tier_keeps_its_files_flat(inprocess, tmp_path):
    """Values that spill to disk (a RAM budget too small for them) are replaced file for file:
    the run's disk directory holds as many files and bytes after 200 iterations as after 20."""
    iterations, warm = 200, 20
    image = _exact_image((1, 256, 512, 3), 9)  # 1.5 MiB, over the 1 MiB budget
    a, b = _through("img", "mid", INVERT), _through("mid", "img", INVERT)
    samples: list[tuple[int, int, int]] = []

    def on_progress(ev):
        if ev.kind == "workflow_done" and ev.workflow == 1:
            files = list((tmp_path / f"dcf-{ev.run_id}").iterdir())
            st = get_context(ev.run_id).stats()
            samples.append((len(files), sum(f.stat().st_blocks * 512 for f in files), st["bytes_disk"]))

    result = run_sequential([a, b], {"img": image}, iterations=iterations, executor=inprocess, timeout=120,
                            ram_budget=1 << 20, disk_dir=tmp_path, on_progress=on_progress)
    assert torch.equal(result["img"], image)
    print("disk tier: files, allocated bytes, stored bytes after 1 / 20 / 200 iterations:",
          samples[0], samples[warm - 1], samples[-1])
    assert samples[warm - 1][2] >= 2 * image.numel() * 4  # both keys really live on disk
    assert all(s == samples[warm - 1] for s in samples[warm:]), (samples[warm - 1], max(samples[warm:]))
    assert list(tmp_path.iterdir()) == []


def test_release_unused_keeps_only_live_values(executor):
    """release_unused: after each workflow the store holds only what a later workflow reads or the
    caller gets back."""
    image = _exact_image((1, 32, 48, 3), 3)
    a = _through("img", "mid", INVERT)
    b = _through("mid", "tmp", INVERT)
    c = _through("tmp", "img", INVERT)
    held: list[tuple[int, int, list[str]]] = []

    def on_progress(ev):
        if ev.kind == "workflow_done":
            held.append((ev.iteration, ev.workflow, sorted(get_context(ev.run_id).keys())))

    result = run_sequential([a, b, c], {"img": image}, iterations=3, executor=executor, timeout=120,
                            release_unused=True, outputs=["img"], on_progress=on_progress)
    assert set(result) == {"img"} and torch.equal(result["img"], 1.0 - image)
    assert held[:3] == [(0, 0, ["mid"]), (0, 1, ["tmp"]), (0, 2, ["img"])]
    assert held[-1] == (2, 2, ["img"]) and len(held) == 9
    # Without the option every key's latest value stays until the end.
    kept: list[list[str]] = []
    run_sequential([a, b, c], {"img": image}, iterations=1, executor=executor, timeout=120,
                   on_progress=lambda ev: ev.kind == "workflow_done" and kept.append(
                       sorted(get_context(ev.run_id).keys())))
    assert kept[-1] == ["img", "mid", "tmp"]


# ------------------------------------------------------------------------------------ cancel

def _gate(src: str, dst: str, fifo: str, release: str) -> dict:
    return _through(src, dst, ("DiscomfortTestGate", {"signal": fifo, "release": release}))


@pytest.mark.filterwarnings("ignore::discomfort.remote.TransportWarning")  # the HTTP case announces itself
@pytest.mark.parametrize("where", ["inprocess", "server", "server-http"])
def test_cancel_from_another_thread_inside_a_workflow(request, where, tmp_path):
    executor = request.getfixturevalue(where.split("-")[0])
    transport = "http" if where.endswith("http") else None
    fifo = Fifo(tmp_path / "started")
    image = _exact_image((1, 8, 8, 3), 1)
    token = CancelToken()
    run_ids: list[str] = []
    wfs = [_through("img", "mid", INVERT), _gate("mid", "out", fifo.path, str(tmp_path / "never"))]
    t, box = in_thread(run_sequential, wfs, {"img": image}, iterations=3, executor=executor, timeout=300,
                        cancel=token, transport=transport, on_progress=lambda ev: run_ids.append(ev.run_id))
    try:
        assert fifo.wait(), "the gate node never started"
        token.cancel("test")
        t.join(120)
        assert not t.is_alive()
    finally:
        fifo.close()
    exc = box.get("error")
    assert isinstance(exc, RunCancelled), box
    assert (exc.iteration, exc.workflow, exc.inside) == (0, 1, True)
    assert exc.workflow_name == "workflow 1" and exc.run_id == run_ids[0]
    assert "inside workflow 2/2" in str(exc) and "iteration 1/3" in str(exc) and "(test)" in str(exc)
    assert leftovers(exc.run_id) == []  # over HTTP the server's store: the same /dev/shm here
    if where != "inprocess":
        q = executor.queue()
        assert q["queue_running"] == [] and q["queue_pending"] == []
    # The executor is usable again at once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TransportWarning of the HTTP path
        out = run_sequential([wfs[0]], {"img": image}, executor=executor, timeout=120, transport=transport)
    assert torch.equal(out["mid"], 1.0 - image)


def test_ctrl_c_in_process_interrupts_comfyui(inprocess, tmp_path):
    """A real SIGINT to this process while ComfyUI runs a node in it: ComfyUI is interrupted at
    its next check, the run is removed, RunInterrupted says where, and ComfyUI runs again."""
    fifo = Fifo(tmp_path / "started")
    image = _exact_image((1, 8, 8, 3), 6)
    wfs = [_through("img", "mid", INVERT), _gate("mid", "out", fifo.path, str(tmp_path / "never"))]

    def press_ctrl_c():
        if fifo.wait():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        with pytest.raises(RunInterrupted) as info:
            run_sequential(wfs, {"img": image}, iterations=2, executor=inprocess, timeout=300)
    finally:
        presser.join(60)
        fifo.close()
    exc = info.value
    assert (exc.iteration, exc.workflow, exc.inside) == (0, 1, True) and "Ctrl-C" in str(exc)
    assert leftovers(exc.run_id) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    out = run_sequential([wfs[0]], {"img": image}, executor=inprocess, timeout=120)
    assert torch.equal(out["mid"], 1.0 - image)


def test_cancel_between_workflows(inprocess):
    image = _exact_image((1, 8, 8, 3), 2)
    token = CancelToken()
    ran: list[tuple[int, int]] = []

    def on_progress(ev):
        if ev.kind == "workflow_done":
            ran.append((ev.iteration, ev.workflow))
            if (ev.iteration, ev.workflow) == (1, 0):
                token.cancel()

    wfs = [_through("img", "mid", INVERT), _through("mid", "img", INVERT)]
    with pytest.raises(RunCancelled) as info:
        run_sequential(wfs, {"img": image}, iterations=5, executor=inprocess, cancel=token,
                       on_progress=on_progress)
    assert ran == [(0, 0), (0, 1), (1, 0)]
    exc = info.value
    assert (exc.iteration, exc.workflow, exc.inside) == (1, 1, False)
    assert "before workflow 2/2" in str(exc) and "after 3 of 10 workflows" in str(exc)
    assert leftovers(exc.run_id) == []


def test_cancel_removes_a_queued_prompt(server, tmp_path):
    """While the server is busy with another client's prompt, a cancelled run's prompt is taken
    off the queue: it never runs."""
    busy_fifo, ours_fifo = Fifo(tmp_path / "busy"), Fifo(tmp_path / "ours")
    release = tmp_path / "release"
    image = _exact_image((1, 8, 8, 3), 4)
    other = ComfyServer(server.url)
    try:
        blocker = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                 "color": 0}},
                   "2": {"class_type": "DiscomfortTestGate",
                         "inputs": {"value": ["1", 0], "signal": busy_fifo.path, "release": str(release)}},
                   "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
        bt, bbox = in_thread(other.execute, blocker, timeout=300)
        assert busy_fifo.wait(), "the blocking prompt never started"
        token = CancelToken()
        t, box = in_thread(run_sequential, [_gate("img", "out", ours_fifo.path, str(release))],
                            {"img": image}, executor=server, timeout=300, cancel=token)
        pending: list = []
        while not pending and t.is_alive():  # wait for our prompt to reach the queue
            pending = server.queue()["queue_pending"]
            token.wait(0.02)
        prompt_id = pending[0][1]
        token.cancel()
        t.join(120)
        assert isinstance(box.get("error"), RunCancelled), box
        assert box["error"].inside is True
        assert not server.in_queue(prompt_id)
        release.touch()  # let the blocker finish: it is untouched by the cancel
        bt.join(120)
        assert "error" not in bbox, bbox
        assert not ours_fifo.heard(), "the cancelled prompt ran"
        assert server.history(prompt_id) == {}
    finally:
        release.touch()
        busy_fifo.close()
        ours_fifo.close()
        other.close()


CTRL_C_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from discomfort.errors import RunInterrupted
    from discomfort.sequential import run_sequential
    wfs, url = json.loads(sys.argv[1]), sys.argv[2]
    seen = []
    try:
        run_sequential(wfs, {"img": torch.zeros(1, 8, 8, 3)}, iterations=2, executor=url, timeout=300,
                       transport="shm", on_progress=lambda ev: seen.append(ev.run_id))
        print(json.dumps({"finished": True}))
    except RunInterrupted as exc:
        print(json.dumps({"run_id": exc.run_id, "iteration": exc.iteration, "workflow": exc.workflow,
                          "inside": exc.inside, "message": str(exc), "seen": seen[0],
                          "is_keyboard_interrupt": isinstance(exc, KeyboardInterrupt)}))
""")


def _ctrl_c_when_started(cmd: list[str], fifo: Fifo) -> tuple[int, str, str]:
    """Run ``cmd``; once its gate node says it started, send SIGINT; (status, stdout, stderr)."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fifo.wait(), "the gate node never started"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        fifo.close()
        if child.poll() is None:
            child.kill()
    return child.returncode, out, err


def test_ctrl_c_stops_the_run_and_the_server(server, tmp_path):
    fifo = Fifo(tmp_path / "started")
    wfs = [_through("img", "mid", INVERT), _gate("mid", "out", fifo.path, str(tmp_path / "never"))]
    rc, out, err = _ctrl_c_when_started([sys.executable, "-c", CTRL_C_CHILD, json.dumps(wfs), server.url], fifo)
    assert rc == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info.get("is_keyboard_interrupt") is True, info
    assert (info["iteration"], info["workflow"], info["inside"]) == (0, 1, True)
    assert info["run_id"] == info["seen"] and "Ctrl-C" in info["message"]
    assert leftovers(info["run_id"]) == []
    q = server.queue()
    assert q["queue_running"] == [] and q["queue_pending"] == []


# ------------------------------------------------------------------------------------ progress

def test_on_progress_reports_workflows_nodes_and_steps(executor):
    image = _exact_image((1, 8, 8, 3), 5)
    events = []
    wfs = [_through("img", "mid", ("DiscomfortTestSteps", {"steps": 5})), _through("mid", "img", INVERT)]
    run_sequential(wfs, {"img": image}, iterations=2, executor=executor, timeout=120,
                   on_progress=events.append)
    kinds = [(e.kind, e.iteration, e.workflow) for e in events if e.kind in ("workflow_start", "workflow_done")]
    assert kinds == [(k, it, wf) for it in range(2) for wf in range(2) for k in ("workflow_start", "workflow_done")]
    steps = [(e.iteration, e.value, e.max) for e in events if e.kind == "step"]
    assert steps == [(it, v, 5) for it in range(2) for v in range(1, 6)]
    assert all(e.node == "2" for e in events if e.kind == "step")
    assert any(e.kind == "node" and e.node == "2" and e.workflow == 0 for e in events)
    done = [e for e in events if e.kind == "workflow_done"]
    assert [e.done for e in done] == [1, 2, 3, 4] and all(e.total == 4 and e.seconds >= 0 for e in done)


def test_progress_bar_only_when_asked_off_a_terminal(inprocess, capsys):
    wf = _through("img", "mid", INVERT)
    run_sequential(wf, {"img": torch.zeros(1, 4, 4, 3)}, iterations=2, executor=inprocess)
    assert capsys.readouterr().err == ""  # not a terminal: silent
    run_sequential(wf, {"img": torch.zeros(1, 4, 4, 3)}, iterations=2, executor=inprocess, progress=True)
    err = capsys.readouterr().err
    assert "discomfort run" in err and "2/2" in err and "iteration 2/2" in err


# ------------------------------------------------------------------------------------ video-sized

def test_video_sized_image_passes_between_workflows_exactly(server):
    """An 81-frame 480x832 clip ([81, 480, 832, 3] float32, 388 MB) goes through a real ComfyUI
    server: no upload endpoint, no base64, no PNG."""
    clip = torch.rand(81, 480, 832, 3, generator=torch.Generator().manual_seed(81))
    a = _through("video", "clip")  # a plain hand-over: loaded, then saved again by the server
    b = _through("clip", "inverted", INVERT)
    result = run_sequential([a, b], {"video": clip}, executor=server, timeout=600, transport="shm",
                            release_unused=True, outputs=["clip", "inverted"])
    assert result["clip"].shape == (81, 480, 832, 3) and result["clip"].dtype == torch.float32
    assert torch.equal(result["clip"], clip)
    assert torch.equal(result["inverted"], 1.0 - clip)


# ------------------------------------------------------------------------------------ models by reference

def _model_workflows(name: str) -> list[dict]:
    load = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": name}},
            "2": _port("model", ["1", 0])}
    return [load, _through("model", "report", ("DiscomfortTestModelReport", {}))]


def _reports(events_into: list):
    """on_progress that keeps each iteration's "report" (read from the run's own context)."""
    def on_progress(ev):
        if ev.kind == "workflow_done" and ev.workflow == 1:
            events_into.append(get_context(ev.run_id).load("report"))
    return on_progress


def test_model_saved_by_reference_is_reused_without_reloading(inprocess):
    """The next workflow gets the very instance the loader built: not pickled, copied or reloaded."""
    reports: list[str] = []
    result = run_sequential(_model_workflows("inprocess-reuse"), iterations=3, executor=inprocess, timeout=120,
                            outputs=["model", "report"], on_progress=_reports(reports))
    model = result["model"]
    assert type(model).__name__ == "CountingModel" and model.name == "inprocess-reuse"
    assert result["report"] == f"name=inprocess-reuse serial={model.serial} constructed={model.serial} same=True"
    # Workflow 0's prompt does not change and its port holds the model: it runs once
    # (discomfort.reuse), and workflow 1 never loads anything.
    assert result.reused == [(1, 0), (2, 0)]
    assert reports == [f"name=inprocess-reuse serial={model.serial} constructed={model.serial} same=True"] * 3
    # Queued every iteration, on ComfyUI's default cache (only the last prompt's outputs) the
    # loader runs every time.
    reports.clear()
    again = run_sequential(_model_workflows("inprocess-reuse"), iterations=3, executor=inprocess, timeout=120,
                           outputs=["model"], on_progress=_reports(reports), rerun="always")
    first = again["model"].serial - 2
    assert reports == [f"name=inprocess-reuse serial={first + i} constructed={first + i} same=True" for i in range(3)]
    # With an LRU cache (a server's --cache-lru) the model is built once for the whole loop.
    inprocess.set_cache(lru=16)
    try:
        reports.clear()
        result = run_sequential(_model_workflows("inprocess-lru"), iterations=4, executor=inprocess,
                                timeout=120, outputs=["model"], on_progress=_reports(reports))
        serial = result["model"].serial
        assert reports == [f"name=inprocess-lru serial={serial} constructed={serial} same=True"] * 4
    finally:
        inprocess.set_cache(0)


def test_model_reference_stays_in_the_server(server):
    for _ in range(2):
        result = run_sequential(_model_workflows("server-reuse"), iterations=2, executor=server, timeout=120,
                                transport="shm")
        assert set(result) == {"report"}  # the MODEL lives in the server's process: not returned
        name, serial, constructed, same = result["report"].split()
        assert name == "name=server-reuse" and same == "same=True" and serial[7:] == constructed[12:]


def test_discomfort_run_command_on_ctrl_c(server, tmp_path):
    """`discomfort run` cut by Ctrl-C: one line saying where, exit status 130, nothing left."""
    from PIL import Image

    fifo = Fifo(tmp_path / "started")
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    paths = []
    for n, wf in enumerate([_through("img", "mid", INVERT), _gate("mid", "out", fifo.path, str(tmp_path / "no"))]):
        paths.append(tmp_path / f"wf{n}.json")
        paths[-1].write_text(json.dumps(wf))
    rc, _, err = _ctrl_c_when_started([sys.executable, "-m", "discomfort.cli", "run", *map(str, paths), "-n", "3",
                                       "-i", f"img={tmp_path / 'in.png'}", "-o", str(tmp_path / "out"),
                                       "--server", server.url, "--transport", "shm", "--no-progress"], fifo)
    assert rc == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("discomfort run: run ") and "inside workflow 2/2 (wf1.json) of iteration 1/3" in line
    run_id = line.split()[3]
    assert leftovers(run_id) == [] and not (tmp_path / "out").exists()
