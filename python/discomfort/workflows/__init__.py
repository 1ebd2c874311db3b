"""Workflows as files and as prompts: API and UI formats, ports, UI -> API as ComfyUI's frontend
converts (`format`, `widgets`, `subgraphs`, `ids`), and reading, planning and sending them (`tools`).

Public: `format` and `tools`; the others are internal."""

__all__ = ["format", "tools"]
