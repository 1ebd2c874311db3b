"""A seed sweep, two ways: the workflow's own seed control, and a seed from Python.

    python examples/seed_sweep.py [--server URL] [--out DIR]

1. workflows/add_noise.json is a workflow as the editor saves it (UI format). Its ImageAddNoise
   seed says "increment" (control after generate), so, as in ComfyUI's queue, each iteration
   uses the next seed. ``keep=["noisy"]`` keeps every iteration's value of the port "noisy";
   its SaveImage wrote a file per iteration, listed in ``result.files``.
2. workflows/noise_seed_port.json takes its seed from a port: a held ``Run`` saves a new seed
   before each call.
"""

import argparse
import os
from pathlib import Path

import torch

from discomfort import Run, run_sequential
from discomfort.cli.run import write_output

HERE = Path(__file__).resolve().parent / "workflows"
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                help="the ComfyUI server (default: $COMFYUI_URL, else ComfyUI's own default address)")
ap.add_argument("--out", default="seed_sweep_out", help="folder for the kept images (default: %(default)s)")
args = ap.parse_args()

gray = torch.full((1, 64, 64, 3), 0.5)

# 1. The seed control of the saved workflow, applied between iterations.
result = run_sequential(HERE / "add_noise.json", {"image": gray}, iterations=4, keep=["noisy"],
                        executor=args.server)
for i, (image, used) in enumerate(zip(result.history["noisy"], result.controls)):
    files = [f["filename"] for f in result.files[i]]
    paths = write_output("noisy", image, args.out, stem=f"noisy_{i}")
    print(f"iteration {i}: controls {used}, SaveImage wrote {files}, kept as {paths[0]}")
distinct = {tuple(image.flatten()[:16].tolist()) for image in result.history["noisy"]}
assert len(distinct) == 4, "each iteration used another seed"

# 2. A seed from Python, through a port, over a run held across calls.
noisy = {}
with Run(args.server) as run:
    run.save("image", gray)
    for seed in (1, 2, 3):
        run.save("seed", seed)
        noisy[seed] = run.execute(HERE / "noise_seed_port.json")["noisy"]
        print(f"seed {seed}: first pixel {noisy[seed][0, 0, 0, 0].item():.4f}")
    run.save("seed", 1)
    again = run.execute(HERE / "noise_seed_port.json")["noisy"]
assert torch.equal(again, noisy[1]) and not torch.equal(noisy[1], noisy[2]), "a seed gives its own image"
