"""The editor panel's per-iteration outputs stay within their cap (files and bytes) and its setting.

The panel saves each iteration's values through ``save_outputs`` with an :class:`OutputBudget`:
a file is encoded first and written only when it fits. The browser and route tests
(``tests/comfy/test_editor_panel.py``) run the panel itself; these check the bound exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL", reason="the panel saves images with Pillow")

from discomfort.panel.io import OutputBudget, PanelLimits, save_outputs  # noqa: E402


def written_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_files_cap(tmp_path):
    lim = PanelLimits()
    budget = OutputBudget(files=2, nbytes=1 << 20)
    values = {"a": np.zeros((1, 8, 8, 3), np.float32), "b": "text", "c": {"n": 1}}
    out = save_outputs(values, {"a": "IMAGE"}, str(tmp_path), "sub", lim, budget)
    assert [(o["key"], o["kind"]) for o in out] == [("a", "image"), ("b", "txt"), ("c", "skipped")]
    assert "DISCOMFORT_PANEL_HISTORY_FILES" in out[2]["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.txt"]
    assert budget.spent and budget.files == 0


def test_bytes_cap_is_exact(tmp_path):
    """A file that would cross the byte cap is not written; a smaller one after it still is."""
    lim = PanelLimits()
    noise = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)  # a PNG of ~12 KiB
    budget = OutputBudget(files=100, nbytes=4000)
    out = save_outputs([("big", noise), ("small", "x" * 100)], {"big": "IMAGE"}, str(tmp_path), "s", lim, budget)
    assert [(o["key"], o["kind"]) for o in out] == [("big", "skipped"), ("small", "txt")]
    assert written_bytes(tmp_path) == 100 and budget.bytes == 3900
    arr = np.ones((100, 100), np.float64)  # .npy: counted from its size before it is written
    out = save_outputs({"arr": arr}, {}, str(tmp_path / "n"), "n", lim, budget)
    assert out[0]["kind"] == "skipped" and not (tmp_path / "n" / "arr.npy").exists()


def test_without_a_budget_nothing_changes(tmp_path):
    out = save_outputs({"img": np.ones((2, 4, 4, 3), np.float32)}, {"img": "IMAGE"}, str(tmp_path), "x", PanelLimits())
    assert [o["filename"] for o in out] == ["img_00000.png", "img_00001.png"]


def test_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISCOMFORT_PANEL_HISTORY_FILES", "7")
    monkeypatch.setenv("DISCOMFORT_PANEL_HISTORY_BYTES", "3M")
    lim = PanelLimits.from_env()
    assert (lim.history_files, lim.history_bytes) == (7, 3 << 20)
    budget = OutputBudget.history(lim)
    assert (budget.files, budget.bytes) == (7, 3 << 20)
