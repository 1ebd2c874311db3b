"""A first loop: one workflow with two ports, run three times, its output fed back as its input.

    python examples/first_loop.py [--server URL]

workflows/fade_to_white.json reads the port "image" (INPUT: nothing linked into it), blends it
halfway towards white, and writes the port "image" (OUTPUT: nothing linked out of it). Each
iteration reads what the one before wrote: 0 -> 0.5 -> 0.75 -> 0.875.
"""

import argparse
import os
from pathlib import Path

import torch

from discomfort import run_sequential

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                help="the ComfyUI server (default: $COMFYUI_URL, else ComfyUI's own default address)")
args = ap.parse_args()

black = torch.zeros(1, 64, 64, 3)  # an IMAGE: float32 [batch, height, width, channels] in 0..1
out = run_sequential(HERE / "workflows" / "fade_to_white.json", {"image": black}, iterations=3,
                     executor=args.server)
image = out["image"]
print(f"after {out.iterations} iterations: shape {tuple(image.shape)}, mean {image.mean().item():.3f}")
assert abs(image.mean().item() - 0.875) < 1e-3
