"""scripts/setup_comfyui.py: the requirement rewrite (pure) and its idempotency (with ComfyUI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup_comfyui.py"


@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("setup_comfyui", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_adapted_requirements(setup_mod):
    text = """comfyui-frontend-package==1.32.9
comfyui-workflow-templates==0.7.25
comfyui-embedded-docs==0.3.1
torch
torchsde
torchvision
torchaudio
numpy>=1.25.0
Pillow

#non essential dependencies:
kornia>=0.7.1
"""
    assert setup_mod.adapted_requirements(text) == [
        "comfyui-frontend-package==1.32.9", "torch", "torchsde", "torchvision==0.28.0",
        "numpy>=1.25.0", "Pillow", "kornia>=0.7.1", "requests", "websocket-client",
    ]


def test_default_cache(setup_mod, monkeypatch, tmp_path):
    monkeypatch.setenv("DISCOMFORT_CACHE", str(tmp_path))
    assert setup_mod.default_cache() == tmp_path
    monkeypatch.delenv("DISCOMFORT_CACHE")
    assert setup_mod.default_cache() == Path.home() / ".cache" / "discomfort"


@pytest.mark.comfy
def test_second_run_is_a_no_op(comfy_path):
    """With ComfyUI already set up, the script does nothing and prints the same directory."""
    if comfy_path.name != "comfyui-0.3.75" or not (comfy_path / ".discomfort-comfyui.json").is_file():
        pytest.skip("DISCOMFORT_COMFYUI was not made by scripts/setup_comfyui.py")
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--python", sys.executable, "--cache-dir", str(comfy_path.parent)],
        check=True, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIP_NO_INDEX": "1"},  # proves no download happens
    )
    assert time.monotonic() - t0 < 30
    assert out.stdout.strip().splitlines()[-1] == str(comfy_path)
    assert "already" in out.stderr
