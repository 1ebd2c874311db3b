"""The node pack in the newest ComfyUI editor (comfyui-frontend-package 1.58.1, issue 27).

The same ComfyUI copy as ``test_editor`` and ``test_editor_panel`` (discomfort installed from the
built wheel by ``install-comfyui``, ``_installed_comfy``), a second server of it started by its own
``main.py`` with ``--front-end-root`` on the newest frontend (``_frontend_oracle``), in headless
Chromium. Elements are found as a user finds them: the node search by its accessible name ("Add a
node..."), the Discomfort tab by its button's name (1.58.1's sidebar buttons have no
``<tab id>-tab-button`` class). DiscomfortPort is added from the search, wired, a unique_id edited
in the canvas' prompt dialog, saved with
``app.graph.serialize()`` and run; the panel runs two saved workflows in a loop. Screenshots go to
``$DISCOMFORT_ARTIFACTS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _browser import artifacts_dir, launch, open_editor, require_browser, until_visible
from _frontend_oracle import NEWEST, VERSION_JS, server_args
from _installed_comfy import PANEL_ENV
from test_editor import BUILD_JS, edit_unique_id
from test_editor_panel import add_workflows, blend_workflow, expected_values, finished_event, invert_workflow, listen, open_panel, pixels

pytestmark = pytest.mark.comfy

START = 51  # the input image's value, as test_editor_panel's


@pytest.fixture(scope="module")
def newest(comfy_copy):
    """(server, page): a server of the installed copy serving frontend 1.58.1, a page on it; saved
    workflows in the copy's user folder and an image in its input folder for the panel."""
    from PIL import Image

    sync_playwright = require_browser()
    args, version = server_args(NEWEST)
    work = Path(comfy_copy.root)
    workflows = work / "user" / "default" / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    (workflows / "newest_invert.json").write_text(json.dumps(invert_workflow()))
    (workflows / "newest_blend.json").write_text(json.dumps(blend_workflow()))
    (work / "input").mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), START, np.uint8)).save(work / "input" / "newest_start.png")
    with comfy_copy.start(args, env=PANEL_ENV, name="newest-frontend") as server, sync_playwright() as pw:
        browser = launch(pw)
        page = open_editor(browser, server.url, "window.app && window.app.graph && window.comfyAPI.api.api.clientId")
        assert page.evaluate(VERSION_JS) == version == NEWEST
        print(f"\ncomfyui-frontend-package {version} (served by {server.url}, {comfy_copy.source})")
        listen(page)
        yield server, page
        browser.close()


def add_from_search(pg, text: str, x: int = 700, y: int = 400) -> list[str]:
    """Double click the canvas, type into the search box (found by its accessible name), take the
    first option with Enter, place the node with a click; the options the search showed."""
    box = pg.get_by_role("combobox", name="Add a node...")
    until_visible(lambda: pg.mouse.dblclick(x, y), box, 5, 6_000)
    box.fill(text)
    pg.wait_for_function("(t) => { const o = [...document.querySelectorAll('[role=option]')];"
                         " return o.length && o[0].textContent.startsWith(t); }", arg=text)
    options = pg.evaluate("() => [...document.querySelectorAll('[role=option]')].map(e => e.textContent.trim())")
    count = pg.evaluate("() => app.graph._nodes.length")
    box.press("Enter")
    box.wait_for(state="hidden")
    pg.wait_for_function("(n) => app.graph._nodes.length === n + 1", arg=count)
    # 1.58.1 then lets the new node follow the pointer until a click places it (Escape drops it).
    pg.mouse.click(x, y)
    return options


def test_port_in_the_newest_editor(newest):
    """DiscomfortPort from the search (the deprecated loader hidden), wired to IMAGE/LATENT/any
    inputs, a unique_id edited on the canvas, the saved graph run with run_sequential."""
    import torch

    from discomfort import run_sequential

    server, pg = newest
    pg.evaluate("() => app.graph.clear()")
    options = add_from_search(pg, "Discomfort Port")
    assert options[0].startswith("Discomfort Port") and not any("Data Loader" in o for o in options), options
    pg.wait_for_function("() => app.graph._nodes.length === 1")
    first = pg.evaluate("() => app.graph._nodes[0].id")
    assert pg.evaluate("() => app.graph._nodes[0].type") == "DiscomfortPort"
    built = pg.evaluate(BUILD_JS)
    assert all(built["linked"].values()) and built["refused"], built
    edit_unique_id(pg, first, "image")
    assert pg.evaluate("(id) => app.graph.getNodeById(id).widgets[0].value", first) == "image"
    pg.screenshot(path=str(artifacts_dir() / f"editor_ports_{NEWEST}.png"))

    workflow = pg.evaluate("() => app.graph.serialize()")
    (artifacts_dir() / f"editor_ports_{NEWEST}.json").write_text(json.dumps(workflow, indent=1))
    assert sorted(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "DiscomfortPort") == [
        "copy", "image", "inverted", "latent", "latent_up"]
    image = torch.full((1, 8, 8, 3), 0.25)
    image[0, :4] = 0.75
    latent = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4).repeat(1, 4, 1, 1)
    result = run_sequential(workflow, inputs={"image": image, "latent": {"samples": latent}}, executor=server,
                            timeout=120)
    assert set(result) == {"inverted", "copy", "latent_up"}, set(result)
    assert torch.allclose(result["inverted"], 1 - image) and torch.equal(result["copy"], result["inverted"])
    assert torch.equal(result["latent_up"]["samples"],
                       torch.nn.functional.interpolate(latent, size=(6, 6), mode="nearest-exact"))


def test_panel_run_in_the_newest_editor(newest):
    """The Discomfort tab opened by its button's name; two saved workflows, the image bound, three
    iterations, run from the panel: finished, and the last outputs hold the expected pixels."""
    server, pg = newest
    open_panel(pg)
    pg.wait_for_selector("[data-dcf=workflow-select] option[value='newest_blend.json']", state="attached")
    add_workflows(pg, ("newest_invert.json", "newest_blend.json"))
    pg.wait_for_selector("li[data-workflow='newest_invert.json'] .dcf-ports li[data-key=image]")
    pg.select_option("[data-dcf=input-file-image]", "newest_start.png")
    pg.fill("[data-dcf=iterations]", "3")
    pg.click("[data-dcf=run]")
    pg.wait_for_selector("[data-dcf=status][data-state=running], [data-dcf=status][data-state=finished]")
    run_id = pg.get_attribute("[data-dcf=status]", "data-run")
    seen = finished_event(pg, run_id)
    pg.wait_for_selector("[data-dcf=status][data-state=finished]")
    pg.screenshot(path=str(artifacts_dir() / f"panel_after_{NEWEST}.png"))
    kinds = [e["kind"] for e in seen]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("workflow_done") == 6, kinds
    want = expected_values(3)
    outputs = seen[-1]["outputs"]
    assert sorted(o["key"] for o in outputs) == ["image", "inverted"]
    for o in outputs:
        got = pixels(Path(server.output_dir) / o["subfolder"] / o["filename"])
        assert abs(int(got.max()) - want[o["key"]]) <= 1 and got.min() == got.max(), (o, got.max(), want)
