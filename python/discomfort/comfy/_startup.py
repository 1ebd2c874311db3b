"""How a ComfyUI tree starts as its user runs it: on which device, and with which node packs.

Shared by :class:`~discomfort.comfy.InProcessComfy` and :func:`~discomfort.comfy.launch_server`,
so both decide alike: the GPU where the torch of the Python that runs ComfyUI sees one, ``--cpu``
only where it sees none (ComfyUI 0.3.75 without ``--cpu`` on a CPU-only torch dies at start:
"Torch not compiled with CUDA enabled"); the tree's own packs, and this project's pack only where
the tree lacks it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Sequence

from .. import _settings
from ._common import default_node_pack, resolve_node_packs

__all__ = ["probe_accelerator", "use_cpu", "tree_node_pack", "packs_to_add"]

# What ComfyUI's comfy/model_management.py itself looks for, in its order, when --cpu is not given.
_PROBE = r"""
import json, torch
def probe():
    try:
        if torch.cuda.is_available():
            return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    except Exception:
        pass
    for name in ("xpu", "npu", "mlu"):
        try:
            if name != "xpu":
                __import__("torch_" + name)
            if getattr(torch, name).is_available():
                return name
        except Exception:
            pass
    try:
        if torch.backends.mps.is_available():
            return "mps"
    except Exception:
        pass
    return None
"""


# Environment variables that change which devices a torch sees.
_DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK",
               "ONEAPI_DEVICE_SELECTOR", "ASCEND_RT_VISIBLE_DEVICES", "MLU_VISIBLE_DEVICES")


def probe_accelerator(python: str | None = None, env: dict | None = None) -> str | None:
    """The accelerator the torch of ``python`` sees: "cuda", "rocm", "xpu", "npu", "mlu", "mps",
    or None (CPU only, or no torch).

    ``python`` None: this interpreter, asked in this process (it is about to import torch for an
    in-process ComfyUI anyway). Otherwise asked in a subprocess with ``env`` (default: this
    environment), once per interpreter and device variables (``CUDA_VISIBLE_DEVICES``, ...)."""
    if python is None:
        scope: dict = {}
        try:
            exec(compile(_PROBE, "<discomfort accelerator probe>", "exec"), scope)
        except ImportError:
            return None
        return scope["probe"]()
    env = _settings.child_env(env)
    key = (os.path.realpath(python), tuple(env.get(k) for k in _DEVICE_ENV))
    if key not in _answers:
        _answers[key] = _probe_child(python, env)
    return _answers[key]


_answers: dict[tuple, str | None] = {}


def _probe_child(python: str, env: dict) -> str | None:
    try:
        out = subprocess.run([python, "-c", _PROBE + "print(json.dumps(probe()))"], capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None  # ComfyUI's own start says what is wrong with this interpreter
    try:
        answer = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (ValueError, IndexError):
        return None
    return answer if isinstance(answer, str) else None


def use_cpu(cpu: bool | None, accelerator: str | None) -> bool:
    """Whether ComfyUI gets ``--cpu``: as forced by ``cpu``, else only where ``accelerator``
    (the probe's answer) is None."""
    if cpu is not None and not isinstance(cpu, bool):
        raise TypeError(f"cpu must be True, False or None (decide from the torch that runs ComfyUI), not {cpu!r}")
    return (accelerator is None) if cpu is None else cpu


def _is_discomfort_pack(folder: Path) -> bool:
    try:
        text = (folder / "__init__.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "DiscomfortPort" in text or "Discomfort node pack" in text


def tree_node_pack(comfy_path: Path) -> Path | None:
    """This project's node pack among the tree's own ``custom_nodes/`` (as ``discomfort
    install-comfyui`` places it), or None; ComfyUI skips folders named ``*.disabled``."""
    folder = comfy_path / "custom_nodes"
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.is_dir() and not entry.name.endswith(".disabled") and _is_discomfort_pack(entry):
            return entry
    return None


def packs_to_add(comfy_path: Path, custom_nodes: Sequence[os.PathLike | str] | None,
                 isolated: bool) -> list[Path]:
    """The node packs to load besides the tree's own: isolated, the given ones (default: this
    project's pack) and nothing else; otherwise this project's pack where the tree lacks it, then
    the given ones (another copy of this project's pack is left out where the tree has one:
    ComfyUI would load both)."""
    if isolated:
        return resolve_node_packs(custom_nodes)
    given = resolve_node_packs(custom_nodes) if custom_nodes is not None else []
    if tree_node_pack(comfy_path) is not None:
        return [p for p in given if not (p.is_dir() and _is_discomfort_pack(p))]
    own = default_node_pack()
    if own is None and not any(p.is_dir() and _is_discomfort_pack(p) for p in given):
        raise FileNotFoundError(
            f"{comfy_path / 'custom_nodes'} has no Discomfort node pack and none is installed with this "
            "package: run `discomfort install-comfyui`, pass custom_nodes=[...] or set DISCOMFORT_COMFY_NODES")
    out = [own] if own is not None and own not in given else []
    return out + [p for p in given if p not in out]
