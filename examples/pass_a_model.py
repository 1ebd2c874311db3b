"""Pass a model between workflows: load it once, use it in every later call.

    python examples/pass_a_model.py [--server URL]

workflows/load_vae.json loads a VAE (``pixel_space``: a real ComfyUI VAE that needs no file) and
writes it to the port "vae". A VAE, like a MODEL or CLIP, is kept by reference inside ComfyUI:
workflows/vae_roundtrip.json reads that very object from its port "vae", with no loader of its
own, for as long as the ``Run`` holds. With a checkpoint it is the same workflow shape:
CheckpointLoaderSimple -> ports "model", "clip", "vae".
"""

import argparse
import os
from pathlib import Path

import torch

from discomfort import Run

HERE = Path(__file__).resolve().parent / "workflows"
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                help="the ComfyUI server (default: $COMFYUI_URL, else ComfyUI's own default address)")
args = ap.parse_args()

gradient = torch.linspace(0, 1, 64).reshape(1, 1, 64, 1).expand(1, 64, 64, 3).contiguous()
with Run(args.server) as run:
    run.execute(HERE / "load_vae.json")                    # the VAE is made here, once
    run.save("image", gradient)
    for i in range(4):                                     # each call encodes, decodes and inverts
        out = run.execute(HERE / "vae_roundtrip.json")
        print(f"call {i}: first pixel {out['image'][0, 0, 0, 0].item():.2f}")
    final = run.load("image")
# Four inversions give the gradient back (the pixel-space VAE changes nothing).
assert torch.allclose(final, gradient, atol=1e-3), (final - gradient).abs().max()
print("the VAE was loaded once and used by four calls")
