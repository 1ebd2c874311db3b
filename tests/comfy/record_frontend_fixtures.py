"""Record the newest frontend's answers for the workflow fixtures of issue 27 (a script, not a test).

    DISCOMFORT_COMFYUI=... .venv/bin/python tests/comfy/record_frontend_fixtures.py

A ComfyUI server with ``--front-end-root`` on comfyui-frontend-package 1.58.1 (``_frontend_oracle``)
loads each fixture below into its editor in headless Chromium and writes

* ``tests/fixtures/workflows/<name>.api.json``: ``app.graphToPrompt()``'s prompt, less the nodes
  of subgraph nodes muted or bypassed inside another subgraph (1.58.1 still sends those: a plain
  bug the converter does not copy, see ``_frontend_oracle.disabled_instances``);
* ``tests/fixtures/workflows/saved-1.58.1/<name>.json``: the workflow as 1.58.1 saves it after
  loading it (``app.graph.serialize()``).

``test_workflow_format`` converts both the fixture and the saved file and compares with the
prompt; ``test_frontend_parity`` compares with the live frontend.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _browser import launch, open_editor  # noqa: E402
from _frontend_oracle import CONVERT_AND_SAVE_JS, NEWEST, VERSION_JS, server_args, without_disabled  # noqa: E402

REPO = HERE.parents[1]
WORKFLOWS = REPO / "tests" / "fixtures" / "workflows"
SAVED = WORKFLOWS / f"saved-{NEWEST}"
FIXTURES = ["ui_subgraph_bypassed", "ui_subgraph_muted", "ui_subgraph_bypassed_nested", "ui_subgraph_muted_nested",
            "ui_subgraph_ids_collide", "ui_preview_any"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    from discomfort.comfy import launch_server

    args, version = server_args(NEWEST)
    SAVED.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work, \
            launch_server(os.environ["DISCOMFORT_COMFYUI"], custom_nodes=[REPO / "comfy_nodes"], work_dir=work,
                          extra_args=args, startup_timeout=240) as server, sync_playwright() as pw:
        browser = launch(pw)
        page = open_editor(browser, server.url)
        assert page.evaluate(VERSION_JS) == version == NEWEST, version
        for name in FIXTURES:
            workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
            prompt, saved = page.evaluate(CONVERT_AND_SAVE_JS, workflow)
            (WORKFLOWS / f"{name}.api.json").write_text(json.dumps(without_disabled(prompt, workflow), indent=1) + "\n")
            (SAVED / f"{name}.json").write_text(json.dumps(saved, indent=1) + "\n")
            print(f"{name}: {len(prompt)} nodes (comfyui-frontend-package {version})")
        browser.close()


if __name__ == "__main__":
    main()
