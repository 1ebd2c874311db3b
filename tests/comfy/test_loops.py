"""Loops as ComfyUI's own queue runs them: seed controls between iterations (randomize, increment,
fixed, across a held Run's calls), and every iteration's results (on_iteration, keep= history,
the files output nodes wrote), in-process, through a server over shared memory and over HTTP."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

from discomfort import Run, run_sequential
from discomfort.errors import StoreFullError

pytestmark = pytest.mark.comfy

SIZE = 8


def _ui_node(nid: int, typ: str, widgets: list, inputs=(), outputs=(), title: str | None = None) -> dict:
    return {"id": nid, "type": typ, "pos": [100 * nid, 50], "size": [200, 80], "flags": {}, "order": nid,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
            "properties": {"Node name for S&R": typ}, "widgets_values": widgets, **({"title": title} if title else {})}


def noise_workflow(seed: int = 5, control: str = "randomize", prefix: str = "loops") -> dict:
    """EmptyImage -> ImageAddNoise (seed widget with its control) -> port "noisy" and SaveImage,
    as the editor saves it."""
    nodes = [
        _ui_node(1, "EmptyImage", [SIZE, SIZE, 1, 0x808080], outputs=[("IMAGE", "IMAGE", [1])]),
        _ui_node(2, "ImageAddNoise", [seed, control, 0.5], inputs=[("image", "IMAGE", 1)],
                 outputs=[("IMAGE", "IMAGE", [2, 3])], title="Noise"),
        _ui_node(3, "DiscomfortPort", ["noisy"], inputs=[("input_data", "*", 2)], outputs=[("output_data", "*", [])]),
        _ui_node(4, "SaveImage", [prefix], inputs=[("images", "IMAGE", 3)]),
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 2, 0, 4, 0, "IMAGE"]]
    return {"id": "00000000-0000-4000-8000-00000000aa25", "revision": 0, "last_node_id": 4, "last_link_id": 3,
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def noise_prompt(seed: int = 5) -> dict:
    """The same in API format (no controls of its own)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                      "color": 0x808080}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": seed, "strength": 0.5},
              "_meta": {"title": "Noise"}},
        "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "noisy", "input_data": ["2", 0]}},
    }


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def seeds(result) -> list:
    return [it[0]["2.seed"] for it in result.controls]


@pytest.fixture(params=["inprocess", "server", "http"])
def target(request):
    """(executor, transport): in-process, a server over shared memory, the same server over HTTP."""
    if request.param == "inprocess":
        return request.getfixturevalue("inprocess"), None
    return request.getfixturevalue("server"), "shm" if request.param == "server" else "http"


def _run(target, *args, **kwargs):
    executor, transport = target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the HTTP transport's one-line notice
        return run_sequential(*args, executor=executor, transport=transport, timeout=120, progress=False, **kwargs)


def test_randomize_gives_distinct_outputs_and_every_iteration_is_reported(target):
    heard = []

    def on_iteration(i, values):
        heard.append((i, digest(values["noisy"]), values.files, values.controls))
        with pytest.raises(TypeError):
            values["noisy"] = None  # read-only

    result = _run(target, noise_workflow(5, "randomize"), iterations=4, keep=["noisy"], on_iteration=on_iteration)
    used = seeds(result)
    assert used[0] == 5 and len(set(used)) == 4  # iteration 1 uses the saved value
    assert all(isinstance(s, int) and 0 <= s <= 1125899906842624 for s in used)
    kept = [digest(t) for t in result.history["noisy"]]
    assert len(set(kept)) == 4  # four different images, as "Queue 4" gives
    assert kept[-1] == digest(result["noisy"])
    assert [h[0] for h in heard] == [0, 1, 2, 3] and [h[1] for h in heard] == kept
    assert [h[3] for h in heard] == result.controls
    assert len(result.files) == 4 and all(len(f) == 1 for f in result.files)
    names = [f[0]["filename"] for f in result.files]
    assert len(set(names)) == 4 and all(n.startswith("loops_") for n in names)
    assert [h[2] for h in heard] == result.files
    for f in (it[0] for it in result.files):
        assert f["node"] == "4" and f["type"] == "output" and f["workflow"] == 0
        assert f["path"] is not None and Path(f["path"]).is_file() and Path(f["path"]).name == f["filename"]


def test_increment_gives_seed_seed_plus_one(target):
    result = _run(target, noise_workflow(40, "increment"), iterations=3, keep=["noisy"])
    assert seeds(result) == [40, 41, 42]
    again = _run(target, noise_prompt(41))  # the same image as a prompt that says seed 41
    assert torch.equal(result.history["noisy"][1], again["noisy"])
    assert result.files and all(len(f) == 1 for f in result.files)


def test_fixed_gives_identical_outputs(target):
    result = _run(target, noise_workflow(7, "randomize"), iterations=3, keep=["noisy"], controls="fixed")
    assert seeds(result) == [7, 7, 7]
    assert len({digest(t) for t in result.history["noisy"]}) == 1
    fixed = _run(target, noise_workflow(7, "fixed"), iterations=2, keep=["noisy"])
    assert seeds(fixed) == [7, 7] and torch.equal(fixed.history["noisy"][0], result.history["noisy"][0])


def test_controls_advance_across_a_held_runs_calls(executor):
    with Run(executor) as run:
        first = run.execute(noise_workflow(100, "increment"), iterations=2, progress=False)
        second = run.execute(noise_workflow(100, "increment"), iterations=2, progress=False)
        other = run.execute(noise_workflow(200, "decrement"), iterations=2, progress=False)  # another workflow
        third = run.execute(noise_workflow(100, "increment"), iterations=1, keep=["noisy"], progress=False)
        assert seeds(first) == [100, 101] and seeds(second) == [102, 103] and seeds(third) == [104]
        assert seeds(other) == [200, 199]
        again = run.execute(noise_prompt(104), progress=False)
        assert torch.equal(third.history["noisy"][0], again["noisy"])


def test_api_workflows_name_controls_by_id_or_title(executor):
    by_title = run_sequential(noise_prompt(9), iterations=3, executor=executor, progress=False,
                              controls={"Noise.seed": "increment"})
    assert [it[0] for it in by_title.controls] == [{"2.seed": 9}, {"2.seed": 10}, {"2.seed": 11}]
    by_id = run_sequential(noise_prompt(9), iterations=2, executor=executor, progress=False,
                           controls={"2.seed": "decrement", "2.strength": "increment"})
    assert [it[0] for it in by_id.controls] == [{"2.seed": 9, "2.strength": 0.5}, {"2.seed": 8, "2.strength": 0.51}]
    plain = run_sequential(noise_prompt(9), iterations=2, executor=executor, progress=False)
    assert plain.controls == [[{}], [{}]] and plain.files == [[], []]
    # a UI workflow's own control, replaced for one call
    over = run_sequential(noise_workflow(3, "randomize"), iterations=3, executor=executor, progress=False,
                          controls={"Noise.seed": "increment"})
    assert seeds(over) == [3, 4, 5]


def test_bad_controls_and_keep_are_refused_before_anything_runs(inprocess):
    bad = [({"Sampler.seed": "increment"}, "no node with id or title 'Sampler'"),
           ({"2.cfg": "increment"}, "has no such input"),
           ({"2.image": "increment"}, "linked to another node"),
           ({"2.seed": "sometimes"}, "the mode is one of"),
           ({"2.seed": "increment-wrap"}, "increment-wrap is for COMBO"),
           ({"seed": "increment"}, "expected NODE.INPUT"),
           ("random", "give None")]
    for controls, message in bad:
        with pytest.raises(ValueError, match=message):
            run_sequential(noise_prompt(), executor=inprocess, progress=False, controls=controls)
    with pytest.raises(ValueError, match="keep= names 'nope'"):
        run_sequential(noise_prompt(), executor=inprocess, progress=False, keep=["nope"])
    with pytest.raises(TypeError, match="on_iteration= is a function"):
        run_sequential(noise_prompt(), executor=inprocess, progress=False, on_iteration=3)


def test_kept_history_is_bounded_by_the_ram_budget(inprocess):
    big = noise_prompt()
    big["1"]["inputs"].update(width=512, height=512)  # 3 MiB a value
    with pytest.raises(StoreFullError, match="over the run's RAM budget"):
        run_sequential(big, iterations=4, executor=inprocess, progress=False, keep=["noisy"],
                       ram_budget=8 << 20, controls={"Noise.seed": "increment"})
    ok = run_sequential(big, iterations=2, executor=inprocess, progress=False, keep=["noisy"], ram_budget=8 << 20,
                        controls={"Noise.seed": "increment"})
    assert len(ok.history["noisy"]) == 2 and not torch.equal(*ok.history["noisy"])
