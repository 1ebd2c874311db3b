"""A video-sized clip through a real ComfyUI server: discomfort against the PNG-over-HTTP round trip.

The clip is 81 frames of 480x832 RGB, float32 ([81, 480, 832, 3], 388 MB), the size of a short
video model's output. Both rows send it into a workflow on a launched ComfyUI server and bring the
workflow's result back:

- discomfort: ``run_sequential`` with the shared-memory transport (a port saves it, a loader
  hands it to the next node, no upload endpoint, no base64, no PNG);
- PNG over HTTP, as other drivers do it, in its cheapest core-ComfyUI form: the frames quantised
  to 8 bits into one animated PNG, one ``POST /upload/image``, LoadImage (which reads every
  frame into one batch) into SaveImage, then ``GET /view`` of each of the 81 saved frames,
  PNG-decoded. It is lossy (8 bits per channel).

Needs ``DISCOMFORT_COMFYUI`` (``scripts/setup_comfyui.py``); skipped without it. Run:
``pytest benchmarks/test_bench_video.py --benchmark-only``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

GROUP = "video 81x480x832x3 float32 through ComfyUI"
SHAPE = (81, 480, 832, 3)
NODE_PACK = Path(__file__).resolve().parents[1] / "comfy_nodes"

pytestmark = pytest.mark.skipif(not os.environ.get("DISCOMFORT_COMFYUI"),
                                reason="DISCOMFORT_COMFYUI is not set: no ComfyUI to run the workflows")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from discomfort.comfy import launch_server

    with launch_server(os.environ["DISCOMFORT_COMFYUI"], isolated=True, custom_nodes=[NODE_PACK], api_nodes=False,
                       work_dir=tmp_path_factory.mktemp("bench-comfy"), startup_timeout=240) as srv:
        yield srv


@pytest.fixture(scope="module")
def clip():
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(81))


def test_video_discomfort_shm(benchmark, server, clip):
    from discomfort.sequential import run_sequential

    benchmark.group = GROUP
    wf = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "video"}},
          "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "clip", "input_data": ["1", 0]}}}

    def round_trip():
        return run_sequential(wf, {"video": clip}, executor=server, transport="shm", timeout=600)["clip"]

    out = benchmark.pedantic(round_trip, rounds=5, warmup_rounds=1, iterations=1)
    assert torch.equal(out, clip)


def test_video_png_over_http(benchmark, server, clip):
    from PIL import Image

    benchmark.group = GROUP
    session = server._session
    rounds = iter(range(1 << 30))

    def round_trip():
        r = next(rounds)  # new file names each round: ComfyUI's cache must not serve the frames
        frames = (clip.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        images = [Image.fromarray(frame) for frame in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="PNG", save_all=True, append_images=images[1:])
        resp = session.post(f"{server.url}/upload/image", files={"image": (f"bench_{r}.png", buf.getvalue(),
                                                                          "image/png")},
                            data={"overwrite": "true"}, timeout=120)
        resp.raise_for_status()
        prompt = {"load": {"class_type": "LoadImage", "inputs": {"image": resp.json()["name"]}},
                  "save": {"class_type": "SaveImage", "inputs": {"images": ["load", 0],
                                                                 "filename_prefix": f"bench_video_{r}"}}}
        outputs = server.execute(prompt, timeout=600)
        out = []
        for image in outputs["save"]["images"]:
            resp = session.get(f"{server.url}/view", params=image, timeout=60)
            resp.raise_for_status()
            with Image.open(io.BytesIO(resp.content)) as im:
                out.append(np.asarray(im.convert("RGB")))
        return torch.from_numpy(np.stack(out)).float() / 255

    out = benchmark.pedantic(round_trip, rounds=2, warmup_rounds=0, iterations=1)
    assert out.shape == SHAPE
    assert float((out - clip).abs().max()) <= 0.5 / 255 + 1e-6  # only the 8-bit quantisation is lost
