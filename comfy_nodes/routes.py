"""HTTP routes of the node pack (only when ComfyUI runs as a server): the node side's
(discomfort.nodes.routes) and the editor panel's (discomfort.panel.runner), which sits above both
the node side and the orchestrator side, so it is added here rather than by the node side."""

from discomfort.nodes.routes import register as _register
from discomfort.panel.runner import add_panel_routes

__all__ = ["register"]


def register() -> bool:
    return _register(also=[add_panel_routes])
