"""DiscomfortDataLoader: what run_sequential puts in place of an INPUT port."""

from discomfort.nodes.support import ANY, context_for, load_value


def _describe(exc, run_id, unique_id):
    return f"DiscomfortDataLoader: cannot load unique_id {unique_id!r} of run {run_id!r}: {exc}"


class DiscomfortDataLoader:
    """Loads the value stored under ``unique_id`` in the run ``run_id``.

    In a server attached to the run, a copy (read with pread, ``WorkflowContext.load_guarded``):
    the server outlives runs, and a chunk another process truncated must fail the prompt, not
    kill the server with SIGBUS. In the run's own process (in-process executor), zero-copy.

    Its fingerprint (IS_CHANGED) is the stored object's version, which is store-wide and never
    repeated: ComfyUI's cache reruns it exactly when the value changed. ComfyUI keeps it in the
    prompt as ``is_changed`` and takes one a prompt sends as is, so the run's prompt digest covers
    it (the orchestrator registers the version it will be: ``runs.run_digests``). A missing run
    or key is a node error naming them, never a silent default.
    """

    CATEGORY = "discomfort/internal"
    DESCRIPTION = "Loads a value from a discomfort run (inserted by run_sequential)."
    # Out of the editor's node library and search: run_sequential places it, users never do
    # (the frontend hides deprecated nodes by default).
    DEPRECATED = True
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("data",)
    FUNCTION = "load_data"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "run_id": ("STRING", {"default": ""}),
                "unique_id": ("STRING", {"default": ""}),
            },
            "hidden": {"prompt": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # ComfyUI gives IS_CHANGED no prompt, so this cannot check it; load_data does. A version
        # number is all it reveals. If this raised, ComfyUI would treat the node as changed.
        import discomfort

        run_id, unique_id = kwargs.get("run_id"), kwargs.get("unique_id")
        return discomfort.get_context(run_id).info(unique_id)["version"]

    def load_data(self, run_id, unique_id, prompt=None):
        import discomfort.errors as errors

        try:
            ctx = context_for(run_id, prompt)
            return (load_value(ctx, unique_id),)
        except errors.UnknownKeyError as exc:
            raise errors.UnknownKeyError(_describe(exc, run_id, unique_id)) from exc
        except (errors.UnknownRunError, errors.CorruptedStoreError) as exc:  # a truncated chunk among them
            raise type(exc)(_describe(exc, run_id, unique_id)) from exc


NODE_CLASS_MAPPINGS = {"DiscomfortDataLoader": DiscomfortDataLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DiscomfortDataLoader": "Discomfort Data Loader (internal)"}
