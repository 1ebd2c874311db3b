"""Internal: the editor's Discomfort panel, run inside ComfyUI: its routes (`runner`), run tokens, slots and
events (`runs`), inputs and outputs on disk (`io`) and ComfyUI's cache of a run's outputs (`cache`)."""
