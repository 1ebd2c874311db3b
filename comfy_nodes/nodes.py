"""DiscomfortPort: where a value enters (INPUT) or leaves (OUTPUT) a workflow, keyed by unique_id."""

from discomfort.nodes.support import ANY, always_changed_token, context_for, save_value
from discomfort.nodes.support import port_mode as _resolve_mode


class DiscomfortPort:
    """Marks a port of a workflow.

    Its mode follows the graph: INPUT (no incoming link, feeds other nodes), OUTPUT (incoming
    link, nothing downstream), PASSTHRU (both). With a ``run_id`` (written into the prompt by
    ``discomfort.run_sequential``), in OUTPUT or PASSTHRU mode it saves its input
    into the run's WorkflowContext under ``unique_id`` and passes it through unchanged; it is then
    never served from ComfyUI's cache, so its value is always in the store. Without a run_id it
    is a plain pass-through, so workflows still run in the ComfyUI editor.
    """

    CATEGORY = "discomfort"
    DESCRIPTION = "A named port: values enter or leave the workflow here (discomfort run_sequential)."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("output_data",)
    FUNCTION = "process_port"
    OUTPUT_NODE = True  # a node that leads to no output node never runs

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unique_id": ("STRING", {"default": "port", "multiline": False}),
            },
            "optional": {
                "input_data": (ANY, {}),
            },
            "hidden": {
                "run_id": "STRING",
                "port_mode": "STRING",
                "prompt": "PROMPT",
                "node_id": "UNIQUE_ID",
            },
        }

    @classmethod
    def IS_CHANGED(cls, run_id=None, **kwargs):
        # With a run, always execute: the value must reach the store on every run even when
        # everything upstream comes from ComfyUI's cache.
        if run_id:
            return always_changed_token()
        return ""

    def process_port(self, unique_id, input_data=None, run_id=None, port_mode=None, prompt=None, node_id=None):
        if run_id:
            mode = _resolve_mode(prompt, node_id, port_mode)
            if mode in ("OUTPUT", "PASSTHRU"):
                save_value(context_for(run_id, prompt), unique_id, input_data)
        return (input_data,)


NODE_CLASS_MAPPINGS = {"DiscomfortPort": DiscomfortPort}
NODE_DISPLAY_NAME_MAPPINGS = {"DiscomfortPort": "Discomfort Port"}
