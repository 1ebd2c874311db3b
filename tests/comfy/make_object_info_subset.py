"""Regenerate tests/fixtures/object_info_subset.json from a real ComfyUI server.

    DISCOMFORT_COMFYUI=... PYTHONPATH=python .venv/bin/python tests/comfy/make_object_info_subset.py

The fixture holds /object_info for just the node types the workflow fixtures use, so that the
format tests run without ComfyUI. test_object_info_fixture_matches_server checks it stays current.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "object_info_subset.json"

NODE_TYPES = [
    "EmptyImage", "ImageInvert", "ImageScale", "ImageBlend", "ImageBatch", "SolidMask",
    "InvertMask", "MaskToImage", "EmptyLatentImage", "LatentUpscale", "LatentAdd", "KSampler",
    "RandomNoise", "PrimitiveInt", "PrimitiveString", "PreviewImage", "SaveImage", "LoadImage",
    "DiscomfortPort", "DiscomfortDataLoader",
    # frontend-only widget values (issue 14): viewers, size text, preview, browser captures
    "Preview3D", "SaveGLB", "GetImageSize", "PreviewAny", "WebcamCapture", "Load3D",
    "CLIPTextEncode", "ImageScaleToTotalPixels",
]


def subset(object_info: dict) -> dict:
    missing = [t for t in NODE_TYPES if t not in object_info]
    if missing:
        raise SystemExit(f"the server lacks {missing}")
    out = {}
    for t in NODE_TYPES:
        info = dict(object_info[t])
        if t in ("LoadImage", "Load3D"):  # the file list depends on the input folder
            info["input"] = json.loads(json.dumps(info["input"]))
            key = "image" if t == "LoadImage" else "model_file"
            info["input"]["required"][key][0] = ["example.png" if t == "LoadImage" else "example.glb"]
        out[t] = info
    return out


def main() -> int:
    sys.path.insert(0, str(REPO / "python"))
    from discomfort.comfy import launch_server

    comfy = os.environ.get("DISCOMFORT_COMFYUI")
    if not comfy:
        raise SystemExit("set DISCOMFORT_COMFYUI (the path scripts/setup_comfyui.py prints)")
    with launch_server(comfy, isolated=True, custom_nodes=[REPO / "comfy_nodes"]) as server:
        info = server.object_info()
    FIXTURE.write_text(json.dumps(subset(info), indent=1, sort_keys=True) + "\n")
    print(FIXTURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
