"""Discomfort node pack for ComfyUI: DiscomfortPort and DiscomfortDataLoader.

A thin drop-in folder: the code lives in the ``discomfort`` package (``pip install
discomfort==0.1.0``, see requirements.txt); this folder only registers the nodes with ComfyUI.
Its folder name differs from the package name on purpose, so that ComfyUI never imports the
package a second time under another name.
"""

try:
    import discomfort  # noqa: F401
except ImportError as exc:  # pragma: no cover - shown in ComfyUI's log as IMPORT FAILED
    raise ImportError(
        "the Discomfort node pack needs the 'discomfort' package in ComfyUI's Python "
        "environment: pip install -r requirements.txt in this folder"
    ) from exc

from .nodes import NODE_CLASS_MAPPINGS as _PORT_NODES
from .nodes import NODE_DISPLAY_NAME_MAPPINGS as _PORT_NAMES
from .nodes_internal import NODE_CLASS_MAPPINGS as _INTERNAL_NODES
from .nodes_internal import NODE_DISPLAY_NAME_MAPPINGS as _INTERNAL_NAMES
from . import routes as _routes

NODE_CLASS_MAPPINGS = {**_PORT_NODES, **_INTERNAL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_PORT_NAMES, **_INTERNAL_NAMES}
# The editor's Discomfort panel (a sidebar tab): plain JS, served by ComfyUI under /extensions/.
WEB_DIRECTORY = "./web"

_routes.register()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
