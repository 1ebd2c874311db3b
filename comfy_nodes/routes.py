"""HTTP routes of the node pack (only when ComfyUI runs as a server): see discomfort.nodes.routes."""

from discomfort.nodes.routes import register

__all__ = ["register"]
