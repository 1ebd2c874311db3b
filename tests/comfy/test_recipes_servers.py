"""Models that travel: a reference saved on one server, used on another, by recipe.

Two launched servers with an LRU cache (``--cache-lru``) and the weights-free MODEL stand-in,
which counts its constructions per process: the recipe runs once per server, and never where the
object already lives.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from discomfort import Run
from discomfort.comfy import launch_server
from discomfort.recipes import Recipe
from discomfort.remote import TransportWarning
from discomfort.sequential import run_sequential

pytestmark = pytest.mark.comfy

HERE = Path(__file__).resolve().parent
NODE_PACK = HERE.parents[1] / "comfy_nodes"
TEST_PACK = HERE / "test_pack"


@pytest.fixture(scope="module")
def two_servers(comfy_path, tmp_path_factory):
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], api_nodes=False, extra_args=["--cache-lru", "16"],
                       work_dir=tmp_path_factory.mktemp("server-a"), startup_timeout=180) as a, \
            launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], api_nodes=False, extra_args=["--cache-lru", "16"],
                          work_dir=tmp_path_factory.mktemp("server-b"), startup_timeout=180) as b:
        yield a, b


def _port(uid: str, source: list | None = None) -> dict:
    inputs: dict = {"unique_id": uid}
    if source is not None:
        inputs["input_data"] = source
    return {"class_type": "DiscomfortPort", "inputs": inputs}


LOAD = {"1": {"class_type": "DiscomfortTestModelLoader", "inputs": {"name": "travelling"}},
        "2": _port("model", ["1", 0])}
USE = {"1": _port("model"), "2": {"class_type": "DiscomfortTestModelReport", "inputs": {"model": ["1", 0]}},
       "3": _port("report", ["2", 0])}


def _report(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"name=travelling serial=(\d+) constructed=(\d+) same=True", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def test_a_model_loaded_on_one_server_is_used_on_another(two_servers):
    a, b = two_servers
    with Run(a, transport="shm") as run:
        run.execute(LOAD, timeout=120)
        serial_a, _ = _report(run.execute(USE, timeout=120)["report"])  # on A: the object itself
        built_on_b = []
        for _ in range(3):  # on B: rebuilt there from the recipe, once (its LRU cache keeps it)
            serial, constructed = _report(run.execute(USE, timeout=120, executor=b)["report"])
            built_on_b.append((serial, constructed))
        assert len(set(built_on_b)) == 1 and built_on_b[0][0] == built_on_b[0][1]
        serial_again, constructed_a = _report(run.execute(USE, timeout=120)["report"])
        assert serial_again == serial_a and constructed_a == serial_a  # A never rebuilt it
        recipe = run.recipe("model")
        assert set(v["class_type"] for v in recipe.nodes.values()) == {"DiscomfortTestModelLoader"}


def test_outputs_give_the_recipe_and_it_travels_over_http(two_servers):
    a, b = two_servers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransportWarning)
        out = run_sequential(LOAD, executor=a, transport="http", outputs=["model"], timeout=120)
        recipe = out["model"]
        assert isinstance(recipe, Recipe) and recipe.key == "model"
        assert recipe.trusted and len(recipe.types) == 64  # extracted here, for A's node definitions
        first = _report(run_sequential(USE, {"model": recipe}, executor=b, transport="http", timeout=120)["report"])
        kept = json.dumps(recipe.to_json())  # as a script would keep it, as JSON: read back explicitly
        again = Recipe.from_json(json.loads(kept))
        assert not again.trusted  # checked against B before it is stitched, and accepted
        second = _report(run_sequential(USE, {"model": again}, executor=b, transport="http", timeout=120)["report"])
    assert first == second  # built once on B; the second call got it from B's cache
