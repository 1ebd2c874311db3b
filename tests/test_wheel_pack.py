"""The node pack a user gets is the node pack in the repository (issue 25, point 1).

ComfyUI loads every file of ``comfy_nodes/`` (the Python modules and the ``web/`` scripts of the
editor panel); the wheel ships them as ``discomfort/node_pack``. The built wheel
(``$DISCOMFORT_WHEEL``, which ``scripts/test.sh`` exports) and the installed package must hold the
same files with the same bytes. Without ``DISCOMFORT_WHEEL`` (a developer's run) the wheel test is
skipped with the reason; the installed package is checked either way.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "comfy_nodes"
IN_WHEEL = "discomfort/node_pack/"


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return "__pycache__" in parts or rel.endswith(".pyc")


def files_of(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``folder`` that ComfyUI can load."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not _skipped(rel):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def pack_files() -> dict[str, str]:
    return files_of(PACK)


def test_the_pack_has_its_web_scripts():
    """The comparison below means something: the pack has Python modules and the panel's script."""
    files = pack_files()
    assert "__init__.py" in files and "web/discomfort_panel.js" in files, sorted(files)


def test_built_wheel_holds_the_whole_pack():
    wheel = os.environ.get("DISCOMFORT_WHEEL")
    if not wheel:
        pytest.skip("DISCOMFORT_WHEEL is not set (scripts/test.sh sets it to the wheel it builds): "
                    "no built wheel to compare")
    path = Path(wheel)
    assert path.is_file(), f"DISCOMFORT_WHEEL={wheel}: no such file"
    with zipfile.ZipFile(path) as zf:
        shipped = {n[len(IN_WHEEL):]: hashlib.sha256(zf.read(n)).hexdigest()
                   for n in zf.namelist() if n.startswith(IN_WHEEL) and not n.endswith("/")}
    want = pack_files()
    assert sorted(set(want) - set(shipped)) == [], "missing from the wheel's node_pack"
    assert sorted(set(shipped) - set(want)) == [], "in the wheel's node_pack but not in comfy_nodes/"
    assert [k for k in want if shipped[k] != want[k]] == [], "files that differ from comfy_nodes/"


def test_installed_package_holds_the_whole_pack():
    discomfort = pytest.importorskip("discomfort")
    installed = Path(discomfort.__file__).resolve().parent / "node_pack"
    if installed.resolve() == PACK.resolve():
        pytest.skip("discomfort runs from the checkout: its node_pack is comfy_nodes/ itself")
    assert installed.is_dir(), f"{installed}: the installed package has no node_pack"
    got = files_of(installed)
    want = pack_files()
    assert sorted(set(want) - set(got)) == [], f"missing from {installed}"
    assert sorted(set(got) - set(want)) == [], f"in {installed} but not in comfy_nodes/"
    assert [k for k in want if got[k] != want[k]] == [], f"files of {installed} that differ from comfy_nodes/"
