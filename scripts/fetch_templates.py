#!/usr/bin/env python3
"""Fetch the workflow templates a ComfyUI tree pins, as test data for the frontend-parity tests.

ComfyUI's requirements.txt pins ``comfyui-workflow-templates==X``; that wheel only points (by
``Requires-Dist``) at the ``comfyui-workflow-templates-media-*`` wheels that hold the JSON. This
downloads those wheels with ``pip download --no-deps`` (the ordinary client, one look-up per wheel)
and extracts their ``templates/*.json`` into ``DEST/<version>/``; the templates are GPL-free test
data but are never committed. Prints the directory on the last line of stdout.

Usage: fetch_templates.py --comfyui PATH [--dest DIR] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "comfyui-workflow-templates"
MEDIA_RE = re.compile(r"^Requires-Dist:\s*(comfyui-workflow-templates-media-[a-z]+)==([^\s;]+)\s*$")
DONE_MARK = ".complete"


def pinned_version(comfy_path: Path) -> str:
    """The templates version ComfyUI's own requirements.txt pins."""
    for line in (comfy_path / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^\s*{PACKAGE}\s*==\s*([^\s#;]+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"{comfy_path}/requirements.txt does not pin {PACKAGE}")


def download(python: str, requirement: str, into: Path) -> Path:
    """One wheel, no dependencies, through pip."""
    before = set(into.glob("*.whl"))
    subprocess.run([python, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                    "-d", str(into), requirement], check=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(name.lower() + "-")]
    new = [p for p in found if p not in before] or found
    if not new:
        raise SystemExit(f"pip download {requirement}: no wheel appeared in {into}")
    return new[0]


def media_requirements(wheel: Path) -> list[str]:
    """The media wheels (name==version) the meta wheel requires unconditionally."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [f"{m.group(1)}=={m.group(2)}" for m in map(MEDIA_RE.match, lines) if m]
    return sorted(set(reqs))


def extract_templates(wheel: Path, dest: Path) -> int:
    """Copy ``*/templates/*.json`` (workflows and index files) out of one wheel."""
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[-2] == "templates" and name.endswith(".json"):
                (dest / parts[-1]).write_bytes(zf.read(name))
                count += 1
    return count


def fetch(comfy_path: Path, dest_root: Path, python: str) -> Path:
    version = pinned_version(comfy_path)
    dest = dest_root / version
    if (dest / DONE_MARK).exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="discomfort-templates-") as tmp:
        wheels = Path(tmp)
        meta = download(python, f"{PACKAGE}=={version}", wheels)
        reqs = media_requirements(meta)
        if not reqs:
            raise SystemExit(f"{meta.name} requires no media wheels: unknown layout")
        total = sum(extract_templates(download(python, req, wheels), dest) for req in reqs)
    if not total:
        raise SystemExit("no templates/*.json found in the media wheels")
    (dest / DONE_MARK).write_text("\n".join(reqs) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("DISCOMFORT_COMFYUI"), help="ComfyUI tree")
    ap.add_argument("--dest", default=str(Path.home() / ".cache" / "discomfort" / "templates"))
    ap.add_argument("--python", default=sys.executable, help="interpreter whose pip downloads")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui (or $DISCOMFORT_COMFYUI) is required")
    print(fetch(Path(args.comfyui), Path(args.dest), args.python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
