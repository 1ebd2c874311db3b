"""`discomfort demo` as a user runs it: a subprocess, on ComfyUI fetched the way the tests fetch it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

Image = pytest.importorskip("PIL.Image")
np = pytest.importorskip("numpy")


def _demo(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "discomfort.cli", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.comfy
def test_demo_installs_the_pack_and_runs_a_loop_with_ports(comfy_path, tmp_path):
    """The cache holds the tests' ComfyUI (as ``scripts/setup_comfyui.py`` made it): the demo
    fetches nothing, copies it, places the pack, starts it and runs a loop whose files stay."""
    if not (comfy_path / ".discomfort-comfyui.json").is_file():
        pytest.skip("DISCOMFORT_COMFYUI was not made by scripts/setup_comfyui.py")
    from discomfort.comfy import fetch

    if fetch.installed_requirements(sys.executable).get("comfyui_version") != fetch.COMFYUI_VERSION:
        pytest.skip("ComfyUI's requirements were not installed here by scripts/setup_comfyui.py")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / comfy_path.name).symlink_to(comfy_path, target_is_directory=True)

    proc = _demo("--cache-dir", str(cache), "--iterations", "3", env={"PIP_NO_INDEX": "1"})  # no download
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    demo = cache / "demo" / "ComfyUI"
    assert f"the demo's own copy of it: {demo}" in out
    assert (demo / "custom_nodes" / "discomfort_nodes" / "web" / "discomfort_panel.js").is_file()
    assert not (comfy_path / "custom_nodes" / "discomfort_nodes").exists(), "the fetched tree stays as fetched"
    assert "seeds used: [1, 2, 3]" in out
    assert len(re.findall(r"iteration \d: image \(1, 96, 128, 3\) float32", out)) == 3

    output = demo / "output" / "discomfort-demo"
    saved = sorted(output.glob("step_*.png"))
    kept = sorted((output / "kept").glob("image_*.png"))
    assert len(saved) == 3 and len(kept) == 3, out
    for path in saved + kept:
        assert str(path) in out
    pixels = [np.asarray(Image.open(p)) for p in kept]
    assert all(p.shape == (96, 128, 3) for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])
    # SaveImage saved what the port passed on: the value kept from the store (SaveImage truncates
    # to 8 bits, write_output rounds).
    diff = np.asarray(Image.open(saved[-1])).astype(int) - pixels[-1].astype(int)
    assert np.abs(diff).max() <= 1
    assert (output / "loop.json").is_file()


def test_demo_refuses_a_folder_that_is_not_comfyui(tmp_path):
    proc = _demo("--comfyui", str(tmp_path), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"discomfort demo: error: --comfyui {tmp_path}: not a ComfyUI folder (no main.py)"


def test_the_demo_keeps_the_torch_it_finds():
    """The demo installs ComfyUI's requirements under a pin of the torch and torchvision this
    Python has (the tests pin the project's own), so pip never swaps them."""
    torch = pytest.importorskip("torch")
    from discomfort.comfy import fetch

    pins = fetch.installed_torch_pins(sys.executable)
    assert f"torch=={torch.__version__}" in pins
    text = "torch\ntorchvision\ntorchaudio\nnumpy>=1.25.0\n"
    assert fetch.adapted_requirements(text, replace={}) == ["torch", "torchvision", "numpy>=1.25.0", "requests",
                                                           "websocket-client"]
    assert fetch.adapted_requirements(text)[1] == "torchvision==0.28.0"
