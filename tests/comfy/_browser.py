"""The real frontend in headless Chromium, for the browser tests (a plain module, not a test).

Debian's chromium (``apt-get install -y chromium``) driven by Playwright from PyPI (no browser
download). Without them the browser tests fail with the fix, unless ``DISCOMFORT_SKIP_BROWSER=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("DISCOMFORT_CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # require_browser() says how to install it
    class PlaywrightTimeout(Exception):  # type: ignore[no-redef]
        """Never raised: Playwright is missing and the browser tests fail before using it."""


def until_visible(act: Any, locator: Any, attempts: int, timeout_ms: int) -> None:
    """Do ``act()`` until ``locator`` shows, at most ``attempts`` times: a loaded page may take two
    clicks for a double click, or a double click for two clicks."""
    for attempt in range(attempts):
        act()
        try:
            locator.wait_for(state="visible", timeout=timeout_ms)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def artifacts_dir() -> Path:
    """Where screenshots and summaries are kept: ``$DISCOMFORT_ARTIFACTS``, else /tmp/discomfort-artifacts."""
    path = Path(os.environ.get("DISCOMFORT_ARTIFACTS") or "/tmp/discomfort-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_browser() -> Any:
    """Playwright's ``sync_playwright``, or a failure that says how to install what is missing."""
    if os.environ.get("DISCOMFORT_SKIP_BROWSER") == "1":
        pytest.skip("DISCOMFORT_SKIP_BROWSER=1: browser tests skipped on request")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (or set DISCOMFORT_SKIP_BROWSER=1)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `pip install playwright==1.65.2` (no browser download needed)")
    return sync_playwright


def launch(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


_TEMPLATES_DUE: dict[int, bool] = {}  # id(page) -> whether its Templates dialog will open


def _templates_due(url: str) -> bool:
    """Whether the editor will open its Templates dialog: only while the user's setting
    ``Comfy.TutorialCompleted`` is not set (the frontend sets it as it opens the dialog)."""
    import requests

    try:
        resp = requests.get(url + "/settings/Comfy.TutorialCompleted", timeout=30)
        return not (resp.status_code == 200 and resp.json() is True)
    except (requests.RequestException, ValueError):
        return True


def open_editor(browser: Any, url: str, ready: str = "window.app && window.app.graph",
                viewport: tuple[int, int] = (1500, 950)) -> Any:
    """A page on the editor at ``url``, once ``ready`` (a JS expression) holds."""
    due = _templates_due(url)
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    _TEMPLATES_DUE[id(page)] = due
    page.goto(url)
    page.wait_for_function(ready, timeout=120_000)
    return page


def close_templates(pg: Any) -> None:
    """A fresh profile (a new server's) opens the Templates dialog over the canvas, once the page
    has loaded its settings: wait for it, close it. A page whose server's settings say it was
    shown (another test opened the editor on the same server) gets none: nothing to wait for."""
    if _TEMPLATES_DUE.pop(id(pg), True) is False:
        return
    dialog = pg.locator(".p-dialog")
    try:
        dialog.first.wait_for(state="visible", timeout=60_000)
    except Exception:  # noqa: BLE001 - no dialog this time
        return
    close = pg.locator(".p-dialog[aria-labelledby=global-workflow-template-selector] button.right-6")
    if close.count():
        close.first.click()  # its close button (top right; it has no label)
    else:
        pg.keyboard.press("Escape")
    dialog.first.wait_for(state="hidden", timeout=15_000)
