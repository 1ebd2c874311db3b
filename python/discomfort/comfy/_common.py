"""Helpers shared by the in-process executor and the server launcher."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from .. import _settings
from ..errors import NodeExecutionError, PromptValidationError

#: Folder name the repository's node pack gets inside a generated custom_nodes directory.
#: It differs from the package name ("discomfort") so that ComfyUI never imports the package twice.
PACK_LINK_NAME = "discomfort_nodes"


def default_node_pack() -> Path | None:
    """``$DISCOMFORT_COMFY_NODES``, else the copy installed with the wheel
    (``discomfort/node_pack``), else the repository's ``comfy_nodes/`` folder."""
    env = _settings.get("DISCOMFORT_COMFY_NODES")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve()
    installed = here.parents[1] / "node_pack"  # discomfort/comfy/_common.py -> discomfort/node_pack
    source = here.parents[3] / "comfy_nodes"  # python/discomfort/comfy/_common.py -> repository root
    for candidate in (installed, source):
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def resolve_node_packs(custom_nodes: Sequence[os.PathLike | str] | None) -> list[Path]:
    """The node-pack folders to load: the given ones, or the default pack."""
    if custom_nodes is None:
        pack = default_node_pack()
        if pack is None:
            raise FileNotFoundError(
                "cannot find the discomfort node pack (comfy_nodes/): pass custom_nodes=[...] "
                "or set DISCOMFORT_COMFY_NODES"
            )
        return [pack]
    packs = [Path(p).expanduser().resolve() for p in custom_nodes]
    for p in packs:
        if not p.exists():
            raise FileNotFoundError(f"node pack {p} does not exist")
    return packs


def make_custom_nodes_dir(packs: Iterable[Path], parent: Path) -> Path:
    """A fresh folder under ``parent`` holding one symlink per node pack.

    ComfyUI scans a custom_nodes folder for packs; pointing it at the repository root would make
    it try every folder there. The repository's ``comfy_nodes`` gets the name ``discomfort_nodes``.
    """
    target = parent / "custom_nodes"
    target.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for pack in packs:
        name = PACK_LINK_NAME if pack.name == "comfy_nodes" else pack.name
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
        base, i = name, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        link = target / (name + (pack.suffix if pack.is_file() and not name.endswith(pack.suffix) else ""))
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pack, target_is_directory=pack.is_dir())
    return target


def _first_line(text: str) -> str:
    text = (text or "").strip()
    return text


def raise_for_messages(messages: Sequence, prompt_id: str | None = None) -> None:
    """Raise for an ``execution_error`` / ``execution_interrupted`` in ComfyUI's status messages."""
    for item in messages or ():
        event, data = item[0], item[1]
        if event == "execution_error":
            raise NodeExecutionError(
                data.get("node_id"),
                data.get("node_type"),
                _first_line(f"{data.get('exception_type', 'Exception')}: {data.get('exception_message', '')}"),
                details=data,
            )
        if event == "execution_interrupted":
            raise NodeExecutionError(data.get("node_id"), data.get("node_type"),
                                     "execution was interrupted", details=data)


def format_validation_error(error: dict | None, node_errors: dict | None) -> str:
    parts = []
    if error:
        msg = error.get("message", "invalid prompt")
        details = error.get("details")
        parts.append(f"{msg}: {details}" if details else msg)
    for node_id, info in (node_errors or {}).items():
        reasons = "; ".join(
            f"{r.get('message', '')}" + (f" ({r.get('details')})" if r.get("details") else "")
            for r in info.get("errors", [])
        )
        parts.append(f"node {node_id} ({info.get('class_type', '?')}): {reasons}")
    return "prompt rejected by ComfyUI: " + (" | ".join(parts) if parts else "unknown reason")


def validation_error(error: dict | None, node_errors: dict | None) -> PromptValidationError:
    return PromptValidationError(format_validation_error(error, node_errors), node_errors or {}, error)


def cached_nodes(messages) -> list[str]:
    """Node ids ComfyUI served from its cache, from an execute()'s status messages."""
    for item in messages or ():
        if item[0] == "execution_cached":
            return [str(n) for n in item[1].get("nodes", [])]
    return []
