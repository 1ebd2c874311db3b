"""Talking to ComfyUI: in-process executor, HTTP client, server launcher.

Nothing here imports ComfyUI (or requests) until it is used.

* :class:`InProcessComfy` runs ComfyUI's own ``PromptExecutor`` in this process.
* :class:`ComfyServer` talks to a running server (``POST /prompt``, ``/ws``).
* :func:`launch_server` starts a local server.

Both that start ComfyUI run the given tree as its ``main.py`` would (its GPU, custom nodes,
models and folders; this project's node pack added where the tree lacks it), or with
``isolated=True`` only the given packs with temporary folders: see docs/COMFYUI.md.
* :func:`install_torchvision_shim` makes torchvision importable with the CPU torch.
"""

from __future__ import annotations

from ._common import cached_nodes
from ._tvshim import install as install_torchvision_shim
from .client import ComfyServer
from .inprocess import InProcessComfy
from .launcher import free_port, launch_server

__all__ = [
    "InProcessComfy",
    "ComfyServer",
    "launch_server",
    "free_port",
    "install_torchvision_shim",
    "cached_nodes",
]
