"""For each image in a folder, one run of a workflow; the results written beside each other.

    python examples/for_each_file.py [--server URL] [--images DIR] [--out DIR]

Without ``--images`` it makes three small PNGs to work on. Each file is read as an IMAGE
(``load_input``: float32 [1, H, W, 3] in 0..1), run through workflows/fade_to_white.json twice,
and written as a PNG (``write_output``). ``discomfort run --input-dir image=DIR`` does the same
from the shell.
"""

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image

from discomfort import run_sequential
from discomfort.cli.run import load_input, write_output

HERE = Path(__file__).resolve().parent / "workflows"
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--server", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                help="the ComfyUI server (default: $COMFYUI_URL, else ComfyUI's own default address)")
ap.add_argument("--images", type=Path, default=None, help="a folder of .png/.jpg/.webp files")
ap.add_argument("--out", type=Path, default=Path("for_each_out"), help="where results go (default: %(default)s)")
args = ap.parse_args()

if args.images is None:
    args.images = Path(tempfile.mkdtemp(prefix="discomfort-example-"))
    for name, color in (("red", (200, 0, 0)), ("green", (0, 160, 0)), ("blue", (0, 0, 220))):
        Image.new("RGB", (48, 32), color).save(args.images / f"{name}.png")

files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
for path in files:
    image = load_input(path)
    out = run_sequential(HERE / "fade_to_white.json", {"image": image}, iterations=2, executor=args.server)
    written = write_output("image", out["image"], args.out, stem=path.stem)
    print(f"{path.name} {tuple(image.shape)} -> {written[0]}")
    assert out["image"].shape == image.shape and out["image"].min() >= 0.75 - 1e-3
