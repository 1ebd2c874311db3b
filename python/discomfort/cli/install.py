"""Internal: ``discomfort install-comfyui``: put discomfort and its node pack into a user's ComfyUI.

    discomfort install-comfyui COMFYUI_PATH [--python PY] [--link] [--wheel FILE] [--remove]

1. finds the Python that runs that ComfyUI: ``--python``, else its ``venv``/``.venv``, else the
   portable build's embedded Python (``python_embeded`` next to the ComfyUI folder);
2. installs this package there with that Python's pip: ``--wheel FILE``, else this checkout
   (when run from one), else the wheel this package was installed from;
3. places the node pack in ``custom_nodes/discomfort_nodes`` (a copy, or a symbolic link with
   ``--link``);
4. checks that ComfyUI's Python imports it, and reports the version and store backend.

Then restart ComfyUI. ``--remove`` takes the node pack out of ``custom_nodes`` and uninstalls the
package from that Python.
"""

from __future__ import annotations

import argparse
import json
import ntpath
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, unquote, urlparse

from .. import _settings
from .._platform import PLATFORM
from .common import CommandError

__all__ = ["add_install_parser", "install_command", "find_comfy_python", "PACK_NAME"]

PACK_NAME = "discomfort_nodes"  # not "discomfort": ComfyUI must never import the package twice
_PROBE = ("import json, sys; print(json.dumps({'version': list(sys.version_info[:2]), "
          "'prefix': sys.prefix, 'executable': sys.executable}))")
_CHECK = ("import json, os, discomfort, discomfort.nodes; print(json.dumps({'version': discomfort.__version__, "
          "'backend': discomfort.backend, 'file': discomfort.__file__, "
          "'node_pack': os.path.join(os.path.dirname(discomfort.__file__), 'node_pack')}))")


def add_install_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("install-comfyui", help="install discomfort and its node pack into a ComfyUI",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comfyui", metavar="COMFYUI_PATH", help="the ComfyUI folder (the one with main.py)")
    p.add_argument("--python", metavar="PY", default=None,
                   help="the Python that runs ComfyUI (default: its venv/.venv, or the portable build's)")
    p.add_argument("--link", action="store_true",
                   help="link the node pack into custom_nodes instead of copying it (follows this checkout)")
    p.add_argument("--wheel", metavar="FILE", default=None, help="install this discomfort wheel")
    p.add_argument("--remove", action="store_true", help="take the node pack out and uninstall the package")
    p.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    p.set_defaults(func=install_command)
    return p


# --------------------------------------------------------------------------------- finding things


def _comfy_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CommandError(f"{path}: no such folder; give the ComfyUI folder (the one with main.py)")
    folder = folder.resolve()
    if not (folder / "main.py").is_file() and (folder / "ComfyUI" / "main.py").is_file():
        folder = folder / "ComfyUI"  # the portable build's folder (ComfyUI_windows_portable): its ComfyUI
    if not (folder / "main.py").is_file():
        raise CommandError(f"{folder} is not a ComfyUI folder (no main.py); give the folder that holds "
                           "ComfyUI's main.py")
    return folder


def find_comfy_python(comfy: Path, explicit: str | None = None) -> Path:
    """The Python that runs the ComfyUI in ``comfy``."""
    if explicit:
        found = shutil.which(explicit) if os.sep not in explicit else explicit
        if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise CommandError(f"--python {explicit}: no such program; give the Python that runs ComfyUI")
        return Path(os.path.abspath(found))
    names = ("bin/python3", "bin/python", "Scripts/python.exe")
    candidates = [comfy / env / name for env in ("venv", ".venv") for name in names]
    candidates += [comfy.parent / embedded / name for embedded in ("python_embeded", "python_embedded")
                   for name in ("python.exe", "bin/python3", "python")]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return Path(os.path.abspath(c))
    raise CommandError(f"cannot find the Python that runs {comfy} (no venv or .venv in it, no python_embeded "
                       "next to it); pass --python /path/to/that/python")


def _child_env() -> dict[str, str]:
    """The target Python on its own: nothing of this process's import path."""
    env = _settings.child_env(drop=("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run_python(python: Path, code: str, timeout: float = 120) -> dict:
    with tempfile.TemporaryDirectory(prefix="discomfort-install-") as cwd:  # no module of the cwd shadows
        try:
            proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout,
                                  cwd=cwd, env=_child_env())
        except OSError as exc:
            raise CommandError(f"cannot run {python}: {exc.strerror or exc}; pass --python with a working Python") \
                from None
        except subprocess.TimeoutExpired:
            raise CommandError(f"{python} did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise _ChildFailed(_last_line(proc.stderr) or f"exit code {proc.returncode}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CommandError(f"{python} answered something unexpected: {proc.stdout[-200:]!r}") from None


class _ChildFailed(Exception):
    pass


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR") or "Error" in ln]
    return (errors or lines or [""])[-1]


def _this_checkout() -> Path | None:
    """The source tree this package runs from (PYTHONPATH=python), or None."""
    root = Path(__file__).resolve().parents[3]  # python/discomfort/cli/install.py
    if (root / "pyproject.toml").is_file() and (root / "comfy_nodes" / "__init__.py").is_file() \
            and (root / "python" / "discomfort" / "cli" / "install.py").is_file():
        return root
    return None


def _installed_from() -> tuple[str, Path] | None:
    """("wheel", file) or ("checkout", folder) this package was pip-installed from, when still there."""
    from importlib import metadata

    try:
        raw = metadata.distribution("discomfort").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    url = urlparse(info.get("url", ""))
    if url.scheme != "file":
        return None
    path = Path(_file_url_path(url))
    if path.is_file() and path.suffix == ".whl":
        return "wheel", path
    if path.is_dir() and (path / "pyproject.toml").is_file():
        return "checkout", path
    return None


def _file_url_path(url: ParseResult) -> str:
    """The path of a file: URL as pip records it. Windows: file:///C:/x/a.whl is C:\\x\\a.whl, and
    file://server/share/a.whl is \\\\server\\share\\a.whl (a UNC path)."""
    path = unquote(url.path)
    if PLATFORM != "win32":
        return path
    if re.match(r"/[A-Za-z]:", path):
        path = path[1:]
    elif url.netloc and url.netloc.lower() != "localhost":
        path = f"//{url.netloc}{path}"
    return ntpath.normpath(path)


def _wheel_fits(wheel: Path, version: list[int]) -> bool:
    parts = wheel.name[:-4].split("-")
    tags = parts[-3].split(".") if len(parts) >= 5 else []
    want = f"cp{version[0]}{version[1]}"
    return any(t == want or t in ("py3", f"py{version[0]}{version[1]}") for t in tags)


def _source(args: argparse.Namespace, version: list[int]) -> tuple[str, Path]:
    if args.wheel:
        wheel = Path(args.wheel).expanduser().resolve()
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise CommandError(f"--wheel {args.wheel}: no such wheel file")
        kind_path: tuple[str, Path] = ("wheel", wheel)
    else:
        checkout = _this_checkout()
        found = ("checkout", checkout) if checkout else _installed_from()
        if found is None:
            raise CommandError("cannot tell what to install: this discomfort was not installed from a wheel file "
                               "or a checkout that still exists; pass --wheel FILE, or run this command from a "
                               "checkout (PYTHONPATH=python python -m discomfort.cli install-comfyui ...)")
        kind_path = found
    kind, path = kind_path
    if kind == "wheel" and not _wheel_fits(path, version):
        raise CommandError(f"the wheel {path.name} does not fit ComfyUI's Python {version[0]}.{version[1]}; "
                           f"build one for it (that Python: pip wheel CHECKOUT) and pass --wheel FILE")
    return kind, path


# ------------------------------------------------------------------------------------- the pack


def _is_our_pack(folder: Path) -> bool:
    init = folder / "__init__.py"
    try:
        text = init.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "Discomfort node pack" in text or ("DiscomfortPort" in text and "discomfort" in text)


def _remove_pack(dest: Path) -> bool:
    if dest.is_symlink():
        dest.unlink()
        return True
    if not dest.exists():
        return False
    if not dest.is_dir() or not _is_our_pack(dest):
        raise CommandError(f"{dest} exists and is not a Discomfort node pack; move it away first")
    shutil.rmtree(dest)
    return True


def _other_packs(custom_nodes: Path, dest: Path) -> list[Path]:
    try:
        entries = list(custom_nodes.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.name != dest.name and e.is_dir() and not e.name.endswith(".disabled")
            and _is_our_pack(e)]


def _pip(python: Path, pip_args: list[str], verbose: bool, what: str) -> None:
    cmd = [str(python), "-m", "pip", *pip_args]
    try:
        proc = subprocess.run(cmd, capture_output=not verbose, text=True, env=_child_env(), timeout=1800)
    except subprocess.TimeoutExpired:
        raise CommandError(f"pip did not finish {what} within 30 minutes") from None
    if proc.returncode != 0:
        why = _last_line((proc.stderr or "") + "\n" + (proc.stdout or "")) if not verbose else "see pip's output above"
        if "No module named pip" in (proc.stderr or ""):
            raise CommandError(f"{python} has no pip; install it there (python -m ensurepip) and try again")
        raise CommandError(f"pip failed {what} into {python}: {why} (rerun with -v for pip's output)")


# -------------------------------------------------------------------------------------- command


def install_command(args: argparse.Namespace) -> int:
    comfy = _comfy_folder(args.comfyui)
    python = find_comfy_python(comfy, args.python)
    try:
        probe = _run_python(python, _PROBE)
    except _ChildFailed as exc:
        raise CommandError(f"{python} does not run: {exc}; pass --python with the Python that runs ComfyUI") \
            from None
    version = probe["version"]
    if tuple(version) < (3, 10):
        raise CommandError(f"{python} is Python {version[0]}.{version[1]}; discomfort needs 3.10 or newer")
    custom_nodes = comfy / "custom_nodes"
    dest = custom_nodes / PACK_NAME
    same_env = os.path.realpath(probe["prefix"]) == os.path.realpath(sys.prefix)
    if args.remove:
        return _remove(args, python, dest, same_env)

    if dest.exists() and not dest.is_symlink() and not (dest.is_dir() and _is_our_pack(dest)):
        raise CommandError(f"{dest} exists and is not a Discomfort node pack; move it away first")
    try:
        before: dict | None = _run_python(python, _CHECK)
    except _ChildFailed:
        before = None
    from .._version import __version__

    if same_env and before and before["version"] == __version__ and not args.wheel:
        # ComfyUI runs in this very environment, which has this very package: nothing to install,
        # the node pack comes from this package (or from the checkout it runs from).
        checkout = _this_checkout()
        kind, source = ("checkout", checkout) if checkout else ("installed", Path(before["node_pack"]))
    else:
        kind, source = _source(args, version)
        if kind == "checkout":
            print(f"building discomfort from {source} with {python} (the C++ core needs a compiler and CMake; "
                  "without them it installs in pure-Python mode)", flush=True)
        pip_args = ["install", "-q"] + (["--force-reinstall", "--no-deps"] if before else []) + [str(source)]
        _pip(python, pip_args, args.verbose, f"installing {source.name}")
    try:
        after = _run_python(python, _CHECK)
    except _ChildFailed as exc:
        raise CommandError(f"discomfort was installed but {python} cannot import it: {exc}") from None

    pack_source = source / "comfy_nodes" if kind == "checkout" else Path(after["node_pack"])
    if not (pack_source / "__init__.py").is_file():
        raise CommandError(f"the node pack is missing from {pack_source}; reinstall discomfort")
    custom_nodes.mkdir(exist_ok=True)
    _remove_pack(dest)
    if args.link:
        try:
            dest.symlink_to(pack_source, target_is_directory=True)
        except OSError as exc:
            why = " (Windows lets only administrators and Developer Mode make links)" if PLATFORM == "win32" else ""
            raise CommandError(f"cannot link {dest} to {pack_source}: {exc.strerror or exc}{why}; leave out --link "
                               "to copy the node pack instead") from None
        placed = f"linked {dest} -> {pack_source}"
    else:
        shutil.copytree(pack_source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        placed = f"copied the node pack to {dest}"
    print(f"discomfort {after['version']} ({after['backend']} backend) installed for {python} "
          f"(Python {version[0]}.{version[1]})")
    print(placed)
    for other in _other_packs(custom_nodes, dest):
        print(f"note: {other} is another Discomfort node pack; remove it (ComfyUI would load both)")
    if same_env:
        print("note: that is this command's own environment")
    print("Now restart ComfyUI to load the Discomfort nodes.")
    return 0


def _remove(args: argparse.Namespace, python: Path, dest: Path, same_env: bool) -> int:
    removed = _remove_pack(dest)
    print(f"removed {dest}" if removed else f"no node pack at {dest}")
    try:
        _run_python(python, "import json, discomfort; print(json.dumps({}))")
        installed = True
    except _ChildFailed:
        installed = False
    if installed and same_env:
        print(f"left the discomfort package in {python}'s environment: it is this command's own "
              f"(uninstall it with: {python} -m pip uninstall discomfort)")
    elif installed:
        _pip(python, ["uninstall", "-y", "-q", "discomfort"], args.verbose, "uninstalling discomfort")
        print(f"uninstalled discomfort from {python}")
    else:
        print(f"discomfort is not installed for {python}")
    print("Now restart ComfyUI to unload the Discomfort nodes." if removed else "Nothing else to do.")
    return 0

