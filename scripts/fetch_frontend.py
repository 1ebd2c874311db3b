#!/usr/bin/env python3
"""Fetch a newer ComfyUI frontend as a second oracle for the frontend-parity tests.

ComfyUI 0.3.75 pins ``comfyui-frontend-package==1.32.9``; users run newer frontends against the
same server (``main.py --front-end-root <package>/static``). This downloads the pinned newer one
with ``pip download --no-deps`` (the ordinary client, one look-up; never installed into any
environment, so ComfyUI's own pin stays) and unpacks the package directory, with its
``dist-info`` (where the version is read from), into ``DEST/<version>/``. Prints the ``static``
directory on the last line of stdout. Standard library only; a second run does nothing.

Usage: fetch_frontend.py [--version V] [--dest DIR] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "comfyui-frontend-package"
VERSION = "1.58.1"
DONE_MARK = ".complete"


def default_dest() -> Path:
    root = os.environ.get("DISCOMFORT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "discomfort") / "frontend"


def installed_version(static: Path) -> str:
    """The version in the unpacked package's METADATA (``<root>/*.dist-info``), beside ``static``."""
    for meta in sorted(static.parent.parent.glob("*.dist-info/METADATA")):
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise FileNotFoundError(f"no dist-info METADATA beside {static}")


def fetch(version: str, dest: Path, python: str) -> Path:
    """``dest/<version>/comfyui_frontend_package/static``, downloaded and unpacked once."""
    out = dest / version
    static = out / "comfyui_frontend_package" / "static"
    if (out / DONE_MARK).exists():
        return static
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                        "-d", tmp, f"{PACKAGE}=={version}"], check=True)
        wheels = list(Path(tmp).glob("comfyui_frontend_package-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"pip download {PACKAGE}=={version}: expected one wheel, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in zf.namelist():
                target = (out / name).resolve()
                if not str(target).startswith(str(out.resolve()) + os.sep):
                    raise SystemExit(f"{wheels[0].name}: member {name!r} leaves the target directory")
            zf.extractall(out)
    if installed_version(static) != version:
        raise SystemExit(f"{wheels[0].name} holds version {installed_version(static)}, not {version}")
    (out / DONE_MARK).write_text(version)
    return static


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--dest", type=Path, default=default_dest())
    ap.add_argument("--python", default=sys.executable, help="interpreter whose pip downloads the wheel")
    args = ap.parse_args()
    static = fetch(args.version, args.dest, args.python)
    print(f"[fetch_frontend] {PACKAGE} {installed_version(static)} in {static}", file=sys.stderr)
    print(static)


if __name__ == "__main__":
    main()
