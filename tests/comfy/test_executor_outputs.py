"""Both executors return ComfyUI's outputs of a prompt and say where its files are."""

from __future__ import annotations

import pytest
from PIL import Image

pytestmark = pytest.mark.comfy


def test_outputs_name_the_saved_file_under_output_dir(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 6, "height": 5, "batch_size": 1, "color": 0x00FF00}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "outputs_test/img"}},
    }
    first = executor.execute(prompt, timeout=60)
    second = executor.execute(prompt, timeout=60)  # served from ComfyUI's cache: its outputs still come back
    for outputs in (first, second):
        assert list(outputs) == ["2"]
        (image,) = outputs["2"]["images"]
        assert image["type"] == "output" and image["subfolder"] == "outputs_test"
        path = executor.output_dir / image["subfolder"] / image["filename"]
        assert path.is_file(), path
        with Image.open(path) as img:
            assert img.size == (6, 5) and img.convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    assert first["2"]["images"][0]["filename"] == second["2"]["images"][0]["filename"]


def test_remote_server_output_dir_is_unknown():
    from discomfort.comfy import ComfyServer

    assert ComfyServer("http://127.0.0.1:1").output_dir is None
